"""How a multi-turn episode becomes token ids (docs/tools.md).

The student's sampled ids are appended exactly as sampled (never decoded and re-encoded); only what the environment
adds is rendered, by one of two formats:

- ``ChatTemplateFormat`` (a tokenizer with a chat template): the ids appended after an assistant turn are
  ``template(history + new messages) - template(history)``, preceded by what the template writes after the
  end-of-turn token (``"\\n"`` after ``<|im_end|>`` in ChatML). This needs a template that only appends: at start-up
  a probe conversation is rendered turn by turn and a template that rewrites earlier turns (Qwen3-style templates
  drop past ``<think>`` blocks) is refused.
- ``PlainFormat`` (no chat template, e.g. the demo's character tokenizer): the first messages' contents are encoded
  back to back, a tool message is encoded as ``{result}``, any other observation message as its content; a turn
  ends at EOS.

A turn cut by the length limit is closed explicitly: the end-of-turn token (and the template's text after it) is
appended as context, outside the loss mask, since the student did not sample it.
"""

from __future__ import annotations

from typing import Protocol

from reopold.environments import Message


class TurnFormat(Protocol):
    stop_token_id: int  # the token that ends an assistant turn

    def prompt(self, messages: list[Message]) -> list[int]:
        """Ids of the episode's first messages, ready for the first assistant turn."""
        ...

    def observation(self, history: list[Message], new: list[Message]) -> list[int]:
        """Ids to append after a finished assistant turn (the last message of ``history``) so that ``new`` follows
        and the next assistant turn can start."""
        ...


class PlainFormat:
    """Text without a chat template: contents back to back, tool results in braces."""

    def __init__(self, tokenizer, *, result_open: str = "{", result_close: str = "}"):
        self.tokenizer = tokenizer
        self.stop_token_id = tokenizer.eos_token_id
        self.result_open, self.result_close = result_open, result_close

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, messages: list[Message]) -> list[int]:
        return self._encode("".join(m["content"] for m in messages))

    def observation(self, history: list[Message], new: list[Message]) -> list[int]:
        wrap = lambda m: f"{self.result_open}{m['content']}{self.result_close}" if m["role"] == "tool" else m["content"]
        return self._encode("".join(wrap(m) for m in new))


class TemplateRewritesHistory(ValueError):
    """A chat template whose rendering of a conversation is not a prefix of its rendering of a longer one."""


_PROBE = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\nLet me check."},
    {"role": "tool", "name": "calc", "content": "5"},
    {"role": "assistant", "content": "<think>\nit says 5\n</think>\n5"},
]


class ChatTemplateFormat:
    """Observations rendered by the tokenizer's chat template, as the difference of two renderings."""

    def __init__(self, tokenizer, *, tools: list | None = None, name: str = "the student"):
        self.tokenizer, self.tools, self.name = tokenizer, tools or None, name
        self.stop_token_id = tokenizer.eos_token_id
        self.check_appends_only()

    def _render(self, messages: list[Message], *, next_turn: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, tools=self.tools, add_generation_prompt=next_turn,
                                                 tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def prompt(self, messages: list[Message]) -> list[int]:
        return self._render(messages, next_turn=True)

    def closing(self, history: list[Message]) -> list[int]:
        """What the template writes after the last assistant turn's end-of-turn token (e.g. a newline)."""
        ids = self._render(history, next_turn=False)
        ends = [i for i, t in enumerate(ids) if t == self.stop_token_id]
        return ids[ends[-1] + 1 :] if ends else []

    def observation(self, history: list[Message], new: list[Message]) -> list[int]:
        before = self._render(history, next_turn=False)
        after = self._render(history + new, next_turn=True)
        if after[: len(before)] != before:
            raise TemplateRewritesHistory(self._refusal())
        return self.closing(history) + after[len(before) :]

    def check_appends_only(self) -> None:
        """Refuse a template whose rendering of a conversation changes when a turn is added."""
        for k in range(1, len(_PROBE)):
            before = self._render(_PROBE[:k], next_turn=_PROBE[k - 1]["role"] != "assistant")
            after = self._render(_PROBE[: k + 1], next_turn=False)
            if after[: len(before)] != before:
                raise TemplateRewritesHistory(self._refusal())

    def _refusal(self) -> str:
        return (f"the chat template of {self.name} rewrites earlier turns when a turn is added (Qwen3-style templates "
                f"drop past <think> blocks), so multi-turn ids would not match what the model saw; give the tokenizer "
                f"a template that only appends (docs/tools.md)")
