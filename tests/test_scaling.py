"""Test-time scaling harness: finite, ordered results on tiny models; matched-accuracy ratios by hand; table, plot."""

from __future__ import annotations

import json
import math

import pytest

from reopold.cli import main
from reopold.evaluation.scaling import (
    ScalingModel,
    ScalingPoint,
    cheapest_reaching,
    matched_accuracy,
    measure_scaling,
    plot_scaling,
    scaling_table,
)
from reopold.models.loading import load_model, load_tokenizer
from reopold.tasks import ArithmeticTask
from reopold.tasks.prompts import PromptEncoder
from tests.tiny import make_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    small = make_model(root / "small", hidden=16, layers=1, seed=2)
    big = make_model(root / "big", hidden=32, layers=2, seed=1, sharpness=20.0)  # a peakier, different sampler
    return small, big


class FirstCharChecker:
    """A stand-in grader that a random model passes about half the time: the answer is the first character of the
    completion, right when it is an even digit or '*'."""

    name = "first-char"

    def grade(self, problem, completion: str):
        answer = completion[:1] or None
        return answer, answer is not None and answer in "02468*"


def scaling_model(label, path):
    tokenizer = load_tokenizer(str(path))
    return ScalingModel(label, load_model(str(path), trainable=False), tokenizer, PromptEncoder(tokenizer, "off"))


def test_latency_harness_gives_finite_ordered_results(models):
    problems = ArithmeticTask().problems("test", 2)
    ks = [1, 2, 4]
    small, big = scaling_model("small", models[0]), scaling_model("big", models[1])
    results = measure_scaling([small, big], problems, FirstCharChecker(), ks=ks, max_new_tokens=4, seed=3)
    assert list(results) == ["small", "big"]
    for label, points in results.items():
        assert [p.k for p in points] == ks
        assert all(p.model == label for p in points)
        assert all(math.isfinite(p.latency_s) and 0 < p.latency_s < 60 for p in points)
        assert all(0.0 <= p.maj_at_k <= 1.0 and 1.0 <= p.response_length <= 5 for p in points)
        passes = [p.pass_at_k for p in points]
        # Unbiased pass@K from one pool of n = 1 + 2 + 4 samples per problem rises with K.
        assert passes == sorted(passes) and 0.0 <= passes[0] <= passes[-1] <= 1.0
        assert points[0].maj_at_k == pytest.approx(points[0].pass_at_k)  # one vote: maj@1 = pass@1
    again = measure_scaling([small], problems, FirstCharChecker(), ks=ks, max_new_tokens=4, seed=3, warmup=False)
    accuracies = lambda pts: [(p.k, p.pass_at_k, p.maj_at_k, p.response_length) for p in pts]
    assert accuracies(again["small"]) == accuracies(results["small"])  # same seed, same samples; latencies differ


def test_harness_rejects_bad_ks_and_greedy(models):
    model = [scaling_model("small", models[0])]
    problems = ArithmeticTask().problems("test", 1)
    with pytest.raises(ValueError, match="increasing"):
        measure_scaling(model, problems, FirstCharChecker(), ks=[4, 2], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        measure_scaling(model, problems, FirstCharChecker(), ks=[1], max_new_tokens=2, temperature=0.0)


def point(model, k, latency, accuracy):
    return ScalingPoint(model, k, latency, pass_at_k=accuracy, maj_at_k=accuracy, response_length=10.0)


TEACHER = [point("teacher", 1, 1.0, 0.50), point("teacher", 2, 1.2, 0.60), point("teacher", 4, 1.6, 0.70)]
STUDENT = [point("student", 1, 0.2, 0.40), point("student", 2, 0.25, 0.55), point("student", 4, 0.3, 0.62),
           point("student", 8, 0.5, 0.65)]


def test_matched_accuracy_ratios_by_hand():
    rows = matched_accuracy(TEACHER, STUDENT, "maj")
    # teacher K=1 (0.50): cheapest student point with >= 0.50 is K=2 at 0.25 s -> 1.0 / 0.25 = 4.
    # teacher K=2 (0.60): student K=4 (0.62) at 0.3 s -> 1.2 / 0.3 = 4.
    # teacher K=4 (0.70): the student never reaches it -> no ratio.
    assert [(r["reference_k"], r["model_k"]) for r in rows] == [(1, 2), (2, 4), (4, None)]
    assert rows[0]["latency_ratio"] == pytest.approx(4.0)
    assert rows[1]["latency_ratio"] == pytest.approx(4.0)
    assert rows[2]["latency_ratio"] is None
    # The other way round: student K=8 (0.65) needs teacher K=4 at 1.6 s -> 0.5 / 1.6 = 0.3125.
    assert matched_accuracy(STUDENT, TEACHER, "pass")[3]["latency_ratio"] == pytest.approx(0.3125)


def test_cheapest_reaching_prefers_lower_latency_over_lower_k():
    points = [point("m", 1, 0.9, 0.5), point("m", 2, 0.4, 0.5)]  # a noisy K=2 that ran faster than K=1
    assert cheapest_reaching(points, 0.5, "maj").k == 2
    assert cheapest_reaching(points, 0.51, "maj") is None


def test_table_and_plot(tmp_path):
    results = {"teacher": TEACHER, "student": STUDENT}
    table = scaling_table(results, reference="teacher", metric="maj", device="CPU (test)")
    assert "| student | 8 | 0.5000 | 0.650 | 0.650 | 10.0 |" in table
    assert "| 1 | 0.500 | 1.0000 | 2 | 0.550 | 0.2500 | 4.00 |" in table
    assert "| 4 | 0.700 | 1.6000 | - | - | - | - |" in table
    assert "## student against teacher at matched maj@K" in table and "Measured on CPU (test)" in table
    with pytest.raises(ValueError, match="reference 'nobody'"):
        scaling_table(results, reference="nobody", metric="maj")
    path = plot_scaling(results, tmp_path / "scaling.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_scaling_command_writes_table_json_and_plot(tmp_path, models, capsys):
    out = tmp_path / "out"
    argv = ["scaling", "--model", f"student={models[0]}", "--model", f"teacher={models[1]}", "--reference", "teacher",
            "--num-problems", "2", "--ks", "1,2", "--max-new-tokens", "4", "--out", str(out)]
    assert main(argv) == 0
    saved = json.loads((out / "scaling.json").read_text())
    assert saved["reference"] == "teacher" and saved["num_problems"] == 2 and saved["ks"] == [1, 2]
    assert [p["k"] for p in saved["points"]["student"]] == [1, 2]
    table = (out / "scaling.md").read_text()
    assert "## student against teacher at matched maj@K" in table
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "done:" in capsys.readouterr().out


def test_scaling_command_needs_distinct_labels(tmp_path, models, capsys):
    argv = ["scaling", "--model", str(models[0]), "--model", str(models[0]), "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "distinct labels" in capsys.readouterr().err
