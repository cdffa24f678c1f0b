"""Which tokens REOPOLD trains on: entropy-based dynamic sampling and the two phases (Eq. 8, 9, 10).

    tau_beta = (1 - beta) quantile of the student entropy H over valid tokens          (Eq. 8)
    M = 1[R >= floor]       if k <  T_switch   (exploration)                          (Eq. 9)
      = 1[H >= tau_beta]    if k >= T_switch   (refinement)                           (Eq. 10)
"""

from __future__ import annotations

import math

import torch

from reopold.core._checks import check_choice, check_fraction, check_mask, check_same_shape

PHASES = ("exploration", "refinement")


def entropy_threshold(entropy: torch.Tensor, completion_mask: torch.Tensor, *, beta: float) -> torch.Tensor:
    """tau_beta of Eq. 8: keeping ``entropy >= tau_beta`` keeps the top-beta fraction of valid tokens.

    Our choice (the paper names a quantile, not an estimator; docs/algorithm.md): with N valid tokens and
    k = ceil(beta * N),
    tau_beta is the k-th largest valid entropy. At least k tokens are kept, more only when entropies tie at the
    threshold (all ties are kept). With no valid token the threshold is +inf (nothing is kept).

    To compute it over a whole rollout batch split across data-parallel ranks, gather the valid entropies of
    every rank and call this once on the concatenation.

    Args:
        entropy: (B, T) entropy of the student's full next-token distribution (rollout-time student).
        completion_mask: (B, T) bool, True on valid response tokens.
        beta: fraction of tokens kept, in (0, 1]; 0.2 in the paper (0.4 for agentic tasks).

    Returns:
        0-dim detached tensor.
    """
    check_fraction("beta", beta, low_open=True, high_open=False)
    check_mask("completion_mask", completion_mask)
    check_same_shape(entropy=entropy, completion_mask=completion_mask)
    valid = entropy.detach()[completion_mask]  # (N,)
    if valid.numel() == 0:
        return torch.tensor(math.inf, dtype=entropy.dtype, device=entropy.device)
    k = math.ceil(beta * valid.numel())
    return torch.topk(valid, k).values[-1]


def keep_mask(
    token_rewards: torch.Tensor,
    entropy: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    phase: str,
    floor: float | None,
    threshold: torch.Tensor | float | None,
) -> torch.Tensor:
    """M of Eq. 9/10: the tokens whose loss counts in this phase.

    exploration: valid tokens with R >= floor. The heavy negative tail (tokens the teacher finds near impossible)
        is dropped; every other token, including mildly negative ones, is trained on. ``floor=None``: all valid.
    refinement: valid tokens with H >= tau_beta, the high-entropy "forking" tokens. ``threshold=None``: all valid.
    Tokens exactly on the floor or the threshold are kept.

    Returns:
        (B, T) bool.
    """
    check_choice("phase", phase, PHASES)
    check_mask("completion_mask", completion_mask)
    check_same_shape(token_rewards=token_rewards, entropy=entropy, completion_mask=completion_mask)
    if phase == "exploration":
        return completion_mask if floor is None else completion_mask & (token_rewards.detach() >= floor)
    return completion_mask if threshold is None else completion_mask & (entropy.detach() >= threshold)


def phase_at(step: int, switch_step: int) -> str:
    """The phase of rollout step ``step`` (0-based): exploration before T_switch, refinement from it on.

    switch_step = 0 means refinement from the first step (the two-phase schedule switched off).
    """
    if step < 0 or switch_step < 0:
        raise ValueError(f"step and switch_step must be >= 0; got step={step}, switch_step={switch_step}")
    return "exploration" if step < switch_step else "refinement"
