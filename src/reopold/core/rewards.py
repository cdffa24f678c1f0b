"""Token rewards of on-policy distillation and REOPOLD's reward floor (Eq. 3, Remark 3.1, Eq. 5/7).

The teacher grades every token the student sampled by how much more (or less) likely it finds that token:

    R[i,t] = log pi_T(o[i,t] | q, o[i,<t]) - log pi_theta(o[i,t] | q, o[i,<t])        (Eq. 3)

Summed over a response this is minus the sampled estimate of KL(pi_theta || pi_T), so maximising it is reverse-KL
distillation. REOPOLD treats R as a constant (Remark 3.1) and clips it from below (Eq. 5/7).
"""

from __future__ import annotations

import math

import torch

from reopold.core._checks import check_same_shape


def reward_floor(lam: float) -> float:
    """The mixture-based reward floor ``log(lam) / (1 - lam)`` (Eq. 5/7, App. A.2).

    By Jensen, R <= 1/(1-lam) * log(((1-lam) pi_T + lam pi_theta) / pi_theta); the right side is bounded below by
    log(lam)/(1-lam) as pi_T -> 0, so no reward under the (never computed) mixture can fall below this value.
    Note it is log(lam)/(1-lam), not log(lam/(1-lam)). lam=0.3 gives -1.7200.

    Args:
        lam: mixture weight of the student in the relaxed target, in (0, 1).
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 < lam < 1.0:
        raise ValueError(f"lam must be a float in (0, 1) (the paper uses 0.3); got lam={lam!r}")
    return math.log(lam) / (1.0 - lam)


def token_rewards(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    stop_gradient: bool = True,
) -> torch.Tensor:
    """Per-token reward R = log pi_T - log pi_theta of the sampled tokens (Eq. 3).

    Args:
        student_logprobs: (B, T) log-prob of each sampled token under the student, at the sampling temperature.
        teacher_logprobs: (B, T) log-prob of the same tokens under the teacher, teacher-forced on the student's
            sequence. Carries no gradient.
        stop_gradient: REOPOLD's sg(R) (Remark 3.1): the reward is a constant for the policy gradient. Without it
            (vanilla RKL) R keeps the gradient of -log pi_theta; the expected gradient is the same, the variance
            higher.

    Returns:
        (B, T) rewards; padding positions hold whatever the inputs held there (mask them downstream).
    """
    check_same_shape(student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs)
    student = student_logprobs.detach() if stop_gradient else student_logprobs
    return teacher_logprobs.detach() - student


def clipped_rewards(rewards: torch.Tensor, floor: float | None) -> torch.Tensor:
    """R_hat = max(R, floor) (Eq. 7); one-sided, positive rewards are never clipped. ``floor=None``: unchanged.

    The gradient (when R carries one) flows where R > floor and is zero where the floor binds.
    """
    if floor is None:
        return rewards
    return torch.clamp(rewards, min=floor)
