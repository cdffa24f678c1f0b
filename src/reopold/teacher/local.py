"""A teacher in this process: a frozen Hugging Face model scored teacher-forced on the student's sequences."""

from __future__ import annotations

import torch

from reopold.models.scorer import TokenScorer
from reopold.rollout.batch import Rollout
from reopold.teacher import SpanScores


class LocalTeacher:
    """A frozen Hugging Face model in this process, scored at ``temperature`` (default 1.0, the sampling one)."""

    def __init__(self, lm, *, temperature: float = 1.0, chunk_size: int = 1024, micro_batch_size: int = 64):
        self.scorer = TokenScorer(lm.eval().requires_grad_(False), temperature=temperature, chunk_size=chunk_size)
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def score(self, rollout: Rollout) -> SpanScores:
        """One tokenizer: the token log-probs, no span alignment."""
        return SpanScores(self.logprobs(rollout), None)

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        return self._batched(rollout, with_entropy=False)[0]  # (B, T)

    @torch.no_grad()
    def logprobs_and_cover(self, rollout: Rollout, table) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) log-probs of the rollout's tokens and their covers (``reopold.core.marginal``; ``table``: the
        ``extensions`` of this teacher's vocabulary)."""
        return self._batched(rollout, cover=table)

    def _batched(self, rollout: Rollout, **options) -> tuple[torch.Tensor, ...]:
        device = next(self.scorer.parameters()).device
        width = rollout.completion_mask.shape[1]
        parts = []
        for start in range(0, len(rollout), self.micro_batch_size):
            rows = list(range(start, min(start + self.micro_batch_size, len(rollout))))
            out = self.scorer(rollout.select(rows).to(device), **options)
            parts.append([None if t is None else torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in out])
        return tuple(None if part[0] is None else torch.cat(part).to(rollout.input_ids.device)
                     for part in zip(*parts, strict=True))

    @torch.no_grad()
    def logits(self, rollout: Rollout, vocab_size: int | None = None) -> torch.Tensor:
        device = next(self.scorer.parameters()).device
        logits = self.scorer(rollout.to(device), return_logits=True)
        return (logits if vocab_size is None else logits[..., :vocab_size]).to(rollout.input_ids.device)
