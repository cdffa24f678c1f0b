"""The teacher's span log-probs with the canonical cut's lookahead removed (reopold.core.marginal), against a
character model and the exact token model of the same distribution under a tokenizer that merges a digit with
the operator after it (the bundled cross-tokenizer demonstration's tokenizer)."""

import itertools
import math
import random

import pytest
import torch

from reopold.core.marginal import cover_logprobs, extensions, marginal_span_sums
from reopold.core.spans import align_spans, pad_byte_ends, student_span_sums, teacher_span_sums

F64 = torch.float64
DIGITS, OPS = "0123", "*=;"
CHARS = list(DIGITS + OPS)  # the student's vocabulary: one token per character, then EOS
EOS = len(CHARS)
MERGED = [d + o for d in DIGITS for o in OPS]
TEACHER = CHARS + MERGED  # the teacher's: the characters, then each digit+operator, then EOS
T_EOS = len(TEACHER)


def char_model(seed: int):
    """A random bigram character model: P(next | previous character) over CHARS + EOS (float64)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(CHARS) + 1, len(CHARS) + 1, generator=g, dtype=F64) * 1.5  # row len(CHARS): start
    return logits.log_softmax(-1)


def canonical(text: str) -> list[str]:
    """The merges tokenizer's cut: a digit followed by an operator is one token."""
    out, i = [], 0
    while i < len(text):
        if text[i] in DIGITS and i + 1 < len(text) and text[i + 1] in OPS:
            out.append(text[i : i + 2])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return out


def teacher_distribution(model, text: str, last_bare_digit: bool) -> torch.Tensor:
    """The exact next-token distribution over TEACHER + EOS of the character model under the canonical cut, after
    the teacher's tokens of ``text``. A bare digit token means "this digit, and no operator after it"."""
    prev = CHARS.index(text[-1]) if text else len(CHARS)
    p = model[prev].exp()  # (C + 1,) next character
    out = torch.zeros(len(TEACHER) + 1, dtype=F64)
    for c, ch in enumerate(CHARS):
        if ch in DIGITS:
            after = model[c].exp()
            stop = sum(after[CHARS.index(o)] for o in OPS)
            out[TEACHER.index(ch)] = p[c] * (1 - stop)
            for o in OPS:
                out[TEACHER.index(ch + o)] = p[c] * after[CHARS.index(o)]
        else:
            out[TEACHER.index(ch)] = p[c]
    out[T_EOS] = p[EOS]
    if last_bare_digit:  # the previous token promised no operator: renormalise without them
        for o in OPS:
            out[TEACHER.index(o)] = 0.0
        out = out / out.sum()
    return out.log()


def score(model, text: str, ended: bool):
    """Student log-probs of its characters, teacher log-probs and covers of its canonical tokens, and both sides'
    byte ends (plus the EOS pair when ``ended``)."""
    table = extensions([t.encode() for t in TEACHER] + [b""])
    s_lp, prev = [], len(CHARS)
    for ch in text:
        s_lp.append(float(model[prev, CHARS.index(ch)]))
        prev = CHARS.index(ch)
    s_ends = list(itertools.accumulate(1 for _ in text))
    tokens = canonical(text)
    t_lp, cover, so_far, bare = [], [], "", False
    for tok in tokens + (["<eos>"] if ended else []):
        dist = teacher_distribution(model, so_far, bare)
        tid = T_EOS if tok == "<eos>" else TEACHER.index(tok)
        t_lp.append(float(dist[tid]))
        cover.append(float(cover_logprobs(dist[None], torch.tensor([tid]), table)[0]))
        if tok != "<eos>":
            so_far += tok
            bare = tok in DIGITS
    t_ends = list(itertools.accumulate(len(t) for t in tokens))
    if ended:
        s_lp.append(float(model[prev, EOS]))
        s_ends.append(len(text))
        t_ends.append(len(text))
    return s_lp, t_lp, cover, s_ends, t_ends


def batch(model, rows):
    scored = [score(model, text, ended) for text, ended in rows]
    s_ends, s_mask = pad_byte_ends([r[3] for r in scored])
    t_ends, t_mask = pad_byte_ends([r[4] for r in scored])
    pad = lambda seqs, width: torch.tensor([s + [0.0] * (width - len(s)) for s in seqs], dtype=F64)
    s_lp = pad([r[0] for r in scored], s_ends.shape[1])
    t_lp, cover = (pad([r[i] for r in scored], t_ends.shape[1]) for i in (1, 2))
    return s_lp, t_lp, cover, align_spans(s_ends, t_ends, s_mask, t_mask), s_mask


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(CHARS) for _ in range(length))


def test_extensions_are_every_token_that_starts_with_the_bytes():
    table = [b"a", b"ab", b"abc", b"b", b"", b"ac", b"\xff", b"\xff\x00", b"a\xff"]
    ext = extensions(table)
    for t, piece in enumerate(table):
        got = sorted(ext.order[ext.start[t] : ext.stop[t]].tolist())
        want = [t] if not piece else sorted(u for u, other in enumerate(table) if other and other.startswith(piece))
        assert got == want, (piece, got, want)


def test_cover_is_the_log_of_the_summed_probabilities_of_the_extensions():
    table = [t.encode() for t in TEACHER] + [b""]
    ext = extensions(table)
    logits = torch.randn(len(table), len(table), dtype=F64, generator=torch.Generator().manual_seed(3))
    logprobs = logits.log_softmax(-1)
    tokens = torch.arange(len(table))
    got = cover_logprobs(logprobs, tokens, ext)
    for i, piece in enumerate(table):
        members = [u for u, other in enumerate(table) if other.startswith(piece) and other] if piece else [i]
        want = math.log(sum(math.exp(float(logprobs[i, u])) for u in members))
        assert got[i].item() == pytest.approx(want, abs=1e-12), TEACHER[i] if i < len(TEACHER) else "eos"
    assert (got >= logprobs[tokens, tokens] - 1e-15).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_teacher_that_is_the_students_character_model_gives_every_span_reward_zero(seed):
    """The teacher is the student's own distribution under another tokenizer, so every span's reward must be 0.
    The canonical cut's token log-probs get the sums of whole completions right but not the spans."""
    model = char_model(seed)
    rng = random.Random(seed)
    rows = [(random_text(rng, rng.randint(1, 14)), rng.random() < 0.5) for _ in range(24)]
    rows += [("12*3=0;", True), ("1", False), ("1*", False), ("11", True)]
    s_lp, t_lp, cover, alignment, s_mask = batch(model, rows)
    student = student_span_sums(s_lp, alignment)
    marginal = marginal_span_sums(t_lp, cover, alignment)
    torch.testing.assert_close(marginal, student, rtol=0, atol=1e-12)
    canonical_sums = teacher_span_sums(t_lp, alignment)
    assert (canonical_sums - student).abs().max() > 0.1  # the lookahead the marginal removes
    ended = torch.tensor([e for _, e in rows])
    # Whole completions that end with EOS: both cuts give log pi_T(text), the sum of the student's.
    torch.testing.assert_close(canonical_sums.sum(1)[ended], s_lp.sum(1)[ended], rtol=0, atol=1e-12)
    # Cut ones: only the marginal gives the probability of the prefix, the canonical cut adds its lookahead.
    torch.testing.assert_close(marginal.sum(1)[~ended], s_lp.sum(1)[~ended], rtol=0, atol=1e-12)


def test_a_digit_the_teacher_ends_the_number_after_is_not_charged_for_the_length():
    """"1" then "2" where the teacher is sure the number ends after "1": the canonical cut charges the "1" (its
    bare token means "no operator next"); the marginal charges the "2", the student's decision to continue."""
    logits = torch.full((len(CHARS) + 1, len(CHARS) + 1), -9.0, dtype=F64)
    logits[len(CHARS), CHARS.index("1")] = 0.0  # start: "1"
    logits[CHARS.index("1"), CHARS.index("*")] = 0.0  # after "1": "*"
    model = logits.log_softmax(-1)
    s_lp, t_lp, cover, alignment, _ = batch(model, [("12", False)])
    canonical_sums = teacher_span_sums(t_lp, alignment)[0]
    marginal = marginal_span_sums(t_lp, cover, alignment)[0]
    assert canonical_sums[0] < -5 and marginal[0] > -0.01  # the "1" span: right digit
    assert marginal[1] < -5  # the "2" span: the wrong length is charged where it is chosen
    assert marginal.sum().item() == pytest.approx(s_lp.sum().item(), abs=1e-12)


def test_with_nothing_to_extend_it_is_the_canonical_span_sum_bit_for_bit():
    model = char_model(4)
    rng = random.Random(4)
    s_lp, t_lp, cover, alignment, _ = batch(model, [(random_text(rng, 9), True) for _ in range(6)])
    assert torch.equal(marginal_span_sums(t_lp, t_lp.clone(), alignment), teacher_span_sums(t_lp, alignment))


def test_cover_in_bounded_pieces_equals_cover_at_once(monkeypatch):
    import reopold.core.marginal as marginal

    table = extensions([t.encode() for t in TEACHER] + [b""])
    g = torch.Generator().manual_seed(5)
    logprobs = torch.randn(50, len(TEACHER) + 1, generator=g, dtype=F64).log_softmax(-1)
    tokens = torch.randint(len(TEACHER) + 1, (50,), generator=g)
    whole = cover_logprobs(logprobs, tokens, table)
    monkeypatch.setattr(marginal, "MAX_PAIRS", 7)  # a few rows at a time (digits have 4 extensions each)
    assert torch.equal(cover_logprobs(logprobs, tokens, table), whole)
