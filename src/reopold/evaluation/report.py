"""Run report: run_dir/metrics.jsonl -> run_dir/report.md with PNG plots in run_dir/plots/.

Keys read (all optional; anything absent is left out of the table and plots):
  eval records:  "samples" (samples seen), "accuracy" (held-out), "reverse_kl" (held-out KL to the teacher)
  train records: "reward_mean", "entropy_mean", "kept_frac", "below_floor_frac", "clip_frac", "grad_norm",
                 "response_length", "phase" ("exploration" / "refinement"), "floor" (reward floor),
                 "reward_hist" ({"edges": [n+1 finite floats], "counts": [n numbers]}, same edges every step)
  any record:    "time" (seconds since the run started), "skipped_steps" (cumulative count)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # pyplot-free: no global backend or display, so Agg is used

from reopold.train.tracking import METRICS_FILE, read_metrics

TRAIN_KEYS = ("reward_mean", "entropy_mean", "kept_frac", "below_floor_frac", "clip_frac", "grad_norm",
              "response_length")
PLOTS = ("accuracy.png", "train_curves.png", "reward_hist.png")


def _num(value) -> float | None:
    """A record value as a float, None when absent or not a number (nan/inf stay as they are)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _points(records: list[dict], key: str, x: str = "step") -> list[tuple[float, float]]:
    return [(_num(r[x]), _num(r[key])) for r in records
            if _num(r.get(x)) is not None and _num(r.get(key)) is not None]


def _last(points):
    return points[-1][1] if points else None


def _finite_max(values):
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) if finite else None


def summarize(records: list[dict]) -> dict:
    """Headline numbers of a run. Values are None where the records do not have what is needed.

    first/last_* are the earliest/latest eval points by step (nan included); best_accuracy ignores nan and
    best_accuracy_step is the first step reaching it; phase_switch_step is the first "refinement" train step.
    """
    ordered = sorted(records, key=lambda r: _num(r.get("step")) or 0.0)  # stable; no step sorts first
    train = [r for r in ordered if r.get("kind") == "train"]
    evals = [r for r in ordered if r.get("kind") == "eval"]
    acc, kl = _points(evals, "accuracy"), _points(evals, "reverse_kl")
    best = _finite_max([a for _, a in acc])
    steps = [s for r in ordered if (s := _num(r.get("step"))) is not None]
    switch = [r["step"] for r in train if r.get("phase") == "refinement"]
    return {
        "train_steps": len(train),
        "eval_points": len(evals),
        "last_step": int(max(steps)) if steps else None,
        "samples": _finite_max([_num(r.get("samples")) for r in ordered]),
        "first_accuracy": acc[0][1] if acc else None,
        "last_accuracy": _last(acc),
        "best_accuracy": best,
        "best_accuracy_step": next((int(s) for s, a in acc if a == best), None),
        "first_reverse_kl": kl[0][1] if kl else None,
        "last_reverse_kl": _last(kl),
        "phase_switch_step": switch[0] if switch else None,
        "wall_time_s": _finite_max([_num(r.get("time")) for r in ordered]),
        "skipped_steps": _last(_points(ordered, "skipped_steps")),
    }


def _fmt(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fmt_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{seconds:.0f} s ({minutes // 60}h {minutes % 60:02d}m {secs:02d}s)"


_ROWS = [("train steps logged", "train_steps"), ("last step", "last_step"), ("samples seen", "samples"),
         ("eval points", "eval_points"), ("first accuracy", "first_accuracy"),
         ("last accuracy", "last_accuracy"), ("best accuracy", "best_accuracy"),
         ("best accuracy at step", "best_accuracy_step"), ("first held-out reverse KL", "first_reverse_kl"),
         ("last held-out reverse KL", "last_reverse_kl"), ("phase switch at step", "phase_switch_step"),
         ("skipped steps", "skipped_steps"), ("wall time", "wall_time_s")]


def _table(summary: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for label, key in _ROWS:
        value = summary[key]
        if value is not None:
            lines.append(f"| {label} | {_fmt_duration(value) if key == 'wall_time_s' else _fmt(value)} |")
    return "\n".join(lines)


def _xy(points):
    # Non-finite values become gaps: inf would break autoscaling, nan is drawn as a break in the line.
    xy = np.asarray(points, float).reshape(-1, 2)
    return xy[:, 0], np.where(np.isfinite(xy[:, 1]), xy[:, 1], np.nan)


def _plot_eval(evals: list[dict], path: Path) -> bool:
    x = "samples" if all(_num(r.get("samples")) is not None for r in evals) else "step"
    acc, kl = _points(evals, "accuracy", x), _points(evals, "reverse_kl", x)
    if not acc and not kl:
        return False
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.set_xlabel("samples seen" if x == "samples" else "step")
    kl_ax = ax.twinx() if acc and kl else ax
    if acc:
        ax.plot(*_xy(acc), "o-", color="C0", label="accuracy")
        ax.set_ylabel("held-out accuracy", color="C0")
    if kl:
        kl_ax.plot(*_xy(kl), "s--", color="C1", label="reverse KL")
        kl_ax.set_ylabel("held-out reverse KL to teacher", color="C1")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return True


def _plot_train(train: list[dict], switch_step, path: Path) -> bool:
    keys = [k for k in TRAIN_KEYS if _points(train, k)]
    if not keys:
        return False
    rows = math.ceil(len(keys) / 2)
    fig = Figure(figsize=(10, 2.8 * rows))
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax, key in zip(axes[: len(keys)], keys, strict=True):
        ax.plot(*_xy(_points(train, key)), lw=1)
        if switch_step is not None:
            ax.axvline(switch_step, color="gray", ls="--", lw=1, label="phase switch")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _plot_hist(train: list[dict], path: Path) -> str | None:
    """Token-reward histogram of the first vs last 10% of steps; returns the caption, None if no histograms."""
    hists = [(r["step"], r["reward_hist"]) for r in train
             if isinstance(r.get("reward_hist"), dict) and {"edges", "counts"} <= r["reward_hist"].keys()]
    if not hists or not np.isfinite(edges := np.asarray(hists[0][1]["edges"], float)).all():
        return None  # open-ended (infinite) outer bins cannot be drawn
    hists = [(s, h) for s, h in hists if h["edges"] == hists[0][1]["edges"]]  # sums need identical bins
    n = max(1, math.ceil(0.1 * len(hists)))
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for part, label in ((hists[:n], "first"), (hists[-n:], "last")):
        counts = np.nan_to_num(np.sum([np.asarray(h["counts"], float) for _, h in part], axis=0))
        frac = counts / counts.sum() if counts.sum() > 0 else counts
        ax.stairs(frac, edges, label=f"{label} {n} step(s): {part[0][0]}..{part[-1][0]}")
    floor = _last(_points(train, "floor"))
    has_floor = floor is not None and math.isfinite(floor)
    if has_floor:
        ax.axvline(floor, color="red", ls="--", label=f"reward floor {floor:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("token reward")
    ax.set_ylabel("fraction of tokens")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    caption = (f"Token-reward histogram summed over the first vs last {n} of {len(hists)} logged steps, "
               "normalised to fractions of tokens (log scale).")
    return caption + (" The dashed red line is the reward floor." if has_floor else "")


def _teacher_lines(train: list[dict]) -> list[str]:
    """A table of each teacher's training metrics (runs with several teachers: ``<metric>/<teacher>`` keys) and the
    span statistics of a teacher with another tokenizer."""
    names = sorted({key.split("/", 1)[1] for r in train for key in r if key.startswith("reward_mean/")})
    lines = []
    if names:
        lines += ["## Teachers", "", "| teacher | steps | reward_mean first -> last | reverse_kl first -> last | "
                  "below_floor_frac first -> last |", "|---|---|---|---|---|"]
        for name in names:
            cells = []
            for metric in ("reward_mean", "reverse_kl", "below_floor_frac"):
                points = [p for p in _points(train, f"{metric}/{name}") if math.isfinite(p[1])]
                cells.append(f"{_fmt(points[0][1])} -> {_fmt(points[-1][1])}" if points else "-")
            steps = sum(f"reward_mean/{name}" in r for r in train)
            lines.append(f"| {name} | {steps} | " + " | ".join(cells) + " |")
        lines += ["", "*Per-step training metrics of the rows each teacher scored (docs/teachers.md).*", ""]
    spans = [p[1] for p in _points(train, "multi_token_span_frac")]
    if spans:
        lines += [f"Span alignment (a teacher with another tokenizer): {sum(spans) / len(spans):.3f} of the student's "
                  "tokens fell in multi-token spans on average (docs/cross_tokenizer.md).", ""]
    return lines


def write_report(run_dir: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write run_dir/report.md (and plots under run_dir/plots/) from run_dir/metrics.jsonl; returns its path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    lines = [f"# {title or 'REOPOLD run: ' + run_dir.resolve().name}", ""]
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:  # a plot this run can no longer draw must not linger from an earlier report
        (plots / name).unlink(missing_ok=True)
    if not records:
        lines.append("no metrics yet")
    else:
        summary = summarize(records)
        ordered = sorted(records, key=lambda r: _num(r.get("step")) or 0.0)
        train = [r for r in ordered if r.get("kind") == "train"]
        lines += [_table(summary), ""]
        if _plot_eval([r for r in ordered if r.get("kind") == "eval"], plots / PLOTS[0]):
            lines += ["## Held-out evaluation", "", f"![held-out accuracy](plots/{PLOTS[0]})", "",
                      "*Held-out accuracy (and reverse KL to the teacher, right axis) against samples seen.*", ""]
        if _plot_train(train, summary["phase_switch_step"], plots / PLOTS[1]):
            lines += ["## Training curves", "", f"![training curves](plots/{PLOTS[1]})", "",
                      "*Per-step training diagnostics; the dashed line marks the switch from exploration to "
                      "refinement.*", ""]
        lines += _teacher_lines(train)
        caption = _plot_hist(train, plots / PLOTS[2])
        if caption:
            lines += ["## Token rewards", "", f"![token-reward histogram](plots/{PLOTS[2]})", "",
                      f"*{caption}*", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
