"""Plain typed Python functions as tools: the tool-call adapter (docs/tools.md).

``ToolEnvironment([calc, zoom])`` is an Environment: after each assistant turn it parses the tool calls in the
reply, runs each (with a per-call timeout) and answers with one ``{"role": "tool"}`` message per call; a reply
without a tool call ends the episode. A call that names no known tool, has arguments that do not fit the
function's signature, raises or times out is answered with an error message, as a real agent would see it, and
counted (``Observation.tool_errors``); it never stops the run.

Two call formats:

- ``json`` (the chat-template format of Qwen2.5 / Hermes-style templates, picked when the student's template
  mentions ``<tool_call>``): ``<tool_call>{"name": "calc", "arguments": {"expression": "47*86"}}</tool_call>``.
- ``tag`` (for tokenizers without a tool-call format, such as the demo's character tokenizer):
  ``[calc(47*86)]``; arguments are positional and comma-separated, each converted to its parameter's type hint
  (int, float, bool, str); a function of one parameter receives the whole text between the parentheses.
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass

from reopold.environments import Message, Observation, call_with_timeout

CALL_FORMATS = ("tag", "json")
_TAG_CALL = re.compile(r"\[([A-Za-z_]\w*)\((.*?)\)\]", re.S)
_JSON_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class ToolCallError(ValueError):
    """A tool call that cannot be run as written (unknown tool, arguments that do not fit)."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict | str  # json format: the arguments object; tag format: the raw text between the parentheses


def parse_tool_calls(text: str, call_format: str) -> list[ToolCall | ToolCallError]:
    """The tool calls in ``text``, in order; a json call that is not valid JSON comes back as a ToolCallError."""
    if call_format == "tag":
        return [ToolCall(name, raw) for name, raw in _TAG_CALL.findall(text)]
    calls: list[ToolCall | ToolCallError] = []
    for body in _JSON_CALL.findall(text):
        try:
            data = json.loads(body)
            calls.append(ToolCall(str(data["name"]), data.get("arguments", {})))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            calls.append(ToolCallError(f"the tool call {body[:80]!r} is not JSON with a name and arguments ({exc})"))
    return calls


def call_format_for(tokenizer) -> str:
    """"json" when the tokenizer's chat template renders tool calls as ``<tool_call>`` JSON, else "tag"."""
    template = getattr(tokenizer, "chat_template", None)
    return "json" if isinstance(template, str) and "<tool_call>" in template else "tag"


class Tool:
    """A typed Python function callable from model text: its signature says which arguments it takes."""

    def __init__(self, function: Callable):
        self.function = function
        self.name = function.__name__
        self.signature = inspect.signature(function)
        hints = typing.get_type_hints(function)
        self.types = {name: hints.get(name, str) for name in self.signature.parameters}

    def bind(self, arguments: dict | str) -> dict:
        """Keyword arguments for the function, converted to its type hints; ToolCallError if they do not fit."""
        params = list(self.signature.parameters.values())
        if isinstance(arguments, str):  # tag format: positional text
            parts = [arguments] if len(params) == 1 else [a.strip() for a in arguments.split(",")] if arguments else []
            if len(parts) > len(params):
                raise ToolCallError(f"{self.name} takes {len(params)} arguments, got {len(parts)}")
            arguments = {p.name: value for p, value in zip(params, parts, strict=False)}
        if not isinstance(arguments, dict):
            raise ToolCallError(f"{self.name}: arguments must be an object, got {type(arguments).__name__}")
        unknown = set(arguments) - set(self.types)
        if unknown:
            raise ToolCallError(f"{self.name} has no argument {sorted(unknown)[0]!r} (it takes {list(self.types)})")
        missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in arguments]
        if missing:
            raise ToolCallError(f"{self.name} is missing the argument {missing[0]!r}")
        return {name: _convert(self.name, name, value, self.types[name]) for name, value in arguments.items()}


def _convert(tool: str, name: str, value, kind):
    """``value`` as the type ``kind`` (from text, or checked when it came from JSON)."""
    if kind not in (int, float, bool, str):
        return value  # other hints: passed through as parsed
    if isinstance(value, str) and kind is not str:
        try:
            return {"true": True, "false": False}[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise ToolCallError(f"{tool}: argument {name!r} must be {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ToolCallError(f"{tool}: argument {name!r} must be {kind.__name__}, got {value!r}")
    return value


class ToolEnvironment:
    """An Environment whose observations are the results of the tool calls in each assistant turn.

    ``first_messages(problem)``: the episode's opening messages (default: one user message with ``problem.prompt``).
    ``format_error(message)``: how an error reads to the model (default ``"error: <message>"``; a model with a
    narrow vocabulary may need something shorter). ``max_calls`` bounds the calls run per turn.
    """

    def __init__(self, tools: list[Callable], *, call_format: str = "tag", timeout: float = 10.0, max_calls: int = 4,
                 first_messages: Callable | None = None, format_error: Callable[[str], str] | None = None):
        if call_format not in CALL_FORMATS:
            raise ValueError(f"call_format must be one of {CALL_FORMATS}, got {call_format!r}")
        self.tools = {tool.name: tool for tool in map(Tool, tools)}
        self.call_format, self.timeout, self.max_calls = call_format, timeout, max_calls
        self.first_messages = first_messages
        self.format_error = format_error or (lambda message: f"error: {message}")

    def reset(self, problem) -> list[Message]:
        if self.first_messages is not None:
            return self.first_messages(problem)
        return [{"role": "user", "content": problem.prompt}]

    def step(self, reply: str) -> Observation:
        calls = parse_tool_calls(reply, self.call_format)[: self.max_calls]
        if not calls:
            return Observation(done=True)
        results = [self._run(call) for call in calls]
        messages = [{"role": "tool", "name": name, "content": content} for name, content, _ in results]
        return Observation(messages=messages, tool_calls=len(calls), tool_errors=sum(not ok for *_, ok in results))

    def _run(self, call: ToolCall | ToolCallError) -> tuple[str, str | list, bool]:
        """(tool name, what the model reads: text, or image parts for a tool returning images, whether the call
        succeeded)."""
        if isinstance(call, ToolCallError):
            return "", self.format_error(str(call)), False
        tool = self.tools.get(call.name)
        try:
            if tool is None:
                raise ToolCallError(f"unknown tool {call.name!r} (tools: {', '.join(self.tools)})")
            result = call_with_timeout(tool.function, self.timeout, **tool.bind(call.arguments))
            return call.name, _content(result), True
        except Exception as exc:  # noqa: BLE001 - bad arguments, the tool's own exceptions, timeouts
            return call.name, self.format_error(str(exc) or type(exc).__name__), False


def _content(result) -> str | list:
    """A tool's return value as message content: an image (or a list of images and strings) becomes parts, anything
    else its text."""
    items = result if isinstance(result, list | tuple) else [result]
    if not any(hasattr(item, "convert") for item in items):
        return str(result)
    return [{"type": "image", "image": item} if hasattr(item, "convert") else {"type": "text", "text": str(item)}
            for item in items]
