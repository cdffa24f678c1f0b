"""``reopold benchmark``: sample efficiency of REOPOLD against its baselines at one sample budget, with equal tuning.

A sweep is methods x learning-rate grid x seeds of ``reopold train`` runs on one base config, in two stages:

  select  one run per (method, lr), seed 0, evaluated on the validation split. Each method keeps the lr with the
          best final validation accuracy (ties: the lower held-out reverse KL, then the smaller lr).
  test    the kept lr with seeds 1..S on the test split: the reported numbers. Seed 0 is not reused, so the seed
          whose luck picked the lr is not also reported.

Every method gets the same grid, the same prompts x samples x steps, and the same seeds; the grid is chosen from the
base config's lr, never per method. Each run is a subprocess (``python -m reopold train``, one thread), ``jobs`` at a
time. A run whose metrics.jsonl holds its final eval is skipped and one with a checkpoint is resumed, so running the
same command again finishes a stopped sweep. Output folder:

  sweep.json                   settings; a sweep with another base config or grid in the same folder is refused
  runs/{select,test}/<method>-lr<lr>-seed<k>/   run folders;  logs/{select,test}/<run>.log   their output
  sweep_log.jsonl              one line per finished subprocess (exit code, wall seconds): the time estimate
  teacher.json                 the teacher's greedy test accuracy, measured once
  results.md, results.json, accuracy.png, ladder.png, entropy.png, below_floor.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
SELECT_SEED = 0
SWITCHES = ("stop_gradient", "reward_floor", "entropy_selection", "two_phase")
# name -> (algo.name, explicit ablation switches or None for the algorithm's own). Switches are always written out
# (null when None) so a base config that sets one cannot leak it into another method.
METHODS = {
    "reopold": ("reopold", None),
    "rkl": ("rkl", None),
    "rkl_sg": ("rkl_sg", None),
    "grpo": ("grpo", None),
    "sft": ("sft", None),
    "gkd": ("gkd", None),
    "rkl_floor": ("rkl", {"stop_gradient": True, "reward_floor": True, "entropy_selection": False,
                          "two_phase": False}),
    "rkl_entropy": ("rkl", {"stop_gradient": True, "reward_floor": True, "entropy_selection": True,
                            "two_phase": False}),
}
MAIN_METHODS = ("reopold", "rkl", "rkl_sg", "grpo", "sft", "gkd")
# The paper's cumulative ablation; rungs that equal a method reuse its runs.
LADDER = (("RKL", "rkl"), ("+ stop-gradient", "rkl_sg"), ("+ reward floor", "rkl_floor"),
          ("+ entropy selection", "rkl_entropy"), ("+ two phases (= REOPOLD)", "reopold"))
QUICK_METHODS = ("reopold", "rkl")
PLOTS = ("accuracy.png", "ladder.png", "entropy.png", "below_floor.png")


# ---- the plan -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    stage: str  # "select" (validation split) or "test"
    method: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-lr{self.lr:g}-seed{self.seed}"


@dataclass
class Sweep:
    config: Path  # the base config every run starts from
    out: Path
    methods: tuple[str, ...] = (*MAIN_METHODS, "rkl_floor", "rkl_entropy")
    lrs: tuple[float, ...] | None = None  # None: base lr x (1/3, 1, 3)
    seeds: int = 3
    jobs: int = 2
    overrides: tuple[str, ...] = ()  # applied to the base config, before each run's own
    teacher_accuracy: float | None = None  # None: measured once with greedy decoding on the test split

    def base(self):
        """The validated base config (with the sweep's overrides)."""
        from reopold.config import ConfigError, load_config
        from reopold.train_config import TrainConfig

        config = load_config(TrainConfig, self.config, self.overrides)
        if not config.run.eval_every:
            raise ConfigError("the benchmark needs held-out evals during training: set run.eval_every > 0")
        return config

    def grid(self, base) -> tuple[float, ...]:
        return tuple(self.lrs) if self.lrs else default_lrs(base.optim.lr)


def default_lrs(lr: float) -> tuple[float, ...]:
    """The base lr and a factor of 3 either side, to two significant digits (1e-5 -> 3.3e-6, 1e-5, 3e-5)."""
    return tuple(float(f"{x:.2g}") for x in (lr / 3, lr, lr * 3))


def method_overrides(method: str) -> list[str]:
    algo, switches = METHODS[method]
    values = {key: "null" if switches is None else str(switches[key]).lower() for key in SWITCHES}
    return [f"algo.name={algo}", *(f"algo.{key}={value}" for key, value in values.items())]


def run_overrides(spec: RunSpec, out: Path) -> list[str]:
    split = "validation" if spec.stage == "select" else "test"
    return [*method_overrides(spec.method), f"optim.lr={spec.lr!r}", f"run.seed={spec.seed}", f"run.name={spec.name}",
            f"run.output_dir={run_root(out, spec.stage)}", f"data.eval_split={split}", "run.threads=1",
            "run.overwrite=true", "run.progress=false", "run.report=false"]


def selection_runs(methods, lrs) -> list[RunSpec]:
    """One seed per (method, lr); none when the grid has a single lr (nothing to choose)."""
    return [] if len(lrs) < 2 else [RunSpec("select", m, lr, SELECT_SEED) for m in methods for lr in lrs]


def seed_runs(picks: dict[str, float | None], seeds: int) -> list[RunSpec]:
    return [RunSpec("test", m, lr, seed) for m, lr in picks.items() if lr is not None for seed in range(1, seeds + 1)]


def quick_overrides(base) -> list[str]:
    """Two steps, an eval after each, tiny batches and evals: checks the pipeline, measures nothing."""
    prompts = min(8, base.rollout.prompts_per_step)
    data, rollout = base.data, base.rollout
    return ["run.steps=2", "run.eval_every=1", "run.save_every=2", f"data.eval_problems={min(16, data.eval_problems)}",
            f"data.train_problems={min(200, data.train_problems)}",
            f"data.preflight_problems={min(4, data.preflight_problems)}", f"rollout.prompts_per_step={prompts}",
            f"optim.mini_batch_prompts={prompts}", f"rollout.samples_per_prompt={min(4, rollout.samples_per_prompt)}"]


# ---- running ------------------------------------------------------------------------------------------------------
def run_root(out: Path, stage: str) -> Path:
    return Path(out) / "runs" / stage


def is_finished(records: list[dict], steps: int) -> bool:
    return any(r.get("kind") == "eval" and r.get("step") == steps for r in records)


def run_status(run_dir: Path, steps: int) -> str:
    """'done' (metrics hold the final eval), 'resume' (a checkpoint, unfinished) or 'start'."""
    from reopold.checkpoint import latest_checkpoint
    from reopold.tracking import read_metrics

    if is_finished(read_metrics(run_dir), steps):
        return "done"
    return "resume" if latest_checkpoint(run_dir) is not None else "start"


def execute(specs: list[RunSpec], sweep: Sweep, steps: int, *, log=print) -> list[dict]:
    """Run every unfinished spec, ``sweep.jobs`` at a time; one result dict per subprocess run."""
    todo = [(spec, status) for spec in specs
            if (status := run_status(run_root(sweep.out, spec.stage) / spec.name, steps)) != "done"]
    if len(todo) < len(specs):
        log(f"{len(specs) - len(todo)} of {len(specs)} {specs[0].stage} runs already finished")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def one(item):
        spec, status = item
        run_dir = run_root(sweep.out, spec.stage) / spec.name
        if status == "resume":
            command = [sys.executable, "-m", "reopold", "train", "--resume", str(run_dir)]
        else:
            command = [sys.executable, "-m", "reopold", "train", "--config", str(sweep.config), *sweep.overrides,
                       *run_overrides(spec, sweep.out)]
        log_path = Path(sweep.out) / "logs" / spec.stage / f"{spec.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(log_path, "a") as handle:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
        result = {"run": f"{spec.stage}/{spec.name}", "method": spec.method, "status": status, "returncode": code,
                  "wall_s": time.perf_counter() - started}
        with open(Path(sweep.out) / "sweep_log.jsonl", "a") as handle:
            handle.write(json.dumps(result) + "\n")
        log(f"{'ok' if code == 0 else f'FAILED (exit {code}, see {log_path})'}: {result['run']} "
            f"({status}, {result['wall_s']:.0f} s)")
        return result

    with ThreadPoolExecutor(max_workers=sweep.jobs) as pool:
        return list(pool.map(one, todo))


def check_sweep_file(sweep: Sweep, base, lrs) -> None:
    """Record the sweep's settings; refuse to mix runs of another base config or grid into the same folder."""
    from reopold.config import to_dict

    path = Path(sweep.out) / "sweep.json"
    settings = {"base_config": to_dict(base), "lrs": list(lrs)}
    if path.exists():
        old = json.loads(path.read_text())
        old_flat, new_flat = _flatten(old), _flatten(settings)
        differ = sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))
        if differ:
            raise ValueError(f"{sweep.out} holds a sweep with other settings ({differ[0]}: {old_flat.get(differ[0])!r} "
                             f"there, {new_flat.get(differ[0])!r} now); choose another --out or delete it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def measure_teacher_accuracy(base) -> dict:
    """Greedy accuracy of the teacher on the test problems the runs are evaluated on (same count, same budget)."""
    from reopold.data import PromptEncoder, build_task
    from reopold.evaluation import evaluate
    from reopold.models import load_model, load_tokenizer

    if base.teacher.url is not None:
        raise ValueError("the teacher is remote (teacher.url): measure its accuracy with `reopold eval` and pass "
                         "--teacher-accuracy")
    task = build_task(base.data)
    problems = task.problems("test", base.data.eval_problems)
    tokenizer = load_tokenizer(base.teacher.model)
    model = load_model(base.teacher.model, dtype=base.teacher.dtype, trainable=False)
    metrics = evaluate(model, tokenizer, task, problems, PromptEncoder(tokenizer, base.data.chat_template),
                       max_new_tokens=base.rollout.max_new_tokens)
    return {"accuracy": metrics["accuracy"], "problems": len(problems), "split": "test", "model": base.teacher.model}


# ---- aggregation: pure functions of metrics records -------------------------------------------------------------
def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; nan for one value) of ``values``."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n}


def records_of(records: list[dict], kind: str, key: str) -> dict[int, dict]:
    """step -> record of ``kind`` that has a number under ``key`` (the last one when a step repeats)."""
    return {r["step"]: r for r in records
            if r.get("kind") == kind and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)}


def mean_curve(runs: list[list[dict]], key: str, kind: str = "eval") -> list[dict]:
    """Per step present in every run: samples, mean "time", and mean / std / min / max of ``key`` over runs."""
    if not runs:
        return []
    by_run = [records_of(records, kind, key) for records in runs]
    steps = sorted(set.intersection(*(set(points) for points in by_run)))
    curve = []
    for step in steps:
        values = [points[step][key] for points in by_run]
        stats = mean_std(values)
        curve.append({"step": step, "samples": by_run[0][step].get("samples"),
                      "time": mean_std([points[step].get("time", math.nan) for points in by_run])["mean"],
                      "mean": stats["mean"], "std": stats["std"], "min": min(values), "max": max(values)})
    return curve


def samples_to_threshold(curve: list[dict], threshold: float) -> dict | None:
    """The first point whose mean reaches ``threshold`` (step, samples, mean training seconds); None: not reached."""
    hit = next((p for p in curve if p["mean"] >= threshold), None)
    return None if hit is None else {"step": hit["step"], "samples": hit["samples"], "time": hit["time"]}


def relative_samples(samples: float | None, reference: float | None, budget: float) -> dict:
    """``samples`` / ``reference`` with the kind of number it is: "=" exact, ">" a lower bound (only the reference
    reached the threshold within ``budget``), "<" an upper bound (only ``samples`` did); None when neither did."""
    if reference is not None and reference > 0:
        if samples is not None:
            return {"ratio": samples / reference, "bound": "="}
        return {"ratio": budget / reference, "bound": ">"}
    if reference is None and samples is not None:
        return {"ratio": samples / budget, "bound": "<"}
    return {"ratio": None, "bound": None}


def negative_transfer(runs: list[list[dict]], start: float) -> dict:
    """How far below ``start`` (the student's step-0 accuracy) each run fell during training (evals after step 0),
    and where it ended; mean over runs."""
    lowest, final = [], []
    for records in runs:
        evals = records_of(records, "eval", "accuracy")
        after = [evals[s]["accuracy"] for s in sorted(evals) if s > 0]
        if after:
            lowest.append(min(after))
            final.append(after[-1])
    low = mean_std(lowest)
    return {"start": start, "lowest": low, "lowest_minus_start": low["mean"] - start,
            "final_minus_start": mean_std([f - start for f in final]),
            "runs_ending_below_start": sum(f < start for f in final), "runs": len(final)}


def final_eval(records: list[dict]) -> dict:
    evals = records_of(records, "eval", "accuracy")
    return evals[max(evals)] if evals else {}


def pick_lr(results: dict[float, dict | None]) -> float | None:
    """The lr whose final validation eval has the best accuracy; ties: lower reverse KL, then smaller lr. A failed
    run (None) never wins; None when every run failed."""
    def rank(lr):
        final = results[lr]
        kl = final.get("reverse_kl", math.inf)
        return -final["accuracy"], kl if isinstance(kl, (int, float)) and math.isfinite(kl) else math.inf, lr

    finished = [lr for lr, final in results.items() if final is not None and "accuracy" in final]
    return min(finished, key=rank) if finished else None


def summarize_method(runs: list[list[dict]], threshold: float | None) -> dict:
    """Headline numbers of one method's finished runs (seeds)."""
    finals = [final_eval(records) for records in runs]
    curve = mean_curve(runs, "accuracy")
    hit = samples_to_threshold(curve, threshold) if threshold is not None else None
    start = curve[0]["mean"] if curve and curve[0]["step"] == 0 else math.nan
    return {
        "seeds": len(runs),
        "accuracy": mean_std([f["accuracy"] for f in finals]),
        "reverse_kl": mean_std([f["reverse_kl"] for f in finals if "reverse_kl" in f]),
        "samples": finals[0].get("samples") if finals else None,
        "train_seconds": mean_std([f.get("time", math.nan) for f in finals]),
        "to_threshold": hit,
        "negative_transfer": negative_transfer(runs, start),
        "accuracy_curve": curve,
        "reverse_kl_curve": mean_curve(runs, "reverse_kl"),
    }


def matching(methods: dict[str, dict], reference: str) -> dict[str, dict]:
    """The paper's comparison, per method m: samples the reference's mean curve needs to reach m's final mean
    accuracy, as a fraction of m's own budget (the paper: REOPOLD reaches RKL's final accuracy in <= 1/2 of its
    samples); and the other way round. A hit at step 0 means m ended at or below the student's start."""
    ref = methods.get(reference)
    if ref is None:
        return {}
    out = {}
    for m, summary in methods.items():
        if m == reference or not summary["samples"]:
            continue
        target = summary["accuracy"]["mean"]
        hit = samples_to_threshold(ref["accuracy_curve"], target)
        back = samples_to_threshold(summary["accuracy_curve"], ref["accuracy"]["mean"])
        out[m] = {"target": target, "reference_hit": hit, "budget": summary["samples"],
                  "fraction": None if hit is None else hit["samples"] / summary["samples"], "method_hit": back}
    return out


def estimate_seconds(remaining: dict[str, int], wall: dict[str, list[float]], jobs: int) -> float | None:
    """Wall time of ``remaining`` runs per method at ``jobs`` in parallel, from measured run walls (a method's own
    mean, else the mean of all measured runs); None before any run was measured."""
    everything = [w for walls in wall.values() for w in walls]
    if not everything:
        return None
    overall = sum(everything) / len(everything)
    total = sum(count * (sum(wall[m]) / len(wall[m]) if wall.get(m) else overall) for m, count in remaining.items())
    return total / jobs


# ---- reports ------------------------------------------------------------------------------------------------------
def _pm(stat: dict, digits: int = 3) -> str:
    if not stat or not stat["n"] or math.isnan(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.{digits}f}" + ("" if math.isnan(stat["std"]) else f" ± {stat['std']:.{digits}f}")


def _relative(rel: dict) -> str:
    if rel["ratio"] is None:
        return "n/a"
    return f"{'' if rel['bound'] == '=' else rel['bound']}{rel['ratio']:.2f}x"


def _hit(hit: dict | None) -> str:
    return "not reached" if hit is None else f"{hit['samples']:,} (step {hit['step']})"


def _reached(summary: dict) -> tuple[str, str]:
    hit = summary["to_threshold"]
    return _hit(hit), "not reached" if hit is None else f"{hit['time']:.1f} s"


def _method_row(label: str, lr, summary: dict, reference: dict | None) -> str:
    samples, seconds = _reached(summary)
    rel = "n/a"
    if reference is not None and summary["samples"]:
        ref_hit = reference["to_threshold"]
        rel = _relative(relative_samples(summary["to_threshold"] and summary["to_threshold"]["samples"],
                                         ref_hit and ref_hit["samples"], summary["samples"]))
    return (f"| {label} | {lr:g} | {summary['seeds']} | {_pm(summary['accuracy'])} | {_pm(summary['reverse_kl'])} | "
            f"{samples} | {rel} | {seconds} | {summary['samples'] or 0:,} | {_pm(summary['train_seconds'], 1)} s |")


_HEADER = ("| {first} | lr | seeds | final accuracy | held-out reverse KL | samples to 90% of teacher | samples vs "
           "{ref} | train time to 90% | samples | train time |\n|---|---|---|---|---|---|---|---|---|---|")


def results_markdown(data: dict) -> str:
    s = data["setup"]
    ref = data["reference"]
    lines = [
        "# Sample efficiency", "",
        f"Base config `{s['config']}`; every run: {s['prompts_per_step']} prompts x {s['samples_per_prompt']} samples "
        f"x {s['steps']} steps = {s['budget']:,} samples. Teacher greedy accuracy on {s['teacher']['problems']} test "
        f"problems: {s['teacher']['accuracy']:.3f}; threshold 90% of it = {s['threshold']:.3f}. Student start "
        f"(step-0 eval): {_pm(s['start'])}. "
        + (f"Learning-rate grid {', '.join(f'{x:g}' for x in s['lrs'])} for every method, picked on the validation "
           f"split (seed {SELECT_SEED}). " if len(s["lrs"]) > 1 else f"One learning rate, {s['lrs'][0]:g}: no "
           "selection. ")
        + f"Reported: test split, seeds 1-{s['seeds']}, mean ± sample std. Train time = rollout + scoring + updates "
        f"(no loading, no evals), {s['jobs']} runs at a time, 1 thread each.", "",
    ]
    if s["validation_is_test"]:
        lines += ["**Warning: this task's validation split is its test split, so the lr was picked on the test "
                  "problems.**", ""]
    methods = data["methods"]
    lines += ["## Methods", "", _HEADER.format(first="method", ref=ref)]
    lines += [_method_row(m, data["picks"][m], methods[m], methods.get(ref)) for m in methods if m in MAIN_METHODS]
    rungs = [(label, m) for label, m in LADDER if m in methods]
    if rungs:
        lines += ["", "## Ablation ladder (cumulative)", "", _HEADER.format(first="rung", ref=ref)]
        lines += [_method_row(f"{label} ({m})", data["picks"][m], methods[m], methods.get(ref)) for label, m in rungs]
    if data.get("matching"):
        lines += ["", "## Samples to match (the paper's comparison, on mean curves)", "",
                  f"How many samples {ref} needs to reach each method's final mean test accuracy, as a fraction of "
                  f"that method's own budget (the paper: at most 1/2 of RKL's, at most 1/6.7 = 0.15 of GRPO's), "
                  f"and when each method reaches {ref}'s final accuracy. Evals every "
                  f"{s['eval_every']} steps, so a hit is the first eval at or above the target.", "",
                  f"| method | its final accuracy | {ref} reaches it at | fraction of its budget | "
                  f"it reaches {ref}'s final at |", "|---|---|---|---|---|"]
        for m, match in data["matching"].items():
            fraction = "n/a" if match["fraction"] is None else f"{match['fraction']:.2f}"
            lines.append(f"| {m} | {match['target']:.3f} | {_hit(match['reference_hit'])} | {fraction} | "
                         f"{_hit(match['method_hit'])} |")
    lines += ["", "## Negative transfer", "",
              "Lowest held-out accuracy after step 0 (mean over seeds of each seed's lowest) against the start.", "",
              "| method | start | lowest | lowest - start | final - start | seeds ending below start |",
              "|---|---|---|---|---|---|"]
    for m, summary in methods.items():
        nt = summary["negative_transfer"]
        lines.append(f"| {m} | {nt['start']:.3f} | {_pm(nt['lowest'])} | {nt['lowest_minus_start']:+.3f} | "
                     f"{_pm(nt['final_minus_start'])} | {nt['runs_ending_below_start']}/{nt['runs']} |")
    if data["selection"]:
        lrs = s["lrs"]
        lines += ["", "## Learning-rate selection (validation split, final accuracy / reverse KL)", "",
                  "| method | " + " | ".join(f"lr {x:g}" for x in lrs) + " | picked |",
                  "|---|" + "---|" * (len(lrs) + 1)]
        for m, by_lr in data["selection"].items():
            cells = [("failed" if (f := by_lr.get(f"{x:g}")) is None else
                      f"{f['accuracy']:.3f} / {f.get('reverse_kl', math.nan):.3f}") for x in lrs]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {data['picks'][m]} |")
    if data["failed"]:
        lines += ["", "## Failed runs (left out of every number above)", "", *(f"- {r}" for r in data["failed"])]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in data["plots"]]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[dict]], path: Path, ylabel: str, lines: dict[str, float] | None = None) -> bool:
    """Mean over seeds against samples seen, shaded between the lowest and highest seed; False if nothing to plot."""
    from matplotlib.figure import Figure  # pyplot-free, so no display or global backend is needed

    curves = {name: c for name, c in curves.items() if c}
    if not curves:
        return False
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for i, (name, curve) in enumerate(curves.items()):
        x = [p["samples"] for p in curve]
        ax.plot(x, [p["mean"] for p in curve], "-", color=f"C{i}", label=name, lw=1.5)
        ax.fill_between(x, [p["min"] for p in curve], [p["max"] for p in curve], color=f"C{i}", alpha=0.15, lw=0)
    finite = {label: y for label, y in (lines or {}).items() if isinstance(y, float) and math.isfinite(y)}
    for j, (label, y) in enumerate(finite.items()):
        ax.axhline(y, color="gray", ls=("--", ":", "-.")[j % 3], lw=1, label=label)
    ax.set_xlabel("samples seen")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return True


def write_results(data: dict, runs: dict[str, list[list[dict]]], out: Path) -> Path:
    from reopold.tracking import to_jsonable

    out = Path(out)
    for name in PLOTS:
        (out / name).unlink(missing_ok=True)
    s, methods = data["setup"], data["methods"]
    lines = {"teacher": s["teacher"]["accuracy"], "90% of teacher": s["threshold"], "student start": s["start"]["mean"]}
    plotted = [
        plot_curves({m: methods[m]["accuracy_curve"] for m in methods if m in MAIN_METHODS}, out / PLOTS[0],
                    "held-out accuracy (test)", lines),
        plot_curves({m: methods[m]["accuracy_curve"] for _, m in LADDER if m in methods}, out / PLOTS[1],
                    "held-out accuracy (test), ablation ladder", lines),
        plot_curves({m: mean_curve(r, "entropy_mean", "train") for m, r in runs.items()}, out / PLOTS[2],
                    "student entropy (nats/token)"),
        plot_curves({m: mean_curve(r, "below_floor_frac", "train") for m, r in runs.items()}, out / PLOTS[3],
                    "fraction of tokens below the reward floor"),
    ]
    data["plots"] = [name for name, ok in zip(PLOTS, plotted, strict=True) if ok]
    (out / "results.md").write_text(results_markdown(data))
    # nan (one seed's std, a method without KL) is written as "nan", as in metrics.jsonl: strict JSON has no NaN.
    (out / "results.json").write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
    return out / "results.md"


# ---- the whole benchmark ------------------------------------------------------------------------------------------
def load_finished(specs: list[RunSpec], out: Path, steps: int) -> dict[RunSpec, list[dict] | None]:
    from reopold.tracking import read_metrics

    loaded = {spec: read_metrics(run_root(out, spec.stage) / spec.name) for spec in specs}
    return {spec: records if is_finished(records, steps) else None for spec, records in loaded.items()}


def pick_all(sweep: Sweep, select: list[RunSpec], steps: int, lrs) -> tuple[dict, dict]:
    """(validation finals by method and lr, picked lr by method) from the finished selection runs."""
    if not select:
        return {}, {m: lrs[0] for m in sweep.methods}
    chosen = load_finished(select, sweep.out, steps)
    finals = {m: {s.lr: final_eval(r) if r else None for s, r in chosen.items() if s.method == m}
              for m in sweep.methods}
    return ({m: {f"{lr:g}": f for lr, f in by_lr.items()} for m, by_lr in finals.items()},
            {m: pick_lr(by_lr) for m, by_lr in finals.items()})


def check_splits(base) -> bool:
    """Whether the validation split is the test split (a prompt file has one held-out set); raises when a split
    is too small for data.eval_problems, before any run starts."""
    from reopold.data import build_task

    task = build_task(base.data)
    n = base.data.eval_problems
    return task.problems("validation", n) == task.problems("test", n)


def run_walls(out: Path) -> dict[str, float]:
    """Subprocess seconds per run folder (resumed parts added up), from sweep_log.jsonl."""
    walls: dict[str, float] = {}
    log_file = Path(out) / "sweep_log.jsonl"
    for line in log_file.read_text().splitlines() if log_file.exists() else []:
        entry = json.loads(line)
        walls[entry["run"]] = walls.get(entry["run"], 0.0) + entry["wall_s"]
    return walls


def run_benchmark(sweep: Sweep, *, log=print) -> tuple[Path, list[str]]:
    """Run (or finish) the sweep and write the reports; returns results.md and the runs that failed."""
    base = sweep.base()
    steps, lrs = base.run.steps, sweep.grid(base)
    unknown = [m for m in sweep.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    select = selection_runs(sweep.methods, lrs)
    validation_is_test = check_splits(base) and bool(select)
    if validation_is_test:
        log("warning: the validation split is the test split here; the lr will be picked on the test problems")
    check_sweep_file(sweep, base, lrs)
    teacher_file = Path(sweep.out) / "teacher.json"
    if sweep.teacher_accuracy is not None:
        teacher = {"accuracy": sweep.teacher_accuracy, "problems": base.data.eval_problems, "split": "test",
                   "model": base.teacher.model, "given": True}
    elif teacher_file.exists():
        teacher = json.loads(teacher_file.read_text())
    else:
        log("measuring the teacher's greedy test accuracy")
        teacher = measure_teacher_accuracy(base)
    teacher_file.write_text(json.dumps(teacher, indent=2) + "\n")

    execute(select, sweep, steps, log=log)
    selection, picks = pick_all(sweep, select, steps, lrs)
    tests = seed_runs(picks, sweep.seeds)
    execute(tests, sweep, steps, log=log)
    finished = load_finished(tests, sweep.out, steps)
    runs = {m: [r for s, r in finished.items() if s.method == m and r is not None] for m in sweep.methods}
    runs = {m: r for m, r in runs.items() if r}
    failed = [f"{s.stage}/{s.name}" for s in select if selection[s.method][f"{s.lr:g}"] is None]
    failed += [f"{s.stage}/{s.name}" for s, r in finished.items() if r is None]
    failed += [f"{m}: every lr failed in selection" for m, lr in picks.items() if lr is None]

    threshold = 0.9 * teacher["accuracy"]
    methods = {m: summarize_method(r, threshold) for m, r in runs.items()}
    walls = run_walls(sweep.out)
    for m, summary in methods.items():
        summary["run_wall_seconds"] = mean_std([walls[f"test/{s.name}"] for s in tests
                                                if s.method == m and f"test/{s.name}" in walls])
    starts = [s["negative_transfer"]["start"] for s in methods.values()]
    data = {
        "setup": {"config": str(sweep.config), "overrides": list(sweep.overrides), "steps": steps,
                  "prompts_per_step": base.rollout.prompts_per_step,
                  "samples_per_prompt": base.rollout.samples_per_prompt,
                  "budget": steps * base.rollout.prompts_per_step * base.rollout.samples_per_prompt,
                  "eval_problems": base.data.eval_problems, "eval_every": base.run.eval_every,
                  "lrs": list(lrs), "seeds": sweep.seeds, "jobs": sweep.jobs,
                  "teacher": teacher, "threshold": threshold,
                  "start": mean_std([x for x in starts if not math.isnan(x)]),
                  "validation_is_test": validation_is_test, "sweep_wall_seconds": sum(walls.values())},
        "reference": "reopold" if "reopold" in methods else next(iter(methods), "reopold"),
        "picks": picks, "selection": selection, "methods": methods, "failed": failed,
        "matching": matching(methods, "reopold"),
        "ladder": [{"rung": label, "method": m} for label, m in LADDER if m in methods],
    }
    return write_results(data, runs, Path(sweep.out)), failed


def plan_text(sweep: Sweep) -> str:
    """What the sweep runs, how many runs are left, and their wall time estimated from the runs measured so far."""
    base = sweep.base()
    steps, lrs = base.run.steps, sweep.grid(base)
    select = selection_runs(sweep.methods, lrs)
    left = [s for s in select if run_status(run_root(sweep.out, s.stage) / s.name, steps) != "done"]
    pending = {s.method for s in left}  # lr not picked yet: every test run of these methods is left
    remaining = {m: sum(s.method == m for s in left) + (sweep.seeds if m in pending else 0) for m in sweep.methods}
    picked = [s for s in select if s.method not in pending]
    if picked or not select:  # methods whose lr is known: count their unfinished test runs
        picks = pick_all(sweep, picked, steps, lrs)[1]
        for s in seed_runs({m: lr for m, lr in picks.items() if m not in pending}, sweep.seeds):
            remaining[s.method] += run_status(run_root(sweep.out, s.stage) / s.name, steps) != "done"
    wall: dict[str, list[float]] = {}
    log_file = Path(sweep.out) / "sweep_log.jsonl"
    for line in log_file.read_text().splitlines() if log_file.exists() else []:
        entry = json.loads(line)
        if entry["returncode"] == 0 and entry["status"] == "start":  # whole runs only, not resumed remainders
            wall.setdefault(entry["method"], []).append(entry["wall_s"])
    estimate = estimate_seconds(remaining, wall, sweep.jobs)
    budget = steps * base.rollout.prompts_per_step * base.rollout.samples_per_prompt
    measured = (f"about {estimate / 60:.0f} minutes at {sweep.jobs} at a time, from {sum(map(len, wall.values()))} "
                "measured runs" if estimate is not None else "no run measured yet: start the sweep, stop it after "
                "the first runs finish (it resumes) and ask again with --dry-run")
    return (f"{len(sweep.methods)} methods x {len(lrs)} lrs ({', '.join(f'{x:g}' for x in lrs)}) = {len(select)} "
            f"selection runs, then {len(sweep.methods)} methods x {sweep.seeds} seeds = "
            f"{len(sweep.methods) * sweep.seeds} test runs, {budget:,} samples each; "
            f"{sum(remaining.values())} runs left: {measured}")


# ---- command line -------------------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1e-5,3e-5; got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("expected one or more learning rates > 0")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="base config every run starts from "
                        "(default: the bundled demo)")
    parser.add_argument("--out", help="output folder (default: benchmarks/results, or benchmarks/results/quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: reopold and rkl, 1 lr, 1 seed, 2 steps, "
                        "tiny evals; checks the pipeline, measures nothing")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    parser.add_argument("--seeds", type=int, default=3, help="test seeds per method (default 3)")
    parser.add_argument("--lrs", type=_floats, help="learning-rate grid, same for every method (default: the "
                        "config's lr x 1/3, 1, 3)")
    parser.add_argument("--methods", type=_names, help=f"comma-separated subset of {', '.join(METHODS)} "
                        "(default: all)")
    parser.add_argument("--teacher-accuracy", type=float, help="the teacher's greedy test accuracy, if measured "
                        "already (default: measured once)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run, e.g. run.steps=100 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate; run nothing")


def add_command(subparsers) -> argparse.ArgumentParser:
    """Register ``reopold benchmark`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "benchmark", help="sample efficiency of every method at one budget (lr picked on validation, >= 3 seeds)",
        description="Run reopold, rkl, rkl_sg, grpo, sft, gkd and the ablation ladder at the same sample budget with "
        "the same lr grid (picked on the validation split), then report test accuracy, samples to 90%% of the "
        "teacher, wall-clock, negative transfer and plots. Running it again resumes a stopped sweep.",
    )  # fmt: skip
    add_arguments(parser)
    return parser


def sweep_from_args(args) -> tuple[Sweep, bool]:
    """The Sweep of parsed arguments, and whether this is a dry run."""
    from reopold.config import load_config
    from reopold.train_config import TrainConfig

    if args.jobs < 1 or args.seeds < 1:
        raise ValueError("--jobs and --seeds must be at least 1")
    overrides = tuple(args.override)
    methods = tuple(args.methods) if args.methods else None
    lrs, seeds = args.lrs, args.seeds
    if args.quick:
        overrides = (*overrides, *quick_overrides(load_config(TrainConfig, args.config, overrides)))
        methods, seeds = methods or QUICK_METHODS, 1
        lrs = lrs or [load_config(TrainConfig, args.config, overrides).optim.lr]
    out = Path(args.out or ("benchmarks/results/quick" if args.quick else "benchmarks/results"))
    sweep = Sweep(config=Path(args.config), out=out, lrs=tuple(lrs) if lrs else None, seeds=seeds, jobs=args.jobs,
                  overrides=overrides, teacher_accuracy=args.teacher_accuracy)
    if methods:
        sweep.methods = methods
    return sweep, args.dry_run


def run_command(args: argparse.Namespace) -> int:
    """Run ``reopold benchmark``: 0 when every run finished, 1 when some failed (reported), 2 on bad input."""
    from reopold.config import ConfigError

    try:
        sweep, dry_run = sweep_from_args(args)
        if dry_run:
            print(plan_text(sweep))
            return 0
        print(plan_text(sweep), flush=True)
        report, failed = run_benchmark(sweep, log=lambda line: print(line, flush=True))
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"reopold: error: {err}", file=sys.stderr)
        return 2
    print(f"done: {report}" + (f" ({len(failed)} failed runs, listed there)" if failed else ""))
    return 1 if failed else 0
