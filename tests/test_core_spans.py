"""Span alignment and span rewards across tokenizers (docs/cross_tokenizer.md), against a naive byte-walk reference."""

import itertools
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reopold.core.losses import reopold_loss
from reopold.core.rewards import reward_floor, token_rewards
from reopold.core.spans import (
    align_spans,
    byte_ends_from_offsets,
    pad_byte_ends,
    span_inputs,
    span_metrics,
    span_rewards,
    student_span_sums,
    teacher_span_sums,
    token_credit,
)
from tests import reference as ref

torch.set_num_threads(1)
F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)
LO = reward_floor(0.3)  # -1.7199611


def byte_tokens(*pieces: str) -> list[bytes]:
    return [p.encode() for p in pieces]


def ends_of(tokens: list[bytes]) -> list[int]:
    return list(itertools.accumulate(len(t) for t in tokens))


def align_rows(student_rows, teacher_rows):
    """align_spans on padded tensors built from per-row token byte strings."""
    s_ends, s_mask = pad_byte_ends([ends_of(r) for r in student_rows])
    t_ends, t_mask = pad_byte_ends([ends_of(r) for r in teacher_rows])
    return align_spans(s_ends, t_ends, s_mask, t_mask), s_mask, t_mask


def assert_matches_reference(alignment, student_rows, teacher_rows):
    for i, (s_row, t_row) in enumerate(zip(student_rows, teacher_rows, strict=True)):
        s_ids, t_ids, n = ref.align_token_strings(s_row, t_row)
        assert alignment.student_spans[i, : len(s_row)].tolist() == s_ids
        assert alignment.teacher_spans[i, : len(t_row)].tolist() == t_ids
        assert (alignment.student_spans[i, len(s_row) :] == -1).all()
        assert (alignment.teacher_spans[i, len(t_row) :] == -1).all()
        assert int(alignment.num_spans[i]) == n
        last = {span: t for t, span in enumerate(s_ids) if span >= 0}
        expected_end = [span >= 0 and last[span] == t for t, span in enumerate(s_ids)]
        assert alignment.span_end_mask[i, : len(s_row)].tolist() == expected_end


def spans_cover_same_bytes(student_tokens, teacher_tokens, s_ids, t_ids, n):
    """Every span holds >= 1 token per side and both sides' tokens of it spell the same bytes, in text order."""
    for span in range(n):
        s_text = b"".join(t for t, k in zip(student_tokens, s_ids, strict=True) if k == span)
        t_text = b"".join(t for t, k in zip(teacher_tokens, t_ids, strict=True) if k == span)
        assert s_ids.count(span) >= 1 and t_ids.count(span) >= 1
        assert s_text == t_text
    assert s_ids == sorted(s_ids) and t_ids == sorted(t_ids)


# ---------------------------------------------------------------- alignment by hand
def test_identical_tokenisation_is_one_token_per_span():
    tokens = byte_tokens("The", " answer", " is", " 4", "2", ".", "")  # "" = EOS, zero bytes
    alignment, s_mask, _ = align_rows([tokens, tokens[:3]], [tokens, tokens[:3]])
    assert alignment.student_spans.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, -1, -1, -1, -1]]
    assert torch.equal(alignment.teacher_spans, alignment.student_spans)
    assert alignment.num_spans.tolist() == [7, 3]
    assert torch.equal(alignment.span_end_mask, s_mask)


def test_one_student_token_two_teacher_tokens():
    # student "12" | teacher "1" "2": one span; its end is the student's only token.
    alignment, _, _ = align_rows([byte_tokens("x=", "12")], [byte_tokens("x=", "1", "2")])
    assert alignment.student_spans.tolist() == [[0, 1]]
    assert alignment.teacher_spans.tolist() == [[0, 1, 1]]
    assert alignment.span_end_mask.tolist() == [[True, True]]


def test_two_student_tokens_one_teacher_token():
    alignment, _, _ = align_rows([byte_tokens("1", "2", "+")], [byte_tokens("12", "+")])
    assert alignment.student_spans.tolist() == [[0, 0, 1]]
    assert alignment.teacher_spans.tolist() == [[0, 1]]
    assert alignment.span_end_mask.tolist() == [[False, True, True]]


@pytest.mark.parametrize(
    "student, teacher, expected_student, expected_teacher",
    [
        # "  12345": char-level student; teacher merges the spaces and digit pairs.
        (list("  12345"), ["  ", "12", "34", "5"], [0, 0, 1, 1, 2, 2, 3], [0, 1, 2, 3]),
        # GPT-style leading-space merge " 1" and digit pairs that straddle the student's.
        (list("  12345"), [" ", " 1", "23", "45"], [0, 1, 1, 2, 2, 3, 3], [0, 1, 2, 3]),
        # Pairs that never line up: the whole number is one span.
        (["  ", "12", "34", "5"], [" ", " 1", "23", "45"], [0, 0, 0, 0], [0, 0, 0, 0]),
    ],
)
def test_whitespace_and_digits_split_differently(student, teacher, expected_student, expected_teacher):
    student_tokens, teacher_tokens = byte_tokens(*student), byte_tokens(*teacher)
    alignment, _, _ = align_rows([student_tokens], [teacher_tokens])
    assert alignment.student_spans[0].tolist() == expected_student
    assert alignment.teacher_spans[0, : len(teacher)].tolist() == expected_teacher
    assert_matches_reference(alignment, [student_tokens], [teacher_tokens])


@pytest.mark.parametrize(
    "student, teacher, expected_student, expected_teacher",
    [
        # "é" = c3 a9: byte-level student splits the character, the teacher keeps it whole.
        ([b"caf", b"\xc3", b"\xa9"], [b"caf\xc3\xa9"], [0, 0, 0], [0]),
        ([b"caf", b"\xc3", b"\xa9"], [b"caf", b"\xc3\xa9"], [0, 1, 1], [0, 1]),
        # "日本" = e6 97 a5 | e6 9c ac; the student cuts inside both characters: one 3:2 span.
        ([b"\xe6", b"\x97\xa5\xe6", b"\x9c\xac"], ["日".encode(), "本".encode()], [0, 0, 0], [0, 0]),
        # "😀" = f0 9f 98 80, cut differently on both sides, then a shared "!".
        ([b"\xf0\x9f", b"\x98\x80", b"!"], [b"\xf0", b"\x9f\x98", b"\x80!"], [0, 0, 0], [0, 0, 0]),
        ([b"\xf0\x9f", b"\x98\x80", b"!"], [b"\xf0", b"\x9f\x98\x80", b"!"], [0, 0, 1], [0, 0, 1]),
    ],
)
def test_multibyte_characters_split_mid_character(student, teacher, expected_student, expected_teacher):
    alignment, _, _ = align_rows([student], [teacher])
    assert alignment.student_spans[0].tolist() == expected_student
    assert alignment.teacher_spans[0, : len(teacher)].tolist() == expected_teacher
    assert_matches_reference(alignment, [student], [teacher])


def test_end_of_sequence_tokens_pair_up():
    # Student "4" "2" EOS; teacher "42" <end-of-turn>: both zero-byte tokens form their own span.
    alignment, _, _ = align_rows([byte_tokens("4", "2", "")], [byte_tokens("42", "")])
    assert alignment.student_spans.tolist() == [[0, 0, 1]]
    assert alignment.teacher_spans.tolist() == [[0, 1]]
    assert alignment.span_end_mask.tolist() == [[False, True, True]]


def test_teacher_template_tokens_outside_the_completion_are_masked_out():
    # The teacher's row holds a role header and a generation-prompt token before the completion; the caller
    # masks them (they are the template, not the student's text), and the alignment is as if they were absent.
    s_ends, s_mask = pad_byte_ends([ends_of(byte_tokens("4", "2", ""))])
    t_ends = torch.tensor([[0, 0, 2, 2, 9]])  # header, prompt token, "42", end-of-turn, a masked pad holding junk
    t_mask = torch.tensor([[False, False, True, True, False]])
    alignment = align_spans(s_ends, t_ends, s_mask, t_mask)
    assert alignment.teacher_spans.tolist() == [[-1, -1, 0, 1, -1]]
    assert alignment.student_spans.tolist() == [[0, 0, 1]]


def test_surplus_zero_byte_token_joins_the_span_that_closed_on_its_byte():
    # A teacher-only end-of-turn after a truncated student (no EOS): it has no counterpart and joins the last
    # span (docs/cross_tokenizer.md says not to pass it). A student-only EOS joins the last span the same way.
    alignment, _, _ = align_rows(
        [byte_tokens("4", "2"), byte_tokens("42", "")], [byte_tokens("42", ""), byte_tokens("4", "2")]
    )
    assert alignment.student_spans.tolist() == [[0, 0], [0, 0]]
    assert alignment.teacher_spans.tolist() == [[0, 0], [0, 0]]
    assert alignment.span_end_mask.tolist() == [[False, True], [False, True]]


def test_leading_zero_byte_token_joins_the_first_span():
    alignment, _, _ = align_rows([byte_tokens("", "ab")], [byte_tokens("a", "b")])
    assert alignment.student_spans.tolist() == [[0, 0]]
    assert alignment.teacher_spans.tolist() == [[0, 0]]


def test_a_side_without_tokens_gives_no_span():
    # An empty completion: the student sampled only EOS and the teacher was given no token: nothing to compare.
    s_ends, s_mask = pad_byte_ends([[0]])
    t_ends, t_mask = pad_byte_ends([[]], length=2)
    alignment = align_spans(s_ends, t_ends, s_mask, t_mask)
    assert alignment.student_spans.tolist() == [[-1]]
    assert alignment.num_spans.tolist() == [0]
    assert not alignment.span_end_mask.any()


def test_padding_rows_and_row_order_do_not_change_a_row():
    rows = [
        (byte_tokens(*"  12345"), byte_tokens("  ", "12", "34", "5")),
        (byte_tokens("1", "2", "+"), byte_tokens("12", "+")),
        ([], []),  # an all-padding row
        ([b"caf", b"\xc3", b"\xa9", b""], [b"caf\xc3\xa9", b""]),
    ]
    together, _, _ = align_rows([s for s, _ in rows], [t for _, t in rows])
    assert together.num_spans.tolist() == [4, 2, 0, 2]
    assert (together.student_spans[2] == -1).all() and (together.teacher_spans[2] == -1).all()
    for i, (s, t) in enumerate(rows):
        if not s:
            continue
        alone, _, _ = align_rows([s], [t])
        assert together.student_spans[i, : len(s)].tolist() == alone.student_spans[0].tolist()
        assert together.teacher_spans[i, : len(t)].tolist() == alone.teacher_spans[0].tolist()
    assert_matches_reference(together, [s for s, _ in rows], [t for _, t in rows])


@pytest.mark.parametrize(
    "student_rows, teacher_rows, match",
    [
        ([[1, 2]], [[1, 3]], "cover 2 bytes but the teacher's cover 3"),
        ([[2, 1]], [[2]], "must not decrease"),
        ([[-1, 2]], [[2]], "negative byte end"),
    ],
)
def test_inconsistent_offsets_are_refused(student_rows, teacher_rows, match):
    s_ends, s_mask = pad_byte_ends(student_rows)
    t_ends, t_mask = pad_byte_ends(teacher_rows)
    with pytest.raises(ValueError, match=match):
        align_spans(s_ends, t_ends, s_mask, t_mask)


def test_float_offsets_are_refused():
    s_ends, s_mask = pad_byte_ends([[1, 2]])
    with pytest.raises(ValueError, match="integer"):
        align_spans(s_ends.double(), s_ends, s_mask, s_mask)


# ---------------------------------------------------------------- random tokenisations vs the byte walk
ALPHABET = ["a", "b", " ", "1", "2", "é", "日", "😀", "\n"]


def random_tokens(data: bytes, cuts: set[int], empties: set[int]) -> list[bytes]:
    """Cut ``data`` at the byte positions in ``cuts``; insert a zero-byte token at each position in ``empties``."""
    points = sorted({0, len(data)} | {c for c in cuts if 0 < c < len(data)})
    tokens = []
    for start, stop in itertools.pairwise(points):
        tokens.extend([b""] * (start in empties))
        tokens.append(data[start:stop])
    tokens.extend([b""] * (len(data) in empties))
    return tokens


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_tokenisations_match_the_byte_walk(data):
    rows_s, rows_t = [], []
    for _ in range(data.draw(st.integers(1, 3))):
        text = "".join(data.draw(st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=8))).encode()
        cuts = st.sets(st.integers(0, len(text)), max_size=len(text) + 1)
        empties = st.sets(st.integers(0, len(text)), max_size=2)
        rows_s.append(random_tokens(text, data.draw(cuts), data.draw(empties)))
        rows_t.append(random_tokens(text, data.draw(cuts), data.draw(empties)))
    alignment, _, _ = align_rows(rows_s, rows_t)
    assert_matches_reference(alignment, rows_s, rows_t)
    for i, (s, t) in enumerate(zip(rows_s, rows_t, strict=True)):
        n = int(alignment.num_spans[i])
        spans_cover_same_bytes(
            s, t, alignment.student_spans[i, : len(s)].tolist(), alignment.teacher_spans[i, : len(t)].tolist(), n
        )
    # The same tokenizer on both sides: one-to-one spans, whatever the cuts and empty tokens.
    same, s_mask, _ = align_rows(rows_s, rows_s)
    lengths = s_mask.sum(dim=1)
    assert torch.equal(same.num_spans, lengths)
    assert torch.equal(same.span_end_mask, s_mask)


# ---------------------------------------------------------------- rewards by hand
def test_rewards_of_a_merge_and_a_split_by_hand():
    # Row 0, student "1" "2" "+" (log-probs -0.5 -1.0 -0.25) | teacher "12" "+" (-0.75 -0.5):
    #   span "12": R = -0.75 - (-0.5 - 1.0) = 0.75 on the student's "2"; "1" holds 0; span "+": -0.5 + 0.25 = -0.25
    # Row 1, student "12" "+" (-2.0 -0.1) | teacher "1" "2" "+" (-0.5 -0.5 -0.3):
    #   span "12": -1.0 + 2.0 = 1.0; span "+": -0.3 + 0.1 = -0.2
    alignment, s_mask, _ = align_rows(
        [byte_tokens("1", "2", "+"), byte_tokens("12", "+")], [byte_tokens("12", "+"), byte_tokens("1", "2", "+")]
    )
    student = torch.tensor([[-0.5, -1.0, -0.25], [-2.0, -0.1, math.nan]], dtype=F64)
    teacher = torch.tensor([[-0.75, -0.5, math.inf], [-0.5, -0.5, -0.3]], dtype=F64)
    rewards = span_rewards(student, teacher, alignment)
    expected = torch.tensor([[0.0, 0.75, -0.25], [1.0, -0.2, 0.0]], dtype=F64)
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-15)
    # Sums: row 0: -1.25 - (-1.75) = 0.5 ; row 1: -1.3 - (-2.1) = 0.8 (the sequence log-ratios).
    torch.testing.assert_close(rewards.sum(dim=1), torch.tensor([0.5, 0.8], dtype=F64), rtol=0, atol=1e-15)


def test_token_credit_by_hand():
    # Student "7" "*" (pi_old log-probs -0.5, -0.01) | teacher "7*" (-10.0): one span. Surprisal shares
    # (0.5 + e) / (0.51 + 2e) and (0.01 + e) / (0.51 + 2e), e = 1e-6: the teacher's -10 splits into about -9.8039
    # on "7" and -0.1961 on "*"; the token rewards -9.3039 and -0.1861 still sum to R_span = -10 + 0.51 = -9.49.
    # A second span, "+" alone (-0.2 | teacher -0.3), keeps the teacher's log-prob exactly.
    alignment, _, _ = align_rows([byte_tokens("7", "*", "+")], [byte_tokens("7*", "+")])
    student = torch.tensor([[-0.5, -0.01, -0.2]], dtype=F64)
    teacher_on_ends = teacher_span_sums(torch.tensor([[-10.0, -0.3]], dtype=F64), alignment)
    shares = token_credit(teacher_on_ends, student, alignment)
    e = 1e-6
    expected = torch.tensor([[-10 * (0.5 + e) / (0.51 + 2 * e), -10 * (0.01 + e) / (0.51 + 2 * e), -0.3]], dtype=F64)
    torch.testing.assert_close(shares, expected, rtol=0, atol=1e-12)
    rewards = token_rewards(student, shares)
    torch.testing.assert_close(rewards[0, :2].sum(), torch.tensor(-9.49, dtype=F64), rtol=0, atol=1e-12)
    assert shares[0, 2] == -0.3  # a one-token span: bit for bit


def test_token_credit_with_identical_tokenizers_is_the_teacher_bit_for_bit():
    student, _, teacher, _, mask = ref.random_batch(4, 9, seed=5, min_len=1)
    tokens = [[bytes([97 + t]) * (1 + t % 3) for t in range(int(n))] for n in mask.sum(dim=1)]
    alignment, s_mask, _ = align_rows(tokens, tokens)
    width = s_mask.shape[1]
    student, teacher, mask = student[:, :width], teacher[:, :width], mask[:, :width]
    shares = token_credit(teacher_span_sums(teacher, alignment), student, alignment)
    assert torch.equal(shares[mask], teacher[mask])


def test_identical_tokenizers_reduce_to_token_rewards_bit_for_bit():
    student, old, teacher, entropy, mask = ref.random_batch(4, 9, seed=3, min_len=1)
    tokens = [[bytes([97 + t]) * (1 + t % 3) for t in range(int(n))] for n in mask.sum(dim=1)]
    alignment, s_mask, _ = align_rows(tokens, tokens)
    assert torch.equal(s_mask, mask)
    rewards = span_rewards(student, teacher, alignment)
    expected = token_rewards(student, teacher)
    assert torch.equal(rewards[mask], expected[mask])
    assert (rewards[~mask] == 0).all()
    assert torch.equal(student_span_sums(student, alignment)[mask], student[mask])
    assert torch.equal(teacher_span_sums(teacher, alignment)[mask], teacher[mask])


@pytest.mark.parametrize("phase", ["exploration", "refinement"])
@pytest.mark.parametrize("stop_gradient", [True, False])
def test_identical_tokenizers_reduce_to_reopold_loss_bit_for_bit(phase, stop_gradient):
    student, old, teacher, entropy, mask = ref.random_batch(5, 11, seed=7)
    tokens = [[b"x"] * int(n) for n in mask.sum(dim=1)]
    alignment, _, _ = align_rows(tokens, tokens)
    width = alignment.student_spans.shape[1]
    student, old, teacher, entropy, mask = (x[:, :width] for x in (student, old, teacher, entropy, mask))
    kwargs = dict(phase=phase, lam=0.3, beta=0.3, stop_gradient=stop_gradient)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss, metrics = reopold_loss(*span_inputs(s1, old, teacher, entropy, mask, alignment), **kwargs)
    expected, expected_metrics = reopold_loss(s2, old, teacher, entropy, mask, **kwargs)
    assert torch.equal(loss, expected)
    assert torch.equal(ref.grad(loss, s1), ref.grad(expected, s2))
    for name in ("kept_frac", "reward_mean", "threshold", "below_floor_frac"):
        assert torch.equal(metrics[name], expected_metrics[name]) or (
            metrics[name].isnan() and expected_metrics[name].isnan()
        )


def test_per_span_floor_binds_once_per_span():
    # Span A: student "1" "2" (-0.5, -0.5) | teacher "12" (-3.0): R_A = -3.0 + 1.0 = -2.0 < floor -1.7200.
    #   Per token the student's log-probs are above the floor; the span as a unit is below it: clipped once.
    # Span B: student "+" (-1.0) | teacher "+" (-0.5): R_B = 0.5.
    # refinement, no entropy selection, student == old (rho = 1), 2 kept spans:
    #   loss = -(floor + 0.5) / 2 = -(-1.7199611 + 0.5) / 2 = 0.6099806
    #   d loss / d s_t = -A_span / 2 for every token of the span (rho of the span = exp(s_1 + s_2 - old)):
    #   span A tokens: 0.8599806 each ; span B: -0.25
    # exploration: span A (R < floor) is dropped as a whole: loss = -0.5 / 1, grads (0, 0, -0.5).
    alignment, mask, _ = align_rows([byte_tokens("1", "2", "+")], [byte_tokens("12", "+")])
    student = torch.tensor([[-0.5, -0.5, -1.0]], dtype=F64)
    teacher = torch.tensor([[-3.0, -0.5]], dtype=F64)
    rewards = span_rewards(student, teacher, alignment)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -2.0, 0.5]], dtype=F64), rtol=0, atol=1e-15)

    s = student.clone().requires_grad_()
    inputs = span_inputs(s, student, teacher, None, mask, alignment)
    loss, metrics = reopold_loss(*inputs, phase="refinement", entropy_selection=False)
    assert loss.item() == pytest.approx(-(LO + 0.5) / 2, abs=1e-12)
    expected_grad = torch.tensor([[-LO / 2, -LO / 2, -0.25]], dtype=F64)
    torch.testing.assert_close(ref.grad(loss, s), expected_grad, rtol=0, atol=1e-12)
    assert float(metrics["below_floor_frac"]) == pytest.approx(0.5)  # one span of two, not tokens

    s = student.clone().requires_grad_()
    loss, _ = reopold_loss(
        *span_inputs(s, student, teacher, None, mask, alignment), phase="exploration", entropy_selection=False
    )
    assert loss.item() == pytest.approx(-0.5, abs=1e-12)
    torch.testing.assert_close(ref.grad(loss, s), torch.tensor([[0.0, 0.0, -0.5]], dtype=F64), rtol=0, atol=1e-12)


def test_entropy_of_a_span_is_the_sum_of_its_tokens():
    alignment, mask, _ = align_rows([byte_tokens("1", "2", "+")], [byte_tokens("12", "+")])
    entropy = torch.tensor([[0.75, 0.5, 2.0]], dtype=F64)
    zeros = torch.zeros(1, 3, dtype=F64)
    inputs = span_inputs(zeros, zeros, torch.zeros(1, 2, dtype=F64), entropy, mask, alignment)
    torch.testing.assert_close(inputs.entropy, torch.tensor([[0.0, 1.25, 2.0]], dtype=F64), rtol=0, atol=0)
    assert inputs.completion_mask.tolist() == [[False, True, True]]


# ---------------------------------------------------------------- random batches vs the float64 reference
def random_rows(seed: int, rows: int):
    """Texts with multibyte characters, cut at random bytes on each side, some rows ending in EOS/end-of-turn."""
    rng = random.Random(seed)
    student_rows, teacher_rows = [], []
    for _ in range(rows):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6))).encode()
        eos = {len(text)} if rng.random() < 0.5 else set()
        for side in (student_rows, teacher_rows):
            cuts = {rng.randint(1, len(text)) for _ in range(rng.randint(0, len(text)))}
            side.append(random_tokens(text, cuts, eos))
    return student_rows, teacher_rows


def padded(values: list[list[float]], width: int, fill: float) -> torch.Tensor:
    return torch.tensor([row + [fill] * (width - len(row)) for row in values], dtype=F64)


@pytest.mark.parametrize("seed", range(6))
def test_span_rewards_sum_to_the_sequence_log_ratio(seed):
    student_rows, teacher_rows = random_rows(seed, rows=5)
    alignment, s_mask, t_mask = align_rows(student_rows, teacher_rows)
    g = torch.Generator().manual_seed(seed)
    student = torch.where(s_mask, -3 * torch.rand(s_mask.shape, generator=g, dtype=F64), math.nan)
    teacher = torch.where(t_mask, -3 * torch.rand(t_mask.shape, generator=g, dtype=F64), -math.inf)
    rewards = span_rewards(student, teacher, alignment)
    assert rewards.isfinite().all()
    log_ratio = teacher.nan_to_num(neginf=0.0).sum(dim=1) - student.nan_to_num().sum(dim=1)
    torch.testing.assert_close(rewards.sum(dim=1), log_ratio, **TIGHT)
    for i, (s, t) in enumerate(zip(student_rows, teacher_rows, strict=True)):
        s_ids, t_ids, _ = ref.align_token_strings(s, t)
        s_sums = ref.span_sums_on_ends([float(x) for x in student[i, : len(s)]], s_ids)
        t_sums = ref.teacher_sums_on_student_ends([float(x) for x in teacher[i, : len(t)]], s_ids, t_ids)
        expected = [a - b for a, b in zip(t_sums, s_sums, strict=True)]
        torch.testing.assert_close(rewards[i, : len(s)], torch.tensor(expected, dtype=F64), **TIGHT)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("phase", ["exploration", "refinement"])
def test_span_reopold_loss_matches_the_reference(seed, phase):
    student_rows, teacher_rows = random_rows(100 + seed, rows=4)
    alignment, s_mask, t_mask = align_rows(student_rows, teacher_rows)
    g = torch.Generator().manual_seed(seed)
    # Tokens above the floor one by one, so that span sums fall below it in some spans.
    student = -1.5 * torch.rand(s_mask.shape, generator=g, dtype=F64)
    old = student + 0.2 * torch.randn(s_mask.shape, generator=g, dtype=F64)
    teacher = -3.0 * torch.rand(t_mask.shape, generator=g, dtype=F64)
    entropy = 2.0 * torch.rand(s_mask.shape, generator=g, dtype=F64)

    s = student.clone().requires_grad_()
    loss, metrics = reopold_loss(*span_inputs(s, old, teacher, entropy, s_mask, alignment), phase=phase, beta=0.5)

    s_ref = student.clone().requires_grad_()
    width = s_mask.shape[1]
    zero = torch.zeros((), dtype=F64)
    rows = {"student": [], "old": [], "teacher": [], "entropy": [], "mask": []}
    for i, (s_row, t_row) in enumerate(zip(student_rows, teacher_rows, strict=True)):
        n = len(s_row)
        s_ids, t_ids, _ = ref.align_token_strings(s_row, t_row)
        last = {span: t for t, span in enumerate(s_ids) if span >= 0}
        rows["student"].append(ref.span_sums_on_ends([s_ref[i, t] for t in range(n)], s_ids) + [zero] * (width - n))
        rows["old"].append(ref.span_sums_on_ends([float(x) for x in old[i, :n]], s_ids) + [0.0] * (width - n))
        rows["teacher"].append(ref.teacher_sums_on_student_ends([float(x) for x in teacher[i]], s_ids, t_ids))
        rows["teacher"][-1] += [0.0] * (width - n)
        rows["entropy"].append(ref.span_sums_on_ends([float(x) for x in entropy[i, :n]], s_ids) + [0.0] * (width - n))
        rows["mask"].append([t < n and s_ids[t] >= 0 and last[s_ids[t]] == t for t in range(width)])
    span_student = torch.stack([torch.stack([torch.as_tensor(v, dtype=F64) for v in row]) for row in rows["student"]])
    ref_loss, ref_metrics = ref.reopold_loss(
        span_student, padded(rows["old"], width, 0.0), padded(rows["teacher"], width, 0.0),
        padded(rows["entropy"], width, 0.0), torch.tensor(rows["mask"]), phase, beta=0.5,
    )  # fmt: skip
    grad = ref.grad(loss, s)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TIGHT)
    torch.testing.assert_close(grad, ref.grad(ref_loss, s_ref), **TIGHT)
    assert float(metrics["kept_frac"]) == pytest.approx(ref_metrics["kept_frac"], abs=1e-6)
    # The gradient of a kept span reaches every student token of it (not only the span end), and nothing else.
    spans = alignment.student_spans
    for i in range(spans.shape[0]):
        for span in range(int(alignment.num_spans[i])):
            members = grad[i][spans[i] == span]
            assert (members == members[-1]).all()  # d loss / d s_t = d loss / d (span sum), for every t in it
    assert (grad[spans < 0] == 0).all()


# ---------------------------------------------------------------- metrics
def test_span_metrics_by_hand():
    # Row 0: spans {"1","2"}:{"12"} and {"+"}:{"+"}; row 1 identical "a" "b": 5 aligned student tokens,
    # 2 of them in a span that is not one-to-one -> 0.4; 4 spans hold 5 student and 4 teacher tokens.
    alignment, _, _ = align_rows([byte_tokens("1", "2", "+"), byte_tokens("a", "b")],
                                 [byte_tokens("12", "+"), byte_tokens("a", "b")])  # fmt: skip
    metrics = span_metrics(alignment)
    assert float(metrics["multi_token_span_frac"]) == pytest.approx(0.4)
    assert float(metrics["student_tokens_per_span"]) == pytest.approx(5 / 4)
    assert float(metrics["teacher_tokens_per_span"]) == pytest.approx(1.0)
    same, _, _ = align_rows([byte_tokens("a", "b")], [byte_tokens("a", "b")])
    assert float(span_metrics(same)["multi_token_span_frac"]) == 0.0


# ---------------------------------------------------------------- character offsets (HF offset mappings)
# Offsets a byte-level BPE (HF tokenizers, ByteLevel pre-tokenizer) returned for "x😀é" with an end-of-turn
# special token appended by its post-processor (offsets (0, 0)): the emoji's four byte tokens all report the whole
# character (1, 2).
HF_TEXT = "x😀é"
HF_OFFSETS = [(0, 1), (1, 2), (1, 2), (1, 2), (1, 2), (2, 3), (0, 0)]


def test_byte_ends_from_character_offsets():
    # bytes: "x" = 1, "😀" = 4 (ends at byte 5), "é" = 2 (ends at byte 7); the special token stays at 7.
    assert byte_ends_from_offsets(HF_TEXT, HF_OFFSETS) == [1, 5, 5, 5, 5, 7, 7]
    assert byte_ends_from_offsets("ab", [(0, 0), (0, 2)]) == [0, 2]  # a leading special token: zero width at 0
    with pytest.raises(ValueError, match="outside"):
        byte_ends_from_offsets("ab", [(0, 3)])


def test_character_offsets_against_exact_bytes_give_the_right_spans():
    # Student: exact byte tokens x | f0 | 9f | 98 | 80 | é | EOS. Teacher: the HF offsets above. The teacher's
    # collapsed emoji pieces join the span that closes at byte 5, so every span spells the same bytes.
    student = [b"x", b"\xf0", b"\x9f", b"\x98", b"\x80", "é".encode(), b""]
    s_ends, s_mask = pad_byte_ends([ends_of(student)])
    t_ends, t_mask = pad_byte_ends([byte_ends_from_offsets(HF_TEXT, HF_OFFSETS)])
    alignment = align_spans(s_ends, t_ends, s_mask, t_mask)
    assert alignment.student_spans.tolist() == [[0, 1, 1, 1, 1, 2, 3]]
    assert alignment.teacher_spans.tolist() == [[0, 1, 1, 1, 1, 2, 3]]
