"""The default sampler: Hugging Face ``generate`` with a KV cache, on the trained model itself (also the CPU path)."""

from __future__ import annotations

import torch

from reopold.rollout.batch import Rollout, completion_mask_from


class HFRolloutEngine:
    """Samples with ``model.generate`` (KV cache) at ``temperature`` from the model's full distribution.

    top-k and top-p are switched off on purpose: the student's log-probs are taken from softmax(logits / T), so the
    sampler must draw from exactly that distribution (a model's generation_config often sets top_k=50).
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int, temperature: float = 1.0, do_sample: bool = True,
                 vision=None, suppress_tokens: list[int] | None = None):
        self.model = model
        # Image prompts: a VisionPromptEncoder renders them from the problems (their images with them); the
        # prompt ids passed to generate() are then not used. ``suppress_tokens``: ids never sampled (the vision
        # placeholders; a sampled one would break the next forced pass).
        self.vision = vision
        self.suppress_tokens = suppress_tokens
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.do_sample = do_sample

    def sync_weights(self, model) -> None:
        """Nothing to copy: ``generate`` runs on the model the trainer updates."""
        self.model = model

    def close(self) -> None:
        """Nothing to release: the model belongs to the trainer."""

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], problems: list, *, num_samples: int = 1) -> Rollout:
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        images = None
        if self.vision is not None:
            input_ids, attention, images = self.vision.batch(problems)
        else:
            width = max(len(p) for p in prompt_ids)
            input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids], device=device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
        return self.sample(input_ids, attention, images, problems, num_samples=num_samples)

    @torch.no_grad()
    def sample(self, input_ids: torch.Tensor, attention: torch.Tensor, images, problems: list, *,
               num_samples: int = 1) -> Rollout:
        """``generate`` on a batch laid out already: left-padded ``input_ids`` and ``attention`` (B, P), and the
        ``ImageInputs`` of their images or None (multi-turn episodes of a vision-language student lay out their
        interleaved contexts themselves)."""
        from transformers import GenerationConfig

        tokenizer = self.tokenizer
        device = next(self.model.parameters()).device
        pad = tokenizer.pad_token_id
        width = input_ids.shape[1]
        extra = {}
        if images is not None:
            input_ids, attention, images = input_ids.to(device), attention.to(device), images.to(device)
            extra = {"pixel_values": images.pixel_values, "image_grid_thw": images.image_grid_thw,
                     "mm_token_type_ids": images.mm_token_type_ids}
        sampling = {"temperature": self.temperature, "top_k": 0, "top_p": 1.0} if self.do_sample else {}
        if self.suppress_tokens:
            sampling["suppress_tokens"] = list(self.suppress_tokens)
        config = GenerationConfig(
            do_sample=self.do_sample, max_new_tokens=self.max_new_tokens, num_return_sequences=num_samples,
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True, **sampling,
        )  # fmt: skip
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config, **extra)
        self.model.train(was_training)
        completion = out[:, width:]  # (B * n, T)
        mask = completion_mask_from(completion, tokenizer.eos_token_id)
        completion = torch.where(mask, completion, torch.full_like(completion, pad))
        rows = torch.arange(input_ids.shape[0], device=device).repeat_interleave(num_samples)
        rollout = Rollout(
            input_ids=torch.cat([input_ids[rows], completion], dim=1),
            attention_mask=torch.cat([attention[rows], mask.long()], dim=1),
            completion_mask=mask,
            prompt_length=width,
            problems=[problems[i] for i in rows.tolist()],
            texts=tokenizer.batch_decode(completion, skip_special_tokens=True),
            images=None if images is None else images.select(rows),
        )
        return rollout


def vision_options(encode) -> dict:
    """HFRolloutEngine keyword arguments for prompts encoded by ``encode``: for a VisionPromptEncoder, the encoder
    (the engine renders image prompts from the problems) and the ids never sampled; nothing for text prompts."""
    if not getattr(encode, "multimodal", False):
        return {}
    return {"vision": encode, "suppress_tokens": encode.never_sampled}
