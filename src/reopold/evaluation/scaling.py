"""Test-time scaling: wall-clock latency to answer a problem with K samples drawn in parallel, against the pass@K
and maj@K those samples reach, for several models on the same machine in the same run (the paper's Figure 1b).

For each K and each model, every problem gets one ``generate`` call with K sequences in one batch, timed end to end
(prompt encoding excluded, decoding of the K answers included); the latency of a point is the median over problems,
which a burst of load from another process on the machine does not drag. K is the outer loop so that slow drifts of the
machine (other jobs, clocks) fall on all models alike. Accuracy at K uses every sample a model drew for a problem
during the timed calls (n = sum of the Ks): the unbiased pass@K estimator and maj@K over disjoint blocks of K, which
have the same expectation as grading one call's K samples and a lower variance.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reopold.evaluation.metrics import maj_at_k, pass_at_k
from reopold.rollout import HFRolloutEngine, vision_options

METRICS = ("pass", "maj")


@dataclass(frozen=True)
class ScalingPoint:
    """One model at one K: mean seconds to answer a problem with K parallel samples, and the accuracy reached."""

    model: str
    k: int
    latency_s: float  # median over problems of the wall-clock time of one K-sample generate call
    pass_at_k: float  # mean over problems, unbiased from all the model's samples of the problem
    maj_at_k: float  # mean over problems, over disjoint blocks of K of those samples
    response_length: float  # mean response tokens (EOS included) of the timed calls at this K

    def accuracy(self, metric: str) -> float:
        return {"pass": self.pass_at_k, "maj": self.maj_at_k}[metric]


@dataclass
class ScalingModel:
    """A model to measure: its label in tables and plots, the LM, its tokenizer and its prompt encoder."""

    label: str
    model: object
    tokenizer: object
    encode: object
    episodes: object = None  # EpisodeSetup for a task with an environment: each answer is an episode


def _synchronize(model) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_scaling(models: list[ScalingModel], problems: list, checker, *, ks: list[int], max_new_tokens: int,
                    temperature: float = 1.0, seed: int = 0, warmup: bool = True) -> dict[str, list[ScalingPoint]]:
    """label -> one ScalingPoint per K (in the order of ``ks``, which must be increasing) for every model.

    Before timing, each model answers the first problem once with max(ks) samples, untimed, so that lazy
    initialisation (kernels, allocator growth) is not billed to the first K.
    """
    if not problems:
        raise ValueError("the scaling harness needs at least one problem")
    if not ks or any(k < 1 for k in ks) or sorted(set(ks)) != list(ks):
        raise ValueError(f"ks must be increasing positive integers, got {ks}")
    if temperature <= 0:
        raise ValueError("test-time scaling samples K different answers: temperature must be > 0")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be distinct, got {labels}")
    # Image models render image prompts from the problems (their processor time is part of the latency).
    engines = {m.label: HFRolloutEngine(m.model, m.tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                        **vision_options(m.encode))
               for m in models}
    engines = {m.label: engines[m.label] if m.episodes is None else m.episodes.wrap(engines[m.label], m.tokenizer)
               for m in models}
    prompts = {m.label: [m.encode(p.prompt) for p in problems] for m in models}
    if warmup:
        for m in models:
            engines[m.label].generate(prompts[m.label][:1], problems[:1], num_samples=max(ks))
    # Per model and problem: every sample's (answer, verdict) across Ks; per model and K: latencies and lengths.
    graded = {m.label: [[] for _ in problems] for m in models}
    timings = {m.label: {} for m in models}
    for k in ks:
        for m in models:
            torch.manual_seed(seed * 1_000_003 + k)
            latencies, lengths = [], []
            for index, problem in enumerate(problems):
                _synchronize(m.model)
                start = time.perf_counter()
                rollout = engines[m.label].generate([prompts[m.label][index]], [problem], num_samples=k)
                _synchronize(m.model)
                latencies.append(time.perf_counter() - start)
                lengths.extend(rollout.completion_mask.sum(-1).tolist())
                graded[m.label][index].extend(checker.grade(problem, text) for text in rollout.texts)
            timings[m.label][k] = (statistics.median(latencies), sum(lengths) / len(lengths))
    results = {}
    for m in models:
        points = []
        for k in ks:
            per_problem = graded[m.label]
            passes = [pass_at_k(len(s), sum(c for _, c in s), k) for s in per_problem]
            majorities = [maj_at_k([a for a, _ in s], [c for _, c in s], k) for s in per_problem]
            latency, length = timings[m.label][k]
            points.append(ScalingPoint(m.label, k, latency, sum(passes) / len(passes),
                                       sum(majorities) / len(majorities), length))
        results[m.label] = points
    return results


def cheapest_reaching(points: list[ScalingPoint], accuracy: float, metric: str) -> ScalingPoint | None:
    """The lowest-latency point whose accuracy is at least ``accuracy`` (None when no point reaches it)."""
    reaching = [p for p in points if p.accuracy(metric) >= accuracy - 1e-12]
    return min(reaching, key=lambda p: p.latency_s) if reaching else None


def matched_accuracy(reference: list[ScalingPoint], other: list[ScalingPoint], metric: str) -> list[dict]:
    """For each reference point, the cheapest point of ``other`` at least as accurate, and the latency ratio
    reference / other (above 1: ``other`` reaches the reference's accuracy faster; None: it never does)."""
    rows = []
    for ref in reference:
        target = ref.accuracy(metric)
        match = cheapest_reaching(other, target, metric)
        ratio = ref.latency_s / match.latency_s if match is not None and match.latency_s > 0 else None
        rows.append({"reference_k": ref.k, "accuracy": target, "reference_latency_s": ref.latency_s,
                     "model_k": match.k if match else None, "model_accuracy": match.accuracy(metric) if match else None,
                     "model_latency_s": match.latency_s if match else None, "latency_ratio": ratio})
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def scaling_table(results: dict[str, list[ScalingPoint]], *, reference: str, metric: str, device: str = "") -> str:
    """Markdown: every measured point, then each model against ``reference`` at matched ``metric`` accuracy."""
    if reference not in results:
        raise ValueError(f"reference {reference!r} is not one of the models {list(results)}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    lines = ["# Test-time scaling", ""]
    if device:
        lines += [f"Measured on {device}. Latency: median over problems of the wall-clock seconds to generate one "
                  "problem's K answers in parallel (one batch of K).", ""]
    lines += ["| model | K | latency (s) | pass@K | maj@K | response tokens |", "|---|---:|---:|---:|---:|---:|"]
    for label, points in results.items():
        lines += [f"| {label} | {p.k} | {p.latency_s:.4f} | {p.pass_at_k:.3f} | {p.maj_at_k:.3f} | "
                  f"{p.response_length:.1f} |" for p in points]
    for label, points in results.items():
        if label == reference:
            continue
        lines += ["", f"## {label} against {reference} at matched {metric}@K", "",
                  f"For each K of {reference}: the cheapest K of {label} with at least that {metric}@K, and the "
                  f"latency ratio {reference} / {label} (above 1: {label} is faster at that accuracy).", "",
                  f"| {reference} K | {metric}@K | latency (s) | {label} K | {metric}@K | latency (s) | ratio |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in matched_accuracy(results[reference], points, metric):
            lines.append(f"| {row['reference_k']} | {row['accuracy']:.3f} | {row['reference_latency_s']:.4f} | "
                         f"{_fmt(row['model_k'], 'd')} | {_fmt(row['model_accuracy'], '.3f')} | "
                         f"{_fmt(row['model_latency_s'], '.4f')} | {_fmt(row['latency_ratio'], '.2f')} |")
    return "\n".join(lines) + "\n"


def plot_scaling(results: dict[str, list[ScalingPoint]], path: str | Path, *, title: str = "") -> Path:
    """Accuracy against latency, one curve per model and each point marked with its K; pass@K and maj@K panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, METRICS, strict=True):
        for label, points in results.items():
            xs, ys = [p.latency_s for p in points], [p.accuracy(metric) for p in points]
            (line,) = ax.plot(xs, ys, marker="o", label=label)
            for p, x, y in zip(points, xs, ys, strict=True):
                ax.annotate(f"K={p.k}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=line.get_color())
        if all(p.latency_s > 0 for points in results.values() for p in points):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("latency per problem (s, K answers in parallel)")
        ax.set_title(f"{metric}@K")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def results_to_json(results: dict[str, list[ScalingPoint]]) -> dict[str, list[dict]]:
    return {label: [asdict(p) for p in points] for label, points in results.items()}
