"""A teacher with another tokenizer: it scores the student's completion *text* under its own tokenizer and chat
template, and its log-probs reach the student through spans of the same bytes (``reopold.core.spans``,
docs/cross_tokenizer.md).

Per rollout row: the student's sampled tokens give the completion's bytes (each token's own bytes, not a
re-tokenisation of the decoded text); the teacher's prompt is the problem's prompt rendered with the teacher's
template; the completion text is tokenised on its own with offsets, and the teacher's EOS is appended exactly when
the student ended with its EOS. Any same-vocabulary teacher (``LocalTeacher``, ``RemoteTeacher``) scores the
teacher-side rows; ``align_spans`` groups both sides' tokens and ``teacher_span_sums`` places each span's teacher
log-prob sum on the student's last token of the span, so the result has the student's (B, T) layout:

    CrossTokenizerTeacher.logprobs(rollout)  (B, T): the teacher's span sums on span ends, 0 elsewhere
    CrossTokenizerTeacher.score(rollout)     the same plus the SpanAlignment the trainer sums the student's side by

Summed over a completion, these log-probs are log pi_T(text), so a held-out reverse KL computed as
sum(student - teacher) over the completion is the same sequence-level estimate as with one tokenizer.
"""

from __future__ import annotations

import functools

import torch

from reopold.core.marginal import extensions, marginal_span_sums
from reopold.core.spans import (
    SpanAlignment,
    align_spans,
    byte_ends_from_offsets,
    pad_byte_ends,
    student_span_sums,
    teacher_span_sums,
)
from reopold.rollout.batch import Rollout, build_rollout
from reopold.teacher import SpanScores

EXACT, SPANS = "exact", "spans"  # the two modes of a teacher: same vocabulary, or span alignment
# The teacher's log-prob of a student token it cannot write: one with no bytes (a <pad>, <unk> or other special
# token sampled inside a completion; the final EOS is paired with the teacher's own). Without it such tokens would
# join a span for free, and since R_span = teacher sum - student sum, sampling improbable ones would *raise* the
# span's reward: measured on the demo, the student learnt to fill its answers with them within 50 steps. -20 is
# about what a trained teacher of the same vocabulary gives such a token; REOPOLD floors the span's reward anyway.
UNWRITABLE_LOGPROB = -20.0


def same_vocabulary(student_tokenizer, teacher_tokenizer) -> bool:
    return student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()


def identity_alignment(completion_mask: torch.Tensor) -> SpanAlignment:
    """The alignment of a teacher that shares the student's tokens: every valid token its own span."""
    spans = torch.where(completion_mask, completion_mask.long().cumsum(1) - 1, torch.full_like(completion_mask,
                                                                                              -1, dtype=torch.long))
    return SpanAlignment(spans, spans.clone(), completion_mask.sum(1), completion_mask.clone())


def stack_alignments(parts: list[tuple[list[int], SpanAlignment]], batch: int, width: int) -> SpanAlignment:
    """One (batch, width) alignment from alignments of disjoint row subsets (padding: -1, False)."""
    teacher_width = max((a.teacher_spans.shape[1] for _, a in parts), default=0)
    student = torch.full((batch, width), -1, dtype=torch.long)
    teacher = torch.full((batch, teacher_width), -1, dtype=torch.long)
    ends = torch.zeros((batch, width), dtype=torch.bool)
    count = torch.zeros(batch, dtype=torch.long)
    for rows, alignment in parts:
        index = torch.as_tensor(rows, dtype=torch.long)
        w, tw = alignment.student_spans.shape[1], alignment.teacher_spans.shape[1]
        student[index, :w] = alignment.student_spans.cpu()
        teacher[index, :tw] = alignment.teacher_spans.cpu()
        ends[index, :w] = alignment.span_end_mask.cpu()
        count[index] = alignment.num_spans.cpu()
    return SpanAlignment(student, teacher, count, ends)


# ---- the student's bytes -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE writes for each byte -> the byte."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"),
                                                                                                      ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in visible:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _decoder_types(tokenizer) -> set[str]:
    """The types of a fast tokenizer's decoder (a Sequence counts its parts)."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return set()
    state = json.loads(backend.to_str()).get("decoder") or {}
    parts = state.get("decoders", [state]) if state.get("type") == "Sequence" else [state]
    return {part.get("type") for part in parts if isinstance(part, dict)}


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id stands for, as sampled (special tokens: none). Byte-level BPE tokens map back
    through GPT-2's byte table; SentencePiece-style tokens turn "▁" into a space and "<0xHH>" into the byte;
    others are their own string. ``check_token_bytes`` checks the result on a probe text."""
    special = set(tokenizer.all_special_ids)
    kinds = _decoder_types(tokenizer)
    size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    strings = tokenizer.convert_ids_to_tokens(list(range(size)))
    table = _byte_decoder()
    out = []
    for i, piece in enumerate(strings):
        if i in special or piece is None:
            out.append(b"")
        elif "ByteLevel" in kinds and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        elif "Metaspace" in kinds or "Replace" in kinds:
            out.append(piece.replace("▁", " ").encode())
        else:
            out.append(piece.encode())
    return out


def probe_text(table: list[bytes], size: int = 256) -> str:
    """Text the student can write: the whole-character tokens of a spread of its vocabulary, joined."""
    step = max(1, len(table) // size)
    pieces = []
    for piece in table[::step]:
        try:
            pieces.append(piece.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return "".join(pieces)


def check_token_bytes(tokenizer, table: list[bytes], name: str) -> None:
    """The token bytes of a tokenised text spell the text: else the student's bytes cannot be recovered."""
    probe = probe_text(table)
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    spelled = b"".join(table[i] for i in ids)
    decoded = tokenizer.decode(ids).encode()
    if spelled != decoded:
        raise ValueError(
            f"cannot recover the bytes of {name!r}'s tokens: its tokens of a probe spell {spelled[:60]!r}, its "
            f"decoder gives {decoded[:60]!r}. Cross-tokenizer rewards need each sampled token's bytes; use a "
            "byte-level BPE, SentencePiece or character tokenizer, or a teacher with the student's vocabulary."
        )


def check_offsets(tokenizer, name: str, probe: str) -> None:
    """The teacher's tokenizer gives character offsets and decodes its tokens of ``probe`` (text the student can
    write) back to ``probe``."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"the tokenizer of teacher {name!r} is a slow (Python) tokenizer without offsets; span "
                         "alignment needs return_offsets_mapping: save a fast tokenizer (tokenizer.json) with it")
    encoded = tokenizer(probe, add_special_tokens=False, return_offsets_mapping=True)
    decoded = tokenizer.decode(encoded["input_ids"])
    if decoded != probe:
        at = next((i for i, (x, y) in enumerate(zip(decoded, probe, strict=False)) if x != y), min(len(decoded),
                                                                                               len(probe)))
        raise ValueError(
            f"the tokenizer of teacher {name!r} does not decode its tokens of the student's text back to the same "
            f"text (from character {at}: {probe[at : at + 20]!r} came back as {decoded[at : at + 20]!r}): it cannot "
            "write some of what the student writes (unknown tokens), or it adds a prefix space to text tokenised "
            "on its own"
        )


# ---- the teacher ------------------------------------------------------------------------------------------------
class CrossTokenizerTeacher:
    """The Teacher Protocol for a teacher whose tokenizer differs from the student's.

    Args:
        inner: a same-vocabulary teacher of the teacher's own tokens (``LocalTeacher``, ``RemoteTeacher``).
        teacher_tokenizer: the teacher's (fast) tokenizer.
        student_tokenizer: the student's tokenizer (its sampled tokens' bytes, its EOS).
        encode: problem prompt -> the teacher's prompt ids (``PromptEncoder(teacher_tokenizer, ...)``).
        marginal: read each span's teacher log-prob as the probability of its text, marginalised over the teacher
            tokens that cross the span's end (``reopold.core.marginal``) with ``inner.logprobs_and_cover`` (exact in
            this process and from ``reopold serve-teacher``; from a vLLM server's top-k log-probs, a lower bound).
            False: the teacher's canonical cut as it is.
    """

    def __init__(self, inner, teacher_tokenizer, student_tokenizer, encode, *, marginal: bool = False):
        self.inner = inner
        self.extensions = extensions(token_bytes(teacher_tokenizer)) if marginal else None
        self.tokenizer = teacher_tokenizer
        self.encode = encode
        self.student_bytes = token_bytes(student_tokenizer)
        self.student_eos = {student_tokenizer.eos_token_id}
        self.teacher_eos = teacher_tokenizer.eos_token_id
        self.teacher_pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else 0

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        return self.score(rollout).logprobs

    def logits(self, rollout: Rollout, vocab_size: int | None = None) -> torch.Tensor:
        raise NotImplementedError("a teacher with another tokenizer has no next-token distribution over the "
                                  "student's vocabulary; full-distribution losses (gkd) need a shared vocabulary")

    def align(self, rollout: Rollout) -> tuple[SpanAlignment, Rollout]:
        """The span alignment of the rollout's completions, and the teacher-side rollout that scores them."""
        ids, mask = rollout.completion_ids.cpu(), rollout.completion_mask.cpu()
        student_rows, teacher_rows, teacher_ids, valid_rows = [], [], [], []
        for i in range(len(rollout)):
            tokens = ids[i][mask[i]].tolist()
            pieces = [self.student_bytes[t] if t < len(self.student_bytes) else b"" for t in tokens]
            data = b"".join(pieces)
            text, keep = _whole_characters(data)
            ends, total = [], 0
            for piece in pieces:
                total += len(piece)
                ends.append(total)
            valid_rows.append([end <= keep for end in ends])
            student_rows.append([min(end, keep) for end in ends])
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            row_ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
            row_ends = byte_ends_from_offsets(text, offsets)
            if row_ends:
                row_ends[-1] = keep  # a tokenizer that trims trailing whitespace from offsets still covers it
            if tokens and tokens[-1] in self.student_eos:
                row_ids.append(self.teacher_eos)  # the student's "stop here", graded by the teacher's end of turn
                row_ends.append(keep)
            teacher_ids.append(row_ids)
            teacher_rows.append(row_ends)
        width = ids.shape[1]
        student_ends = torch.zeros((len(rollout), width), dtype=torch.long)
        student_mask = torch.zeros((len(rollout), width), dtype=torch.bool)
        for i, (row, valid) in enumerate(zip(student_rows, valid_rows, strict=True)):
            positions = mask[i].nonzero().squeeze(1)
            student_ends[i, positions] = torch.as_tensor(row, dtype=torch.long)
            student_mask[i, positions] = torch.as_tensor(valid, dtype=torch.bool)
        teacher_ends, teacher_mask = pad_byte_ends(teacher_rows, max(1, max(map(len, teacher_rows), default=1)))
        alignment = align_spans(student_ends, teacher_ends, student_mask, teacher_mask)
        prompts = [self.encode(problem.prompt) for problem in rollout.problems]
        teacher_rollout = build_rollout(prompts, teacher_ids, rollout.problems, pad_token_id=self.teacher_pad,
                                        eos_token_id=-1)  # -1: no id ends a row early; lengths set the masks
        return alignment, teacher_rollout

    def unwritable(self, rollout: Rollout) -> torch.Tensor:
        """(B, T) bool: valid student tokens with no bytes other than a final EOS (the teacher cannot write them)."""
        ids, mask = rollout.completion_ids.cpu(), rollout.completion_mask.cpu()
        no_bytes = torch.tensor([len(piece) == 0 for piece in self.student_bytes], dtype=torch.bool)
        out = no_bytes[ids.clamp(0, len(no_bytes) - 1)] & mask  # (B, T)
        last = (mask.long().cumsum(1) == mask.sum(1, keepdim=True)) & mask  # each row's last valid token
        final_eos = last & torch.isin(ids, torch.tensor(sorted(self.student_eos)))
        return out & ~final_eos

    @torch.no_grad()
    def score(self, rollout: Rollout) -> SpanScores:
        alignment, teacher_rollout = self.align(rollout)
        width = alignment.teacher_spans.shape[1]
        fit = lambda t: torch.nn.functional.pad(t.float().cpu(), (0, max(0, width - t.shape[1])))[:, :width]  # (B, Tt)
        if self.extensions is None:
            on_student = teacher_span_sums(fit(self.inner.logprobs(teacher_rollout)), alignment)  # (B, T)
        else:
            logprobs, cover = self.inner.logprobs_and_cover(teacher_rollout, self.extensions)
            on_student = marginal_span_sums(fit(logprobs), fit(cover), alignment)
        penalty = self.unwritable(rollout).float() * UNWRITABLE_LOGPROB  # (B, T)
        on_student = on_student + student_span_sums(penalty, alignment)  # on the span ends of the spans they join
        device = rollout.input_ids.device
        alignment = SpanAlignment(*(t.to(device) for t in alignment))
        return SpanScores(on_student.to(device), alignment)


def _whole_characters(data: bytes) -> tuple[str, int]:
    """The UTF-8 text of ``data`` cut back to its last whole character, and how many bytes that keeps."""
    for cut in range(len(data), max(-1, len(data) - 4), -1):
        try:
            return data[:cut].decode("utf-8"), cut
        except UnicodeDecodeError:
            continue
    return "", 0  # invalid UTF-8 inside the completion: no text to score, the row gets no span
