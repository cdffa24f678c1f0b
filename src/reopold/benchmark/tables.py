"""The sweep's report: results.md tables, results.json and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from reopold.benchmark.aggregate import mean_curve, relative_samples
from reopold.benchmark.plan import LADDER, MAIN_METHODS, PLOTS, SELECT_SEED


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
    from reopold.train.tracking import to_jsonable

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
