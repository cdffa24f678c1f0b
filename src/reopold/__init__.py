"""reopold: Relaxed On-Policy Distillation (REOPOLD, Ko et al. 2026) of language models, and its baselines.

``import reopold`` imports nothing heavy: ``reopold.core`` (the math, torch only) loads on first use of
``reopold.core``, ``reopold.reopold_loss`` or ``reopold.reward_floor``; trainers, models and optional engines (vLLM,
TRL, verl, wandb) are imported only by the modules that use them, so ``reopold --help`` starts without torch.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["__version__", "core", "reopold_loss", "reward_floor"]


def __getattr__(name: str):
    if name == "core":
        return importlib.import_module("reopold.core")
    if name in ("reopold_loss", "reward_floor"):
        return getattr(importlib.import_module("reopold.core"), name)
    raise AttributeError(f"module 'reopold' has no attribute {name!r}")
