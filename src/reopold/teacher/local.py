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

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        device = next(self.scorer.parameters()).device
        parts = []
        for start in range(0, len(rollout), self.micro_batch_size):
            rows = list(range(start, min(start + self.micro_batch_size, len(rollout))))
            part = rollout.select(rows).to(device)
            logprobs, _ = self.scorer(part, with_entropy=False)
            parts.append(torch.nn.functional.pad(logprobs, (0, rollout.completion_mask.shape[1] - logprobs.shape[1])))
        return torch.cat(parts).to(rollout.input_ids.device)  # (B, T)

    @torch.no_grad()
    def logits(self, rollout: Rollout, vocab_size: int | None = None) -> torch.Tensor:
        device = next(self.scorer.parameters()).device
        logits = self.scorer(rollout.to(device), return_logits=True)
        return (logits if vocab_size is None else logits[..., :vocab_size]).to(rollout.input_ids.device)
