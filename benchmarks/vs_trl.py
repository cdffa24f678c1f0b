"""reopold against TRL's on-policy distillation trainers on identical work: sampled tokens per CPU-second.

Both train the bundled demo student from the demo teacher on the same arithmetic prompts (reopold's encoding), with
the same batch (32 prompts x 4 samples = 128 sequences per optimizer step), the same answer length (80 new tokens at
most, temperature 1, full distribution), fp32, one torch thread, one optimizer step per rollout, Hugging Face
``generate`` on both sides. Each run is a fresh subprocess; the two sides alternate, ``--rounds`` times.

Measured: CPU time (``time.process_time``, the whole process) between the ends of consecutive optimizer steps after
``--warmup`` steps, and the response tokens sampled in those steps (up to and including EOS). CPU time, not wall
time, because a loaded machine makes wall time meaningless; with one thread the two agree on an idle one.

    python benchmarks/vs_trl.py --rounds 3 --steps 4 --trl gkd --out bench.json

Needs TRL (``pip install 'reopold[trl]'``, trl 1.16). ``--trl`` picks GKDTrainer (lmbda=1: fully on-policy, the
generalized JSD on full distributions) or DistillationTrainer (reverse KL on full distributions); both score every
position with the full teacher distribution, as reopold's teacher pass does for the sampled tokens.

``--engine vllm`` samples with vLLM on both sides (reopold's colocated engine; TRL's ``use_vllm=True,
vllm_mode="colocate"``, which only DistillationTrainer has in trl 1.16); ``--trl-engine`` sets TRL's side apart.
Needs vLLM and TRL in one environment (docs/speed.md). TRL 1.16's colocated weight sync calls the vLLM model's
``load_weights``, which vLLM 0.32's CPU build refuses once it has repacked the linear weights (``'Parameter' object
has no attribute 'weight_loader'``); on TRL's side the sync is therefore replaced by the one reopold's engine uses
(the worker's ``reload_weights``, then the tied head re-packed), and everything else is TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

STEPS_PER_ROLLOUT = 1
PROMPTS, SAMPLES, NEW_TOKENS = 32, 4, 80


def _threads():
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    return torch


def run_reopold(steps: int, algo: str, engine: str, reuse: bool = True) -> dict:
    """``reopold train`` on the demo config, ``steps`` rollout steps; per-step CPU time and sampled tokens."""
    _threads()
    from reopold.cli import DEMO_CONFIG
    from reopold.config.loader import load_config
    from reopold.config.schema import TrainConfig
    from reopold.train import run as train_run
    from reopold.train.trainer import Trainer

    ends, tokens = [], []
    rollout, train_step = Trainer.rollout, Trainer.train_step

    def counted_rollout(self, problems):
        out = rollout(self, problems)
        tokens.append(int(out.completion_mask.sum()))
        return out

    def timed_step(self, step):
        record = train_step(self, step)
        ends.append(time.process_time())
        return record

    Trainer.rollout, Trainer.train_step = counted_rollout, timed_step
    Trainer.reuse_update_forward = reuse  # False: the separate pi_old pass, as before the update reused its forward
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"run.steps={steps}", "run.eval_every=0", f"run.save_every={steps}", "run.report=false",
                     "run.progress=false", f"run.output_dir={out}", "run.threads=1", f"algo.name={algo}",
                     f"rollout.engine={engine}", "run.overwrite=true"]  # fmt: skip
        if algo not in ("reopold", "rkl", "rkl_sg"):
            overrides.append("algo.two_phase=null")  # the demo config's REOPOLD switch means nothing to the others
        config = load_config(TrainConfig, DEMO_CONFIG, overrides)
        start = time.process_time()
        train_run.train(config)
    return {"side": f"reopold-{algo}", "step_ends": [e - start for e in ends], "tokens": tokens}


def trl_vllm_sync(generation) -> None:
    """TRL's ``VLLMGeneration.sync_weights`` for a colocated engine, done as reopold's engine does it (see the module
    docstring): the in-process worker reloads TRL's (name, tensor) pairs in place, then the tied head is re-packed."""
    from reopold.rollout.vllm import repack_shared_weights

    worker = generation.llm.llm_engine.model_executor.driver_worker
    worker.reload_weights(weights_iterator=list(generation._iter_named_params()))
    repack_shared_weights(worker.model_runner.get_model())
    generation.llm.reset_prefix_cache()


def run_trl(steps: int, trainer_name: str, engine: str = "hf") -> dict:
    """TRL's trainer on the same prompts, batch, length and precision; per-step CPU time and sampled tokens."""
    torch = _threads()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from reopold.cli import DEMO_CONFIG
    from reopold.config.loader import load_config
    from reopold.config.schema import TrainConfig
    from reopold.models.loading import resolve_model
    from reopold.registry import TASKS
    from reopold.tasks.prompts import PromptEncoder

    config = load_config(TrainConfig, DEMO_CONFIG, [])
    student_path, teacher_path = resolve_model("demo-student"), resolve_model("demo-teacher")
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    encode = PromptEncoder(tokenizer, config.data.chat_template)
    task = TASKS.get(config.data.task).from_config(config.data)
    problems = task.problems("train", PROMPTS * (steps + 1))
    rows = [encode(p.prompt) for p in problems for _ in range(SAMPLES)]  # n samples of a prompt: n rows
    dataset = Dataset.from_dict({"prompt_ids": rows})
    ends, tokens = [], []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.process_time())

    def collate(features):
        width = max(len(f["prompt_ids"]) for f in features)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(f["prompt_ids"])) + f["prompt_ids"] for f in features])
        mask = torch.tensor([[0] * (width - len(f["prompt_ids"])) + [1] * len(f["prompt_ids"]) for f in features])
        labels = torch.full_like(ids, -100)
        return {"prompts": ids, "prompt_attention_mask": mask, "input_ids": ids, "attention_mask": mask,
                "labels": labels, "prompt": [tokenizer.decode(f["prompt_ids"]) for f in features]}

    common = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PROMPTS * SAMPLES, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=config.optim.lr, lr_scheduler_type="constant", use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to=[], logging_steps=10_000, save_strategy="no", seed=0,
        dataloader_num_workers=0, max_grad_norm=1.0,
    )  # fmt: skip
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    if trainer_name == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        class OnPolicyGKD(GKDTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                # The prompt-only batch has no label tokens, so HF counts 0 items and the loss would be x / 0; None
                # makes GKD average over the generated tokens (its "batchmean" over labels != -100).
                return super().training_step(model, inputs, None)

        trainer_class = OnPolicyGKD
        original = GKDTrainer.generate_on_policy_outputs

        def counted(model, inputs, generation_config):
            ids, attention, labels = original(model, inputs, generation_config)
            tokens.append(int(attention[:, inputs["prompts"].shape[1] :].sum()))
            return ids, attention, labels

        GKDTrainer.generate_on_policy_outputs = staticmethod(counted)
        args = GKDConfig(**common, lmbda=1.0, beta=0.5, temperature=1.0, max_new_tokens=NEW_TOKENS)
        kwargs = {"data_collator": collate}
    else:
        from trl import DistillationConfig, DistillationTrainer

        trainer_class = DistillationTrainer
        dataset = Dataset.from_dict({"prompt": [tokenizer.decode(r) for r in rows]})
        vllm = {}
        if engine == "vllm":  # colocated, in this process; fp32 like the student; max_num_seqs = the batch
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            from trl.generation.vllm_generation import VLLMGeneration

            VLLMGeneration.sync_weights = trl_vllm_sync
            vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 128,
                    "vllm_gpu_memory_utilization": 0.05}
        args = DistillationConfig(**common, max_completion_length=NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0,
                                  beta=1.0, **vllm)
        kwargs = {}
        generate = student.generate

        def counted_generate(*a, **k):
            out = generate(*a, **k)
            sequences = out.sequences if hasattr(out, "sequences") else out
            width = (k.get("input_ids") if k.get("input_ids") is not None else a[0]).shape[1]
            from reopold.rollout import completion_mask_from

            new = sequences[:, width:]
            tokens.append(int((completion_mask_from(new, tokenizer.eos_token_id) & (new != tokenizer.pad_token_id)
                               | (new == tokenizer.eos_token_id)).sum()))
            return out

        student.generate = counted_generate
    trainer = trainer_class(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[StepEnds()], **kwargs)
    if engine == "vllm":
        sample = trainer.vllm_generation.generate

        def counted_sample(*a, **k):
            out = sample(*a, **k)  # (prompt_ids, completion_ids, logprobs, logprob_token_ids); EOS is in the ids
            tokens.append(sum(len(ids) for ids in out[1]))
            return out

        trainer.vllm_generation.generate = counted_sample
    start = time.process_time()
    trainer.train()
    return {"side": f"trl-{trainer_name}-{engine}", "step_ends": [e - start for e in ends], "tokens": tokens}


def steady(result: dict, warmup: int) -> dict:
    """Tokens per CPU-second over the steps after ``warmup`` (the first steps pay for lazy initialisation)."""
    ends, tokens = result["step_ends"], result["tokens"]
    if len(ends) <= warmup or len(tokens) < len(ends):
        raise RuntimeError(f"{result['side']}: {len(ends)} step ends, {len(tokens)} token counts")
    seconds = ends[-1] - ends[warmup - 1] if warmup else ends[-1]
    sampled = sum(tokens[warmup : len(ends)])
    steps = len(ends) - warmup
    return {"side": result["side"], "tokens_per_cpu_second": sampled / seconds, "cpu_seconds_per_step": seconds / steps,
            "tokens_per_step": sampled / steps}


def child(argv: list[str]) -> dict:
    """Run one side in a fresh interpreter (no state shared between runs) and read its JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{argv}: exit {out.returncode}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two sides")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the measurement")
    parser.add_argument("--trl", choices=("gkd", "distillation"), default="gkd")
    parser.add_argument("--algo", default="reopold", help="reopold's algorithm (the demo config's: reopold)")
    parser.add_argument("--engine", default="hf", choices=("hf", "vllm"), help="rollout engine of both sides")
    parser.add_argument("--trl-engine", choices=("hf", "vllm"), help="TRL's rollout engine (default: --engine)")
    parser.add_argument("--no-reuse", action="store_true", help="reopold: keep the separate pi_old pass")
    parser.add_argument("--out", help="write the runs and the summary here (JSON)")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side and print its JSON
    args = parser.parse_args()
    args.trl_engine = args.trl_engine or args.engine
    if args.trl_engine == "vllm" and args.trl != "distillation":
        parser.error("TRL samples with vLLM in DistillationTrainer only (trl 1.16): add --trl distillation")
    if args.side == "reopold":
        print(json.dumps(run_reopold(args.steps, args.algo, args.engine, reuse=not args.no_reuse)))
        return
    if args.side == "trl":
        print(json.dumps(run_trl(args.steps, args.trl, args.trl_engine)))
        return
    common = ["--steps", str(args.steps), "--trl", args.trl, "--algo", args.algo, "--engine", args.engine,
              "--trl-engine", args.trl_engine,
              *(["--no-reuse"] if args.no_reuse else [])]
    runs, ratios = [], []
    for round_ in range(args.rounds):
        pair = {}
        order = ("reopold", "trl") if round_ % 2 == 0 else ("trl", "reopold")  # neither side always goes first
        for side in order:
            pair[side] = steady(child(["--side", side, *common]), args.warmup)
            print(json.dumps({"round": round_, **pair[side]}), flush=True)
        ratios.append(pair["reopold"]["tokens_per_cpu_second"] / pair["trl"]["tokens_per_cpu_second"])
        runs.append(pair)
    summary = {"ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
               "ratios": ratios, "settings": vars(args) | {"prompts": PROMPTS, "samples": SAMPLES,
                                                          "max_new_tokens": NEW_TOKENS}}  # fmt: skip
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": runs, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
