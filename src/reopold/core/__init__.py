"""REOPOLD's math as pure torch functions: tensors and scalars in, ``(loss, metrics)`` out.

No models, no config objects, no I/O, no device syncs. docs/algorithm.md maps each SPEC equation to its function.
"""

from reopold.core.losses import (
    generalized_jsd_loss,
    grpo_advantages,
    grpo_loss,
    masked_mean,
    policy_loss,
    reopold_loss,
    rkl_loss,
    rkl_sg_loss,
    sft_loss,
)
from reopold.core.rewards import clipped_rewards, reward_floor, token_rewards
from reopold.core.selection import entropy_threshold, keep_mask, phase_at
from reopold.core.tokens import entropy_from_logits, logprobs_and_entropy, logprobs_from_hidden, sampled_logprobs

__all__ = [
    "clipped_rewards",
    "entropy_from_logits",
    "entropy_threshold",
    "generalized_jsd_loss",
    "grpo_advantages",
    "grpo_loss",
    "keep_mask",
    "logprobs_and_entropy",
    "logprobs_from_hidden",
    "masked_mean",
    "phase_at",
    "policy_loss",
    "reopold_loss",
    "reward_floor",
    "rkl_loss",
    "rkl_sg_loss",
    "sampled_logprobs",
    "sft_loss",
    "token_rewards",
]
