"""One process of the data-parallel equivalence test (run directly, or by torchrun with 2 gloo ranks).

Rollouts come from a scripted engine (the task's gold solutions, one per valid path), so one process and two
ranks train on exactly the same global batch and only the distributed reductions differ.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from reopold.config.loader import from_dict
from reopold.config.schema import TrainConfig
from reopold.rollout import build_rollout
from reopold.tasks import ArithmeticTask
from reopold.train.run import resume_config, train


class ScriptedEngine:
    """Sample i of a prompt is its gold solution along path i, with a wrong final answer for odd i (so outcome
    rewards differ within each group)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.task = ArithmeticTask(digits=(3, 2))

    def generate(self, prompt_ids, problems, *, num_samples=1):
        rows, responses, row_problems = [], [], []
        for ids, problem in zip(prompt_ids, problems, strict=True):
            paths = self.task.paths(problem)
            for i in range(num_samples):
                text = self.task.solution(problem, path=paths[i % len(paths)])
                if i % 2:
                    work, answer = text.rsplit(":", 1)
                    text = f"{work}:{int(answer) + 1}"
                rows.append(ids)
                responses.append(self.tokenizer(text)["input_ids"] + [self.tokenizer.eos_token_id])
                row_problems.append(problem)
        return build_rollout(rows, responses, row_problems, pad_token_id=self.tokenizer.pad_token_id,
                             eos_token_id=self.tokenizer.eos_token_id, tokenizer=self.tokenizer)

    def sync_weights(self, model) -> None:
        """Scripted answers do not depend on the weights."""


def force_fsdp_on_cpu() -> None:
    """accelerate lets FSDP run only on GPU-like devices; torch's FSDP2 itself runs on CPU over gloo. Set the
    environment ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` sets, and make accelerate take this
    gloo process group for a GPU one, so the sharded path (FSDP2's hooks, collectives and state dicts) runs here."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ.update({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                       "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_RESHARD_AFTER_FORWARD": "true",
                       "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"})
    state = PartialState(cpu=True)
    if state.num_processes > 1:
        state.distributed_type = DistributedType.MULTI_GPU


def deepspeed_on_cpu(stage: int) -> None:
    """The environment ``accelerate launch`` sets for a DeepSpeed config of this ZeRO stage. DeepSpeed runs on the
    CPU over gloo (its CPU accelerator), but accelerate turns DeepSpeed off for ``Accelerator(cpu=True)`` and picks
    no process-group backend without a GPU: the trainer's Accelerator is built with the gloo backend instead."""
    import accelerate
    from accelerate.utils import InitProcessGroupKwargs

    os.environ.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
                       "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "ACCELERATE_GRADIENT_CLIPPING": "1.0",
                       "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"})
    original = accelerate.Accelerator

    def gloo_accelerator(*, cpu=False, **kwargs):  # cpu=True (the trainer's choice without a GPU) is dropped
        return original(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)

    accelerate.Accelerator = gloo_accelerator


def nan_loss_at(step: int) -> None:
    """Rank 0's loss is NaN in every update of rollout step ``step`` (0-based), the scores staying finite."""
    import torch

    import reopold.train.run

    build = reopold.train.run.build_algorithm

    def build_with_nan(config, vocab_size):
        algorithm = build(config, vocab_size)
        shape, loss, current = algorithm.shape, algorithm.loss, {}

        def record_step(scored, *, step, gather):
            current["step"] = step
            return shape(scored, step=step, gather=gather)

        def nan_loss(*args):
            value, metrics = loss(*args)
            rank0 = torch.distributed.is_initialized() and torch.distributed.get_rank() == 0
            return (value * float("nan") if rank0 and current["step"] == step else value), metrics

        algorithm.shape, algorithm.loss = record_step, nan_loss
        return algorithm

    reopold.train.run.build_algorithm = build_with_nan


def main() -> None:
    """ddp_worker.py CONFIG.json [--fsdp | --zero STAGE] [--resume RUN_DIR --steps N] [--nan-loss-at STEP]"""
    args = sys.argv[1:]
    if "--nan-loss-at" in args:
        nan_loss_at(int(args[args.index("--nan-loss-at") + 1]))
    if "--fsdp" in args:
        force_fsdp_on_cpu()
    if "--zero" in args:
        deepspeed_on_cpu(int(args[args.index("--zero") + 1]))
    resume = args[args.index("--resume") + 1] if "--resume" in args else None
    if resume:
        config = resume_config(Path(resume), [f"run.steps={args[args.index('--steps') + 1]}"])
    else:
        config = from_dict(TrainConfig, json.loads(Path(args[0]).read_text()))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.student.model)
    train(config, resume=resume, engine=ScriptedEngine(tokenizer))


if __name__ == "__main__":
    main()
