"""Rollout: the student samples n answers per prompt. ``Rollout`` is the batch every later stage reads;
``RolloutEngine`` is the sampler Protocol (Hugging Face ``generate`` in ``hf``, vLLM in ``vllm``)."""

from reopold.rollout.batch import ImageInputs, Rollout, RolloutEngine, build_rollout, completion_mask_from
from reopold.rollout.hf import HFRolloutEngine, vision_options

__all__ = ["HFRolloutEngine", "ImageInputs", "Rollout", "RolloutEngine", "build_rollout", "completion_mask_from",
           "vision_options"]
