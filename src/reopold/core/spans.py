"""Sampled-token rewards across tokenizers: spans of the same bytes, graded as one unit (docs/cross_tokenizer.md).

The student samples a completion with its tokenizer; the teacher scores the same completion text re-tokenised with
its own. Tokens are grouped into spans that end on the same byte boundary on both sides: a span is a run of
>= 1 student tokens and >= 1 teacher tokens covering the same bytes. For such a span both sums of log-probs are
log-probabilities of the same string given the same text prefix, so

    R_span = sum_{u in span} log pi_T(u | q, text_<span) - sum_{t in span} log pi_theta(o_t | q, o_<t)

is the sampled-token reward of Eq. 3 for the span. With identical tokenizers every span is one token on each side
and R_span is R of Eq. 3 exactly.

REOPOLD then runs unchanged with the span as its unit: every per-token input of ``reopold_loss`` (student, old and
teacher log-probs, entropy) is summed over the span and placed on the span's last student token, and the
completion mask keeps only those span ends (``span_inputs``). The PPO ratio of a span is the product of its tokens'
ratios, so the gradient of a span's term reaches every student token of the span; the floor of Eq. 5/7 applies
once per span; the exploration mask of Eq. 9 keeps or drops whole spans; the entropy of a span is the sum of its
tokens' entropies (the chain rule estimate of the span's entropy along the sampled path).

Shapes: B rows, Ts student tokens, Tt teacher tokens (both padded). Span ids are int64, -1 off any span. Byte
offsets are ends of tokens counted from the start of the completion text, in bytes of its UTF-8 encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from reopold.core._checks import check_mask, check_same_shape
from reopold.core.rewards import token_rewards

_PAD_KEY = 2**62  # above every real (byte end, rank) key; the teacher's padding uses _PAD_KEY + 1


class SpanAlignment(NamedTuple):
    """Which span every student and teacher token belongs to (see ``align_spans``)."""

    student_spans: torch.Tensor  # (B, Ts) int64 span id of each student token, -1 on padding / no span
    teacher_spans: torch.Tensor  # (B, Tt) int64 span id of each teacher token, -1 on padding / no span
    num_spans: torch.Tensor  # (B,) int64 spans per row; ids run 0 .. num_spans - 1 in text order
    span_end_mask: torch.Tensor  # (B, Ts) bool, the last student token of each span (where its values go)


class SpanInputs(NamedTuple):
    """The per-token inputs of ``reopold_loss`` with the span as the unit, in its positional order."""

    student_logprobs: torch.Tensor  # (B, Ts) span sums on span ends, 0 elsewhere
    old_logprobs: torch.Tensor  # (B, Ts)
    teacher_logprobs: torch.Tensor  # (B, Ts) the teacher's span sums, on the student's span ends
    entropy: torch.Tensor | None  # (B, Ts)
    completion_mask: torch.Tensor  # (B, Ts) bool, span ends only


def pad_byte_ends(rows: Sequence[Sequence[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-row lists of cumulative byte ends into ``(ends, mask)``, both (B, length).

    Args:
        rows: for each row, the byte end of each token in order (e.g. ``itertools.accumulate`` of token byte
            lengths).
        length: padded width; defaults to the longest row.
    """
    width = max((len(row) for row in rows), default=0) if length is None else length
    if any(len(row) > width for row in rows):
        raise ValueError(f"length={width} is shorter than the longest row ({max(len(row) for row in rows)} tokens)")
    ends = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ends[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.int64)
        mask[i, : len(row)] = True
    return ends, mask


def byte_ends_from_offsets(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Byte ends of tokens from character offsets into ``text`` (a tokenizer's ``return_offsets_mapping``).

    ``offsets`` must be relative to ``text``, the completion (subtract the completion's start when the teacher
    tokenised the prompt and the completion together). Ends are kept non-decreasing: a token with empty offsets
    (a special token, often reported as ``(0, 0)``) becomes a zero-width token where the previous one ended. HF
    offsets count characters: a token holding part of a multi-byte character is reported with the whole
    character, so here it covers the whole character and the next pieces of it get zero width. Exact when the
    other side's ends are exact bytes; when both sides split one character into pieces, the pieces of that
    character are paired in order (the sum over the character stays exact). docs/cross_tokenizer.md.

    Returns:
        the byte end of every token, in order (UTF-8 bytes of ``text``).
    """
    byte_at = [0]  # byte position of each character boundary
    for char in text:
        byte_at.append(byte_at[-1] + len(char.encode("utf-8", "surrogatepass")))
    ends, current = [], 0
    for start, end in offsets:
        if not 0 <= start <= end <= len(text):
            raise ValueError(f"offset ({start}, {end}) lies outside the {len(text)} characters of the text")
        current = max(current, byte_at[end]) if end > start else current
        ends.append(current)
    return ends


def _compact(ends: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each row's valid tokens to the front, in order: returns (order, ends, mask) in compacted order."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # (B, T)
    return order, ends.gather(1, order), mask.gather(1, order)


def _keys(ends: torch.Tensor, mask: torch.Tensor, base: int, pad: int) -> torch.Tensor:
    """key = end * base + rank, rank = how many earlier valid tokens of the row end on the same byte (compacted).

    Zero-width tokens (an end-of-sequence token, a token that HF offsets collapse onto its character) share their
    end with the token before them; the rank keeps their keys distinct and pairs them in order across the sides.
    """
    position = torch.arange(ends.shape[1], device=ends.device).expand_as(ends)  # (B, T)
    previous = torch.cat([torch.full_like(ends[:, :1], -1), ends[:, :-1]], dim=1)
    run_start = torch.where(ends != previous, position, torch.zeros_like(position)).cummax(dim=1).values
    keys = ends * base + (position - run_start)
    return torch.where(mask, keys, torch.full_like(keys, pad))


def _isin_rows(queries: torch.Tensor, sorted_keys: torch.Tensor) -> torch.Tensor:
    """(B, Q) bool: is queries[b, q] among sorted_keys[b, :] (each row sorted ascending)."""
    if sorted_keys.shape[1] == 0:
        return torch.zeros_like(queries, dtype=torch.bool)
    index = torch.searchsorted(sorted_keys, queries).clamp(max=sorted_keys.shape[1] - 1)
    return sorted_keys.gather(1, index) == queries


def _span_ids(keys: torch.Tensor, ends: torch.Tensor, mask: torch.Tensor, other_keys: torch.Tensor, base: int):
    """Span id of each (compacted) token of one side, and whether its key is a shared boundary."""
    shared = _isin_rows(keys, other_keys) & mask  # (B, T): this token closes a span
    before = torch.cumsum(shared.to(torch.int64), dim=1) - shared.to(torch.int64)  # shared keys below this one
    # A surplus zero-width token on a byte where a span closes joins that span (the one just closed).
    on_boundary = _isin_rows(ends * base, other_keys) & mask & ~shared
    return before - on_boundary.to(torch.int64), shared


def _check_ends(name: str, ends: torch.Tensor, mask: torch.Tensor) -> None:
    if ends.dtype == torch.bool or ends.is_floating_point() or ends.is_complex():
        raise ValueError(f"{name} must be an integer tensor of byte ends; got dtype {ends.dtype}")
    if ends.dim() != 2:
        raise ValueError(f"{name} must be a (B, T) tensor of byte ends; got shape {tuple(ends.shape)}")
    if bool((mask & (ends < 0)).any()):
        raise ValueError(f"{name} holds a negative byte end on a valid token; ends count bytes from 0")


def _check_increasing(name: str, ends: torch.Tensor, mask: torch.Tensor) -> None:
    """Valid ends (compacted: valid tokens first, in order) must not decrease."""
    decreasing = (ends[:, 1:] < ends[:, :-1]) & mask[:, 1:]  # the token before a valid one is valid too
    if bool(decreasing.any()):
        raise ValueError(f"{name} must not decrease along a row's valid tokens (they are cumulative byte ends)")


def align_spans(
    student_ends: torch.Tensor,
    teacher_ends: torch.Tensor,
    student_mask: torch.Tensor,
    teacher_mask: torch.Tensor,
) -> SpanAlignment:
    """Group student and teacher tokens into spans that end on the same byte on both sides.

    Walk both token lists in text order: a span opens with the next token of each side, takes more tokens on
    whichever side is behind, and closes as soon as both sides end on the same byte. Zero-width tokens (no bytes:
    an end-of-sequence token, or a token whose offsets were collapsed onto the character it shares with its
    neighbour) are handled so that identical tokenisations always give one-to-one spans:

    - zero-width tokens on both sides right after a boundary pair up in order, one span each (so the student's
      EOS and the teacher's end-of-turn token form their own span, graded like any token);
    - a surplus zero-width token on one side only, right after a boundary, joins the span that closed there;
    - a zero-width token inside an open span (or before the first boundary) belongs to that span.

    Tokens with a False mask take no part (id -1): pass False for the teacher's template tokens that stand
    outside the completion text (its BOS, role headers, the generation prompt) and for padding. A row with no
    valid token on one side has no span: every token of the other side gets -1.

    Runs once per rollout step where the offsets are made (normally the CPU). It checks its inputs, which costs a
    device sync if they live on a GPU; it is not part of the loss path.

    Args:
        student_ends: (B, Ts) integer, the byte end of each student token within the completion text.
        teacher_ends: (B, Tt) integer, the byte end of each teacher token within the same text.
        student_mask: (B, Ts) bool, valid student tokens (the completion mask).
        teacher_mask: (B, Tt) bool, valid teacher tokens; need not be contiguous.

    Returns:
        SpanAlignment: student_spans (B, Ts), teacher_spans (B, Tt), num_spans (B,), span_end_mask (B, Ts).

    Raises:
        ValueError: when a row's ends decrease, are negative, or the two sides do not cover the same number of
            bytes (the texts differ: the teacher was not given the student's completion text).
    """
    _check_alignment_inputs(student_ends, teacher_ends, student_mask, teacher_mask)
    s_order, s_ends, s_mask = _compact(student_ends.to(torch.int64), student_mask)  # (B, Ts)
    t_order, t_ends, t_mask = _compact(teacher_ends.to(torch.int64), teacher_mask)  # (B, Tt)
    _check_increasing("student_ends", s_ends, s_mask)
    _check_increasing("teacher_ends", t_ends, t_mask)
    s_total = _last_valid(s_ends, s_mask)
    t_total = _last_valid(t_ends, t_mask)
    if bool((s_total != t_total).any()):
        row = int((s_total != t_total).nonzero()[0, 0])
        raise ValueError(
            f"row {row}: the student's tokens cover {int(s_total[row])} bytes but the teacher's cover "
            f"{int(t_total[row])}; both must tokenise the same completion text"
        )

    base = max(student_ends.shape[1], teacher_ends.shape[1]) + 1  # ranks are < base
    s_keys = _keys(s_ends, s_mask, base, _PAD_KEY)
    t_keys = _keys(t_ends, t_mask, base, _PAD_KEY + 1)  # padding never matches the other side's padding
    s_spans, s_shared = _span_ids(s_keys, s_ends, s_mask, t_keys, base)
    t_spans, _ = _span_ids(t_keys, t_ends, t_mask, s_keys, base)
    num_spans = s_shared.sum(dim=1)  # (B,)
    s_spans = torch.where(s_mask & (s_spans < num_spans[:, None]), s_spans, torch.full_like(s_spans, -1))
    t_spans = torch.where(t_mask & (t_spans < num_spans[:, None]), t_spans, torch.full_like(t_spans, -1))
    following = torch.cat([s_spans[:, 1:], torch.full_like(s_spans[:, :1], -1)], dim=1)
    s_end = (s_spans >= 0) & (s_spans != following)  # ids never decrease in text order

    return SpanAlignment(
        student_spans=torch.empty_like(s_spans).scatter(1, s_order, s_spans),
        teacher_spans=torch.empty_like(t_spans).scatter(1, t_order, t_spans),
        num_spans=num_spans,
        span_end_mask=torch.empty_like(s_end).scatter(1, s_order, s_end),
    )


def _check_alignment_inputs(student_ends, teacher_ends, student_mask, teacher_mask) -> None:
    """Masks are bool, shapes agree, both sides have the same rows, and no row's byte ends are negative."""
    check_mask("student_mask", student_mask)
    check_mask("teacher_mask", teacher_mask)
    check_same_shape(student_ends=student_ends, student_mask=student_mask)
    check_same_shape(teacher_ends=teacher_ends, teacher_mask=teacher_mask)
    if student_ends.shape[0] != teacher_ends.shape[0]:
        raise ValueError(
            f"student_ends has {student_ends.shape[0]} rows but teacher_ends has {teacher_ends.shape[0]}; "
            "pass the same completions in the same order"
        )
    _check_ends("student_ends", student_ends, student_mask)
    _check_ends("teacher_ends", teacher_ends, teacher_mask)


def _last_valid(ends: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) the last valid end of each compacted row; 0 for a row without valid tokens."""
    count = mask.sum(dim=1)  # (B,)
    if ends.shape[1] == 0:
        return torch.zeros_like(count)
    last = ends.gather(1, (count - 1).clamp(min=0)[:, None]).squeeze(1)
    return torch.where(count > 0, last, torch.zeros_like(last))


def _span_totals(values: torch.Tensor, spans: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size + 1) sum of ``values`` per span id; column ``size`` collects the tokens in no span."""
    check_same_shape(values=values, spans=spans)
    in_span = spans >= 0
    index = torch.where(in_span, spans, torch.full_like(spans, size))
    kept = torch.where(in_span, values, torch.zeros_like(values))  # nan/inf under padding never enter a sum
    return torch.zeros(values.shape[0], size + 1, dtype=values.dtype, device=values.device).scatter_add(1, index, kept)


def _on_span_ends(totals: torch.Tensor, alignment: SpanAlignment) -> torch.Tensor:
    """Place per-span totals (B, Ts + 1) on the student's span-end tokens: (B, Ts), 0 elsewhere."""
    spans = alignment.student_spans
    index = torch.where(spans >= 0, spans, torch.full_like(spans, totals.shape[1] - 1))
    placed = totals.gather(1, index)
    return torch.where(alignment.span_end_mask, placed, torch.zeros_like(placed))


def student_span_sums(values: torch.Tensor, alignment: SpanAlignment) -> torch.Tensor:
    """Each span's sum of a per-student-token quantity, on the span's last student token.

    Args:
        values: (B, Ts) e.g. student log-probs (gradients flow back to every token of the span) or entropies.
        alignment: from ``align_spans``.

    Returns:
        (B, Ts): the span sum on each span end, 0 on every other position. A one-token span holds its token's
        value bit for bit.
    """
    totals = _span_totals(values, alignment.student_spans, values.shape[1])
    return _on_span_ends(totals, alignment)


def teacher_span_sums(teacher_values: torch.Tensor, alignment: SpanAlignment) -> torch.Tensor:
    """Each span's sum of a per-teacher-token quantity, carried onto the student's last token of the span.

    Args:
        teacher_values: (B, Tt) e.g. the teacher's log-probs of its own tokens of the completion.
        alignment: from ``align_spans``.

    Returns:
        (B, Ts): the teacher's span sum on each student span end, 0 elsewhere.
    """
    size = alignment.student_spans.shape[1]  # a span holds >= 1 student token, so ids are < Ts
    totals = _span_totals(teacher_values, alignment.teacher_spans, size)
    return _on_span_ends(totals, alignment)


def token_credit(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    alignment: SpanAlignment,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-student-token teacher log-probs from span sums: each span's teacher log-prob split over its student tokens
    in proportion to their surprisal -log pi(o_t) (plus ``eps``, so a span the student is sure of splits evenly).

    Then R_t = share_t - log pi(o_t) grades each token on its own, and the R_t of a span still sum to R_span. A
    token the student was sure of (a number's closing operator, say) takes almost none of the teacher's surprise;
    the uncertain token of the span takes most of it. With one-token spans the result is the teacher's log-prob of
    the token, bit for bit. A heuristic credit rule, not an identity: docs/cross_tokenizer.md says what it changed.

    Args:
        teacher_logprobs: (B, Ts) the teacher's span sums on the student's span ends, 0 elsewhere
            (``teacher_span_sums``: what a cross-tokenizer teacher's score returns).
        student_logprobs: (B, Ts) log pi_old of the sampled student tokens (detached).
        alignment: from ``align_spans``.

    Returns:
        (B, Ts) teacher log-probs per student token; 0 on tokens in no span.
    """
    check_same_shape(teacher_logprobs=teacher_logprobs, student_logprobs=student_logprobs,
                     student_spans=alignment.student_spans)
    spans = alignment.student_spans
    size = spans.shape[1]
    index = torch.where(spans >= 0, spans, torch.full_like(spans, size))
    teacher_totals = _span_totals(teacher_logprobs, spans, size).gather(1, index)  # (B, Ts) the span's sum
    weight = (-student_logprobs.detach()).clamp(min=0) + eps  # (B, Ts)
    weight_totals = _span_totals(weight, spans, size).gather(1, index)
    shares = torch.where(weight == weight_totals, teacher_totals, teacher_totals * weight / weight_totals)
    return torch.where(spans >= 0, shares, torch.zeros_like(shares))


def span_rewards(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    alignment: SpanAlignment,
    *,
    stop_gradient: bool = True,
) -> torch.Tensor:
    """R_span = sum of teacher log-probs - sum of student log-probs over a span, on its last student token.

    Every other student token holds 0, so a row's rewards sum to log pi_T(text) - log pi_theta(text) over its
    aligned tokens: the sequence log-ratio. With identical tokenizers this is ``token_rewards`` bit for bit on
    valid tokens (0 on padding). Train on it with ``span_inputs``; the floor of Eq. 7 then applies per span.

    Args:
        student_logprobs: (B, Ts) log pi_theta of the sampled student tokens.
        teacher_logprobs: (B, Tt) log pi_T of the teacher's tokens of the same completion text.
        alignment: from ``align_spans``.
        stop_gradient: sg(R) of Remark 3.1.

    Returns:
        (B, Ts) rewards, non-zero only under ``alignment.span_end_mask``.
    """
    rewards = token_rewards(
        student_span_sums(student_logprobs, alignment),
        teacher_span_sums(teacher_logprobs, alignment),
        stop_gradient=stop_gradient,
    )  # (B, Ts)
    return torch.where(alignment.span_end_mask, rewards, torch.zeros_like(rewards))


def span_inputs(
    student_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    completion_mask: torch.Tensor,
    alignment: SpanAlignment,
) -> SpanInputs:
    """The inputs of ``reopold_loss`` with the span as the unit: call ``reopold_loss(*span_inputs(...), ...)``.

    Student, old and teacher log-probs and the entropy are summed over each span and placed on its last student
    token; the mask keeps only those span ends. Then, per span: R = R_span (Eq. 3), the PPO ratio is
    pi_theta(span) / pi_old(span) (Eq. 6), the floor max(R_span, log(lam)/(1-lam)) binds at most once (Eq. 7),
    exploration keeps or drops the whole span (Eq. 9), refinement keeps spans whose summed entropy reaches
    tau_beta, computed over span ends (Eq. 8, 10), and the loss is a mean over kept spans. With identical
    tokenizers every tensor comes back bit for bit and the loss is ``reopold_loss``'s.

    Args:
        student_logprobs: (B, Ts) current log pi_theta of the sampled tokens (with gradient).
        old_logprobs: (B, Ts) rollout-time log pi_old.
        teacher_logprobs: (B, Tt) the teacher's log-probs of its tokens of the same completion text.
        entropy: (B, Ts) rollout-time student entropy, or None.
        completion_mask: (B, Ts) bool, valid student tokens (the mask given to ``align_spans``).
        alignment: from ``align_spans``.

    Returns:
        SpanInputs, all (B, Ts).
    """
    check_mask("completion_mask", completion_mask)
    check_same_shape(
        student_logprobs=student_logprobs, old_logprobs=old_logprobs, completion_mask=completion_mask,
        student_spans=alignment.student_spans,
    )  # fmt: skip
    return SpanInputs(
        student_logprobs=student_span_sums(student_logprobs, alignment),
        old_logprobs=student_span_sums(old_logprobs.detach(), alignment),
        teacher_logprobs=teacher_span_sums(teacher_logprobs.detach(), alignment),
        entropy=None if entropy is None else student_span_sums(entropy.detach(), alignment),
        completion_mask=completion_mask & alignment.span_end_mask,
    )


def span_metrics(alignment: SpanAlignment) -> dict[str, torch.Tensor]:
    """How far two tokenisations disagree (detached 0-dim tensors, no device sync).

    multi_token_span_frac: fraction of aligned student tokens whose span is not one student token to one teacher
        token (0 with identical tokenizers). student_tokens_per_span / teacher_tokens_per_span: mean span sizes.
    """
    student, teacher = alignment.student_spans, alignment.teacher_spans
    size = student.shape[1]
    ones_s = torch.ones_like(student, dtype=torch.float32)
    ones_t = torch.ones_like(teacher, dtype=torch.float32)
    s_count = _span_totals(ones_s, student, size)  # (B, Ts + 1) tokens per span
    t_count = _span_totals(ones_t, teacher, size)
    one_to_one = ((s_count == 1) & (t_count == 1)).to(torch.float32)
    aligned = student >= 0
    index = torch.where(aligned, student, torch.full_like(student, size))
    in_multi = torch.where(aligned, 1.0 - one_to_one.gather(1, index), torch.zeros_like(ones_s))
    spans = alignment.num_spans.sum().clamp(min=1).to(torch.float32)
    return {
        "multi_token_span_frac": in_multi.sum() / aligned.sum().clamp(min=1),
        "student_tokens_per_span": aligned.sum() / spans,
        "teacher_tokens_per_span": (teacher >= 0).sum() / spans,
    }
