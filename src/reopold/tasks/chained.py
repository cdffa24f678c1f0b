"""Chained multiplication with a calculator tool: the bundled tool-use demo task.

A problem is three 2-digit factors (10..99), ``"47*86*29="``, answered ``117218``. The model may call the
calculator ``calc`` once per turn in the tag format ``[calc(47*86)]``; the tool's result comes back into the
sequence as ``{4042}``, and the model continues in a new turn. The gold trajectory with the tool has three
assistant turns (each ended by eos) and two observations:

    47*86*29=  [calc(47*86)]<eos>  {4042}  [calc(4042*29)]<eos>  {117218}  :117218<eos>

The "mental" gold trajectory does the arithmetic itself in one turn:

    47*86*29=  47*86=4042;4042*29=117218:117218<eos>

Only the final answer is graded: the digits after the last ``:`` of the last assistant turn. A last turn that is
a tool call (the episode ran out of turns) or has no ``:`` is wrong, so both styles are graded the same way.

Splits are a fixed function of the sorted factors (a stable hash, as in ``reopold.tasks.arithmetic``), so
train, validation and test never share a problem, not even as a permutation of its factors.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from reopold.environments.tools import ToolEnvironment, parse_tool_calls
from reopold.tasks.arithmetic import HELD_OUT_SHARE, SPLITS, Problem, hashed_split

LOW, HIGH = 10, 99  # every factor is a 2-digit number
N_FACTORS = 3
MAX_OPERAND_DIGITS = 12  # calc refuses longer operands (nothing in the task comes close)

_PROMPT = re.compile(r"([0-9]+)\*([0-9]+)\*([0-9]+)=")
_CALC = re.compile(rf"([0-9]{{1,{MAX_OPERAND_DIGITS}}})([*+])([0-9]{{1,{MAX_OPERAND_DIGITS}}})")
_FINAL = re.compile(r":([0-9]+)$")


def calc(expression: str) -> str:
    """Multiply or add two non-negative integers.

    Args:
        expression: ``"a*b"`` or ``"a+b"``, where a and b are non-negative integers written in decimal digits
            (at most 12 digits each, no spaces, no signs).

    Returns:
        The result as decimal text, e.g. ``calc("47*86") == "4042"``.

    Raises:
        ValueError: for anything else (another operator, more than two operands, non-digits, empty operands).
    """
    if not isinstance(expression, str):
        raise ValueError(f"calc takes a string like '47*86' or '47+86', got {type(expression).__name__}")
    m = _CALC.fullmatch(expression)
    if m is None:
        raise ValueError(f"calc takes 'a*b' or 'a+b' with a and b non-negative integers of at most "
                         f"{MAX_OPERAND_DIGITS} digits, got {expression!r}")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a * b if op == "*" else a + b)


def tool_call_text(expression: str) -> str:
    """The tag-format text of a call of ``calc`` on ``expression``: ``[calc(47*86)]``."""
    return f"[calc({expression})]"


def observation_text(result: str) -> str:
    """How a tool result is rendered into the sequence: ``{4042}``."""
    return "{" + result + "}"


def parse_tool_call(turn: str) -> str | None:
    """The expression of an assistant turn that is exactly one tag-format call of calc, else None (parsed by the
    tool adapter's own tag parser)."""
    text = turn.strip()
    calls = parse_tool_calls(text, "tag")
    if len(calls) == 1 and calls[0].name == "calc" and tool_call_text(calls[0].arguments) == text:
        return calls[0].arguments
    return None


def factors(problem: Problem) -> tuple[int, int, int]:
    """The three factors of ``problem``'s prompt; ValueError when the prompt is not ``"A*B*C="``."""
    m = _PROMPT.fullmatch(problem.prompt)
    if m is None:
        raise ValueError(f"prompt {problem.prompt!r} is not of the form 'A*B*C='")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _split_of(a: int, b: int, c: int) -> str:
    """Which split the unordered triple {a, b, c} belongs to (stable across runs and machines)."""
    lo, mid, hi = sorted((a, b, c))
    return hashed_split(f"chained:{lo}*{mid}*{hi}")


def _problem(a: int, b: int, c: int) -> Problem:
    return Problem(prompt=f"{a}*{b}*{c}=", answer=str(a * b * c))


class ChainedProductsTask:
    """``A*B*C=`` with three 2-digit factors; a calculator tool ``calc`` multiplies two numbers at a time."""

    name = "chained-products"

    def __init__(self, tool: Callable[[str], str] = calc) -> None:
        self.alphabet = "0123456789*+=;:[](){}cal"  # every character of a prompt, turn or observation
        self.tool = tool  # another function named calc tests that a model reads the results

    def environment(self, call_format: str = "tag") -> ToolEnvironment:
        """One episode's environment: ``calc`` in the tag format; a refused call comes back as ``{}`` (the
        character tokenizer has no letters for an error message), counted as a tool error."""
        return ToolEnvironment([self.tool], call_format=call_format, format_error=lambda message: "")

    def __repr__(self) -> str:
        return "ChainedProductsTask()"

    @classmethod
    def from_config(cls, data) -> ChainedProductsTask:
        """The task takes no settings from the config's data section."""
        return cls()

    # ---- problems -------------------------------------------------------------------------------------
    def sample_problem(self, rng: random.Random, split: str = "train") -> Problem:
        """One random problem of ``split`` (with replacement; for streaming training data)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        while True:
            a, b, c = (rng.randint(LOW, HIGH) for _ in range(N_FACTORS))
            if _split_of(a, b, c) == split:
                return _problem(a, b, c)

    def problems(self, split: str, n: int) -> list[Problem]:
        """The first ``n`` distinct problems of ``split`` (a fixed, seeded order: same call, same list).

        Raises ValueError for an unknown split or when ``n`` exceeds (about half of) the split's size,
        past which rejection sampling would crawl.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        total = (HIGH - LOW + 1) ** N_FACTORS
        share = HELD_OUT_SHARE.get(split, 1.0 - sum(HELD_OUT_SHARE.values()))
        if n > total * share / 2:
            raise ValueError(f"n={n} is too many for split {split!r} of {self!r} (at most {int(total * share / 2)})")
        rng = random.Random(f"{self.name}-{split}")
        seen: set[tuple[int, int, int]] = set()
        out: list[Problem] = []
        while len(out) < n:
            triple = tuple(rng.randint(LOW, HIGH) for _ in range(N_FACTORS))
            if triple in seen or _split_of(*triple) != split:
                continue
            seen.add(triple)
            out.append(_problem(*triple))
        return out

    # ---- gold trajectories ----------------------------------------------------------------------------
    def gold_turns(self, problem: Problem) -> list[tuple[str, str | None]]:
        """The gold trajectory with the tool: (assistant turn text, tool result or None) per turn.

        ``47*86*29=`` -> ``[("[calc(47*86)]", "4042"), ("[calc(4042*29)]", "117218"), (":117218", None)]``.
        Each turn ends with eos (not in the text); a result is rendered as ``observation_text(result)``.
        """
        a, b, c = factors(problem)
        first = f"{a}*{b}"
        partial = calc(first)
        second = f"{partial}*{c}"
        total = calc(second)
        assert total == problem.answer
        return [(tool_call_text(first), partial), (tool_call_text(second), total), (f":{total}", None)]

    def gold_mental(self, problem: Problem) -> str:
        """The gold trajectory without the tool, one turn: ``47*86=4042;4042*29=117218:117218``."""
        a, b, c = factors(problem)
        partial = a * b
        total = partial * c
        assert str(total) == problem.answer
        return f"{a}*{b}={partial};{partial}*{c}={total}:{total}"

    def max_completion_chars(self) -> int:
        """An upper bound on the length of any one gold assistant turn, either style (for ``max_new_tokens``
        per turn; the mental turn of ``99*99*99=`` is the longest, 32 characters)."""
        worst = _problem(HIGH, HIGH, HIGH)
        return max(len(self.gold_mental(worst)), *(len(text) for text, _ in self.gold_turns(worst)))

    # ---- checking -------------------------------------------------------------------------------------
    def parse_answer(self, completion: str) -> str | None:
        """The final answer of a completion (the last assistant turn's text), or None when it has none.

        The answer is the digits after the last ``:``, up to the end of the text; a tool call (``...)]``), any
        other text after the number, or no ``:`` at all means no answer. Eos/pad must be stripped by the caller.
        The whole interleaved episode text (``[calc(47*86)]{4042}...:117218``) grades the same as its last turn.
        """
        m = _FINAL.search(completion.strip())
        return m.group(1) if m else None

    def check(self, problem: Problem, completion: str) -> bool:
        """Exact final-answer match (whatever came before the last ``:`` is not graded)."""
        return self.parse_answer(completion) == problem.answer
