"""Aggregation of a sweep: pure functions of metrics records (curves, samples to a threshold, lr picks,
negative transfer, the paper's samples-to-match comparison)."""

from __future__ import annotations

import math


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
