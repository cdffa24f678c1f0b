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
- ``VisionChatFormat`` (a vision-language student): the same difference, taken on the template's text, then
  encoded by the processor with the new messages' images (each image placeholder expanded to the image's tokens);
  the rendered pieces carry their images' pixel values.

A turn cut by the length limit is closed explicitly: the end-of-turn token (and the template's text after it) is
appended as context, outside the loss mask, since the student did not sample it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from reopold.environments import Message, message_images


@dataclass
class Rendered:
    """Token ids to append, with the pixel values of the images they hold (Qwen-VL layout), if any."""

    ids: list[int]
    pixel_values: torch.Tensor | None = None  # (patches of these images, C*t*p*p)
    image_grid_thw: torch.Tensor | None = None  # (images, 3)


class TurnFormat(Protocol):
    stop_token_id: int  # the token that ends an assistant turn
    multimodal: bool  # whether rendered pieces may hold images

    def prompt(self, messages: list[Message]) -> Rendered:
        """The episode's first messages, ready for the first assistant turn."""
        ...

    def observation(self, history: list[Message], new: list[Message]) -> Rendered:
        """What to append after a finished assistant turn (the last message of ``history``) so that ``new``
        follows and the next assistant turn can start."""
        ...


class PlainFormat:
    """Text without a chat template: contents back to back, tool results in braces."""

    multimodal = False

    def __init__(self, tokenizer, *, result_open: str = "{", result_close: str = "}"):
        self.tokenizer = tokenizer
        self.stop_token_id = tokenizer.eos_token_id
        self.result_open, self.result_close = result_open, result_close

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, messages: list[Message]) -> Rendered:
        return Rendered(self._encode("".join(_text(m) for m in messages)))

    def observation(self, history: list[Message], new: list[Message]) -> Rendered:
        wrap = lambda m: f"{self.result_open}{_text(m)}{self.result_close}" if m["role"] == "tool" else _text(m)
        return Rendered(self._encode("".join(wrap(m) for m in new)))


def _text(message: Message) -> str:
    """A message's text; images cannot be written as plain text."""
    if isinstance(message["content"], str):
        return message["content"]
    if message_images(message):
        raise ValueError("an observation holds an image but the student has no image processor: image observations "
                         "need a vision-language student (docs/tools.md)")
    return "".join(part["text"] for part in message["content"])


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

    multimodal = False

    def __init__(self, tokenizer, *, tools: list | None = None, name: str = "the student"):
        self.tokenizer, self.tools, self.name = tokenizer, tools or None, name
        self.stop_token_id = tokenizer.eos_token_id
        self.check_appends_only()

    def _render(self, messages: list[Message], *, next_turn: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, tools=self.tools, add_generation_prompt=next_turn,
                                                 tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def prompt(self, messages: list[Message]) -> Rendered:
        return Rendered(self._render(messages, next_turn=True))

    def closing(self, history: list[Message]) -> list[int]:
        """What the template writes after the last assistant turn's end-of-turn token (e.g. a newline)."""
        ids = self._render(history, next_turn=False)
        ends = [i for i, t in enumerate(ids) if t == self.stop_token_id]
        return ids[ends[-1] + 1 :] if ends else []

    def observation(self, history: list[Message], new: list[Message]) -> Rendered:
        before = self._render(history, next_turn=False)
        after = self._render(history + new, next_turn=True)
        if after[: len(before)] != before:
            raise TemplateRewritesHistory(self._refusal())
        return Rendered(self.closing(history) + after[len(before) :])

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


class VisionChatFormat(ChatTemplateFormat):
    """A vision-language student's episodes: the chat template's text difference, encoded by the processor with the
    images of the new messages (the processor expands each image placeholder to the image's tokens)."""

    multimodal = True

    def __init__(self, processor, *, tools: list | None = None, name: str = "the student"):
        self.processor = processor
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token",
                                                                                "<|image_pad|>"))
        super().__init__(processor.tokenizer, tools=tools, name=name)

    def _text(self, messages: list[Message], *, next_turn: bool) -> str:
        return self.processor.apply_chat_template(messages, tools=self.tools, add_generation_prompt=next_turn,
                                                  tokenize=False)

    def _render(self, messages: list[Message], *, next_turn: bool) -> list[int]:
        """Text-level ids (one placeholder per image): what the appends-only check and ``closing`` compare."""
        return self.tokenizer(self._text(messages, next_turn=next_turn), add_special_tokens=False)["input_ids"]

    def _encode(self, text: str, images: list) -> Rendered:
        encoded = self.processor(text=[text], images=images or None, return_tensors="pt")
        ids = encoded["input_ids"][0].tolist()
        if not images:
            return Rendered(ids)
        return Rendered(ids, encoded["pixel_values"], encoded["image_grid_thw"])

    def prompt(self, messages: list[Message]) -> Rendered:
        return self._encode(self._text(messages, next_turn=True), [i for m in messages for i in message_images(m)])

    def observation(self, history: list[Message], new: list[Message]) -> Rendered:
        before = self._text(history, next_turn=False)
        after = self._text(history + new, next_turn=True)
        if not after.startswith(before):
            raise TemplateRewritesHistory(self._refusal())
        closing = self.tokenizer.decode(self.closing(history))
        return self._encode(closing + after[len(before) :], [i for m in new for i in message_images(m)])
