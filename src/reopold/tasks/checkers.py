"""Answer checkers: completion -> (parsed final answer, correct?). The parsed answer is what maj@k votes on.

``exact`` is the task's own check (exact final-answer match for the bundled arithmetic task; the normalised last
``\\boxed{}`` or number for a JSONL of problems). ``math`` uses Hugging Face's math-verify, so equivalent forms
such as ``\\frac{1}{2}``, ``0.5`` and ``1/2`` match; it is an optional dependency (``pip install 'reopold[math]'``)
imported only when a math checker is built.
"""

from __future__ import annotations

from typing import Protocol

from reopold.registry import unknown_name

CHECKERS = ("exact", "math")
MATH_INSTALL_HINT = "the math checker needs math-verify: pip install 'reopold[math]' (or pip install math-verify)"


class Checker(Protocol):
    name: str

    def grade(self, problem, completion: str) -> tuple[str | None, bool]:
        """(final answer parsed from ``completion`` or None, whether it matches ``problem.answer``)."""
        ...


class TaskChecker:
    """The task's own ``parse_answer`` and ``check``; the bundled task's check is an exact string match."""

    name = "exact"

    def __init__(self, task):
        self.task = task

    def grade(self, problem, completion: str) -> tuple[str | None, bool]:
        return self.task.parse_answer(completion), bool(self.task.check(problem, completion))


def require_math_verify():
    """The ``math_verify`` module, or an ImportError that says how to install it."""
    try:
        import math_verify
    except ImportError as err:
        raise ImportError(MATH_INSTALL_HINT) from err
    return math_verify


class MathChecker:
    """Symbolic equivalence with math-verify: the completion's last ``\\boxed{}`` (else its last LaTeX or plain
    expression) against the reference answer, so ``\\frac{1}{2}``, ``0.5`` and ``1/2`` are one answer.

    math-verify bounds each parse with ``signal.alarm``, so grading must run in the main thread.
    """

    name = "math"

    def __init__(self):
        self._math_verify = require_math_verify()
        self._references: dict[str, list] = {}

    def _parse_reference(self, answer: str) -> list:
        # A bare reference such as "\sqrt{2}" is only found inside a math environment; "0.5" parses either way.
        if answer not in self._references:
            text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
            self._references[answer] = self._math_verify.parse(text)
        return self._references[answer]

    def grade(self, problem, completion: str) -> tuple[str | None, bool]:
        parsed = self._math_verify.parse(completion)
        if not parsed:
            return None, False
        reference = self._parse_reference(str(problem.answer))
        return _vote_key(parsed[0]), bool(self._math_verify.verify(reference, parsed))


def _vote_key(expression) -> str:
    """A canonical string of a parsed answer, so that 0.5 and 1/2 vote together."""
    import sympy

    if isinstance(expression, sympy.Float):
        expression = sympy.nsimplify(expression, rational=True)
    return str(expression)


def build_checker(name: str, task) -> Checker:
    """The checker called ``name`` ("exact" needs the ``task`` whose check it uses)."""
    if name == "exact":
        return TaskChecker(task)
    if name == "math":
        return MathChecker()
    raise ValueError(unknown_name("checker", name, CHECKERS))
