"""Sampling metrics of a model on problems with checkable answers: pass@k, avg@k and maj@k from n >= k samples.

Pure functions on plain Python values (verdicts and parsed answers), no models and no I/O. ``summarize`` averages
them over problems. docs/evaluation.md gives the formulas and the tie rule.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from math import comb


def check_k(n: int, k: int) -> None:
    """Fail with a sentence that says what to do when ``k`` samples cannot be taken from ``n``."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got k={k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the n={n} samples drawn per problem; draw at least {k} (--n {k})")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k (the chance that at least one of k samples is correct) from n >= k samples of
    which c are correct (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1):

        pass@k = 1 - C(n - c, k) / C(n, k)

    i.e. one minus the share of the C(n, k) equally likely k-subsets of the n samples that hold no correct one.
    ``math.comb`` is exact on integers and int / int division is correctly rounded, so this is accurate for any n.
    """
    check_k(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c={c} correct samples is impossible out of n={n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose final answer wins a majority vote, or None when no sample has an answer.

    Samples without a parsed answer (None) do not vote. Tie rule: among the answers with the highest count, the
    one that appears first in draw order wins, and the index returned is that first appearance. Samples are
    exchangeable, so this deterministic rule breaks ties as a uniformly random choice would, in expectation.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """maj@k of one problem: is the majority answer of k samples correct, averaged over the floor(n / k) disjoint
    blocks of k consecutive samples (each block is an independent draw of k samples, so the mean is unbiased).

    ``answers[i]`` is sample i's parsed final answer (None: none found) and ``correct[i]`` its verdict; a block
    whose samples have no answer at all counts as wrong. Ties follow ``majority_vote``.
    """
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"{n} answers but {len(correct)} verdicts")
    check_k(n, k)
    blocks = n // k
    hits = 0
    for b in range(blocks):
        winner = majority_vote(answers[b * k : (b + 1) * k])
        hits += winner is not None and bool(correct[b * k + winner])
    return hits / blocks


def avg_at_k(correct: Sequence[bool], k: int) -> float:
    """avg@k of one problem: the accuracy of k samples averaged over the floor(n / k) disjoint blocks of k
    consecutive samples, i.e. the mean verdict of the first floor(n / k) * k samples. Its expectation is pass@1 for
    every k; only its variance falls as k grows."""
    n = len(correct)
    check_k(n, k)
    used = (n // k) * k
    return sum(map(bool, correct[:used])) / used


def summarize(correct: Sequence[Sequence[bool]], answers: Sequence[Sequence[str | None]], ks: Sequence[int]
              ) -> dict[str, float]:
    """pass@1 and, for each k in ``ks``, pass@k, avg@k and maj@k, each averaged over problems (equal weights).

    ``correct[p][i]`` and ``answers[p][i]`` belong to sample i of problem p; every problem needs at least max(ks)
    samples.
    """
    if not correct:
        raise ValueError("no problems to summarize")
    if len(answers) != len(correct):
        raise ValueError(f"{len(correct)} problems of verdicts but {len(answers)} of answers")
    for verdicts in correct:
        for k in ks:
            check_k(len(verdicts), k)
    mean = lambda values: sum(values) / len(values)
    metrics = {"pass@1": mean([pass_at_k(len(v), sum(map(bool, v)), 1) for v in correct])}
    for k in ks:
        metrics[f"pass@{k}"] = mean([pass_at_k(len(v), sum(map(bool, v)), k) for v in correct])
        metrics[f"avg@{k}"] = mean([avg_at_k(v, k) for v in correct])
        metrics[f"maj@{k}"] = mean([maj_at_k(a, v, k) for a, v in zip(answers, correct, strict=True)])
    return metrics
