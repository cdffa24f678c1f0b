"""The Rollout batch layout and the engine Protocol every sampler implements (Hugging Face ``generate`` in
``rollout.hf``, vLLM in ``rollout.vllm``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch


@dataclass
class ImageInputs:
    """The image part of a batch of image prompts, laid out as a Qwen-VL processor returns it.

    ``pixel_values`` is flat over the batch: image i owns ``image_grid_thw[i].prod()`` consecutive rows, images in
    row order. Rows are selected by re-joining their images' blocks, never by slicing at batch positions.
    """

    pixel_values: torch.Tensor  # (sum of patches, C*t*p*p)
    image_grid_thw: torch.Tensor  # (n_images, 3) long
    images_per_row: torch.Tensor  # (B,) long, images in each row's prompt
    mm_token_type_ids: torch.Tensor  # (B, P) 1 on image placeholder tokens of the prompt, 0 elsewhere

    def select(self, index: torch.Tensor) -> ImageInputs:
        """The rows ``index`` (repeats allowed: the n samples of a prompt), each with its own images."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        counts = self.images_per_row.cpu()
        first = torch.cumsum(counts, 0) - counts  # (B,) index of each row's first image
        images = [i for row in index.tolist() for i in range(int(first[row]), int(first[row] + counts[row]))]
        blocks = torch.split(self.pixel_values, self.image_grid_thw.prod(-1).tolist())
        device = self.pixel_values.device
        return ImageInputs(
            pixel_values=torch.cat([blocks[i] for i in images]) if images else self.pixel_values[:0],
            image_grid_thw=self.image_grid_thw[torch.tensor(images, dtype=torch.long, device=device)],
            images_per_row=self.images_per_row[index.to(self.images_per_row.device)],
            mm_token_type_ids=self.mm_token_type_ids[index.to(self.mm_token_type_ids.device)],
        )

    def to(self, device: torch.device | str) -> ImageInputs:
        return ImageInputs(*(t.to(device) for t in (self.pixel_values, self.image_grid_thw, self.images_per_row,
                                                     self.mm_token_type_ids)))

    @staticmethod
    def of_rows(input_ids: torch.Tensor, blocks: list[list[tuple[torch.Tensor, torch.Tensor]]],
                image_token_id: int) -> ImageInputs:
        """The image inputs of rows laid out already: ``blocks[i]`` holds row i's (pixel_values, image_grid_thw)
        pieces in the order their images appear in ``input_ids[i]``; the types mark every image token."""
        pieces = [piece for row in blocks for piece in row]
        counts = torch.tensor([sum(len(grid) for _, grid in row) for row in blocks], dtype=torch.long)
        return ImageInputs(torch.cat([pixels for pixels, _ in pieces]), torch.cat([grid for _, grid in pieces]),
                           counts, (input_ids == image_token_id).long())

    def forward_inputs(self, width: int) -> dict[str, torch.Tensor]:
        """Model kwargs for a teacher-forced pass over ``width`` tokens (prompt + response): ``mm_token_type_ids``
        extended with zeros (text) over the response, so Qwen-VL computes generate()'s 3-D positions. (An episode's
        types cover its observations' images too; cut to ``width`` when the batch was trimmed.)"""
        types = self.mm_token_type_ids[:, :width]
        pad = torch.zeros((types.shape[0], width - types.shape[1]), dtype=types.dtype, device=types.device)
        return {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw,
                "mm_token_type_ids": torch.cat([types, pad], dim=1)}


@dataclass
class Rollout:
    """A batch of prompts with one sampled (or given) response each, laid out for teacher-forced scoring.

    Rows are ``[left-padded prompt | response, right-padded]``. Row ``i`` answers ``problems[i]``; the n samples of
    a prompt are consecutive rows.
    """

    input_ids: torch.Tensor  # (B, P + T) token ids; padding holds the pad id
    attention_mask: torch.Tensor  # (B, P + T) 1 on real prompt and response tokens
    completion_mask: torch.Tensor  # (B, T) bool, response tokens up to and including EOS
    prompt_length: int  # P, the padded prompt width
    problems: list = field(default_factory=list)  # (B,) the task problem behind each row
    texts: list[str] = field(default_factory=list)  # (B,) decoded responses, special tokens removed
    old_logprobs: torch.Tensor | None = None  # (B, T) the sampler's log-prob of each response token, if it reports it
    images: ImageInputs | None = None  # image prompts: the images of every row (None: text only)
    # Multi-turn episodes (reopold.rollout.episodes): completion_mask is then 1 only on the student's own tokens and
    # attention_mask also covers the observations between its turns.
    rewards: torch.Tensor | None = None  # (B,) the environment's task reward of each episode, when it grades them
    episode_stats: dict = field(default_factory=dict)  # the batch's episode metrics (turns, tool calls, errors)

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]  # (B, T)

    @property
    def position_ids(self) -> torch.Tensor:
        # Positions count real tokens only, as generate() does with left padding; a forward pass with the default
        # arange positions would score the sampled tokens under a shifted context.
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P + T)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: list[int] | torch.Tensor) -> Rollout:
        """The sub-batch of the given rows, trimmed to its longest response (observations included)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        mask = self.completion_mask[index]
        real = self.attention_mask[index.to(self.attention_mask.device), self.prompt_length :].bool().cpu()  # (b, T)
        width = int((real * torch.arange(1, real.shape[1] + 1)).max()) if real.numel() else 0  # last real token + 1
        end = self.prompt_length + max(width, 1)
        return replace(
            self,
            input_ids=self.input_ids[index, :end],
            attention_mask=self.attention_mask[index, :end],
            completion_mask=mask[:, : max(width, 1)],
            problems=[self.problems[i] for i in index.tolist()] if self.problems else [],
            texts=[self.texts[i] for i in index.tolist()] if self.texts else [],
            old_logprobs=None if self.old_logprobs is None else self.old_logprobs[index, : max(width, 1)],
            images=None if self.images is None else self.images.select(index),
            rewards=None if self.rewards is None else self.rewards[index.to(self.rewards.device)],
        )

    def to(self, device: torch.device | str) -> Rollout:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            completion_mask=self.completion_mask.to(device),
            old_logprobs=None if self.old_logprobs is None else self.old_logprobs.to(device),
            images=None if self.images is None else self.images.to(device),
            rewards=None if self.rewards is None else self.rewards.to(device),
        )


class RolloutEngine(Protocol):
    """What the trainer needs from a sampler: n responses per prompt, and the trained weights after each update."""

    def generate(self, prompt_ids: list[list[int]], problems: list, *, num_samples: int) -> Rollout:
        """Sample ``num_samples`` responses per prompt at the engine's temperature; rows of a prompt consecutive."""
        ...

    def sync_weights(self, model) -> None:
        """Make the next ``generate`` sample from ``model``'s current weights."""
        ...

    def close(self) -> None:
        """Release what the engine holds (a vLLM engine's worker, process group and KV cache)."""
        ...


def completion_mask_from(ids: torch.Tensor, eos_token_id: int | list[int]) -> torch.Tensor:
    """(B, T) bool: every token up to and including the first EOS (all tokens when no EOS was sampled)."""
    eos = torch.as_tensor(eos_token_id, device=ids.device).reshape(-1)
    is_eos = torch.isin(ids, eos)  # (B, T)
    eos_before = (is_eos.cumsum(-1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    return ~eos_before


def build_rollout(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    problems: list,
    *,
    pad_token_id: int,
    eos_token_id: int | list[int],
    tokenizer=None,
) -> Rollout:
    """Lay out given prompts and responses (e.g. teacher answers for SFT) as a Rollout. Each response is cut after
    its first EOS."""
    width = max(len(p) for p in prompt_ids)
    length = max(1, max(len(r) for r in response_ids))
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width + length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, width + length), dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        input_ids[i, width - len(prompt) : width] = torch.tensor(prompt, dtype=torch.long)
        attention[i, width - len(prompt) : width] = 1
        if response:
            input_ids[i, width : width + len(response)] = torch.tensor(response, dtype=torch.long)
    completion = input_ids[:, width:]
    mask = completion_mask_from(completion, eos_token_id)
    mask &= torch.arange(length)[None, :] < torch.tensor([len(r) for r in response_ids])[:, None]
    input_ids[:, width:] = torch.where(mask, completion, torch.full_like(completion, pad_token_id))
    attention[:, width:] = mask.long()
    texts = tokenizer.batch_decode(input_ids[:, width:] * mask, skip_special_tokens=True) if tokenizer else []
    return Rollout(input_ids, attention, mask, width, list(problems), texts)
