"""write_report / summarize on synthetic metrics whose headline numbers are worked out by hand."""

import math
import re

import pytest

from reopold.evaluation.report import summarize, write_report
from reopold.train.tracking import MetricsLogger, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVALS = [  # (step, samples, accuracy, reverse_kl)
    (0, 0, 0.30, 0.90),
    (10, 640, 0.50, 0.60),
    (20, 1280, 0.45, 0.50),
]


def _train(step):
    return {
        "kind": "train", "step": step, "phase": "exploration" if step < 7 else "refinement",
        "reward_mean": 0.1 * step, "entropy_mean": 1.0 / step, "kept_frac": 0.5, "below_floor_frac": 0.01,
        "grad_norm": math.nan if step == 5 else 1.0, "floor": -2.0, "time": 10.0 * step,
        "skipped_steps": 1 if step >= 5 else 0,
        "reward_hist": {"edges": [-3.0, -2.0, -1.0, 0.0, 1.0], "counts": [step, 0, 20 - step, 5]},
    }


def _write(run_dir, train_steps=range(1, 21), evals=EVALS):
    records = [_train(step) for step in train_steps]
    records += [{"kind": "eval", "step": s, "samples": samples, "accuracy": acc, "reverse_kl": kl}
                for s, samples, acc, kl in evals]
    with MetricsLogger(run_dir) as logger:
        for record in sorted(records, key=lambda r: r["step"]):  # stable: train before eval at a step
            logger.log(record)


def _images(report_text):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_text)


def _assert_valid_pngs(run_dir, links):
    for link in links:
        assert link.startswith("plots/")  # relative, so the run dir can be moved or published
        data = (run_dir / link).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 5_000  # a real plot, not an empty canvas


def test_summary_matches_hand_computed_values(tmp_path):
    _write(tmp_path)
    summary = summarize(read_metrics(tmp_path))
    # 20 train records (steps 1..20), 3 evals; accuracy 0.30 -> 0.50 (step 10) -> 0.45; KL 0.9 -> 0.5.
    # Refinement starts at step 7; time = 10 s * step -> 200 s at step 20; skipped_steps is cumulative -> 1.
    assert summary == {
        "train_steps": 20, "eval_points": 3, "last_step": 20, "samples": 1280.0,
        "first_accuracy": 0.30, "last_accuracy": 0.45, "best_accuracy": 0.50, "best_accuracy_step": 10,
        "first_reverse_kl": 0.90, "last_reverse_kl": 0.50, "phase_switch_step": 7,
        "wall_time_s": 200.0, "skipped_steps": 1.0,
    }


def test_full_report_has_table_and_valid_plots(tmp_path):
    _write(tmp_path)
    path = write_report(tmp_path, title="Synthetic run")
    text = path.read_text()
    assert path == tmp_path / "report.md" and text.startswith("# Synthetic run\n")
    for row in ["| first accuracy | 0.3 |", "| last accuracy | 0.45 |", "| best accuracy | 0.5 |",
                "| best accuracy at step | 10 |", "| first held-out reverse KL | 0.9 |",
                "| last held-out reverse KL | 0.5 |", "| last step | 20 |", "| samples seen | 1280 |",
                "| phase switch at step | 7 |", "| skipped steps | 1 |", "| wall time | 200 s (0h 03m 20s) |"]:
        assert row in text
    links = _images(text)
    assert links == ["plots/accuracy.png", "plots/train_curves.png", "plots/reward_hist.png"]
    _assert_valid_pngs(tmp_path, links)
    # 10% of 20 histogram steps = 2 steps each side; the floor is in the records, so it is drawn.
    assert "first vs last 2 of 20 logged steps" in text and "reward floor" in text


def test_empty_or_missing_metrics_say_no_metrics_yet(tmp_path):
    write_report(tmp_path / "missing")
    assert "no metrics yet" in (tmp_path / "missing" / "report.md").read_text()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    text = write_report(tmp_path / "empty").read_text()
    assert "no metrics yet" in text and _images(text) == []


def test_eval_only_report_and_stale_plots_removed(tmp_path):
    _write(tmp_path)
    write_report(tmp_path)
    assert (tmp_path / "plots" / "train_curves.png").exists()
    _write(tmp_path, train_steps=[])  # same dir, now eval records only
    text = write_report(tmp_path).read_text()
    assert _images(text) == ["plots/accuracy.png"]
    _assert_valid_pngs(tmp_path, _images(text))
    assert not (tmp_path / "plots" / "train_curves.png").exists()
    assert "| best accuracy | 0.5 |" in text and "phase switch" not in text and "| train steps logged | 0 |" in text


def test_train_only_report_with_nan_and_inf_does_not_crash(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 11):
            record = _train(step)
            record["reward_mean"] = math.inf if step == 3 else (math.nan if step > 8 else record["reward_mean"])
            logger.log(record)
        logger.log({"kind": "eval", "step": 10, "accuracy": math.nan})
        logger.log({"kind": "eval", "step": 11, "accuracy": math.nan})
    text = write_report(tmp_path).read_text()
    # All accuracies are nan: first/last are reported as nan, best has no finite value so its rows go.
    assert "| last accuracy | nan |" in text and "best accuracy" not in text
    assert _images(text) == ["plots/accuracy.png", "plots/train_curves.png", "plots/reward_hist.png"]
    _assert_valid_pngs(tmp_path, _images(text)[1:])  # an all-nan curve is a near-empty PNG, skip its size


@pytest.mark.parametrize("count", [1, 3])
def test_histogram_with_few_steps(tmp_path, count):
    _write(tmp_path, train_steps=range(1, count + 1), evals=[])
    text = write_report(tmp_path).read_text()
    assert f"first vs last 1 of {count} logged steps" in text  # ceil(10% of <= 10 steps) = 1
    assert "plots/reward_hist.png" in _images(text)
