"""pass@k against brute-force enumeration of subsets, maj@k on hand-built answer lists (ties included), avg@k."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import pytest

from reopold.evaluation.metrics import avg_at_k, maj_at_k, majority_vote, pass_at_k, summarize


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in subset) for subset in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_of_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-15)


def test_pass_at_k_hand_cases():
    # n=4, c=1, k=2: C(3,2)/C(4,2) = 3/6 of the pairs miss the correct one -> 1/2.
    assert pass_at_k(4, 1, 2) == 0.5
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is c/n
    assert pass_at_k(8, 6, 3) == 1.0  # n - c = 2 < k: every triple holds a correct sample
    assert pass_at_k(8, 0, 8) == 0.0


def test_pass_at_k_stays_exact_for_large_n():
    # 1 - C(900, 10)/C(1000, 10) = 1 - prod_{i=0}^{9} (900 - i)/(1000 - i), computed here in exact rationals.
    ratio = Fraction(1)
    for i in range(10):
        ratio *= Fraction(900 - i, 1000 - i)
    exact = 1 - ratio
    assert pass_at_k(1000, 100, 10) == pytest.approx(float(exact), rel=1e-14)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 0, 5), (4, 1, 0), (4, 5, 2), (4, -1, 2)])
def test_pass_at_k_rejects_impossible_inputs(n, c, k):
    with pytest.raises(ValueError, match="k=|c="):
        pass_at_k(n, c, k)


def test_k_above_n_says_how_many_to_draw():
    with pytest.raises(ValueError, match=r"k=8 is larger than the n=4 samples.*--n 8"):
        pass_at_k(4, 1, 8)
    with pytest.raises(ValueError, match="k=3 is larger than the n=2"):
        maj_at_k(["1", "2"], [True, False], 3)


def test_majority_vote_plain_majority():
    assert majority_vote(["7", "3", "7", "7", "3"]) == 0  # "7" has 3 votes; its first sample is index 0
    assert majority_vote(["3", "7", "7"]) == 1


def test_majority_vote_tie_goes_to_the_answer_seen_first():
    # "5" and "9" both have 2 votes; "9" appears first (index 1), so it wins and index 1 is returned.
    assert majority_vote(["2", "9", "5", "5", "9"]) == 1
    # A three-way tie of single votes: the first sample's answer wins.
    assert majority_vote(["4", "6", "8"]) == 0


def test_majority_vote_ignores_missing_answers():
    # None never votes, even when it is the most common "answer".
    assert majority_vote([None, None, None, "12", "13", "13"]) == 4
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_maj_at_k_hand_cases():
    answers = ["5", "5", "6", "6", "6", "7", None, None]
    correct = [True, True, False, False, False, False, False, False]
    # k=8: "6" has 3 votes against 2 for "5" -> wrong.
    assert maj_at_k(answers, correct, 8) == 0.0
    # k=4: blocks ["5","5","6","6"] (tie, "5" first -> right) and ["6","7",None,None] (tie, "6" first -> wrong).
    assert maj_at_k(answers, correct, 4) == 0.5
    # k=2: blocks [5,5] right, [6,6] wrong, [6,7] "6" wins wrong, [None,None] no answer -> wrong: 1/4.
    assert maj_at_k(answers, correct, 2) == 0.25
    # k=1: each sample alone; 2 of 8 right.
    assert maj_at_k(answers, correct, 1) == 0.25
    # k=3: floor(8/3)=2 blocks ["5","5","6"] right, ["6","6","7"] wrong; the last two samples are unused.
    assert maj_at_k(answers, correct, 3) == 0.5


def test_maj_at_k_verdict_is_the_winning_samples():
    # The reference is 1/2; math-equivalent answers share a vote key, and the winner's verdict is used.
    assert maj_at_k(["1/2", "1/3", "1/2"], [True, False, True], 3) == 1.0
    assert maj_at_k(["1/3", "1/2", "1/3"], [False, True, False], 3) == 0.0


def test_avg_at_k_uses_whole_blocks():
    correct = [True, False, True, True, False]
    assert avg_at_k(correct, 1) == pytest.approx(3 / 5)
    assert avg_at_k(correct, 2) == pytest.approx(3 / 4)  # 2 blocks of 2: the first 4 samples, 3 right
    assert avg_at_k(correct, 5) == pytest.approx(3 / 5)


def test_summarize_averages_over_problems():
    correct = [[True, False, False, False], [True, True, True, True]]
    answers = [["1", "2", "2", None], ["9", "9", "9", "9"]]
    metrics = summarize(correct, answers, [1, 2, 4])
    assert metrics["pass@1"] == pytest.approx((1 / 4 + 1) / 2)
    # Problem 0: pass@2 = 1 - C(3,2)/C(4,2) = 1/2; problem 1: 1.
    assert metrics["pass@2"] == pytest.approx(0.75)
    assert metrics["pass@4"] == pytest.approx(1.0)
    # Problem 0 maj@4: "2" wins 2 to 1 -> wrong; maj@2 blocks ["1","2"] tie -> "1" right, ["2",None] wrong.
    assert metrics["maj@4"] == pytest.approx(0.5)
    assert metrics["maj@2"] == pytest.approx((0.5 + 1) / 2)
    assert metrics["avg@4"] == pytest.approx(metrics["pass@1"])
    assert set(metrics) == {"pass@1", *(f"{m}@{k}" for m in ("pass", "avg", "maj") for k in (1, 2, 4))}


def test_summarize_rejects_k_above_samples():
    with pytest.raises(ValueError, match="k=4 is larger than the n=3"):
        summarize([[True, False, True]], [["1", "2", "1"]], [1, 4])


def test_pass_at_k_is_unbiased_for_random_draws():
    # The mean of the estimator over many n-sample draws matches the true pass@k = 1 - (1 - p)^k.
    rng = random.Random(0)
    p, n, k, trials = 0.2, 10, 4, 4000
    estimates = [pass_at_k(n, sum(rng.random() < p for _ in range(n)), k) for _ in range(trials)]
    # Standard error of the mean is below 0.2 / sqrt(4000) ~ 0.003; 0.015 is five of them.
    assert sum(estimates) / trials == pytest.approx(1 - (1 - p) ** k, abs=0.015)
