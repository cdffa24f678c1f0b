"""Answer checkers: exact match for the bundled task, math-verify equivalences, a clear message without math-verify."""

from __future__ import annotations

import builtins

import pytest

from reopold.tasks import ArithmeticTask, Problem
from reopold.tasks.checkers import MATH_INSTALL_HINT, TaskChecker, build_checker, require_math_verify


def test_exact_checker_on_the_bundled_task():
    checker = TaskChecker(ArithmeticTask())
    problem = Problem("347*26=", "9022")
    assert checker.grade(problem, "347*6=2082;347*20=6940;2082+6940=9022:9022") == ("9022", True)
    assert checker.grade(problem, "347*26=9023:9023") == ("9023", False)
    assert checker.grade(problem, "9022") == (None, False)  # no ':' -> malformed, no answer to vote on
    assert checker.grade(problem, ":09022") == (None, False)  # leading zero is not a well-formed answer


def test_build_checker_names_the_valid_checkers():
    with pytest.raises(ValueError, match=r"unknown checker 'maths'.*exact, math.*did you mean 'math'"):
        build_checker("maths", ArithmeticTask())
    assert build_checker("exact", ArithmeticTask()).name == "exact"


def test_missing_math_verify_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_math_verify(name, *args, **kwargs):
        if name == "math_verify" or name.startswith("math_verify."):
            raise ImportError("No module named 'math_verify'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    with pytest.raises(ImportError, match=r"pip install 'reopold\[math\]'") as info:
        build_checker("math", None)
    assert str(info.value) == MATH_INSTALL_HINT


EQUIVALENT = [
    ("\\frac{1}{2}", "The answer is $\\boxed{0.5}$."),
    ("0.5", "So we get $\\frac{1}{2}$."),
    ("1/2", "x = \\boxed{\\dfrac12}"),
    ("\\sqrt{2}", "\\boxed{2^{1/2}}"),
    ("50\\%", "\\boxed{0.5}"),
    ("x+1", "\\boxed{1+x}"),
    ("12", "Adding them up, the answer is 12."),
]
DIFFERENT = [
    ("3", "\\boxed{4}"),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}"),
    ("\\pi", "\\boxed{3.14}"),
    ("2", "First 2 apples, then 5 more: \\boxed{7}"),  # the boxed answer counts, not an earlier number
]


@pytest.mark.parametrize(("reference", "completion"), EQUIVALENT)
def test_math_checker_accepts_equivalent_forms(reference, completion):
    pytest.importorskip("math_verify")
    answer, correct = build_checker("math", None).grade(Problem("q", reference), completion)
    assert correct is True
    assert answer is not None


@pytest.mark.parametrize(("reference", "completion"), DIFFERENT)
def test_math_checker_rejects_different_values(reference, completion):
    pytest.importorskip("math_verify")
    assert build_checker("math", None).grade(Problem("q", reference), completion)[1] is False


def test_math_checker_vote_keys_merge_equivalent_numbers():
    pytest.importorskip("math_verify")
    checker = build_checker("math", None)
    problem = Problem("q", "1/2")
    keys = [checker.grade(problem, text)[0] for text in ("\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{1/2}")]
    assert keys == ["1/2", "1/2", "1/2"]  # 0.5 and 1/2 vote together in maj@k
    assert checker.grade(problem, "I cannot solve this.") == (None, False)


def test_require_math_verify_returns_the_module():
    module = pytest.importorskip("math_verify")
    assert require_math_verify() is module
