"""Teacher scoring: the Teacher Protocol and its backends, a model in this process (``local``), a model behind an
HTTP server (``remote``) and the server that hosts one (``server``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

from reopold.errors import TeacherUnavailable

if TYPE_CHECKING:
    import torch

    from reopold.core.spans import SpanAlignment
    from reopold.rollout.batch import Rollout


class SpanScores(NamedTuple):
    """A teacher's scores in the student's layout, and how its tokens were grouped with the student's."""

    logprobs: torch.Tensor  # (B, T) span sums on the student's span ends (token log-probs when spans is None)
    spans: SpanAlignment | None  # None: one tokenizer, every token its own span
    names: list[str] | None = None  # (B,) the teacher that scored each row, when several teachers share a batch


class Teacher(Protocol):
    """What the trainer needs from a teacher: log-probs of given tokens (with the span alignment, for a teacher of
    another tokenizer), and full logits for GKD."""

    def score(self, rollout: Rollout) -> SpanScores:
        """``logprobs`` in the student's layout, and the span alignment (None when the tokenizers agree)."""
        ...

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        """(B, T) log pi_T of each response token, teacher-forced on the rollout's own sequences."""
        ...

    def logits(self, rollout: Rollout, vocab_size: int | None = None) -> torch.Tensor:
        """(B, T, V) next-token logits at the response positions (GKD only; remote teachers raise)."""
        ...


__all__ = ["SpanScores", "Teacher", "TeacherUnavailable"]
