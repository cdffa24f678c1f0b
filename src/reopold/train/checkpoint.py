"""Checkpoints that survive a kill at any moment.

Layout: ``<run>/checkpoints/step-000120/`` holds the student in ``save_pretrained`` format (loadable by plain
transformers), its tokenizer, and ``trainer_state.pt`` (optimizer, scheduler, step, counters, RNG states).
Each checkpoint is written to a temporary folder and renamed into place, and ``<run>/checkpoints/latest`` names the
newest complete one (rewritten atomically), so a killed process leaves at worst an ignored temporary folder.
``manifest.json`` records the size and sha256 of every other file, read back from disk after writing; a resume
verifies them and falls back to the newest intact checkpoint when a file was damaged since (a full disk, a copy cut
short).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"


class DamagedCheckpoint(ValueError):
    """A checkpoint file that does not match its manifest or cannot be read; the message names the file."""


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
    write_manifest(tmp)
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
    try:
        return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # torch's unpickling errors of a cut file
        raise DamagedCheckpoint(f"{checkpoint / STATE_FILE} cannot be read ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else 'truncated'})") from err


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file under ``folder`` (read back from disk) in its manifest."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    _write_atomically(folder / MANIFEST_FILE, json.dumps({"files": files}, indent=1) + "\n")


def damaged_file(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be trusted (naming the file), or None when every file matches its manifest.
    Checkpoints written before manifests existed are trusted as they are."""
    manifest = checkpoint / MANIFEST_FILE
    if not manifest.exists():
        return None if (checkpoint / STATE_FILE).exists() else f"{STATE_FILE} is missing"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} cannot be read"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_intact_checkpoint(run_dir: str | Path, *, announce: bool = True) -> Path | None:
    """The newest checkpoint whose files match their manifest, or None when the run has none. Damaged ones are
    skipped, saying so on stderr (``announce``); when every one is damaged, a DamagedCheckpoint names each."""
    root = checkpoint_root(run_dir)
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)  # newest first (step-NNNNNN)
    damaged: list[tuple[Path, str]] = []
    for checkpoint in candidates:
        problem = damaged_file(checkpoint)
        if problem is None:
            if damaged and announce:
                first, why = damaged[0]
                print(f"reopold: warning: checkpoint {first} is damaged ({why}); resuming from the newest intact "
                      f"one, {checkpoint}", file=sys.stderr)
            return checkpoint
        damaged.append((checkpoint, problem))
    if damaged:
        listed = "; ".join(f"{path.name}: {why}" for path, why in damaged)
        raise DamagedCheckpoint(f"{root} holds no intact checkpoint to resume from ({listed}); start the run again "
                                "with --run.overwrite true")
    return None
