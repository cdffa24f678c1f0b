"""Verifiable tasks: a name -> class registry and the bundled char-level tokenizer."""

from __future__ import annotations

import difflib

from reopold.tasks.arithmetic import ArithmeticTask, Problem
from reopold.tasks.tokenizer import build_tokenizer

TASKS: dict[str, type] = {}


def register_task(name: str, cls: type) -> type:
    """Add ``cls`` under ``name``; a second registration of the same name is an error."""
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered (by {TASKS[name].__name__})")
    TASKS[name] = cls
    return cls


def get_task(name: str, **kwargs):
    """Instantiate the task registered as ``name`` with ``kwargs`` (e.g. ``digits=(3, 2)``)."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown task {name!r}; valid names: {sorted(TASKS)}.{hint}")
    return TASKS[name](**kwargs)


register_task(ArithmeticTask.name, ArithmeticTask)

__all__ = ["TASKS", "ArithmeticTask", "Problem", "build_tokenizer", "get_task", "register_task"]
