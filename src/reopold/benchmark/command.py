"""``reopold benchmark``: the whole sweep (plan, run, pick, test, report) and its command line."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from reopold.benchmark.aggregate import (
    estimate_seconds,
    final_eval,
    matching,
    mean_std,
    pick_lr,
    summarize_method,
)
from reopold.benchmark.plan import (
    DEMO_CONFIG,
    LADDER,
    METHODS,
    QUICK_METHODS,
    RunSpec,
    Sweep,
    check_sweep_file,
    execute,
    is_finished,
    measure_teacher_accuracy,
    quick_overrides,
    run_root,
    run_status,
    seed_runs,
    selection_runs,
)
from reopold.benchmark.tables import write_results


# ---- the whole benchmark ------------------------------------------------------------------------------------------
def load_finished(specs: list[RunSpec], out: Path, steps: int) -> dict[RunSpec, list[dict] | None]:
    from reopold.train.tracking import read_metrics

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
    from reopold.tasks import build_task

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
    from reopold.config.loader import load_config
    from reopold.config.schema import TrainConfig

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
    """Run ``reopold benchmark``: 0 when every run finished, 1 when some failed (reported); bad input raises
    (cli.main turns it into one line and exit code 2)."""
    sweep, dry_run = sweep_from_args(args)
    if dry_run:
        print(plan_text(sweep))
        return 0
    print(plan_text(sweep), flush=True)
    report, failed = run_benchmark(sweep, log=lambda line: print(line, flush=True))
    print(f"done: {report}" + (f" ({len(failed)} failed runs, listed there)" if failed else ""))
    return 1 if failed else 0
