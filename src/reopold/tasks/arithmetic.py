"""Multi-digit multiplication with a step-by-step scratchpad: the bundled demo task.

A problem is ``"347*26="``; a gold completion writes one partial product per digit of the factor it
decomposes, then adds them up left to right, then gives the answer after a colon:

    decompose 26, low digit first:   347*6=2082;347*20=6940;2082+6940=9022:9022
    decompose 347, high digit first: 26*300=7800;26*40=1040;26*7=182;7800+1040=8840;8840+182=9022:9022

Either factor may be decomposed and the partial products may come low-first or high-first, so every
problem has four valid solution paths (two when both factors are the same number) of different lengths
(about 30-80 characters for 3x2 digits). A teacher trained on randomly chosen paths spreads its
probability over all of them; a small student distilled on the teacher's samples has to fit that mixture,
while an on-policy student may settle on one path and be graded token by token along it. Only the final
answer is checked, so any path (or any other arithmetic) that ends in the right number counts.

Splits are a fixed function of the unordered pair of factors (a stable hash), so train, validation and
test never share a problem, not even as ``a*b`` versus ``b*a``.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")
# Share of all problems in each held-out split; the rest is train. Shares are of the hash space, so the
# split sizes are close to, not exactly, these fractions.
HELD_OUT_SHARE = {"validation": 0.05, "test": 0.10}

# Every path as (decompose_first_factor, high_digit_first), indexed as ``solution(..., paths=...)`` takes them:
# 0 and 1 decompose the second factor, 2 and 3 the first; even indices go low digit first.
PATHS = ((False, False), (False, True), (True, False), (True, True))

_ANSWER = re.compile(r"^[0-9*+=;]*:(0|[1-9][0-9]*)$")


@dataclass(frozen=True)
class Problem:
    """One task instance: the prompt the model continues, and the exact final answer."""

    prompt: str  # e.g. "347*26="
    answer: str  # e.g. "9022"
    key: str | None = None  # the routing key that picks its teacher among several (data.teacher_key's column)


def _split_of(a: int, b: int) -> str:
    """Which split the unordered pair {a, b} belongs to (stable across runs and machines)."""
    lo, hi = min(a, b), max(a, b)
    return hashed_split(f"{lo}*{hi}")


def hashed_split(key: str) -> str:
    """The split of a problem identified by ``key``: a stable hash, so splits never depend on the seed or machine."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
    if u < HELD_OUT_SHARE["test"]:
        return "test"
    if u < HELD_OUT_SHARE["test"] + HELD_OUT_SHARE["validation"]:
        return "validation"
    return "train"


def check_paths(paths: Sequence[int]) -> tuple[int, ...]:
    """``paths`` as a tuple of distinct indices into ``PATHS``; ValueError when empty, repeated or out of range."""
    out = tuple(int(i) for i in paths)
    if not out or len(set(out)) != len(out) or not all(0 <= i < len(PATHS) for i in out):
        raise ValueError(f"paths must be distinct indices in 0..{len(PATHS) - 1}, got {paths!r}")
    return out


def _factors(prompt: str) -> tuple[int, int]:
    m = re.fullmatch(r"([0-9]+)\*([0-9]+)=", prompt)
    if m is None:
        raise ValueError(f"prompt {prompt!r} is not of the form 'A*B='")
    return int(m.group(1)), int(m.group(2))


class ArithmeticTask:
    """``A*B=`` with A of ``digits[0]`` digits and B of ``digits[1]`` digits, answered with a scratchpad.

    Args:
        digits: number of digits of the first and second factor (leading digit never zero).
    """

    name = "arithmetic"

    def __init__(self, digits: tuple[int, int] | list[int] = (3, 2)):
        digits = tuple(int(d) for d in digits)
        if len(digits) != 2 or min(digits) < 1 or max(digits) > 6:
            raise ValueError(f"digits must be two ints in [1, 6], got {digits!r}")
        self.digits = digits
        self.alphabet = "0123456789*+=;:"  # every character a prompt or completion can contain

    @classmethod
    def from_config(cls, data) -> ArithmeticTask:
        return cls(digits=tuple(data.digits))

    def __repr__(self) -> str:
        return f"ArithmeticTask(digits={self.digits})"

    # ---- problems -------------------------------------------------------------------------------------
    def _random_pair(self, rng: random.Random) -> tuple[int, int]:
        da, db = self.digits
        return rng.randint(10 ** (da - 1), 10**da - 1), rng.randint(10 ** (db - 1), 10**db - 1)

    def sample_problem(self, rng: random.Random, split: str = "train") -> Problem:
        """One random problem of ``split`` (with replacement; for streaming training data)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        while True:
            a, b = self._random_pair(rng)
            if _split_of(a, b) == split:
                return Problem(prompt=f"{a}*{b}=", answer=str(a * b))

    def max_completion_chars(self) -> int:
        """An upper bound on the length of any gold completion (for ``max_new_tokens``)."""
        da, db = self.digits
        worst = Problem(prompt=f"{10**da - 1}*{10**db - 1}=", answer=str((10**da - 1) * (10**db - 1)))
        return max(len(self.solution(worst, path=p)) for p in self.paths(worst))

    def problems(self, split: str, n: int) -> list[Problem]:
        """The first ``n`` distinct problems of ``split`` (a fixed, seeded order: same call, same list).

        Raises ValueError for an unknown split or when ``n`` exceeds (about half of) the split's size,
        past which rejection sampling would crawl.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        da, db = self.digits
        total = 9 * 10 ** (da - 1) * 9 * 10 ** (db - 1)
        share = HELD_OUT_SHARE.get(split, 1.0 - sum(HELD_OUT_SHARE.values()))
        if n > total * share / 2:
            raise ValueError(f"n={n} is too many for split {split!r} of {self!r} (at most {int(total * share / 2)})")
        rng = random.Random(f"{self.name}-{da}x{db}-{split}")
        seen: set[tuple[int, int]] = set()
        out: list[Problem] = []
        while len(out) < n:
            a, b = self._random_pair(rng)
            if (a, b) in seen or _split_of(a, b) != split:
                continue
            seen.add((a, b))
            out.append(Problem(prompt=f"{a}*{b}=", answer=str(a * b)))
        return out

    # ---- gold solutions -------------------------------------------------------------------------------
    def paths(self, problem: Problem) -> list[tuple[bool, bool]]:
        """The distinct valid paths as (decompose_first_factor, high_digit_first) pairs."""
        a, b = _factors(problem.prompt)
        return list(PATHS[:2]) if a == b else list(PATHS)

    def solution(self, problem: Problem, rng: random.Random | None = None,
                 path: tuple[bool, bool] | None = None, paths: Sequence[int] | None = None) -> str:
        """A gold completion (text after the prompt, without eos).

        With neither ``rng`` nor ``path``: the canonical path (decompose the second factor, low digit first).
        With ``rng``: a path drawn uniformly from ``paths(problem)``, or from the indices into ``PATHS`` given as
        ``paths`` (e.g. ``(2, 3)``: decompose the first factor only; when both factors are equal, 2 and 3 write
        the same text as 0 and 1). ``path`` picks one explicitly.
        """
        a, b = _factors(problem.prompt)
        if paths is not None:
            paths = check_paths(paths)
        if path is None:
            if rng is None:
                path = (False, False)
            elif paths is None:
                path = rng.choice(self.paths(problem))
            else:
                path = PATHS[rng.choice(paths)]
        decompose_first, high_first = path
        kept, split = (b, a) if decompose_first else (a, b)
        # One partial product per digit of `split`, digit d at place 10**k -> kept * (d * 10**k).
        digits = str(split)[::-1]
        parts = [(int(d) * 10**k) for k, d in enumerate(digits)]
        if high_first:
            parts = parts[::-1]
        products = [kept * p for p in parts]
        steps = [f"{kept}*{p}={q}" for p, q in zip(parts, products, strict=True)]
        total = products[0]
        for q in products[1:]:
            steps.append(f"{total}+{q}={total + q}")
            total += q
        assert total == a * b
        return ";".join(steps) + f":{total}"

    # ---- checking -------------------------------------------------------------------------------------
    def parse_answer(self, completion: str) -> str | None:
        """The final answer of a completion, or None when it is malformed.

        Well formed = only task characters, exactly one ':' and a number without leading zeros after it.
        Anything the tokenizer appends (eos, pad) must be stripped by the caller or by ``skip_special_tokens``.
        """
        m = _ANSWER.fullmatch(completion.strip())
        return m.group(1) if m else None

    def check(self, problem: Problem, completion: str) -> bool:
        """Exact final-answer match (the scratchpad itself is not graded)."""
        return self.parse_answer(completion) == problem.answer
