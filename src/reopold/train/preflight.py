"""Pre-flight checks of a training run: cheap, before any model loads (the run folder, the resume config, the
launch's precision, trackers, a served teacher's key), and the teacher's greedy check on a few problems."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from reopold.config.loader import ConfigError, load_config
from reopold.config.schema import TrainConfig
from reopold.rollout import HFRolloutEngine
from reopold.train.checkpoint import latest_checkpoint

CONFIG_FILE = "config.yaml"


def prepare_run_dir(config: TrainConfig, resume: str | None, *, main: bool = True) -> tuple[Path, Path | None]:
    """The run folder, and the checkpoint to resume from (None for a fresh run). Only the main process deletes."""
    if resume is not None:
        run_dir = Path(resume)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"{resume} has no complete checkpoint to resume from")
        return run_dir, checkpoint
    run_dir = Path(config.run.output_dir) / config.run_name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not config.run.overwrite:
            raise FileExistsError(
                f"run folder {run_dir} already exists. Resume it with `reopold train --resume {run_dir}`, "
                "choose another --run.name, or pass --run.overwrite true to start it over"
            )
        if main:
            shutil.rmtree(run_dir)
    return run_dir, None


def resume_config(run_dir: Path, overrides: list[str]) -> TrainConfig:
    """The saved config of a run; only run.* keys may change on resume (e.g. run.steps to train longer)."""
    bad = [o for o in overrides if not o.lstrip("-").startswith("run.")]
    if bad:
        raise ConfigError(f"only run.* keys can change when resuming; got {bad[0]!r}")
    return load_config(TrainConfig, run_dir / CONFIG_FILE, overrides)


def preflight_teacher(teacher_lm, tokenizer, task, problems, encode, max_new_tokens: int) -> float:
    """The teacher's greedy accuracy on a few training problems; 0 means the checker or the data is wrong."""
    engine = HFRolloutEngine(teacher_lm, tokenizer, max_new_tokens=max_new_tokens, do_sample=False)
    rollout = engine.generate([encode(p.prompt) for p in problems], problems)
    accuracy = sum(task.check(p, t) for p, t in zip(problems, rollout.texts, strict=True)) / len(problems)
    if accuracy == 0:
        raise ValueError(
            f"the task's checker rejected all {len(problems)} of the teacher's greedy answers to training prompts "
            f"(e.g. {rollout.texts[0][:200]!r} for answer {problems[0].answer!r}). Check data.answer_key, the answer "
            "format, and rollout.max_new_tokens"
        )
    return accuracy





def teacher_api_key(config: TrainConfig) -> str | None:
    name = config.teacher.api_key_env
    if name is None:
        return None
    if not os.environ.get(name):
        raise ValueError(f"teacher.api_key_env names ${name}, which is not set; export it with the server's key")
    return os.environ[name]


def check_launch_precision(config: TrainConfig) -> None:
    """run.mixed_precision is the precision used; an accelerate launch config asking for another one fails here
    instead of being silently overridden."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no" and launched != config.run.mixed_precision:
        raise ConfigError(
            f"the accelerate launch config asks for mixed_precision {launched}, but run.mixed_precision is "
            f"{config.run.mixed_precision!r}; reopold's setting is the one used: pass --run.mixed_precision "
            f"{launched} (or set mixed_precision: 'no' in the accelerate config)"
        )


def check_trackers(config: TrainConfig) -> None:
    """Fail before loading anything when a requested logger is not installed."""
    import importlib.util

    wanted = {"tensorboard": config.run.tensorboard, "wandb": bool(config.run.wandb_project)}
    for module, asked in wanted.items():
        if asked and importlib.util.find_spec(module) is None:
            raise ImportError(f"run.{'tensorboard' if module == 'tensorboard' else 'wandb_project'} needs {module}: "
                              "pip install 'reopold[tracking]'")
