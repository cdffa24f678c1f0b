"""The chained-products tool-use task: splits, gold trajectories, the checker and the calc tool."""

from __future__ import annotations

import itertools
import random

import pytest

from reopold.registry import TASKS
from reopold.tasks.arithmetic import Problem
from reopold.tasks.chained import (
    ChainedProductsTask,
    _split_of,
    calc,
    factors,
    observation_text,
    parse_tool_call,
    tool_call_text,
)

PINNED_TEST = ["64*94*81=", "21*66*70=", "91*14*22="]


@pytest.fixture(scope="module")
def task() -> ChainedProductsTask:
    return ChainedProductsTask()


def _key(problem: Problem) -> tuple[int, ...]:
    return tuple(sorted(factors(problem)))


def test_registered_and_built_from_config(task):
    assert TASKS.get("chained-products") is ChainedProductsTask
    assert isinstance(ChainedProductsTask.from_config(object()), ChainedProductsTask)
    assert task.name == "chained-products"


def test_splits_are_disjoint_up_to_permutation_and_stable(task):
    splits = {s: task.problems(s, n) for s, n in (("train", 3000), ("validation", 500), ("test", 1000))}
    keys = {s: {_key(p) for p in ps} for s, ps in splits.items()}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    for s, ps in splits.items():
        assert len({p.prompt for p in ps}) == len(ps)  # distinct
        assert task.problems(s, 50) == ps[:50]  # same call, same list (prefix-stable)
    # Every permutation of a held-out problem's factors is in the same split; train samples never hit it.
    for split in ("validation", "test"):
        for p in splits[split][:100]:
            for perm in itertools.permutations(factors(p)):
                assert _split_of(*perm) == split
    rng = random.Random(0)
    assert not {_key(task.sample_problem(rng, "train")) for _ in range(2000)} & (keys["test"] | keys["validation"])
    # The split of a problem is pinned (the hash must not change between releases).
    assert [p.prompt for p in splits["test"][:3]] == PINNED_TEST


def test_problem_shapes(task):
    for p in task.problems("validation", 300):
        a, b, c = factors(p)
        assert all(10 <= x <= 99 for x in (a, b, c))
        assert p.prompt == f"{a}*{b}*{c}="
        assert p.answer == str(a * b * c)
    with pytest.raises(ValueError, match="split"):
        task.problems("dev", 3)
    with pytest.raises(ValueError, match="too many"):
        task.problems("test", 10**6)


def test_gold_trajectories_are_right(task):
    p = Problem(prompt="47*86*29=", answer="117218")
    assert task.gold_turns(p) == [("[calc(47*86)]", "4042"), ("[calc(4042*29)]", "117218"), (":117218", None)]
    assert task.gold_mental(p) == "47*86=4042;4042*29=117218:117218"
    for q in task.problems("train", 500):
        a, b, c = factors(q)
        turns = task.gold_turns(q)
        assert [r for _, r in turns] == [str(a * b), str(a * b * c), None]
        assert parse_tool_call(turns[0][0]) == f"{a}*{b}"
        assert parse_tool_call(turns[1][0]) == f"{a * b}*{c}"
        assert parse_tool_call(turns[2][0]) is None
        assert task.check(q, turns[-1][0])
        assert task.check(q, task.gold_mental(q))
        # The whole interleaved text grades like its last turn.
        whole = "".join(t + (observation_text(r) if r is not None else "") for t, r in turns)
        assert task.check(q, whole)
    assert set("".join(t for t, _ in task.gold_turns(p)) + task.gold_mental(p) + "{}") <= set(task.alphabet)
    assert task.max_completion_chars() == len("99*99=9801;9801*99=970299:970299")


@pytest.mark.parametrize("completion, correct", [
    (":117218", True),
    ("47*86=4042;4042*29=117218:117218", True),
    ("47*86=4042;4042*29=117219:117218", True),  # only the final answer is graded
    ("  :117218 ", True),
    (":117219", False),
    (":0117218", False),
    ("117218", False),  # no colon
    ("", False),
    ("[calc(4042*29)]", False),  # the last turn is a tool call
    (":117218[calc(4042*29)]", False),
    (":117218;", False),
    (":11:117218", True),  # the digits after the LAST colon
    (":117218:11", False),
    (":", False),
])
def test_checker(task, completion, correct):
    assert task.check(Problem(prompt="47*86*29=", answer="117218"), completion) is correct


def test_calc():
    assert calc("47*86") == "4042"
    assert calc("4042*29") == "117218"
    assert calc("47+86") == "133"
    assert calc("0*99") == "0"
    assert calc("007+1") == "8"
    for bad in ["47-86", "47*86*29", "-4*2", "4.5*2", "47 * 86", "", "*", "4*", "calc(4*2)", "abc",
                "1234567890123*2"]:
        with pytest.raises(ValueError, match="calc takes"):
            calc(bad)
    with pytest.raises(ValueError, match="calc takes a string"):
        calc(47)  # type: ignore[arg-type]


def test_tag_format():
    assert tool_call_text("47*86") == "[calc(47*86)]"
    assert observation_text("4042") == "{4042}"
    assert parse_tool_call("[calc(47*86)]") == "47*86"
    assert parse_tool_call("[calc(oops)]") == "oops"  # parsed; calc then refuses it
    assert parse_tool_call("[calc(47*86)]:4042") is None
    assert parse_tool_call("[calc(47*86") is None


def test_episodic_tasks_are_recognised_by_the_protocol(task):
    from reopold.tasks import ArithmeticTask, EpisodicTask
    from reopold.tasks.image_tools import ImageToolPromptTask

    assert isinstance(task, EpisodicTask) and issubclass(ImageToolPromptTask, EpisodicTask)
    assert not isinstance(ArithmeticTask(), EpisodicTask)  # single-turn: build_episodes returns None
