"""Pre-flight checks of a training run: cheap, before any model loads (the run folder, the resume config, the
launch's precision, trackers, a served teacher's key), and the teacher's greedy check on a few problems."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import time
from pathlib import Path

from reopold.config.loader import ConfigError, load_config
from reopold.config.schema import TrainConfig
from reopold.rollout import HFRolloutEngine, vision_options
from reopold.train.checkpoint import latest_intact_checkpoint

CONFIG_FILE = "config.yaml"


def prepare_run_dir(config: TrainConfig, resume: str | None, *, main: bool = True) -> tuple[Path, Path | None]:
    """The run folder, and the checkpoint to resume from (None for a fresh run: the newest intact one, see
    ``latest_intact_checkpoint``). The main process claims the folder first (``claim_run_dir``: a second process on
    the same run is refused), and only it deletes; ``release_run_dir`` gives the claim back."""
    run_dir = Path(resume) if resume is not None else Path(config.run.output_dir) / config.run_name
    if resume is not None and not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run_dir} to resume")
    if main:
        claim_run_dir(run_dir)
    try:
        return run_dir, _checked_run_dir(config, run_dir, resume, main)
    except BaseException:
        if main:
            release_run_dir(run_dir)
        raise


def _checked_run_dir(config: TrainConfig, run_dir: Path, resume: str | None, main: bool) -> Path | None:
    if resume is not None:
        checkpoint = latest_intact_checkpoint(run_dir, announce=main)
        if checkpoint is None:
            raise FileNotFoundError(f"{resume} has no complete checkpoint to resume from")
        return checkpoint
    contents = [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.is_dir() else []
    if contents:
        if not config.run.overwrite:
            raise FileExistsError(
                f"run folder {run_dir} already exists. Resume it with `reopold train --resume {run_dir}`, "
                "choose another --run.name, or pass --run.overwrite true to start it over"
            )
        for path in contents if main else []:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    return None


# ---- one process per run folder ----------------------------------------------------------------------------------
LOCK_FILE = ".lock"
_HELD: set[Path] = set()  # run folders this process has claimed


def claim_run_dir(run_dir: Path) -> None:
    """Claim ``run_dir`` for this process: ``<run_dir>/.lock``, created with O_CREAT|O_EXCL, holds "pid host".

    A lock whose process no longer runs on this host (killed, crashed) is taken over; one held by a live process,
    or by any process on another host (its liveness cannot be checked from here), refuses with one line. Taking over
    is serialised by a second short-lived lock, so two processes cannot both break the same stale lock. Released by
    ``release_run_dir`` (and at exit).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None:
                raise FileExistsError(
                    f"run folder {run_dir} is in use by another reopold process ({holder}); wait for it to end or "
                    f"choose another --run.name (if that process is gone, delete {lock})"
                ) from None
            _break_stale_lock(lock)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        _HELD.add(run_dir.resolve())
        atexit.register(release_run_dir, run_dir)
        return
    raise FileExistsError(f"could not claim run folder {run_dir}: its lock {lock} keeps changing hands")


def release_run_dir(run_dir: Path) -> None:
    """Give back this process's claim on ``run_dir``; a run folder left empty (nothing was written) is removed."""
    key = Path(run_dir).resolve()
    if key not in _HELD:
        return
    _HELD.discard(key)
    (key / LOCK_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        key.rmdir()  # only when empty


def _lock_holder(lock: Path) -> str | None:
    """Who holds ``lock`` ("pid N on this host"), or None when nobody does any more."""
    try:
        text = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None  # released meanwhile: try again
    if len(text) < 2 or not text[0].isdigit():
        return "a process claiming it right now" if age < 10 else None  # written just after O_EXCL, or garbage
    pid, host = int(text[0]), text[1]
    if host != socket.gethostname():
        return f"pid {pid} on host {host}"
    if pid == os.getpid():  # this process: a double claim, or a lock left by an earlier container with our pid
        return f"pid {pid}, this process" if lock.parent.resolve() in _HELD else None
    return f"pid {pid} on this host" if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:  # a zombie (killed, not yet reaped by its parent) holds nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _break_stale_lock(lock: Path) -> None:
    """Delete ``lock`` if it is still the stale one, under a short-lived second lock (so a fresh lock taken by
    another process in between is never deleted)."""
    breaker = lock.with_name(LOCK_FILE + ".break")
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - breaker.stat().st_mtime > 30:  # its owner died in these few lines
                breaker.unlink()
        time.sleep(0.1)
        return
    try:
        os.close(fd)
        if _lock_holder(lock) is None:
            lock.unlink(missing_ok=True)
    finally:
        breaker.unlink(missing_ok=True)


def resume_config(run_dir: Path, overrides: list[str]) -> TrainConfig:
    """The saved config of a run; only run.* keys may change on resume (e.g. run.steps to train longer)."""
    bad = [o for o in overrides if not o.lstrip("-").startswith("run.")]
    if bad:
        raise ConfigError(f"only run.* keys can change when resuming; got {bad[0]!r}")
    return load_config(TrainConfig, run_dir / CONFIG_FILE, overrides)


def preflight_teacher(teacher_lm, tokenizer, task, problems, encode, max_new_tokens: int, episodes=None) -> float:
    """The teacher's greedy accuracy on a few training problems (in episodes, for a task with an environment);
    0 means the checker, the data or the environment is wrong."""
    engine = HFRolloutEngine(teacher_lm, tokenizer, max_new_tokens=max_new_tokens, do_sample=False,
                             **vision_options(encode))
    engine = engine if episodes is None else episodes.wrap(engine, tokenizer)
    rollout = engine.generate([encode(p.prompt) for p in problems], problems)
    accuracy = sum(task.check(p, t) for p, t in zip(problems, rollout.texts, strict=True)) / len(problems)
    if accuracy == 0:
        raise ValueError(
            f"the task's checker rejected all {len(problems)} of the teacher's greedy answers to training prompts "
            f"(e.g. {rollout.texts[0][:200]!r} for answer {problems[0].answer!r}). Check data.answer_key, the answer "
            "format, and rollout.max_new_tokens"
        )
    return accuracy


BLIND_TEACHER_NATS = 0.1


def check_teacher_sees_images(teacher, teacher_lm, tokenizer, problems, encode, max_new_tokens: int) -> float:
    """The teacher's summed log-prob of its own greedy answers must change when the images are blanked (pixel
    values set to the image processor's mean: the same tokens and positions, no picture). A teacher whose vision
    weights did not load, or that never receives the images, gives a smooth loss while the student learns nothing.
    Returns the mean absolute change per answer, in nats; raises ValueError below ``BLIND_TEACHER_NATS``."""
    import dataclasses

    import torch

    engine = HFRolloutEngine(teacher_lm, tokenizer, max_new_tokens=max_new_tokens, do_sample=False,
                             **vision_options(encode))
    rollout = engine.generate([encode(p.prompt) for p in problems], problems)
    blank = dataclasses.replace(rollout.images, pixel_values=torch.zeros_like(rollout.images.pixel_values))
    mask = rollout.completion_mask
    seeing = (teacher.logprobs(rollout) * mask).sum(-1)
    blind = (teacher.logprobs(dataclasses.replace(rollout, images=blank)) * mask).sum(-1)
    change = float((seeing - blind).abs().mean())
    if not change >= BLIND_TEACHER_NATS:
        raise ValueError(
            f"the teacher does not look at the images: blanking them changes the log-prob of its {len(problems)} "
            f"greedy answers by {change:.2g} nats on average (< {BLIND_TEACHER_NATS}). Were its vision weights "
            "loaded (a 'newly initialized' warning for the visual tower)? Is it a vision-language model?")
    return change





def teacher_api_key(spec, key: str = "teacher") -> str | None:
    """The served teacher's bearer key from the environment variable ``spec.api_key_env`` names (None: no key)."""
    name = spec.api_key_env
    if name is None:
        return None
    if not os.environ.get(name):
        raise ValueError(f"{key}.api_key_env names ${name}, which is not set; export it with the server's key")
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
