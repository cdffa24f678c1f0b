"""The sample-efficiency benchmark: the plan is fair (same grid, budget and seeds for every method), finished runs
are not run again, and the aggregation gives hand-computed numbers on synthetic metrics; one quick sweep runs for real
on tiny models."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import yaml

from reopold.benchmark.aggregate import (
    estimate_seconds,
    mean_curve,
    mean_std,
    negative_transfer,
    pick_lr,
    relative_samples,
    samples_to_threshold,
)
from reopold.benchmark.command import add_command, plan_text, run_benchmark, run_command
from reopold.benchmark.plan import (
    LADDER,
    METHODS,
    RunSpec,
    Sweep,
    check_sweep_file,
    run_overrides,
    run_root,
    run_status,
    seed_runs,
    selection_runs,
)
from reopold.cli import main
from reopold.config.loader import load_config
from reopold.config.schema import TrainConfig
from reopold.train.tracking import MetricsLogger
from tests.tiny import make_model, tiny_config


def evals(accuracies, *, seconds_per_step=10.0, samples_per_step=32, kl=0.5):
    """Eval records at steps 0, 1, 2, ... with the given accuracies."""
    return [{"kind": "eval", "step": step, "samples": step * samples_per_step, "time": step * seconds_per_step,
             "accuracy": acc, "reverse_kl": kl} for step, acc in enumerate(accuracies)]


def base_file(tmp_path: Path, **sections) -> Path:
    """A config file that loads (models are never opened by the code under test here)."""
    path = tmp_path / "base.yaml"
    config = tiny_config(tmp_path, tmp_path / "teacher", tmp_path / "student", **sections)
    config["run"].update({"steps": 2, "eval_every": 1})
    path.write_text(yaml.safe_dump(config))
    return path


# ---- aggregation: hand-computed ----------------------------------------------------------------------------------
def test_mean_std_is_the_sample_std():
    # mean 0.6; squared deviations 0.01, 0, 0.01 -> / (3 - 1) = 0.01 -> std 0.1
    stats = mean_std([0.5, 0.6, 0.7])
    assert stats["mean"] == pytest.approx(0.6) and stats["std"] == pytest.approx(0.1) and stats["n"] == 3
    assert math.isnan(mean_std([0.4])["std"]) and mean_std([0.4])["mean"] == 0.4


def test_mean_curve_and_samples_to_threshold():
    # Three seeds; accuracy means per step: 0.2, 0.5, 0.8. Seed i's time is (i + 1) * 10 s per step, so the mean
    # time at step 1 is (10 + 20 + 30) / 3 = 20 s. Seed 3 has an extra eval at step 3 that the others lack.
    runs = [evals([0.2, 0.5, 0.8], seconds_per_step=10), evals([0.2, 0.4, 0.9], seconds_per_step=20),
            evals([0.2, 0.6, 0.7, 0.95], seconds_per_step=30)]
    curve = mean_curve(runs, "accuracy")
    assert [p["step"] for p in curve] == [0, 1, 2]  # only steps every seed has
    assert [p["mean"] for p in curve] == pytest.approx([0.2, 0.5, 0.8])
    assert curve[2]["std"] == pytest.approx(0.1) and (curve[2]["min"], curve[2]["max"]) == (0.7, 0.9)
    assert samples_to_threshold(curve, 0.45) == {"step": 1, "samples": 32, "time": pytest.approx(20.0)}
    assert samples_to_threshold(curve, 0.2) == {"step": 0, "samples": 0, "time": 0.0}  # the start counts
    assert samples_to_threshold(curve, 0.85) is None  # 0.95 at step 3 is one seed, not the mean


def test_relative_samples_says_which_bound_it_is():
    assert relative_samples(64, 32, budget=128) == {"ratio": 2.0, "bound": "="}
    # Only the reference reached it: the method needs more than the whole budget, 128 / 32 = more than 4x.
    assert relative_samples(None, 32, budget=128) == {"ratio": 4.0, "bound": ">"}
    # Only the method reached it: the reference needs more than 128, so the ratio is below 32 / 128.
    assert relative_samples(32, None, budget=128) == {"ratio": 0.25, "bound": "<"}
    assert relative_samples(None, None, budget=128) == {"ratio": None, "bound": None}
    assert relative_samples(0, 0, budget=128) == {"ratio": None, "bound": None}  # both at the start


def test_negative_transfer():
    # Start 0.5. After step 0 the seeds reach lows of 0.4, 0.45, 0.3 -> mean 0.38333, 0.11667 below; they end at
    # 0.6, 0.55, 0.45 -> final - start = 0.1, 0.05, -0.05 (mean 0.03333); one seed ends below the start.
    runs = [evals([0.5, 0.4, 0.6]), evals([0.5, 0.45, 0.55]), evals([0.5, 0.3, 0.45])]
    result = negative_transfer(runs, start=0.5)
    assert result["lowest"]["mean"] == pytest.approx(0.38333, abs=1e-5)
    assert result["lowest_minus_start"] == pytest.approx(-0.11667, abs=1e-5)
    assert result["final_minus_start"]["mean"] == pytest.approx(0.03333, abs=1e-5)
    assert (result["runs_ending_below_start"], result["runs"]) == (1, 3)


def test_pick_lr_best_accuracy_then_lower_kl_then_smaller_lr():
    assert pick_lr({1e-5: {"accuracy": 0.6, "reverse_kl": 0.3}, 3e-5: {"accuracy": 0.6, "reverse_kl": 0.2},
                    1e-4: {"accuracy": 0.5, "reverse_kl": 0.1}}) == 3e-5
    assert pick_lr({3e-5: {"accuracy": 0.6, "reverse_kl": 0.2}, 1e-5: {"accuracy": 0.6, "reverse_kl": 0.2}}) == 1e-5
    # A NaN KL ranks as the worst KL; a failed run (None) never wins.
    assert pick_lr({1e-5: {"accuracy": 0.6, "reverse_kl": math.nan}, 3e-5: {"accuracy": 0.6, "reverse_kl": 9.0},
                    1e-4: None}) == 3e-5
    assert pick_lr({1e-5: None, 3e-5: None}) is None


def test_time_estimate_from_measured_runs():
    # reopold: own mean (100 + 120) / 2 = 110 s x 3 runs = 330; sft has none measured: the overall mean
    # (100 + 120 + 80) / 3 = 100 s x 2 = 200. (330 + 200) / 2 jobs = 265 s.
    assert estimate_seconds({"reopold": 3, "sft": 2}, {"reopold": [100, 120], "rkl": [80]}, jobs=2) == 265
    assert estimate_seconds({"reopold": 3}, {}, jobs=2) is None


# ---- the plan is fair --------------------------------------------------------------------------------------------
def test_plan_counts_and_every_method_gets_the_same_grid():
    methods, lrs = tuple(METHODS), (1e-5, 3e-5, 1e-4)
    select = selection_runs(methods, lrs)
    assert len(select) == 8 * 3 and {s.seed for s in select} == {0}
    assert all(sorted(s.lr for s in select if s.method == m) == sorted(lrs) for m in methods)
    tests = seed_runs({m: 3e-5 for m in methods}, seeds=3)
    assert len(tests) == 8 * 3 and {s.seed for s in tests} == {1, 2, 3}  # the selection seed is not reported
    assert selection_runs(methods, (3e-5,)) == []  # a one-lr grid has nothing to select
    assert seed_runs({"reopold": 1e-5, "gkd": None}, seeds=2) == [RunSpec("test", "reopold", 1e-5, 1),
                                                                   RunSpec("test", "reopold", 1e-5, 2)]
    assert [m for _, m in LADDER] == ["rkl", "rkl_sg", "rkl_floor", "rkl_entropy", "reopold"]


def test_run_configs_have_the_intended_objective_and_the_same_budget(tmp_path):
    # The base config switches stop-gradient on: it must not leak into grpo (an error) or into plain rkl.
    base = base_file(tmp_path, algo={"name": "reopold", "stop_gradient": True})
    expected = {
        "reopold": (True, True, True, True), "rkl": (False, False, False, False), "rkl_sg": (True, False, False, False),
        "rkl_floor": (True, True, False, False), "rkl_entropy": (True, True, True, False),
    }  # fmt: skip
    budgets = set()
    for method in METHODS:
        for stage in ("select", "test"):
            spec = RunSpec(stage, method, 3e-5, 2)
            config = load_config(TrainConfig, base, run_overrides(spec, tmp_path / "out"))
            assert config.algo.name == METHODS[method][0]
            assert config.optim.lr == 3e-5 and config.run.seed == 2 and config.run.threads == 1
            assert config.data.eval_split == ("validation" if stage == "select" else "test")
            assert Path(config.run.output_dir) / config.run_name == run_root(tmp_path / "out", stage) / spec.name
            if method in expected:
                assert tuple(config.algo.switches().values()) == expected[method]
            budgets.add((config.rollout.prompts_per_step, config.rollout.samples_per_prompt, config.run.steps))
    assert budgets == {(8, 4, 2)}


def test_run_status(tmp_path):
    run = tmp_path / "run"
    assert run_status(run, steps=2) == "start"
    with MetricsLogger(run) as logger:
        for record in evals([0.1, 0.2]):
            logger.log(record)
    assert run_status(run, steps=2) == "start"  # evals at steps 0 and 1 only: unfinished, nothing to resume from
    checkpoint = run / "checkpoints" / "step-000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.pt").write_bytes(b"")
    assert run_status(run, steps=2) == "resume"
    with MetricsLogger(run, resume=True) as logger:
        logger.log(evals([0.1, 0.2, 0.3])[2])
    assert run_status(run, steps=2) == "done"


def test_a_sweep_with_other_settings_is_refused(tmp_path):
    base = base_file(tmp_path)
    sweep = Sweep(config=base, out=tmp_path / "out")
    config = sweep.base()
    check_sweep_file(sweep, config, (1e-5, 3e-5))
    check_sweep_file(sweep, config, (1e-5, 3e-5))  # the same settings resume
    with pytest.raises(ValueError, match="lrs"):
        check_sweep_file(sweep, config, (1e-5, 1e-4))


def test_dry_run_plan_and_estimate(tmp_path):
    base = base_file(tmp_path)  # lr 3e-3 -> grid 1e-3, 3e-3, 9e-3
    sweep = Sweep(config=base, out=tmp_path / "out", methods=("reopold", "sft"), seeds=3, jobs=2)
    text = plan_text(sweep)
    assert "2 methods x 3 lrs (0.001, 0.003, 0.009) = 6 selection runs" in text
    assert "2 methods x 3 seeds = 6 test runs, 64 samples each; 12 runs left: no run measured yet" in text
    log = tmp_path / "out" / "sweep_log.jsonl"
    log.parent.mkdir()
    entries = [("reopold", "start", 0, 100.0), ("sft", "start", 0, 20.0), ("sft", "resume", 0, 5.0),
               ("sft", "start", 1, 1.0)]  # resumed remainders and failures are not whole-run timings
    log.write_text("".join(json.dumps({"run": f"select/{m}", "method": m, "status": st, "returncode": rc,
                                       "wall_s": w}) + "\n" for m, st, rc, w in entries))
    # 6 runs left of each method: (6 x 100 + 6 x 20) / 2 jobs = 360 s = 6 minutes.
    assert "12 runs left: about 6 minutes at 2 at a time, from 2 measured runs" in plan_text(sweep)
    # sft's selection finishes (0.003 wins) and one of its seeds too: its other 2 test runs are left, and
    # reopold's 3 selection + 3 test runs, as before.
    for lr, acc in ((1e-3, 0.2), (3e-3, 0.4), (9e-3, 0.1)):
        with MetricsLogger(run_root(sweep.out, "select") / RunSpec("select", "sft", lr, 0).name) as logger:
            for record in evals([0.1, 0.1, acc]):
                logger.log(record)
    with MetricsLogger(run_root(sweep.out, "test") / RunSpec("test", "sft", 3e-3, 1).name) as logger:
        for record in evals([0.1, 0.1, 0.3]):
            logger.log(record)
    assert "8 runs left" in plan_text(sweep)


# ---- reports from finished runs (no training: every run folder already holds its final eval) -----------------
def test_report_of_finished_runs(tmp_path):
    base = base_file(tmp_path)  # 2 steps of 8 prompts x 4 samples: 32 samples per step, a budget of 64
    out = tmp_path / "out"
    curves = {  # per method, per seed (time 10 s per step for seed 1, 20 s for seed 2)
        "reopold": ([0.2, 0.5, 0.8], [0.2, 0.6, 0.8]),  # means 0.2, 0.55, 0.8
        "rkl": ([0.2, 0.15, 0.6], [0.2, 0.1, 0.5]),  # means 0.2, 0.125, 0.55
        "sft": ([0.2, 0.3, 0.4], [0.2, 0.3, 0.4]),  # means 0.2, 0.3, 0.4
    }
    for method, seeds in curves.items():
        for seed, accuracies in enumerate(seeds, start=1):
            with MetricsLogger(run_root(out, "test") / RunSpec("test", method, 1e-3, seed).name) as logger:
                for record in evals(accuracies, seconds_per_step=10.0 * seed):
                    logger.log(record)
    sweep = Sweep(config=base, out=out, methods=tuple(curves), lrs=(1e-3,), seeds=2, teacher_accuracy=0.6)
    report, failed = run_benchmark(sweep, log=lambda line: None)
    assert failed == [] and not (out / "logs").exists()  # nothing was run
    text = report.read_text()
    # Threshold 0.9 x 0.6 = 0.54: reopold's mean reaches it at step 1 (32 samples, mean time (10 + 20) / 2 = 15 s),
    # rkl at step 2 (64 samples: 2.00x reopold's), sft never (needs more than the 64-sample budget: >2.00x).
    # Final accuracy: reopold 0.8, 0.8; rkl 0.6, 0.5 -> 0.55 +- 0.0707; train time 20 and 40 s -> 30 +- 14.14.
    rows = {}  # first table row of each method: the methods table
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0], line)
    assert rows["| reopold"] == ("| reopold | 0.001 | 2 | 0.800 ± 0.000 | 0.500 ± 0.000 | 32 (step 1) | 1.00x | "
                                 "15.0 s | 64 | 30.0 ± 14.1 s |")
    assert rows["| rkl"] == ("| rkl | 0.001 | 2 | 0.550 ± 0.071 | 0.500 ± 0.000 | 64 (step 2) | 2.00x | 30.0 s | 64 | "
                             "30.0 ± 14.1 s |")
    assert "| sft | 0.001 | 2 | 0.400 ± 0.000 | 0.500 ± 0.000 | not reached | >2.00x | not reached | 64 |" in text
    assert "| RKL (rkl) |" in text and "| + two phases (= REOPOLD) (reopold) |" in text
    assert "+ stop-gradient" not in text  # rungs without runs are left out
    # Negative transfer of rkl: lows 0.15, 0.1 -> 0.125, 0.075 below the start 0.2; ends +0.4, +0.3 -> 0.35 +- 0.071.
    assert "| rkl | 0.200 | 0.125 ± 0.035 | -0.075 | 0.350 ± 0.071 | 0/2 |" in text
    # The paper's comparison: reopold's mean curve (0.2, 0.55, 0.8) reaches rkl's final 0.55 at step 1, i.e. 32 of
    # rkl's 64 samples (0.50), and sft's 0.4 also at step 1; neither reaches reopold's final 0.8.
    assert "| rkl | 0.550 | 32 (step 1) | 0.50 | not reached |" in text
    assert "| sft | 0.400 | 32 (step 1) | 0.50 | not reached |" in text
    data = json.loads((out / "results.json").read_text())
    assert data["matching"]["rkl"]["fraction"] == 0.5 and set(data["matching"]) == {"rkl", "sft"}
    assert data["methods"]["rkl"]["to_threshold"] == {"step": 2, "samples": 64, "time": 30.0}
    assert data["setup"]["budget"] == 64 and data["setup"]["threshold"] == pytest.approx(0.54)
    assert data["plots"] == ["accuracy.png", "ladder.png"]  # no train records: no entropy or floor plots
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in data["plots"])


# ---- a real quick sweep ------------------------------------------------------------------------------------------
def test_quick_sweep_runs_end_to_end_and_resumes(tmp_path, capsys):
    teacher = make_model(tmp_path / "teacher", hidden=32, layers=1, seed=1)
    student = make_model(tmp_path / "student", hidden=16, layers=1, seed=2)
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, teacher, student)))
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers(dest="command"))
    argv = ["benchmark", "--config", str(config), "--quick", "--jobs", "2", "--out", str(tmp_path / "out")]
    assert run_command(parser.parse_args(argv)) == 0
    out = tmp_path / "out"
    text = (out / "results.md").read_text()
    assert "| reopold | 0.003 | 1 |" in text and "| rkl | 0.003 | 1 |" in text  # tiny_config's lr, one seed
    data = json.loads((out / "results.json").read_text())
    assert set(data["methods"]) == {"reopold", "rkl"} and data["failed"] == []
    assert data["setup"]["steps"] == 2 and data["setup"]["budget"] == 2 * 8 * 4
    assert [p["step"] for p in data["methods"]["reopold"]["accuracy_curve"]] == [0, 1, 2]
    assert {"accuracy.png", "entropy.png", "below_floor.png"} <= set(data["plots"])
    assert len((out / "sweep_log.jsonl").read_text().splitlines()) == 2

    # Again: both runs are finished, so nothing runs and the report is the same.
    assert run_command(parser.parse_args(argv)) == 0
    assert len((out / "sweep_log.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "results.json").read_text())["methods"] == data["methods"]
    # Another grid in the same folder is refused before anything runs.
    capsys.readouterr()
    assert main([*argv, "--lrs", "1e-3"]) == 2
    assert "other settings" in capsys.readouterr().err
