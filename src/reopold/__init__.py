"""reopold: Relaxed On-Policy Distillation (REOPOLD, Ko et al. 2026) of language models, and its baselines.

``import reopold`` stays light: the math lives in ``reopold.core`` (torch only); trainers, models and optional
engines (vLLM, TRL, verl, wandb) are imported only by the modules that use them.
"""

from reopold import core
from reopold.core import reopold_loss, reward_floor

__version__ = "0.1.0"
__all__ = ["__version__", "core", "reopold_loss", "reward_floor"]
