"""Several teachers in one run: each row of a rollout is scored by the teacher its problem's routing key names
(docs/teachers.md)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from reopold.registry import nearest
from reopold.rollout.batch import Rollout
from reopold.teacher import SpanScores
from reopold.teacher.cross import identity_alignment, stack_alignments


class RoutedTeacher:
    """The Teacher Protocol over named teachers: rows go to ``teachers[route(problem)]``.

    Each teacher scores its own rows (as a sub-batch); the scores come back in the batch's layout with the name of
    the teacher of each row. When any teacher has another tokenizer, rows of the others get one-token spans, which
    the trainer treats exactly like tokens.
    """

    def __init__(self, teachers: dict, route: Callable[[object], str]):
        if not teachers:
            raise ValueError("RoutedTeacher needs at least one teacher")
        self.teachers = teachers
        self.route = route

    def names_of(self, problems: list) -> list[str]:
        names = [self.route(problem) for problem in problems]
        check_routes(names, list(self.teachers))
        return names

    @torch.no_grad()
    def score(self, rollout: Rollout) -> SpanScores:
        names = self.names_of(rollout.problems)
        batch, width = rollout.completion_mask.shape
        out = torch.zeros((batch, width), dtype=torch.float32, device=rollout.input_ids.device)
        parts, any_spans = [], False
        for name, teacher in self.teachers.items():
            rows = [i for i, n in enumerate(names) if n == name]
            if not rows:
                continue
            sub = rollout.select(rows)
            scores = teacher.score(sub)
            out[rows, : scores.logprobs.shape[1]] = scores.logprobs.float().to(out.device)
            parts.append((rows, scores.spans if scores.spans is not None else identity_alignment(sub.completion_mask)))
            any_spans = any_spans or scores.spans is not None
        if not any_spans:
            return SpanScores(out, None, names)
        spans = stack_alignments(parts, batch, width)
        return SpanScores(out, type(spans)(*(t.to(out.device) for t in spans)), names)

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        return self.score(rollout).logprobs

    def logits(self, rollout: Rollout, vocab_size: int | None = None) -> torch.Tensor:
        raise NotImplementedError("several teachers grade sampled tokens only; gkd needs one local teacher")


def check_routes(keys: list, names: list[str], *, what: str = "a prompt") -> None:
    """Every routing key must name a teacher: else a ValueError naming the key, the nearest name and all names."""
    for key in keys:
        if key not in names:
            close = nearest(str(key), names)
            hint = f"; did you mean {close!r}?" if close else ""
            raise ValueError(f"{what} is routed to teacher {key!r}, which is not among the teachers "
                             f"({', '.join(names)}){hint}. Name every value of data.teacher_key's column in teachers")
