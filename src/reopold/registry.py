"""Name -> implementation registries: the extension points for algorithms, tasks and answer checkers.

Entries may be given as objects or as ``"module:attribute"`` strings that are imported on first use, so the config
schema can list the valid names (and ``reopold --help`` can show them) without importing torch. ``register`` from
outside the package works the same way as the built-in entries; names are unique.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from typing import Any


def nearest(name: str, valid: Iterable[str]) -> str | None:
    """The valid name closest to a mistyped one, if any is close."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return close[0] if close else None


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> str:
    """The one "unknown X" message: the valid names and the nearest one."""
    valid = list(valid)
    close = nearest(name, valid)
    hint = f"; did you mean {close!r}?" if close else ""
    return f"unknown {kind} {name!r}; valid: {', '.join(valid)}{hint}"


class Registry:
    """A name -> entry table whose lookups fail with the valid names and the nearest match."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, entry: Any = None) -> Any:
        """Add ``entry`` (an object or a "module:attribute" string) under ``name``; usable as a decorator."""
        if entry is None:
            return lambda obj: self.register(name, obj)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(unknown_name(self.kind, name, self._entries))
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), attribute)
        return entry


ALGORITHMS = Registry("algorithm")  # name -> factory(config, vocab_size) -> Algorithm (reopold.train.algorithms)
TASKS = Registry("task")  # name -> Task class (reopold.tasks)

for _name in ("reopold", "rkl", "rkl_sg"):
    ALGORITHMS.register(_name, "reopold.train.algorithms:build_distillation")
ALGORITHMS.register("grpo", "reopold.train.algorithms:build_grpo")
ALGORITHMS.register("sft", "reopold.train.algorithms:build_sft")
ALGORITHMS.register("gkd", "reopold.train.algorithms:build_gkd")
TASKS.register("arithmetic", "reopold.tasks.arithmetic:ArithmeticTask")
TASKS.register("prompts", "reopold.tasks.prompts:PromptTask")
TASKS.register("visual-addition", "reopold.tasks.visual:VisualAdditionTask")
TASKS.register("image-prompts", "reopold.tasks.visual:ImagePromptTask")
TASKS.register("image-tool-prompts", "reopold.tasks.image_tools:ImageToolPromptTask")
TASKS.register("chained-products", "reopold.tasks.chained:ChainedProductsTask")


def choices_of(registry: Registry) -> Callable[[], tuple[str, ...]]:
    """A config field's choices, read when a config is checked (so later registrations count)."""
    return registry.names
