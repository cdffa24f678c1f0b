"""Prompts and tasks: the Task Protocol every data source implements, the bundled arithmetic task, prompts from
JSONL / saved datasets (``prompts``), answer checkers and the char-level tokenizer. Tasks are looked up by name in
``reopold.registry.TASKS``; ``TASKS.register("mine", MyTask)`` adds one (``MyTask.from_config(data)`` builds it)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from reopold.registry import TASKS
from reopold.tasks.arithmetic import ArithmeticTask, Problem
from reopold.tasks.tokenizer import build_tokenizer


class Task(Protocol):
    """Prompts in fixed splits, and an exact checker of a completion's final answer."""

    name: str

    @classmethod
    def from_config(cls, data) -> Task:
        """Build the task from the ``data`` section of a TrainConfig."""
        ...

    def problems(self, split: str, n: int) -> list[Problem]:
        """The first ``n`` problems of ``split`` ("train", "validation" or "test"), in a fixed order."""
        ...

    def check(self, problem: Problem, completion: str) -> bool:
        """Whether ``completion`` ends in the problem's answer."""
        ...


@runtime_checkable
class EpisodicTask(Protocol):
    """A task answered in multi-turn episodes (docs/tools.md): any task that also has this method."""

    def environment(self, call_format: str):
        """A fresh ``reopold.environments.Environment`` for one episode; ``call_format``: "json" (the chat
        template has a tool-call format) or "tag" (``[name(args)]``), how the student writes its tool calls."""
        ...


def build_task(data) -> Task:
    """The task named by ``data.task`` (a registered name), built from the config's data section."""
    return TASKS.get(data.task).from_config(data)


def get_task(name: str, **kwargs) -> Task:
    """Instantiate the task registered as ``name`` with ``kwargs`` (e.g. ``digits=(3, 2)``)."""
    return TASKS.get(name)(**kwargs)


__all__ = ["TASKS", "ArithmeticTask", "EpisodicTask", "Problem", "Task", "build_task", "build_tokenizer", "get_task"]
