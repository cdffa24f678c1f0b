"""A training run from a config: pre-flight checks, loading, resuming, then the trainer.

Cheap checks come first (config, paths, prompt files, the run folder, vocabularies), so a mistake fails in
seconds, not after the models have loaded.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import torch

from reopold.algorithms import build_algorithm
from reopold.checkpoint import latest_checkpoint, load_state, set_rng_state
from reopold.config import ConfigError, load_config, save_config
from reopold.data import PromptEncoder, PromptSampler, build_task
from reopold.distributed import (
    ShardedLM,
    configure_deepspeed,
    deepspeed_stage,
    describe_launch,
    load_optimizer_state,
    optimizer_format,
    sharding,
    whole_models,
)
from reopold.models import (
    apply_lora,
    check_output_size,
    check_same_vocabulary,
    is_adapter_dir,
    load_model,
    load_tokenizer,
    resolve_model,
)
from reopold.remote_teacher import RemoteTeacher
from reopold.rollout import HFRolloutEngine
from reopold.scoring import LocalTeacher, TokenScorer, plain_lm_head
from reopold.train_config import TrainConfig
from reopold.trainer import Trainer, TrainState

CONFIG_FILE = "config.yaml"


def prepare_run_dir(config: TrainConfig, resume: str | None, *, main: bool = True) -> tuple[Path, Path | None]:
    """The run folder, and the checkpoint to resume from (None for a fresh run). Only the main process deletes."""
    if resume is not None:
        run_dir = Path(resume)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"{resume} has no complete checkpoint to resume from")
        return run_dir, checkpoint
    run_dir = Path(config.run.output_dir) / config.run_name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not config.run.overwrite:
            raise FileExistsError(
                f"run folder {run_dir} already exists. Resume it with `reopold train --resume {run_dir}`, "
                "choose another --run.name, or pass --run.overwrite true to start it over"
            )
        if main:
            shutil.rmtree(run_dir)
    return run_dir, None


def resume_config(run_dir: Path, overrides: list[str]) -> TrainConfig:
    """The saved config of a run; only run.* keys may change on resume (e.g. run.steps to train longer)."""
    bad = [o for o in overrides if not o.lstrip("-").startswith("run.")]
    if bad:
        raise ConfigError(f"only run.* keys can change when resuming; got {bad[0]!r}")
    return load_config(TrainConfig, run_dir / CONFIG_FILE, overrides)


def preflight_teacher(teacher_lm, tokenizer, task, problems, encode, max_new_tokens: int) -> float:
    """The teacher's greedy accuracy on a few training problems; 0 means the checker or the data is wrong."""
    engine = HFRolloutEngine(teacher_lm, tokenizer, max_new_tokens=max_new_tokens, do_sample=False)
    rollout = engine.generate([encode(p.prompt) for p in problems], problems)
    accuracy = sum(task.check(p, t) for p, t in zip(problems, rollout.texts, strict=True)) / len(problems)
    if accuracy == 0:
        raise ValueError(
            f"the task's checker rejected all {len(problems)} of the teacher's greedy answers to training prompts "
            f"(e.g. {rollout.texts[0][:200]!r} for answer {problems[0].answer!r}). Check data.answer_key, the answer "
            "format, and rollout.max_new_tokens"
        )
    return accuracy


class NullLogger:
    """What processes other than the main one log to: nothing."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def build_engine(config: TrainConfig, student, student_path: str, tokenizer, device):
    """The student's sampler: transformers generate, or vLLM (colocated, or a TRL vllm-serve server)."""
    rollout = config.rollout
    if rollout.engine == "hf":
        return HFRolloutEngine(student, tokenizer, max_new_tokens=rollout.max_new_tokens,
                               temperature=rollout.temperature)
    from reopold.vllm_engine import VLLMRolloutEngine

    if rollout.vllm_url:
        engine = VLLMRolloutEngine.server(rollout.vllm_url, tokenizer, max_new_tokens=rollout.max_new_tokens,
                                          temperature=rollout.temperature, device=device)
    else:
        if torch.cuda.is_available():
            memory = {"gpu_memory_utilization": rollout.vllm_gpu_memory}
        else:  # CPU build: a fixed KV cache, and no torch.compile (minutes of start-up for no gain at this size)
            memory = {"kv_cache_memory_bytes": rollout.vllm_cpu_kv_cache_mb << 20, "enforce_eager": True}
        engine = VLLMRolloutEngine.offline(resolve_model(student_path), tokenizer,
                                           max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                           device=device, dtype=config.student.dtype, skip_tokenizer_init=True,
                                           seed=config.run.seed, **memory)
    engine.sync_weights(student)  # a resumed run's weights, not the ones on disk at student.model
    return engine


def teacher_api_key(config: TrainConfig) -> str | None:
    name = config.teacher.api_key_env
    if name is None:
        return None
    if not os.environ.get(name):
        raise ValueError(f"teacher.api_key_env names ${name}, which is not set; export it with the server's key")
    return os.environ[name]


def check_launch_precision(config: TrainConfig) -> None:
    """run.mixed_precision is the precision used; an accelerate launch config asking for another one fails here
    instead of being silently overridden."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no" and launched != config.run.mixed_precision:
        raise ConfigError(
            f"the accelerate launch config asks for mixed_precision {launched}, but run.mixed_precision is "
            f"{config.run.mixed_precision!r}; reopold's setting is the one used: pass --run.mixed_precision "
            f"{launched} (or set mixed_precision: 'no' in the accelerate config)"
        )


def check_trackers(config: TrainConfig) -> None:
    """Fail before loading anything when a requested logger is not installed."""
    import importlib.util

    wanted = {"tensorboard": config.run.tensorboard, "wandb": bool(config.run.wandb_project)}
    for module, asked in wanted.items():
        if asked and importlib.util.find_spec(module) is None:
            raise ImportError(f"run.{'tensorboard' if module == 'tensorboard' else 'wandb_project'} needs {module}: "
                              "pip install 'reopold[tracking]'")


def train(config: TrainConfig, *, resume: str | None = None, engine=None) -> Path:
    """Run (or resume) training; returns the run folder.

    ``engine`` replaces the student's rollout engine (anything with RolloutEngine's ``generate``); by default
    Hugging Face ``generate``.
    """
    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars would bury the training bar

    from reopold.report import write_report
    from reopold.tracking import MetricsLogger

    check_trackers(config)
    check_launch_precision(config)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.run.mixed_precision)
    sharded = sharding(accelerator) is not None  # raises for set-ups the trainer does not run
    if sharded and config.rollout.engine != "hf" and engine is None:
        raise ConfigError("rollout.engine=vllm cannot sync a sharded (FSDP, ZeRO-3) student's weights; use "
                          "rollout.engine=hf, or data parallelism (configs/accelerate/ddp.yaml, zero2.yaml)")
    zero_stage = deepspeed_stage(accelerator)
    launch = describe_launch(accelerator)
    if launch and accelerator.is_main_process:  # what accelerate made of a launch, before anything slow
        print(launch, file=sys.stderr)
    if zero_stage is not None:
        rows = config.optim.mini_batch_prompts // accelerator.num_processes * config.rollout.samples_per_prompt
        configure_deepspeed(accelerator, micro_batch_size=config.optim.micro_batch_size,
                            micro_batches=math.ceil(rows / config.optim.micro_batch_size),
                            grad_clip=config.optim.grad_clip)
    run_dir, checkpoint = prepare_run_dir(config, resume, main=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    # A LoRA checkpoint holds only the adapters: the base weights come from student.model.
    adapters = checkpoint if checkpoint is not None and is_adapter_dir(checkpoint) else None
    student_path = str(checkpoint) if checkpoint is not None and adapters is None else config.student.model
    remote = config.teacher.url is not None
    resolve_model(student_path)
    if not remote:
        resolve_model(config.teacher.model)
    task = build_task(config.data)
    train_problems = task.problems("train", config.data.train_problems)
    eval_problems = task.problems(config.data.eval_split, config.data.eval_problems)
    if not eval_problems:
        raise ValueError(f"the {config.data.eval_split} split holds no problems; add prompts to the file")
    if config.run.threads:
        torch.set_num_threads(config.run.threads)

    tokenizer = load_tokenizer(student_path)
    if remote:
        teacher = RemoteTeacher(config.teacher.url, config.teacher.model, timeout=config.teacher.timeout,
                                retries=config.teacher.retries, backoff=config.teacher.backoff,
                                batch_size=config.teacher.micro_batch_size, api_key=teacher_api_key(config))
        teacher.check_tokenizer(tokenizer)  # same ids for a probe text, or a clear error before any loading
    else:
        check_same_vocabulary(tokenizer, load_tokenizer(config.teacher.model), student_path, config.teacher.model)
    encode = PromptEncoder(tokenizer, config.data.chat_template)
    if config.rollout.prompts_per_step % accelerator.num_processes:
        raise ConfigError(f"rollout.prompts_per_step must be a multiple of the {accelerator.num_processes} processes")

    torch.manual_seed(config.run.seed)
    with whole_models(accelerator):
        student = load_model(student_path, dtype=config.student.dtype, device=accelerator.device)
    if config.student.gradient_checkpointing:
        # transformers >= 5.24 renamed gradient checkpointing to activation checkpointing.
        enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
        enable()
    if config.lora.r > 0:
        student = apply_lora(student, config.lora, adapters)
    student.eval()  # train mode (dropout, checkpointing) only inside updates: see Trainer.update
    check_output_size(student, tokenizer, student_path)
    teacher_engine = None
    if not remote:
        with whole_models(accelerator):
            teacher_lm = load_model(config.teacher.model, dtype=config.teacher.dtype, device=accelerator.device,
                                    trainable=False)
        check_output_size(teacher_lm, tokenizer, config.teacher.model)
        probe = train_problems[: config.data.preflight_problems]
        if checkpoint is None and probe and all(p.answer is not None for p in probe):
            preflight_teacher(teacher_lm, tokenizer, task, probe, encode, config.rollout.max_new_tokens)
        teacher = LocalTeacher(teacher_lm, temperature=config.teacher.temperature,
                               micro_batch_size=config.teacher.micro_batch_size)
        teacher_engine = HFRolloutEngine(teacher_lm, tokenizer, max_new_tokens=config.rollout.max_new_tokens,
                                         temperature=config.rollout.temperature)
    policy = TokenScorer(student, temperature=config.rollout.temperature)
    if zero_stage == 3 and plain_lm_head(student):
        import deepspeed

        # The chunked log-prob path reads the LM head's weight inside the scorer's forward, not the head's own.
        deepspeed.zero.register_external_parameter(policy, student.get_output_embeddings().weight)
    optim = config.optim
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2),
                                  weight_decay=optim.weight_decay)
    warmup = optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / warmup) if warmup else 1.0)
    policy, optimizer = accelerator.prepare(policy, optimizer)

    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        save_config(config, run_dir / CONFIG_FILE)
    state = TrainState()
    if checkpoint is not None:
        saved = load_state(checkpoint)
        load_optimizer_state(accelerator, policy, optimizer, saved, checkpoint, expected=optimizer_format(accelerator))
        scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(**saved["train_state"])
        set_rng_state(saved["rng"])
    logger = NullLogger()
    if accelerator.is_main_process:
        wandb = {"project": config.run.wandb_project, "name": config.run_name} if config.run.wandb_project else None
        logger = MetricsLogger(run_dir, tensorboard=config.run.tensorboard, wandb=wandb, resume=checkpoint is not None,
                               truncate_after_step=state.step if checkpoint is not None else None)
    generator = ShardedLM(policy, student) if sharded else student  # what generates: rollouts, evaluation
    own_engine = engine is None
    if own_engine:
        engine = build_engine(config, generator, student_path, tokenizer, accelerator.device)
    trainer = Trainer(
        config, run_dir, accelerator=accelerator, policy=policy, student=student, tokenizer=tokenizer,
        teacher=teacher, engine=engine, teacher_engine=teacher_engine, task=task,
        sampler=PromptSampler(train_problems, config.rollout.prompts_per_step, config.run.seed),
        eval_problems=eval_problems, encode=encode, algorithm=build_algorithm(config, len(tokenizer)),
        logger=logger, optimizer=optimizer, scheduler=scheduler, generator=generator,
    )  # fmt: skip
    trainer.state = state
    try:
        trainer.fit()
    finally:
        logger.close()
        if own_engine and hasattr(engine, "close"):
            engine.close()  # a vLLM engine left to interpreter exit can abort the process
        if config.run.report and accelerator.is_main_process:
            write_report(run_dir, title=f"{config.run_name}: {config.algo.name}")
    # Left to interpreter exit, gloo's threads sometimes abort the process. Only accelerate's own group: an
    # in-process vLLM engine passed in also initialises torch.distributed, and its owner closes it later.
    if accelerator.distributed_type != "NO" and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return run_dir
