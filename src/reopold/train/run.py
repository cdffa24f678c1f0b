"""A training run from a config, as a short sequence of named builders: accelerator, run folder, prompts, models,
teacher, optimizer, resume, logger, engine, then the trainer.

Cheap checks come first (config, paths, prompt files, the run folder, vocabularies: ``train.preflight``), so a
mistake fails in seconds, not after the models have loaded.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from reopold.config.loader import ConfigError, save_config
from reopold.config.schema import TrainConfig
from reopold.errors import TrainingStopped
from reopold.models.loading import (
    apply_lora,
    check_output_size,
    freeze_vision,
    image_token_ids,
    is_adapter_dir,
    is_vision_model,
    load_model,
    load_processor,
    load_tokenizer,
    resolve_model,
)
from reopold.models.scorer import TokenScorer, plain_lm_head
from reopold.rollout import HFRolloutEngine, RolloutEngine, vision_options
from reopold.tasks import Task, build_task
from reopold.tasks.prompts import PromptEncoder, PromptSampler
from reopold.train.algorithms import build_algorithm
from reopold.train.checkpoint import load_state, set_rng_state
from reopold.train.distributed import (
    ShardedLM,
    check_extension_locks,
    configure_deepspeed,
    deepspeed_stage,
    describe_launch,
    load_optimizer_state,
    optimizer_format,
    sharding,
    whole_models,
)
from reopold.train.preflight import (
    CONFIG_FILE,
    check_launch_precision,
    check_trackers,
    prepare_run_dir,
    release_run_dir,
    resume_config,
)
from reopold.train.teachers import build_teachers, check_teacher_routes, describe, plan_teachers, report_spans
from reopold.train.trainer import Backends, Optimization, Prompts, Student, Trainer, TrainState

__all__ = ["resume_config", "train"]


def train(config: TrainConfig, *, resume: str | None = None, engine: RolloutEngine | None = None) -> Path:
    """Run (or resume) training; returns the run folder. ``engine`` replaces the student's rollout engine."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars would bury the training bar
    check_trackers(config)
    check_launch_precision(config)
    accelerator = build_accelerator(config, engine_given=engine is not None)
    run_dir, checkpoint = claim_run(config, resume, accelerator)
    try:
        return _train(config, run_dir, checkpoint, accelerator, engine)
    finally:
        if accelerator.is_main_process:
            release_run_dir(run_dir)


def _train(config: TrainConfig, run_dir: Path, checkpoint: Path | None, accelerator, engine) -> Path:
    set_threads(config, accelerator)
    source = StudentSource.of(config, checkpoint)
    task, prompts = build_prompts(config, accelerator)
    tokenizer, plans = check_models(config, source, accelerator)
    check_teacher_routes(config, prompts.sampler.problems + prompts.eval_problems)
    encode = build_encoder(config, tokenizer, prompts)
    episodes = build_run_episodes(config, task, tokenizer, encode)
    torch.manual_seed(config.run.seed)
    model = build_student_model(config, source, tokenizer, accelerator)
    teacher, teacher_engine = build_teachers(config, plans, tokenizer, task, prompts.sampler.problems, accelerator,
                                             preflight=checkpoint is None, student_encode=encode, episodes=episodes)
    if accelerator.is_main_process:  # each teacher's mode, once every pre-flight check has passed
        print("\n".join(describe(plan, tokenizer) for plan in plans), file=sys.stderr)
    if checkpoint is None and accelerator.is_main_process:  # the share of tokens in multi-token spans
        report_spans(teacher, plans, model, tokenizer, encode, prompts.sampler.problems[:16], config, accelerator)
    student, optimization = build_optimization(config, model, tokenizer, encode, accelerator)
    state = restore(config, run_dir, checkpoint, student, optimization, accelerator)
    logger = build_logger(config, run_dir, checkpoint, state, accelerator)
    own_engine = engine is None  # an engine passed in is closed by its owner
    if own_engine:
        engine = build_engine(config, student.generator, source.path, tokenizer, accelerator.device, encode=encode)
        engine = engine if episodes is None else episodes.wrap(engine, tokenizer)
    backends = Backends(engine=engine, teacher=teacher, task=task, teacher_engine=teacher_engine, episodes=episodes)
    trainer = Trainer(config, run_dir, accelerator=accelerator, student=student, backends=backends, prompts=prompts,
                      optimization=optimization, algorithm=build_algorithm(config, len(tokenizer)), logger=logger)
    trainer.state = state
    warn_if_oversubscribed(accelerator)
    try:
        trainer.fit()
    finally:
        logger.close()
        if own_engine:
            engine.close()  # a vLLM engine left to interpreter exit can abort the process
        if config.run.report and accelerator.is_main_process:
            from reopold.evaluation.report import write_report  # matplotlib: only when a report is written

            write_report(run_dir, title=f"{config.run_name}: {config.algo.name}")
    # Left to interpreter exit, gloo's threads sometimes abort the process. Only accelerate's own group: an
    # in-process vLLM engine passed in also initialises torch.distributed, and its owner closes it later.
    if accelerator.distributed_type != "NO" and torch.distributed.is_initialized():
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return run_dir


def claim_run(config: TrainConfig, resume: str | None, accelerator) -> tuple[Path, Path | None]:
    """The run folder, claimed by the main process (a second process on the same run is refused), and the
    checkpoint to resume from. Every process stops when the main one could not claim it."""
    failure = None
    try:
        run_dir, checkpoint = prepare_run_dir(config, resume, main=accelerator.is_main_process)
    except Exception as err:
        failure = err
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor(float(failure is not None), device=accelerator.device), "sum")
        if failure is None and float(failed) > 0:
            if accelerator.is_main_process:
                release_run_dir(run_dir)
            failure = TrainingStopped("another process could not prepare the run folder (see its message)")
    if failure is not None:
        raise failure
    accelerator.wait_for_everyone()
    return run_dir, checkpoint


def set_threads(config: TrainConfig, accelerator) -> None:
    """torch's CPU threads: run.threads, or the safe default (``auto_threads``)."""
    threads = config.run.threads or auto_threads()
    if threads:
        torch.set_num_threads(threads)


_warned_busy = False


def warn_if_oversubscribed(accelerator) -> None:
    """Once per process, as training starts: say so when other work competes for the CPU cores."""
    global _warned_busy
    busy = oversubscribed()
    if busy and accelerator.is_main_process and not _warned_busy:
        _warned_busy = True
        print(f"reopold: warning: {busy}", file=sys.stderr)


def auto_threads(cores: int | None = None, environ=None) -> int | None:
    """run.threads' default: 1 on 2 cores or fewer, else None (torch's default); None too when OMP_NUM_THREADS is
    set (the user chose). On 2 cores a second thread gains at most 2x on an idle machine, and on a shared one it lost
    about 10x: demo steps took 51-61 s with 2 threads, 4-7 s with 1, at load average 9-11 (docs/training.md)."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return None
    cores = cores or available_cores()
    return 1 if cores <= 2 else None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def oversubscribed(load: float | None = None, cores: int | None = None) -> str | None:
    """A warning when the 1-minute load average exceeds the cores (other jobs compete for them), else None."""
    if torch.cuda.is_available() and load is None:
        return None  # the work is on the GPU
    try:
        load = os.getloadavg()[0] if load is None else load
    except OSError:
        return None
    cores = cores or available_cores()
    if load <= cores:
        return None
    return (f"this machine is busy (load average {load:.1f} on {cores} cores): steps will be slower, and much slower "
            f"with more torch threads than free cores; torch uses {torch.get_num_threads()} (run.threads)")


def build_accelerator(config: TrainConfig, *, engine_given: bool):
    """accelerate's Accelerator for this launch; refuses set-ups the trainer does not run, configures DeepSpeed."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.run.mixed_precision)
    sharded = sharding(accelerator) is not None  # raises for set-ups the trainer does not run
    if sharded and config.rollout.engine != "hf" and not engine_given:
        raise ConfigError("rollout.engine=vllm cannot sync a sharded (FSDP, ZeRO-3) student's weights; use "
                          "rollout.engine=hf, or data parallelism (configs/accelerate/ddp.yaml, zero2.yaml)")
    launch = describe_launch(accelerator)
    if launch and accelerator.is_main_process:  # what accelerate made of a launch, before anything slow
        print(launch, file=sys.stderr)
    if deepspeed_stage(accelerator) is not None:
        check_extension_locks()
        rows = config.optim.mini_batch_prompts // accelerator.num_processes * config.rollout.samples_per_prompt
        configure_deepspeed(accelerator, micro_batch_size=config.optim.micro_batch_size,
                            micro_batches=math.ceil(rows / config.optim.micro_batch_size),
                            grad_clip=config.optim.grad_clip)
    if config.rollout.prompts_per_step % accelerator.num_processes:
        raise ConfigError(f"rollout.prompts_per_step must be a multiple of the {accelerator.num_processes} processes")
    return accelerator


@dataclass
class StudentSource:
    """Where the student's weights come from: student.model, or the checkpoint being resumed."""

    path: str
    adapters: Path | None  # a LoRA checkpoint holds only the adapters: the base weights come from student.model

    @classmethod
    def of(cls, config: TrainConfig, checkpoint: Path | None) -> StudentSource:
        adapters = checkpoint if checkpoint is not None and is_adapter_dir(checkpoint) else None
        path = str(checkpoint) if checkpoint is not None and adapters is None else config.student.model
        resolve_model(path)
        for spec in config.teacher_specs().values():
            if spec.url is None:
                resolve_model(spec.model)
        return cls(path, adapters)


def build_prompts(config: TrainConfig, accelerator) -> tuple[Task, Prompts]:
    """The task, the seeded training prompt order and the held-out problems; empty splits fail here."""
    task = build_task(config.data)
    train_problems = task.problems("train", config.data.train_problems)
    eval_problems = task.problems(config.data.eval_split, config.data.eval_problems)
    if not eval_problems:
        raise ValueError(f"the {config.data.eval_split} split holds no problems; add prompts to the file")
    sampler = PromptSampler(train_problems, config.rollout.prompts_per_step, config.run.seed)
    return task, Prompts(sampler=sampler, eval_problems=eval_problems)


def build_encoder(config: TrainConfig, tokenizer, prompts: Prompts):
    """Prompt text -> ids (PromptEncoder); for a vision-language student, a VisionPromptEncoder that renders image
    prompts with the student's processor, after dropping (counted) the prompts longer than data.max_prompt_tokens."""
    if not is_vision_model(config.student.model):
        return PromptEncoder(tokenizer, config.data.chat_template)
    from reopold.tasks.visual import VisionPromptEncoder

    encode = VisionPromptEncoder(load_processor(config.student.model), max_prompt_tokens=config.data.max_prompt_tokens)
    if config.data.max_prompt_tokens is not None:
        train_kept, train_dropped = encode.keep_fitting(prompts.sampler.problems)
        eval_kept, eval_dropped = encode.keep_fitting(prompts.eval_problems)
        if train_dropped or eval_dropped:
            print(f"reopold: dropped {train_dropped} training and {eval_dropped} held-out image prompts longer than "
                  f"data.max_prompt_tokens={config.data.max_prompt_tokens} (image tokens are never cut)",
                  file=sys.stderr)
        if not train_kept or not eval_kept:
            raise ValueError(f"no image prompt fits data.max_prompt_tokens={config.data.max_prompt_tokens}")
        prompts.sampler.problems, prompts.eval_problems = train_kept, eval_kept
    return encode


def build_run_episodes(config: TrainConfig, task: Task, tokenizer, encode):
    """The run's EpisodeSetup for a task with an environment (tool use, docs/tools.md), else None; a chat template
    that rewrites earlier turns is refused here, before any model loads. A vision-language student's episodes may
    hold images in the prompt and in observations."""
    from reopold.rollout.episodes import build_episodes

    rollout = config.rollout
    episodes = build_episodes(task, tokenizer, chat_template=bool(getattr(encode, "use_template", False)),
                              max_turns=rollout.max_turns, max_episode_tokens=rollout.max_episode_tokens,
                              step_timeout=rollout.step_timeout, processor=getattr(encode, "processor", None))
    if episodes is None and rollout.max_turns > 1:
        raise ConfigError(f"rollout.max_turns={rollout.max_turns} needs a task with an environment (tool use); the "
                          f"task {task.name!r} has none: set rollout.max_turns 1 or pick such a task (docs/tools.md)")
    if episodes is not None and episodes.turn_format.multimodal and rollout.engine != "hf":
        raise ConfigError("a vision-language student's episodes are sampled with rollout.engine=hf only")
    return episodes


def check_vision_pair(student: str, teacher: str, *, served: bool = False) -> None:
    """A vision-language student needs a vision-language teacher giving its image placeholders the same ids (the
    teacher scores the student's token ids and processed images)."""
    student_vision = is_vision_model(student)
    if served and student_vision:
        raise ConfigError("a vision-language student with teacher.url: the teacher server is sent token ids only, "
                          "not images, so it would score blind; use a local teacher (teacher.model)")
    if served:
        return
    teacher_vision = is_vision_model(teacher)
    if student_vision != teacher_vision:
        which = (student, teacher) if student_vision else (teacher, student)
        raise ValueError(f"{which[0]!r} is a vision-language model but {which[1]!r} is text-only; student and "
                         "teacher must both see the images")
    if image_token_ids(student) != image_token_ids(teacher):
        raise ValueError(f"student {student!r} and teacher {teacher!r} use different image token ids "
                         f"({image_token_ids(student)} vs {image_token_ids(teacher)}); use one model family")


def check_models(config: TrainConfig, source: StudentSource, accelerator):
    """The student's tokenizer and each teacher's mode (the student's vocabulary: exact; another tokenizer: span
    alignment), decided before any weights load; served teachers are reached and checked here."""
    tokenizer = load_tokenizer(source.path)
    for spec in config.teacher_specs().values():  # image prompts: both see the images, with the same tokens
        check_vision_pair(config.student.model, spec.model, served=spec.url is not None)
    return tokenizer, plan_teachers(config, tokenizer, source.path)


def build_student_model(config: TrainConfig, source: StudentSource, tokenizer, accelerator):
    """The student's HF model, with activation checkpointing and LoRA as configured, in eval mode."""
    with whole_models(accelerator):
        model = load_model(source.path, dtype=config.student.dtype, device=accelerator.device)
    if config.student.gradient_checkpointing:
        # transformers >= 5.24 renamed gradient checkpointing to activation checkpointing.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if config.lora.r > 0:
        model = apply_lora(model, config.lora, source.adapters, freeze_vision=config.student.freeze_vision)
    elif config.student.freeze_vision:
        freeze_vision(model)  # a no-op for text-only models
    model.eval()  # train mode (dropout, checkpointing) only inside updates: see Trainer.update
    check_output_size(model, tokenizer, source.path)
    return model


def build_optimization(config: TrainConfig, model, tokenizer, encode, accelerator) -> tuple[Student, Optimization]:
    """The scorer around the student, AdamW with linear warmup, both prepared by accelerate."""
    policy = TokenScorer(model, temperature=config.rollout.temperature)
    if deepspeed_stage(accelerator) == 3 and plain_lm_head(model):
        import deepspeed

        # The chunked log-prob path reads the LM head's weight inside the scorer's forward, not the head's own.
        deepspeed.zero.register_external_parameter(policy, model.get_output_embeddings().weight)
    optim = config.optim
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2),
                                  weight_decay=optim.weight_decay)
    warmup = optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / warmup) if warmup else 1.0)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    generator = ShardedLM(policy, model) if sharding(accelerator) is not None else model
    student = Student(policy=policy, model=model, generator=generator, tokenizer=tokenizer, encode=encode)
    return student, Optimization(optimizer=optimizer, scheduler=scheduler)


def restore(config: TrainConfig, run_dir: Path, checkpoint: Path | None, student: Student,
            optimization: Optimization, accelerator) -> TrainState:
    """Write the run's config; on resume, load the optimizer, scheduler, counters and RNG of the checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        save_config(config, run_dir / CONFIG_FILE)
    if checkpoint is None:
        return TrainState()
    saved = load_state(checkpoint)
    load_optimizer_state(accelerator, student.policy, optimization.optimizer, saved, checkpoint,
                         expected=optimizer_format(accelerator))
    optimization.scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    return TrainState(**saved["train_state"])


def build_logger(config: TrainConfig, run_dir: Path, checkpoint: Path | None, state: TrainState, accelerator):
    """metrics.jsonl (+ TensorBoard / W&B) on the main process; nothing elsewhere."""
    from reopold.train.tracking import MetricsLogger

    if not accelerator.is_main_process:
        return NullLogger()
    wandb = {"project": config.run.wandb_project, "name": config.run_name} if config.run.wandb_project else None
    return MetricsLogger(run_dir, tensorboard=config.run.tensorboard, wandb=wandb, resume=checkpoint is not None,
                         truncate_after_step=state.step if checkpoint is not None else None)


class NullLogger:
    """What processes other than the main one log to: nothing."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def build_engine(config: TrainConfig, student, student_path: str, tokenizer, device, *, encode=None):
    """The student's sampler: transformers generate, or vLLM (colocated, or a TRL vllm-serve server)."""
    rollout = config.rollout
    if rollout.engine == "hf":
        return HFRolloutEngine(student, tokenizer, max_new_tokens=rollout.max_new_tokens,
                               temperature=rollout.temperature, **vision_options(encode))
    if getattr(encode, "multimodal", False):
        raise ConfigError("image prompts are sampled with rollout.engine=hf only (vLLM's multimodal path is not "
                          "wired in yet)")
    from reopold.rollout.vllm import VLLMRolloutEngine

    if rollout.vllm_url:
        engine = VLLMRolloutEngine.server(rollout.vllm_url, tokenizer, max_new_tokens=rollout.max_new_tokens,
                                          temperature=rollout.temperature, device=device)
    else:
        if torch.cuda.is_available():
            memory = {"gpu_memory_utilization": rollout.vllm_gpu_memory}
        else:  # CPU build: a fixed KV cache, and no torch.compile (minutes of start-up for no gain at this size)
            memory = {"kv_cache_memory_bytes": rollout.vllm_cpu_kv_cache_mb << 20, "enforce_eager": True}
        # Sampled-token log-probs as pi_old only where they match the trainer's (float32: to 5e-7, docs/vllm.md).
        exact = config.student.dtype == "float32" and config.run.mixed_precision == "no"
        engine = VLLMRolloutEngine.offline(resolve_model(student_path), tokenizer,
                                           max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                           device=device, dtype=config.student.dtype, skip_tokenizer_init=True,
                                           seed=config.run.seed, logprobs=rollout.engine_logprobs and exact,
                                           **memory)
    engine.sync_weights(student)  # a resumed run's weights, not the ones on disk at student.model
    return engine
