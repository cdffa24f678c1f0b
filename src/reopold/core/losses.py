"""The REOPOLD objective and its baselines as (loss, metrics) functions (Eq. 4, 6, 10; docs/algorithm.md).

Shapes: B sequences, T response tokens (padded on the right), V vocabulary. Every mask is a torch.bool tensor.
Every loss returns ``(loss, metrics)``: ``loss`` a 0-dim tensor to call ``backward`` on, ``metrics`` a dict of
0-dim detached tensors (no ``.item()`` here, so no device sync per micro-batch).

Aggregation: losses are sums over kept tokens divided by ``num_tokens``. Pass the GLOBAL kept-token count (over all
gradient-accumulation micro-batches and data-parallel ranks) and the micro-batch losses add up to the full-batch
loss, so the update does not depend on how the batch was split. Under DDP, which averages gradients over ranks,
multiply each rank's loss by the world size (or pass ``num_tokens / world_size``).
"""

from __future__ import annotations

import math

import torch

from reopold.core import rewards as reward_math
from reopold.core._checks import check_choice, check_fraction, check_mask, check_same_shape, token_count
from reopold.core.shaping import Shaping, distillation_shaping, grpo_shaping, reward_logprobs

AGGREGATIONS = ("token_mean", "sequence_mean")
MAX_LOG_RATIO = 20.0
Metrics = dict[str, torch.Tensor]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (0 when empty), ignoring whatever non-finite values sit under padding."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def policy_loss(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    aggregation: str = "token_mean",
    num_tokens: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO-clipped policy-gradient loss, per token (Eq. 6, with the standard PPO clip: docs/algorithm.md).

        rho = pi_theta / pi_old = exp(student_logprobs - old_logprobs)
        loss_t = -min(rho * A, clip(rho, 1 - clip_eps, 1 + clip_eps_high) * A)

    Args:
        student_logprobs: (B, T) current student log-probs of the sampled tokens, with gradient.
        old_logprobs: (B, T) the same under the rollout-time student pi_old (no gradient).
        advantages: (B, T) per-token advantage, used as given: detach it for a stop-gradient reward.
        mask: (B, T) bool, tokens whose loss counts. Positions outside it contribute exactly 0, even nan.
        clip_eps / clip_eps_high: lower / upper ratio clip (upper defaults to the lower).
        aggregation: "token_mean" (sum over kept tokens / num_tokens) or "sequence_mean" (mean over sequences
            with a kept token of each one's token mean; num_tokens then counts such sequences).
        num_tokens: global denominator; defaults to this batch's count.

    Returns:
        loss, metrics with "clip_frac" (fraction of kept tokens where the clipped term binds) and "ratio_mean".
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_mask("mask", mask)
    check_same_shape(student_logprobs=student_logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    zeros = torch.zeros_like(student_logprobs)
    log_ratio = torch.where(mask, student_logprobs - old_logprobs.detach(), zeros)  # (B, T)
    adv = torch.where(mask, advantages, zeros)
    # A ratio of e^20 already saturates the clip; beyond it exp overflows to inf and inf * (negative A) poisons
    # the loss. The clamp only changes tokens whose ratio is astronomically off.
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T), zero off the mask

    if aggregation == "token_mean":
        loss = per_token.sum() / token_count(mask, num_tokens)
    else:
        lengths = mask.sum(dim=-1)  # (B,)
        per_sequence = per_token.sum(dim=-1) / lengths.clamp(min=1)
        loss = per_sequence.sum() / token_count(lengths > 0, num_tokens)

    metrics = {
        "clip_frac": masked_mean((clipped < unclipped).to(ratio.dtype), mask).detach(),
        "ratio_mean": masked_mean(ratio, mask).detach(),
    }
    return loss, metrics


def reopold_loss(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    completion_mask: torch.Tensor,
    *,
    phase: str,
    lam: float = 0.3,
    beta: float = 0.2,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    threshold: torch.Tensor | float | None = None,
    num_tokens: torch.Tensor | int | None = None,
    stop_gradient: bool = True,
    reward_floor: bool = True,
    entropy_selection: bool = True,
    reward_policy: str = "old",
) -> tuple[torch.Tensor, Metrics]:
    """The REOPOLD objective J of Eq. 10, with the paper's ablation switches: ``distillation_shaping`` then
    ``policy_loss``, the same two stages the trainer runs.

        R     = log pi_T - log pi                            (Eq. 3; sg(R) when stop_gradient)
        R_hat = max(R, log(lam) / (1 - lam))                 (Eq. 7; when reward_floor)
        M     = 1[R >= floor]          in "exploration"      (Eq. 9)
              = 1[H >= tau_beta]       in "refinement"       (Eq. 8, 10; all valid tokens without entropy_selection)
        J     = 1/sum(M) * sum rho * R_hat * M               (PPO-clipped, see policy_loss)

    ``reward_policy`` says which student log-probs grade R: "old" (pi_old, the default: rewards, mask and count
    fixed for every update of a rollout step) or "current" (the current policy, detached; the paper's notation).
    They agree on the first update of a step. The two-phase schedule is the caller's ``phase`` (see ``phase_at``).
    Switches reproduce the cumulative ablation: RKL (all off, phase "refinement") -> +stop_gradient ->
    +reward_floor -> +entropy_selection -> +two phases.

    Args:
        student_logprobs, old_logprobs, teacher_logprobs: (B, T) log-probs of the sampled tokens.
        entropy: (B, T) entropy of the rollout-time student; may be None when entropy_selection is off.
        completion_mask: (B, T) bool, valid response tokens.
        phase: "exploration" or "refinement".
        lam: mixture weight of the reward floor, in (0, 1).
        beta: fraction of valid tokens kept in refinement, in (0, 1].
        clip_eps / clip_eps_high: lower / upper PPO ratio clip (upper defaults to the lower).
        threshold: tau_beta computed over the whole rollout batch (all ranks); None computes it from this batch.
        num_tokens: global kept-token count; None uses this batch's.

    Returns:
        loss, metrics: reward_mean, below_floor_frac, kept_frac, threshold, entropy_mean, clip_frac, ratio_mean,
        reverse_kl (mean of -R: the sampled-token estimate of KL(student || teacher) per token).
    """
    check_same_shape(student_logprobs=student_logprobs, old_logprobs=old_logprobs, teacher_logprobs=teacher_logprobs)
    graded = reward_logprobs(student_logprobs, old_logprobs, reward_policy=reward_policy,
                             stop_gradient=stop_gradient)
    shaped = distillation_shaping(
        graded, teacher_logprobs, entropy, completion_mask, phase=phase, lam=lam, beta=beta, threshold=threshold,
        stop_gradient=stop_gradient, reward_floor=reward_floor, entropy_selection=entropy_selection,
    )  # fmt: skip
    loss, metrics = policy_loss(student_logprobs, old_logprobs, shaped.advantages, shaped.keep_mask,
                                clip_eps=clip_eps, clip_eps_high=clip_eps_high, num_tokens=num_tokens)
    metrics.update(loss=loss.detach(), **distillation_metrics(shaped, entropy, completion_mask, lam=lam))
    return loss, metrics


def distillation_metrics(
    shaped: Shaping, entropy: torch.Tensor | None, completion_mask: torch.Tensor, *, lam: float
) -> Metrics:
    """Per-batch diagnostics of a distillation shaping (detached 0-dim tensors; no device sync)."""
    floor = reward_math.reward_floor(lam)
    detached = shaped.rewards.detach()
    entropy = torch.zeros_like(detached) if entropy is None else entropy.detach()
    threshold = math.nan if shaped.threshold is None else shaped.threshold
    return {
        "reward_mean": masked_mean(detached, completion_mask),
        "below_floor_frac": masked_mean((detached < floor).to(detached.dtype), completion_mask),
        "kept_frac": shaped.keep_mask.sum() / completion_mask.sum().clamp(min=1),
        "threshold": torch.as_tensor(threshold, dtype=torch.float32),
        "entropy_mean": masked_mean(entropy, completion_mask),
        "reverse_kl": masked_mean(-detached, completion_mask),
    }


def rkl_loss(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    num_tokens: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Vanilla sampled-token reverse KL ("RKL"): R differentiable, no floor, every valid token."""
    return reopold_loss(
        student_logprobs, old_logprobs, teacher_logprobs, None, completion_mask, phase="refinement",
        clip_eps=clip_eps, num_tokens=num_tokens,
        stop_gradient=False, reward_floor=False, entropy_selection=False,
    )  # fmt: skip


def rkl_sg_loss(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    num_tokens: torch.Tensor | int | None = None,
    reward_policy: str = "old",
) -> tuple[torch.Tensor, Metrics]:
    """Reverse KL with a stop-gradient reward (the Thinking Machines / tinker recipe): RKL + sg(R)."""
    return reopold_loss(
        student_logprobs, old_logprobs, teacher_logprobs, None, completion_mask, phase="refinement",
        clip_eps=clip_eps, num_tokens=num_tokens, reward_policy=reward_policy,
        stop_gradient=True, reward_floor=False, entropy_selection=False,
    )  # fmt: skip


def grpo_loss(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    sequence_rewards: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    group_size: int,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    num_tokens: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO: ``grpo_shaping`` (the group-normalised outcome advantage on every token of its response), then the
    PPO-clipped token-mean ``policy_loss``."""
    shaped = grpo_shaping(sequence_rewards, completion_mask, group_size=group_size)
    loss, metrics = policy_loss(student_logprobs, old_logprobs, shaped.advantages.to(student_logprobs.dtype),
                                shaped.keep_mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                num_tokens=num_tokens)
    metrics.update(loss=loss.detach(), reward_mean=sequence_rewards.float().mean().detach())
    return loss, metrics


def sft_loss(
    student_logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    num_tokens: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Negative log-likelihood of given (e.g. teacher-generated) responses: sequence-level distillation."""
    check_mask("completion_mask", completion_mask)
    check_same_shape(student_logprobs=student_logprobs, completion_mask=completion_mask)
    nll = -torch.where(completion_mask, student_logprobs, torch.zeros_like(student_logprobs))
    loss = nll.sum() / token_count(completion_mask, num_tokens)
    return loss, {"loss": loss.detach(), "nll": masked_mean(nll.detach(), completion_mask)}


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    num_tokens: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Full-distribution generalized JSD of GKD (Agarwal et al. 2024), per token, on the student's samples.

        M = beta * P_T + (1 - beta) * P_S
        JSD_beta = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)      for 0 < beta < 1
        beta = 0: KL(P_T || P_S) (forward KL);  beta = 1: KL(P_S || P_T) (reverse KL)

    top_k restricts both distributions to the teacher's k most likely tokens at each position and renormalises
    them there (our choice, docs/algorithm.md; the paper's "top-5 GKD").

    Args:
        student_logits, teacher_logits: (B, T, V) next-token logits at the response positions.
        completion_mask: (B, T) bool.
    """
    check_fraction("beta", beta, low_open=False, high_open=False)
    check_mask("completion_mask", completion_mask)
    check_same_shape(student_logits=student_logits, teacher_logits=teacher_logits)
    check_same_shape(positions=student_logits[..., 0], completion_mask=completion_mask)
    if top_k is not None and not 1 <= top_k <= student_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, vocab size {student_logits.shape[-1]}] or None; got top_k={top_k}")
    # Zero the logits under padding first: nan there would otherwise reach the gradient as 0 * nan.
    valid = completion_mask[..., None]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
    student = torch.where(valid, student_logits, torch.zeros_like(student_logits)).to(dtype) / temperature
    teacher = torch.where(valid, teacher_logits.detach(), torch.zeros_like(teacher_logits)).to(dtype) / temperature
    if top_k is not None:
        index = teacher.topk(top_k, dim=-1).indices  # (B, T, k)
        student, teacher = student.gather(-1, index), teacher.gather(-1, index)
    log_s = torch.log_softmax(student, dim=-1)  # (B, T, V or k)
    log_t = torch.log_softmax(teacher, dim=-1)

    def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (B, T)

    if beta == 0:
        per_token = kl(log_t, log_s)
    elif beta == 1:
        per_token = kl(log_s, log_t)
    else:
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
        per_token = beta * kl(log_t, log_m) + (1 - beta) * kl(log_s, log_m)
    per_token = torch.where(completion_mask, per_token, torch.zeros_like(per_token))
    loss = per_token.sum() / token_count(completion_mask, num_tokens)
    return loss, {"loss": loss.detach(), "jsd": masked_mean(per_token.detach(), completion_mask)}
