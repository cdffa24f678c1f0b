"""Environments for multi-turn rollouts: what the student talks to between its turns (docs/tools.md).

An episode starts from a problem (``reset``: the first messages) and alternates assistant turns with observations
(``step``: the messages to append after a turn, and whether the episode is over). ``reopold.environments.tools``
turns plain typed Python functions into such an environment (the tool-call adapter); the multi-turn engine that
runs episodes in batches is ``reopold.rollout.episodes``.

A message is a dict as chat templates take it: ``{"role": "user" | "tool" | ..., "content": ...}`` (a tool
message may also carry ``"name"``). The content is text, or, for a vision-language student, a list of parts
``{"type": "text", "text": str}`` and ``{"type": "image", "image": <PIL image>}`` (a tool may return an image).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

Message = dict  # {"role": ..., "content": ...}


@dataclass
class Observation:
    """What the environment answers to one assistant turn."""

    messages: list[Message] = field(default_factory=list)  # appended after the turn (tool results, user replies)
    done: bool = False  # the episode is over: no further assistant turn
    reward: float | None = None  # the episode's task reward, when the environment grades it (read when done)
    tool_calls: int = 0  # tool calls made in the turn (metrics)
    tool_errors: int = 0  # of those, calls that failed: unknown tool, bad arguments, an exception, a timeout


class Environment(Protocol):
    """One episode's environment: a fresh object per episode (it may keep state between turns)."""

    def reset(self, problem) -> list[Message]:
        """The episode's first messages (usually the user's prompt) for ``problem``."""
        ...

    def step(self, reply: str) -> Observation:
        """After an assistant turn whose decoded text is ``reply``: the observation, and whether the episode ends."""
        ...


class EpisodeError(RuntimeError):
    """An environment raised or answered something that is not an Observation (the episode stops; counted)."""


class CallTimedOut(TimeoutError):
    """A call of user code (a tool, an environment's step) that did not return in time."""


def call_with_timeout(function: Callable, timeout: float, *args, **kwargs):
    """``function(*args, **kwargs)`` in a daemon thread, its exception re-raised here; CallTimedOut if it has not
    returned after ``timeout`` seconds (the thread is abandoned: Python cannot kill it, so code that hangs forever
    keeps one idle thread)."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised as it is in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CallTimedOut(f"timed out after {timeout:g}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def message_images(message: Message) -> list:
    """The images of a message, in order (none for text content)."""
    content = message["content"]
    return [] if isinstance(content, str) else [part["image"] for part in content if part.get("type") == "image"]


def _well_formed(message) -> bool:
    if not isinstance(message, dict) or "role" not in message:
        return False
    content = message.get("content")
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(part, dict) and ((part.get("type") == "text" and isinstance(part.get("text"), str))
                                    or (part.get("type") == "image" and hasattr(part.get("image"), "convert")))
        for part in content)  # fmt: skip


def check_observation(observation) -> Observation:
    """``observation`` if it is a well-formed Observation, else EpisodeError saying what is wrong."""
    if not isinstance(observation, Observation):
        raise EpisodeError(f"step() returned {type(observation).__name__}, not an Observation")
    for message in observation.messages:
        if not _well_formed(message):
            raise EpisodeError(f"observation message {str(message)[:120]} is not a {{'role': ..., 'content': text "
                               f"or a list of text/image parts}} dict")
    return observation


__all__ = ["CallTimedOut", "Environment", "EpisodeError", "Message", "Observation", "call_with_timeout",
           "check_observation", "message_images"]
