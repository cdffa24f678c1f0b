"""Teacher scoring: the Teacher Protocol and its backends, a model in this process (``local``), a model behind an
HTTP server (``remote``) and the server that hosts one (``server``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from reopold.errors import TeacherUnavailable

if TYPE_CHECKING:
    import torch

    from reopold.rollout.batch import Rollout


class Teacher(Protocol):
    """What the trainer needs from a teacher: log-probs of given tokens, and full logits for GKD."""

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        """(B, T) log pi_T of each response token, teacher-forced on the rollout's own sequences."""
        ...

    def logits(self, rollout: Rollout, vocab_size: int | None = None) -> torch.Tensor:
        """(B, T, V) next-token logits at the response positions (GKD only; remote teachers raise)."""
        ...


__all__ = ["Teacher", "TeacherUnavailable"]
