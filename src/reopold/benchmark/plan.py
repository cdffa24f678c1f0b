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

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DEMO_CONFIG = Path(__file__).parent.parent / "configs" / "demo.yaml"
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
        from reopold.config.loader import ConfigError, load_config
        from reopold.config.schema import TrainConfig

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
    from reopold.train.checkpoint import latest_checkpoint
    from reopold.train.tracking import read_metrics

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
    from reopold.config.loader import to_dict

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
    from reopold.evaluation.heldout import evaluate
    from reopold.models.loading import load_model, load_tokenizer
    from reopold.tasks import build_task
    from reopold.tasks.prompts import PromptEncoder

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
