"""Sharded training through accelerate (FSDP2, DeepSpeed ZeRO-2/3): what changes when ranks split the student.

Under DDP every rank holds a full student, so ``student.generate`` and ``student.save_pretrained`` work as they are.
Under FSDP2 and ZeRO-3 each rank holds a shard of every parameter; a module's weights are all-gathered by hooks that
run around its forward. Three things follow, and this module holds them:

* Generation goes through the prepared (root) module's forward, ``TokenScorer(generate=...)``, so the root's own
  parameters are gathered, and with ``synced_gpus=True``: ranks whose answers ended keep joining the per-token
  all-gathers until every rank is done. :class:`ShardedLM` gives the rollout engine and the evaluation a model-like
  object that does this.
* Every rank takes part in what gathers weights: evaluation runs on all ranks (the same problems, so the same
  answers; the main rank logs), and saving collects the full state dict on all ranks before the main one writes.
* The optimizer state is saved as one full (unsharded) state dict keyed by parameter names and loaded back into the
  shards, so a resume may use another number of processes. DeepSpeed's ZeRO optimizer has no such form: every
  rank's partition is saved (a list, in rank order), and a resume needs the same number of processes.

DeepSpeed also owns the optimizer step: accelerate's ``backward`` runs ``engine.step()`` (clipping, update) whenever
``sync_gradients`` is set, and the engine divides each loss by its ``gradient_accumulation_steps``.
:func:`configure_deepspeed` writes the trainer's batch sizes and clipping into the engine's config, and
:func:`end_of_update` marks the micro-batch after which the engine steps.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from reopold.config.loader import ConfigError


def deepspeed_stage(accelerator) -> int | None:
    """The ZeRO stage when accelerate runs DeepSpeed, else None."""
    if launch_kind(accelerator) != "DEEPSPEED":
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def sharding(accelerator) -> str | None:
    """``"fsdp2"`` or ``"zero3"`` when the student's parameters are sharded over ranks, None when every rank holds
    them all (one process, DDP, ZeRO-1/2).

    Raises for the sharded set-ups this trainer does not run, before any model is loaded.
    """
    if launch_kind(accelerator) == "FSDP":
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ConfigError(
                f"FSDP version {version} is not supported: set fsdp_version: 2 in the accelerate config "
                "(configs/accelerate/fsdp.yaml is one)"
            )
        return "fsdp2"
    return "zero3" if deepspeed_stage(accelerator) == 3 else None


@contextmanager
def whole_models(accelerator):
    """Load models whole inside this block. Under ZeRO-3 accelerate registers its DeepSpeed config with transformers,
    and ``from_pretrained`` then partitions every model as it loads (zero.Init, whatever zero3_init_flag says): the
    teacher too, which no engine would gather. The student is partitioned by ``accelerator.prepare`` instead."""
    if deepspeed_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def check_extension_locks(max_age: float = 600.0) -> None:
    """DeepSpeed builds some C++ ops on first use (on CPU: its shared-memory collectives) in torch's extensions folder
    (``$TORCH_EXTENSIONS_DIR``, else the per-user ``~/.cache/torch_extensions``), under a lock file that torch waits
    on forever; a build killed midway leaves that lock behind. One older than ``max_age`` seconds (a build takes about
    a minute) is stale: stop with one line saying how to clear it, instead of hanging."""
    import os
    import time
    from pathlib import Path

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > max_age:
            raise ConfigError(
                f"a stale lock {lock} ({age / 60:.0f} minutes old) from an interrupted DeepSpeed extension build would "
                f"make this run wait forever; delete it (rm {lock}) if no build is running, or set "
                "TORCH_EXTENSIONS_DIR to a fresh folder"
            )


def configure_deepspeed(accelerator, *, micro_batch_size: int, micro_batches: int, grad_clip: float) -> None:
    """Write the trainer's batch sizes and clipping into the DeepSpeed config, before ``accelerator.prepare``.

    ``micro_batches`` (micro-batches per update) becomes the engine's gradient_accumulation_steps, which it divides
    each loss by (the trainer multiplies it back: its losses are already normalised by the global token count).
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = micro_batches
    config["train_batch_size"] = micro_batch_size * micro_batches * accelerator.num_processes
    config["gradient_clipping"] = float(grad_clip) if grad_clip > 0 else 0.0
    if deepspeed_stage(accelerator) == 3:  # full weights for save_pretrained, gathered on the main rank
        config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def end_of_update(accelerator, last: bool) -> None:
    """Under DeepSpeed, let the engine step after this micro-batch's backward only when it is the update's last."""
    accelerator.gradient_state._set_sync_gradients(last)  # what accelerator.accumulate() sets, without its counter


def launch_kind(accelerator) -> str:
    """accelerate's distributed type as a plain string: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED, ..."""
    return str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))


def describe_launch(accelerator) -> str | None:
    """One line saying what accelerate made of a launch (None for a plain one-process run)."""
    kind, stage, sharded = launch_kind(accelerator), deepspeed_stage(accelerator), sharding(accelerator) is not None
    if kind == "NO":
        return None
    layout = f"ZeRO-{stage}" if stage else "FSDP2" if sharded else kind
    return (f"reopold: {accelerator.num_processes} process(es), {layout}, {accelerator.device}, mixed precision "
            f"{accelerator.mixed_precision}{', student sharded' if sharded else ''}")


def optimizer_format(accelerator) -> str:
    """How checkpoints of this launch hold the optimizer: ``per_rank`` (DeepSpeed: every rank's partition), ``full``
    (FSDP2: unsharded, keyed by parameter names) or ``torch`` (one process, DDP: the optimizer's own state dict)."""
    if deepspeed_stage(accelerator) is not None:
        return "per_rank"
    return "full" if sharding(accelerator) is not None else "torch"


def optimizer_state(accelerator, policy, optimizer) -> dict | list | None:
    """The optimizer state a checkpoint of this launch holds (see :func:`optimizer_format`); collective under
    FSDP2 and DeepSpeed (every rank calls it; the main rank gets the state)."""
    written = optimizer_format(accelerator)
    if written == "per_rank":
        return per_rank_optimizer_state(accelerator, optimizer)
    if written == "full":
        return full_optimizer_state(policy, optimizer)
    return optimizer.state_dict()


def load_optimizer_state(accelerator, policy, optimizer, saved: dict, checkpoint, *, expected: str) -> None:
    """Restore the optimizer from a checkpoint's trainer state in whichever form its run saved it, into a launch
    whose own form is ``expected``: a ``full`` state loads into shards or into a whole model; the others need the
    same kind of launch, else a ConfigError says which one."""
    written = saved.get("optimizer_format", "torch")
    if written == "full" and expected != "per_rank":
        load_full_optimizer_state(policy, optimizer, saved["optimizer"])
    elif written == expected == "per_rank":
        load_per_rank_optimizer_state(accelerator, optimizer, saved["optimizer"])
    elif written == expected == "torch":
        optimizer.load_state_dict(saved["optimizer"])
    else:
        names = {"torch": "one process or DDP", "full": "FSDP", "per_rank": "DeepSpeed"}
        raise ConfigError(f"{checkpoint} was written by a {names[written]} run; resume it under {names[written]}, "
                          f"not {names[expected]}")


class ShardedLM:
    """The student as ``HFRolloutEngine`` and ``evaluate`` see it, with generation routed through the prepared root
    module so FSDP's hooks gather the weights (see the module docstring). Every rank must call ``generate`` the same
    number of times."""

    def __init__(self, policy, lm):
        self.policy = policy  # the prepared TokenScorer (the FSDP root)
        self.lm = lm  # the HF model inside it

    @torch.no_grad()
    def generate(self, **kwargs):
        return self.policy(generate={**kwargs, "synced_gpus": True})

    def parameters(self):
        return self.policy.parameters()

    @property
    def training(self) -> bool:
        return self.lm.training

    def eval(self):
        self.lm.eval()
        return self

    def train(self, mode: bool = True):
        self.lm.train(mode)
        return self


def unwrap_name(name: str) -> str:
    """A prepared TokenScorer's parameter name as the HF model inside it names it."""
    return name[len("lm.") :] if name.startswith("lm.") else name


def full_model_state(accelerator, policy) -> dict[str, torch.Tensor] | None:
    """The student's full state dict (on the CPU) on the main rank, None on the others. Collective: every rank
    calls it."""
    state = accelerator.get_state_dict(policy)
    if not accelerator.is_main_process:
        return None
    return {unwrap_name(k): v for k, v in state.items()}


def full_optimizer_state(policy, optimizer) -> dict:
    """The optimizer's state, unsharded and keyed by parameter names, on the main rank ({} on the others).
    Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(policy, _inner(optimizer), options=options)


def load_full_optimizer_state(policy, optimizer, state: dict) -> None:
    """Load a state saved by :func:`full_optimizer_state` into this rank's shards (every rank passes the full
    state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(policy, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))


def per_rank_optimizer_state(accelerator, optimizer) -> list | None:
    """Every rank's optimizer partition (DeepSpeed ZeRO), on the CPU, as a list in rank order on the main rank (None
    on the others). Collective: every rank calls it."""
    state = _to_cpu(optimizer.state_dict())
    gathered = [None] * accelerator.num_processes if accelerator.is_main_process else None
    torch.distributed.gather_object(state, gathered, dst=0)
    return gathered


def load_per_rank_optimizer_state(accelerator, optimizer, states: list) -> None:
    if len(states) != accelerator.num_processes:
        raise ConfigError(
            f"this checkpoint holds DeepSpeed optimizer partitions of {len(states)} processes; resume it with "
            f"{len(states)} processes, not {accelerator.num_processes}"
        )
    optimizer.load_state_dict(states)  # the ZeRO optimizer takes every rank's partition and picks its own


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
