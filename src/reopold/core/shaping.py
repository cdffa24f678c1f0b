"""The per-step shaping stage: token rewards -> keep mask -> advantages (Eq. 3, 7, 8, 9, 10).

The REOPOLD objective is this stage followed by the PPO-clipped ``policy_loss``; ``reopold_loss`` runs both in one
call and the trainer runs them apart (shaping once per rollout step or per update, the loss per micro-batch), so
there is exactly one composition of the paper's equations.

Which policy's log-probs enter R (docs/algorithm.md, "Which policy grades the reward"):

- ``"old"`` (default): R = log pi_T - log pi_old. The rewards, the keep mask and the kept-token count are fixed for
  every update of the rollout step, like PPO's advantages; the loss normaliser is known before any backward pass.
- ``"current"``: R = log pi_T - sg(log pi_theta), recomputed for every update (the paper's literal notation).

Both are equal on the first update of a step, when pi_theta = pi_old. Without stop-gradient (vanilla RKL) R must
carry the current policy's gradient, so it is always ``"current"``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from reopold.core import rewards as reward_math
from reopold.core._checks import check_choice, check_fraction, check_mask, check_same_shape
from reopold.core.rewards import clipped_rewards, token_rewards
from reopold.core.selection import PHASES, entropy_threshold, keep_mask

REWARD_POLICIES = ("old", "current")


class Shaping(NamedTuple):
    """What the policy loss of one update trains on."""

    rewards: torch.Tensor  # (B, T) R of Eq. 3 (differentiable only without stop-gradient)
    keep_mask: torch.Tensor  # (B, T) bool, M of Eq. 9/10
    advantages: torch.Tensor  # (B, T) R_hat of Eq. 7 (or R when the floor is off)
    threshold: torch.Tensor | None  # tau_beta used for M (None when the mask is not entropy-based)


def reward_logprobs(
    student_logprobs: torch.Tensor, old_logprobs: torch.Tensor, *, reward_policy: str, stop_gradient: bool
) -> torch.Tensor:
    """The student log-probs R is computed from: pi_old's, or the current policy's (always without stop-gradient).

    Args:
        student_logprobs: (B, T) current log pi_theta of the sampled tokens (with gradient).
        old_logprobs: (B, T) rollout-time log pi_old of the same tokens.
        reward_policy: "old" or "current" (see the module docstring).
    """
    check_choice("reward_policy", reward_policy, REWARD_POLICIES)
    return student_logprobs if reward_policy == "current" or not stop_gradient else old_logprobs


def distillation_shaping(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    completion_mask: torch.Tensor,
    *,
    phase: str,
    lam: float = 0.3,
    beta: float = 0.2,
    threshold: torch.Tensor | float | None = None,
    stop_gradient: bool = True,
    reward_floor: bool = True,
    entropy_selection: bool = True,
) -> Shaping:
    """Rewards, keep mask and advantages of REOPOLD and its ablations.

        R     = log pi_T - log pi                            (Eq. 3; sg(R) when stop_gradient)
        M     = 1[R >= floor]          in "exploration"      (Eq. 9)
              = 1[H >= tau_beta]       in "refinement"       (Eq. 8, 10; all valid tokens without entropy_selection)
        A     = max(R, log(lam) / (1 - lam))                 (Eq. 7; R itself when reward_floor is False)

    Args:
        student_logprobs: (B, T) the student log-probs R is graded against (pi_old or the current policy: see
            ``reward_logprobs``). Differentiable only matters without stop_gradient.
        teacher_logprobs: (B, T) teacher-forced log pi_T of the same tokens.
        entropy: (B, T) entropy of the rollout-time student; may be None when entropy_selection is off.
        completion_mask: (B, T) bool, valid response tokens.
        phase: "exploration" or "refinement" (see ``phase_at``).
        lam: mixture weight of the floor, in (0, 1). beta: fraction of valid tokens kept in refinement, in (0, 1].
        threshold: tau_beta over the whole rollout batch (every rank); None computes it from this batch.

    Returns:
        Shaping(rewards, keep_mask, advantages, threshold).
    """
    check_choice("phase", phase, PHASES)
    floor = reward_math.reward_floor(lam)
    check_fraction("beta", beta, low_open=True, high_open=False)
    check_mask("completion_mask", completion_mask)
    if entropy is None and entropy_selection:
        raise ValueError("entropy is None but entropy_selection=True; pass the student's (B, T) entropy")
    rewards = token_rewards(student_logprobs, teacher_logprobs, stop_gradient=stop_gradient)  # (B, T)
    entropy = torch.zeros_like(rewards).detach() if entropy is None else entropy.detach()
    check_same_shape(rewards=rewards, entropy=entropy, completion_mask=completion_mask)
    used_threshold = None
    if phase == "refinement" and entropy_selection:
        used_threshold = entropy_threshold(entropy, completion_mask, beta=beta) if threshold is None else threshold
        used_threshold = torch.as_tensor(used_threshold, dtype=entropy.dtype, device=entropy.device)
    mask = keep_mask(rewards, entropy, completion_mask, phase=phase, floor=floor, threshold=used_threshold)
    advantages = clipped_rewards(rewards, floor if reward_floor else None)
    return Shaping(rewards, mask, advantages, used_threshold)


def grpo_advantages(sequence_rewards: torch.Tensor, *, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised outcome advantages: A_i = (r_i - mean_g) / (std_g + eps) over the n samples of a prompt.

    Args:
        sequence_rewards: (B,) one scalar reward per response, the ``group_size`` samples of each prompt
            consecutive. std is the unbiased sample std (as in GRPO's reference implementations).

    Returns:
        (B,) advantages; a group whose rewards are all equal gets 0.
    """
    if sequence_rewards.dim() != 1:
        raise ValueError(f"sequence_rewards must be 1-D (B,); got shape {tuple(sequence_rewards.shape)}")
    size = sequence_rewards.numel()
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or size % group_size:
        raise ValueError(
            f"group_size must be an int >= 2 that divides the batch size {size}; got group_size={group_size!r}"
        )
    groups = sequence_rewards.view(-1, group_size)  # (prompts, n)
    mean = groups.mean(dim=-1, keepdim=True)
    std = groups.std(dim=-1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def grpo_shaping(sequence_rewards: torch.Tensor, completion_mask: torch.Tensor, *, group_size: int) -> Shaping:
    """GRPO's shaping: the group-normalised outcome advantage on every valid token of its response.

    Args:
        sequence_rewards: (B,) the verifier's reward per response (bool, int or float).
        completion_mask: (B, T) bool.
    """
    check_mask("completion_mask", completion_mask)
    if sequence_rewards.shape != completion_mask.shape[:1]:
        raise ValueError(
            f"sequence_rewards has shape {tuple(sequence_rewards.shape)}; expected ({completion_mask.shape[0]},), "
            "one reward per response"
        )
    rewards = sequence_rewards.to(torch.promote_types(sequence_rewards.dtype, torch.float32))  # bool/int -> float
    advantages = grpo_advantages(rewards, group_size=group_size)[:, None].expand(completion_mask.shape)  # (B, T)
    return Shaping(rewards[:, None].expand(completion_mask.shape), completion_mask, advantages, None)
