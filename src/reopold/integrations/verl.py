"""REOPOLD as a verl distillation loss: ``distillation.distillation_loss.loss_mode=reopold``.

Registered in verl's distillation-loss registry when verl is imported (entry point ``verl.plugins``, so every
Ray worker has it), or with ``VERL_USE_EXTERNAL_MODULES=reopold.integrations.verl``. docs/integrations.md lists
the verl settings it needs and what differs from reopold's own trainer.

How verl uses it (``verl.trainer.distillation.losses.distillation_loss``, verl 0.9): the function returns a per-token
loss L; with ``use_policy_gradient: true`` verl trains its PPO-clipped "vanilla" policy loss on the advantage -L,
aggregated with ``token-mean`` over the mini-batch's valid response tokens:

    loss = sum_valid clip-min(rho * A) / N_valid                      (N_valid: every valid token of the mini-batch)

REOPOLD's Eq. 10 divides by the kept tokens instead. So A is REOPOLD's advantage (``distillation_shaping``) on
kept tokens, 0 elsewhere, times N_valid / N_kept:

    sum_valid clip-min(rho * R_hat * M * N_valid / N_kept) / N_valid = sum_kept clip-min(rho * R_hat) / N_kept

(the clip acts on rho, and a positive factor moves through min). N_kept is all-reduced over the ranks, so it is
exact whenever a micro-batch is the whole per-rank mini-batch (``ppo_micro_batch_size_per_gpu`` =
``ppo_mini_batch_size * rollout.n / n_gpus``, no dynamic batch size); with several micro-batches per mini-batch each
uses its own kept fraction (metric ``reopold/normaliser_exact`` = 0 then).

Settings verl's config cannot carry (its dataclasses reject unknown keys) come from environment variables, read
when the loss runs: REOPOLD_SWITCH_STEP (T_switch, required), REOPOLD_LAM (0.3), REOPOLD_BETA (0.2),
REOPOLD_REWARD_FLOOR (1), REOPOLD_ENTROPY_SELECTION (1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

from reopold import core

TESTED_VERL = (">=0.9.1", "<0.10")


def _check_verl_version(installed: str) -> None:
    """verl's distillation-loss interface is young and changes between minor releases: refuse untested ones."""
    from packaging.version import Version

    low, high = (Version(bound.lstrip("<>=")) for bound in TESTED_VERL)
    if not low <= Version(installed) < high:
        raise ImportError(
            f"reopold.integrations.verl was tested with verl{','.join(TESTED_VERL)} (its distillation-loss "
            f"registry and batch layout); verl {installed} is installed. Install a tested version with "
            f"`pip install 'verl{','.join(TESTED_VERL)}'`."
        )


try:
    _check_verl_version(version("verl"))
except PackageNotFoundError as error:
    raise ImportError(f"reopold.integrations.verl needs verl{','.join(TESTED_VERL)}") from error

from verl.trainer.distillation.losses import (  # noqa: E402  (after the version check)
    DistillationLossSettings,
    register_distillation_loss,
)
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.metric import AggregationType, Metric  # noqa: E402
from verl.workers.utils.padding import no_padding_2_padding  # noqa: E402

LOSS_MODE = "reopold"
FSDP_STRATEGIES = ("fsdp", "fsdp2", "veomni")


@dataclass(frozen=True)
class REOPOLDSettings:
    """REOPOLD's settings for the verl loss (docs/algorithm.md)."""

    switch_step: int  # T_switch of Eq. 9/10, in training steps (0 = refinement from the first step)
    lam: float = 0.3  # lambda of the reward floor log(lam)/(1-lam), Eq. 5/7
    beta: float = 0.2  # fraction of valid tokens kept in refinement, Eq. 8
    reward_floor: bool = True  # R_hat = max(R, floor), Eq. 7
    entropy_selection: bool = True  # refinement keeps H >= tau_beta, Eq. 8/10

    @classmethod
    def from_env(cls, environ=None) -> REOPOLDSettings:
        environ = os.environ if environ is None else environ
        if "REOPOLD_SWITCH_STEP" not in environ:
            raise ValueError(
                "loss_mode=reopold needs REOPOLD_SWITCH_STEP (T_switch, e.g. 100 of 300 steps) in the environment "
                "of every worker: export it before launching, or pass "
                "+ray_kwargs.ray_init.runtime_env.env_vars.REOPOLD_SWITCH_STEP=100"
            )

        def flag(name: str, default: bool) -> bool:
            value = environ.get(name, str(int(default))).strip().lower()
            if value not in ("0", "1", "true", "false"):
                raise ValueError(f"{name} must be 0/1/true/false; got {value!r}")
            return value in ("1", "true")

        settings = cls(
            switch_step=int(environ["REOPOLD_SWITCH_STEP"]),
            lam=float(environ.get("REOPOLD_LAM", 0.3)),
            beta=float(environ.get("REOPOLD_BETA", 0.2)),
            reward_floor=flag("REOPOLD_REWARD_FLOOR", True),
            entropy_selection=flag("REOPOLD_ENTROPY_SELECTION", True),
        )
        core.reward_floor(settings.lam)  # raises with the allowed range
        if not 0.0 < settings.beta <= 1.0 or settings.switch_step < 0:
            raise ValueError(f"REOPOLD_BETA must be in (0, 1] and REOPOLD_SWITCH_STEP >= 0; got {settings}")
        return settings


def check_verl_config(config, loss_config) -> None:
    """The verl settings under which the registered loss is REOPOLD (docs/integrations.md)."""
    problems = []
    if not loss_config.use_policy_gradient:
        problems.append("distillation.distillation_loss.use_policy_gradient=true (REOPOLD is a policy gradient)")
    if loss_config.use_task_rewards:
        problems.append("distillation.distillation_loss.use_task_rewards=false (no outcome reward in REOPOLD)")
    if loss_config.loss_max_clamp is not None:
        problems.append(
            "distillation.distillation_loss.loss_max_clamp=null (verl clamps both signs; the reward floor is "
            "REOPOLD's only clip, and the kept-token rescaling can exceed the clamp)"
        )
    if config.strategy not in FSDP_STRATEGIES:
        problems.append(
            f"actor_rollout_ref.actor.strategy in {FSDP_STRATEGIES} (the kept-token count is all-reduced over every "
            "rank, and every rank computes the loss only under FSDP)"
        )
    if config.loss_agg_mode != "token-mean":
        problems.append("actor_rollout_ref.actor.loss_agg_mode=token-mean (the normaliser is built for it)")
    if problems:
        raise ValueError("loss_mode=reopold needs: " + "; ".join(problems))


def rollout_step(data) -> int:
    """The 0-based training step that generated this batch: the weights version verl's rollout stamps on each
    trajectory (``min_global_steps``; verl pushes weights ``k`` after step ``k``, so step k+1 samples with ``k``)."""
    steps = tu.get(data, "min_global_steps")
    values = [] if steps is None else [s for s in steps if s is not None]
    if not values:
        raise ValueError(
            "loss_mode=reopold takes the phase from the rollout's weights version (non-tensor field "
            "'min_global_steps', stamped by verl's agent-loop rollout); this batch has none"
        )
    return int(min(values))


def _padded_bool(mask: torch.Tensor) -> torch.Tensor:
    return (mask.to_padded_tensor(0) if mask.is_nested else mask).bool()


def _all_reduce_sum(value: torch.Tensor, dp_size: int) -> torch.Tensor:
    """Sum over data-parallel ranks. Ranks that hold the same data (sequence parallel) are counted once."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    world = torch.distributed.get_world_size()
    total = value.clone()
    torch.distributed.all_reduce(total)
    return total / (world // dp_size)


@register_distillation_loss(DistillationLossSettings(names=[LOSS_MODE], use_estimator=True))  # type: ignore[arg-type]
def reopold_distillation_loss(config, distillation_config, model_output: dict, data) -> tuple[torch.Tensor, dict]:
    """verl distillation loss ``reopold``: per-token loss -A with A = REOPOLD's advantage, rescaled to the
    kept-token normaliser (module docstring).

    Args:
        config: verl ``ActorConfig``. distillation_config: verl ``DistillationConfig``.
        model_output: the actor's forward: ``log_probs`` and ``entropy`` (set actor.calculate_entropy=true), in
            verl's no-padding layout.
        data: the micro-batch ``TensorDict``: ``old_log_probs``, ``teacher_logprobs``, ``response_mask``,
            ``batch_num_tokens``, ``dp_size``, ``min_global_steps``.

    Returns:
        (B, T) losses and metrics, as verl's registry expects.
    """
    check_verl_config(config, distillation_config.distillation_loss)
    settings = REOPOLDSettings.from_env()
    mask = _padded_bool(data["response_mask"])  # (B, T)
    old_logprobs = data["old_log_probs"]
    old_logprobs = old_logprobs.to_padded_tensor(0.0) if old_logprobs.is_nested else old_logprobs  # (B, T)
    teacher_logprobs = no_padding_2_padding(data["teacher_logprobs"], data).squeeze(-1)  # as verl's k1 reads it
    entropy = None
    if settings.entropy_selection:
        if model_output.get("entropy") is None:
            raise ValueError("loss_mode=reopold selects tokens by entropy: set actor_rollout_ref.actor."
                             "calculate_entropy=true (or REOPOLD_ENTROPY_SELECTION=0)")  # fmt: skip
        entropy = no_padding_2_padding(model_output["entropy"], data).detach()  # (B, T)
    phase = core.phase_at(rollout_step(data), settings.switch_step)
    shaped = core.distillation_shaping(
        old_logprobs.float(), teacher_logprobs.float(), None if entropy is None else entropy.float(), mask,
        phase=phase, lam=settings.lam, beta=settings.beta, stop_gradient=True, reward_floor=settings.reward_floor,
        entropy_selection=settings.entropy_selection,
    )  # fmt: skip
    dp_size = int(data["dp_size"])
    kept = _all_reduce_sum(shaped.keep_mask.sum().float(), dp_size)
    valid = _all_reduce_sum(mask.sum().float(), dp_size)
    batch_num_tokens = torch.as_tensor(float(data["batch_num_tokens"]), device=kept.device)
    # Kept tokens of the whole mini-batch: exact when this micro-batch is it, else this micro-batch's kept fraction.
    exact = bool(torch.isclose(valid, batch_num_tokens))
    num_kept = kept if exact else kept / valid.clamp(min=1.0) * batch_num_tokens
    scale = batch_num_tokens / num_kept.clamp(min=1.0)
    advantages = torch.where(shaped.keep_mask, shaped.advantages * scale, torch.zeros_like(shaped.advantages))
    metrics = core.distillation_metrics(shaped, entropy, mask, lam=settings.lam)
    metrics.update(refinement=torch.tensor(float(phase == "refinement")), normaliser_exact=torch.tensor(float(exact)))
    return -advantages.detach(), {
        f"reopold/{name}": Metric(AggregationType.MEAN, value.float())
        for name, value in metrics.items()
        if not torch.isnan(value)  # the threshold outside refinement
    }
