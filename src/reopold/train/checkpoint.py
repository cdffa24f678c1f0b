"""Checkpoints that survive a kill at any moment.

Layout: ``<run>/checkpoints/step-000120/`` holds the student in ``save_pretrained`` format (loadable by plain
transformers), its tokenizer, and ``trainer_state.pt`` (optimizer, scheduler, step, counters, RNG states).
Each checkpoint is written to a temporary folder and renamed into place, and ``<run>/checkpoints/latest`` names the
newest complete one (rewritten atomically), so a killed process leaves at worst an ignored temporary folder.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    with open(tmp) as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, state: dict, *, keep: int = 2,
                    weights: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, and delete all but the newest ``keep``.

    ``weights``: the model's full state dict, when ``model`` itself holds only a shard of it (FSDP).
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomically(root / "latest", final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / STATE_FILE).exists():
            return path
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())
    return complete[-1] if complete else None


def load_state(checkpoint: Path) -> dict:
    """The trainer state saved beside the weights (optimizer, scheduler, counters, RNG)."""
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
