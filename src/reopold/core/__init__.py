"""REOPOLD's math as pure torch functions: tensors and scalars in, ``(loss, metrics)`` out.

No models, no config objects, no I/O, no device syncs. docs/algorithm.md maps each of the paper's equations to
its function.
"""

from reopold.core.losses import (
    distillation_metrics,
    generalized_jsd_loss,
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
from reopold.core.shaping import (
    REWARD_POLICIES,
    Shaping,
    distillation_shaping,
    grpo_advantages,
    grpo_shaping,
    reward_logprobs,
)
from reopold.core.tokens import entropy_from_logits, logprobs_and_entropy, logprobs_from_hidden, sampled_logprobs

__all__ = [
    "REWARD_POLICIES",
    "Shaping",
    "clipped_rewards",
    "distillation_metrics",
    "distillation_shaping",
    "entropy_from_logits",
    "entropy_threshold",
    "generalized_jsd_loss",
    "grpo_advantages",
    "grpo_loss",
    "grpo_shaping",
    "keep_mask",
    "logprobs_and_entropy",
    "logprobs_from_hidden",
    "masked_mean",
    "phase_at",
    "policy_loss",
    "reopold_loss",
    "reward_logprobs",
    "reward_floor",
    "rkl_loss",
    "rkl_sg_loss",
    "sampled_logprobs",
    "sft_loss",
    "token_rewards",
]
