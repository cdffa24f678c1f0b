"""The teacher's probability of a span's *text*, not of its tokenizer's cut: the lookahead of a canonical cut
removed (docs/cross_tokenizer.md, "The lookahead of a canonical cut").

A tokenizer cuts text one way (its canonical cut), and a teacher trained on such cuts learns it. Its token log-prob
then says more than "these bytes come next": it also says "and the next token starts here". With a tokenizer that
merges a digit with the operator after it, ``log pi_T("7")`` is the probability of a 7 *that does not end the
number* (an ending 7 would have been ``"7*"``). Summed over a span whose last teacher token can be extended by
another token of the teacher's vocabulary, the teacher's side of ``R_span`` then grades a decision the student
only makes at its next token: a right digit is charged for the wrong number length that follows it. Only the
sequence sum is free of it.

The fix is the teacher's probability that the text so far is a prefix of its output, marginalised over the token
that crosses the span's end. With t_1 .. t_k the teacher's tokens up to a span end b and t_k the span's last,

    log P_T(text[:b]) ~= sum_{j<k} log pi_T(t_j | t_<j) + log sum_{v : bytes(v) starts with bytes(t_k)} pi_T(v | t_<k)

(the *cover* of t_k: every token the teacher could have written there that spells t_k's bytes and possibly more).
The span's teacher log-prob is the difference of two such prefixes, P_T(text[:b]) / P_T(text[:b_prev]):

    lp_span = sum_{u in span} lp_u  +  (cover_k - lp_k)  -  (cover_k' - lp_k')      (k' = previous span's last)

Over a completion the corrections telescope: the row still sums to log pi_T(text) when the completion ends with
the teacher's end-of-turn token (its cover is itself). The approximation keeps the teacher's canonical cut before
t_k; it is exact when every token that crosses a span end starts where the span's last teacher token starts (the
digit-operator merges of the bundled demonstration), and a one-token lookahead otherwise.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import NamedTuple

import torch

from reopold.core._checks import check_same_shape
from reopold.core.spans import SpanAlignment, _on_span_ends, _span_totals, teacher_span_sums

MAX_PAIRS = 1 << 24  # (row, extension) pairs gathered at once by cover_logprobs (about 400 MB of indices)


class Extensions(NamedTuple):
    """For every token id, the ids whose bytes start with its bytes (itself included): ``order[start[t]:stop[t]]``.

    Byte strings with a common prefix are contiguous in sorted order, so each token's extensions are one range of
    one permutation. A token without bytes (a special token) extends only itself.
    """

    order: torch.Tensor  # (N,) int64 token ids: those with bytes sorted by their bytes, then those without
    start: torch.Tensor  # (V,) int64
    stop: torch.Tensor  # (V,) int64
    rank: torch.Tensor  # (V,) int64 each id's place in ``order``: u extends t iff start[t] <= rank[u] < stop[t]


def extensions(table: Sequence[bytes]) -> Extensions:
    """The ``Extensions`` of a vocabulary given each token id's bytes (``reopold.teacher.cross.token_bytes``)."""
    written = sorted((piece, i) for i, piece in enumerate(table) if piece)
    keys = [piece for piece, _ in written]
    longest = max((len(k) for k in keys), default=0)
    start, stop = [0] * len(table), [0] * len(table)
    for i, piece in enumerate(table):
        if piece:
            start[i] = bisect.bisect_left(keys, piece)
            stop[i] = bisect.bisect_right(keys, piece + b"\xff" * longest)  # every string that starts with piece
    order = [i for _, i in written]
    for i, piece in enumerate(table):
        if not piece:
            start[i], stop[i] = len(order), len(order) + 1
            order.append(i)
    rank = [0] * len(table)
    for place, i in enumerate(order):
        rank[i] = place
    as_long = lambda x: torch.tensor(x, dtype=torch.int64)
    return Extensions(as_long(order), as_long(start), as_long(stop), as_long(rank))


def cover_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, table: Extensions) -> torch.Tensor:
    """log sum_{v extends tokens[i]} exp(logprobs[i, v]): the log-probability that the next token spells at least
    the bytes of the given one.

    Args:
        logprobs: (N, V) log-softmax of the next-token distributions (the teacher's, at its temperature).
        tokens: (N,) the token written at each position.
        table: from ``extensions`` over the same vocabulary (V >= its size).

    Returns:
        (N,) float, >= logprobs[i, tokens[i]]; equal to it for a token nothing extends.
    """
    if logprobs.dim() != 2 or tokens.shape != logprobs.shape[:1]:
        raise ValueError(f"logprobs must be (N, V) and tokens (N,); got {tuple(logprobs.shape)} and "
                         f"{tuple(tokens.shape)}")
    device = logprobs.device
    order, start, stop, _ = (t.to(device) for t in table)
    counts = stop[tokens] - start[tokens]  # (N,) extensions per row: up to a large share of a BPE vocabulary
    ends = counts.cumsum(0)
    if len(tokens) > 1 and int(ends[-1]) > MAX_PAIRS:  # bound the (row, extension) pairs held at once
        cut = max(1, int(torch.searchsorted(ends, torch.tensor(MAX_PAIRS, device=device), right=True)))
        return torch.cat([cover_logprobs(logprobs[:cut], tokens[:cut], table),
                          cover_logprobs(logprobs[cut:], tokens[cut:], table)])
    return _cover(logprobs, tokens, order, start[tokens], counts)


def _cover(logprobs, tokens, order, first, counts) -> torch.Tensor:
    device = logprobs.device
    rows = torch.repeat_interleave(torch.arange(len(tokens), device=device), counts)  # (P,) one per (row, extension)
    offsets = torch.arange(rows.numel(), device=device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    columns = order[torch.repeat_interleave(first, counts) + offsets]
    values = logprobs[rows, columns]  # (P,)
    peak = torch.full((len(tokens),), float("-inf"), dtype=values.dtype, device=device)
    peak = peak.scatter_reduce(0, rows, values, reduce="amax")
    safe = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros_like(peak).index_add(0, rows, (values - safe[rows]).exp())
    return safe + total.log()


def cover_from_candidates(candidates: torch.Tensor, logprobs: torch.Tensor, tokens: torch.Tensor,
                          table: Extensions) -> torch.Tensor:
    """``cover_logprobs`` from a few next-token candidates per position instead of the whole distribution (a
    server's top-k ``prompt_logprobs``): the log-sum-exp over the candidates that extend the written token, a lower
    bound of the cover, exact when every extension with mass is among the candidates.

    Args:
        candidates: (N, K) int64 token ids, -1 for padding; each row must hold ``tokens[i]``.
        logprobs: (N, K) their log-probs.
        tokens: (N,) the written tokens.
        table: ``extensions`` of the vocabulary.

    Returns:
        (N,) float64.
    """
    check_same_shape(candidates=candidates, logprobs=logprobs)
    _, start, stop, rank = table
    place = rank[candidates.clamp(min=0)]  # (N, K)
    inside = (candidates >= 0) & (place >= start[tokens][:, None]) & (place < stop[tokens][:, None])
    if not bool((inside & (candidates == tokens[:, None])).any(1).all()):
        raise ValueError("every row's candidates must hold its written token")
    earlier = torch.ones(candidates.shape[1], candidates.shape[1], dtype=torch.bool).tril(-1)  # (K, K) j < k
    repeated = ((candidates[:, :, None] == candidates[:, None, :]) & earlier).any(2)  # (N, K) seen at an earlier k
    inside = inside & ~repeated  # each id counted once
    return torch.where(inside, logprobs.double(), torch.tensor(float("-inf"), dtype=torch.float64)).logsumexp(1)


@torch.no_grad()
def logprobs_and_cover(
    inputs: torch.Tensor,
    tokens: torch.Tensor,
    table: Extensions,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's log-prob of each of its tokens and its ``cover_logprobs``, ``chunk_size`` positions at a time.

    Args:
        inputs: (B, T, V) next-token logits, or (B, T, D) final hidden states when ``head_weight`` (V, D) is given
            (the logits are then built one chunk at a time).
        tokens: (B, T) the teacher's tokens.
        table: ``extensions`` of the teacher's vocabulary.

    Returns:
        logprobs (B, T) and cover (B, T), float32 (float64 inputs stay float64), at ``temperature``.
    """
    if tokens.shape != inputs.shape[:-1]:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}; expected {tuple(inputs.shape[:-1])}")
    flat, flat_tokens = inputs.reshape(-1, inputs.shape[-1]), tokens.reshape(-1)
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    selected, covers = [], []
    for start in range(0, flat_tokens.numel(), chunk_size):
        chunk, chunk_tokens = flat[start : start + chunk_size], flat_tokens[start : start + chunk_size]
        if head_weight is not None:
            chunk = torch.nn.functional.linear(chunk, head_weight, head_bias)
        logprobs = torch.log_softmax(chunk.to(dtype) / temperature, dim=-1)  # (n, V)
        selected.append(logprobs.gather(-1, chunk_tokens[:, None]).squeeze(-1))
        covers.append(cover_logprobs(logprobs, chunk_tokens, table))
    return torch.cat(selected).view(tokens.shape), torch.cat(covers).view(tokens.shape)


def marginal_span_sums(teacher_logprobs: torch.Tensor, cover: torch.Tensor, alignment: SpanAlignment) -> torch.Tensor:
    """Each span's teacher log-prob of its text, the canonical cut's lookahead removed, on the student's span ends.

    ``teacher_span_sums(teacher_logprobs)`` plus, per span, ``cover - lp`` of its last teacher token minus the same
    of the previous span's last teacher token (the module's formula). With ``cover == teacher_logprobs`` (nothing
    extends any token, e.g. identical tokenizers of a character model) it is ``teacher_span_sums`` bit for bit.

    Args:
        teacher_logprobs: (B, Tt) log pi_T of the teacher's tokens of the completion.
        cover: (B, Tt) ``cover_logprobs`` at the same positions.
        alignment: from ``align_spans``.

    Returns:
        (B, Ts) on span ends, 0 elsewhere.
    """
    check_same_shape(teacher_logprobs=teacher_logprobs, cover=cover, teacher_spans=alignment.teacher_spans)
    spans = alignment.teacher_spans
    size = alignment.student_spans.shape[1]
    position = torch.arange(spans.shape[1], device=spans.device).expand_as(spans)
    index = torch.where(spans >= 0, spans, torch.full_like(spans, size))
    last_at = torch.full((spans.shape[0], size + 1), -1, dtype=torch.int64, device=spans.device)
    last_at = last_at.scatter_reduce(1, index, torch.where(spans >= 0, position, -1), reduce="amax")
    is_last = (spans >= 0) & (last_at.gather(1, index) == position)  # (B, Tt) each span's last teacher token
    lift = torch.where(is_last, cover - teacher_logprobs, torch.zeros_like(cover))  # inf/nan under padding kept out
    per_span = _span_totals(lift, spans, size)  # (B, size + 1): the lift of span s at column s
    previous = torch.cat([torch.zeros_like(per_span[:, :1]), per_span[:, :-1]], dim=1)
    shift = per_span - previous
    shift[:, -1] = 0  # the column of tokens in no span
    return teacher_span_sums(teacher_logprobs, alignment) + _on_span_ends(shift, alignment)


__all__ = ["Extensions", "cover_from_candidates", "cover_logprobs", "extensions", "logprobs_and_cover",
           "marginal_span_sums"]
