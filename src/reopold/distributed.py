"""Sharded training (FSDP2 through accelerate): what changes when no rank holds the student's full weights.

Under DDP every rank holds a full student, so ``student.generate`` and ``student.save_pretrained`` work as they are.
Under FSDP2 each rank holds a shard of every parameter; a module's weights are all-gathered by hooks that run
around its forward. Three things follow, and this module holds them:

* Generation goes through the prepared (root) module's forward, ``TokenScorer(generate=...)``, so the root's own
  parameters are gathered, and with ``synced_gpus=True``: ranks whose answers ended keep joining the per-token
  all-gathers until every rank is done. :class:`ShardedLM` gives the rollout engine and the evaluation a model-like
  object that does this.
* Every rank takes part in what gathers weights: evaluation runs on all ranks (the same problems, so the same
  answers; the main rank logs), and saving collects the full state dict on all ranks before the main one writes.
* The optimizer state is saved as one full (unsharded) state dict keyed by parameter names and loaded back into the
  shards, so a resume may use another number of processes.
"""

from __future__ import annotations

import torch

from reopold.config import ConfigError


def sharding(accelerator) -> str | None:
    """``"fsdp2"`` when the student's parameters are sharded over ranks, None when every rank holds them all.

    Raises for the sharded set-ups this trainer does not run, before any model is loaded.
    """
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind == "FSDP":
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ConfigError(
                f"FSDP version {version} is not supported: set fsdp_version: 2 in the accelerate config "
                "(configs/accelerate/fsdp.yaml is one)"
            )
        return "fsdp2"
    if kind == "DEEPSPEED":
        plugin = accelerator.state.deepspeed_plugin
        stage = plugin.zero_stage if plugin is not None else None
        raise ConfigError(
            f"DeepSpeed (ZeRO stage {stage}) is not supported by reopold's trainer: its engine steps the optimizer "
            "inside backward(), which breaks the per-mini-batch updates with gradient accumulation. Shard with FSDP2 "
            "instead (configs/accelerate/fsdp.yaml: parameters, gradients and optimizer state, like ZeRO-3), or "
            "use plain data parallelism (configs/accelerate/ddp.yaml)"
        )
    return None


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


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
