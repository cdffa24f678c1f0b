"""Metrics logging: run_dir/metrics.jsonl is the record of a run; TensorBoard and W&B are optional mirrors.

Record format, one JSON object per line:
    {"kind": "train" | "eval", "step": int, "<metric>": value, ...}
Values are numbers, strings, bools, null, or lists/dicts of those. Torch tensors and numpy scalars/arrays are
converted to python numbers (arrays to lists). Non-finite floats are written as the strings "nan", "inf" and
"-inf": strict JSON has no literal for them, and null would lose which one it was (and clash with "missing").
`read_metrics` turns those three strings back into floats anywhere in a record, so they are reserved.

Scalar numbers (not strings, lists or dicts) are mirrored as "<kind>/<key>" at x = step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
_TO_FLOAT = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_MISSING = "{what} logging was requested but {pkg} is not installed: pip install 'reopold[tracking]'"


def to_jsonable(value: Any) -> Any:
    """Convert a metric value to plain JSON types; non-finite floats become "nan" / "inf" / "-inf"."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        # torch tensors and numpy arrays/scalars: a 0-dim tensor or numpy scalar gives a python number,
        # a CUDA tensor is copied to host.
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot log a {type(value).__name__} ({value!r}): log numbers, strings, lists or dicts")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, str):
        return _TO_FLOAT.get(value, value)
    return value


def _read_lines(path: Path) -> list[tuple[str, dict]]:
    """(raw line, record) pairs; a torn last line (process killed mid-write) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    pairs = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            pairs.append((line, _from_json(json.loads(line))))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break  # only the line being written when the process died may be incomplete
            raise ValueError(f"{path}:{i + 1} is not valid JSON: {line[:80]!r}") from None
    return pairs


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl (or of run_dir/metrics.jsonl when given a directory), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [record for _, record in _read_lines(path)]


def truncate_metrics(path: str | os.PathLike, step: int | None) -> int:
    """Drop records with "step" > step (all complete records kept if step is None) and any torn last line.

    Used on resume from the checkpoint at `step`: the lines a killed run wrote after that checkpoint would
    otherwise appear twice. Kept lines are copied verbatim; the file is replaced atomically. Returns the number
    of records dropped.
    """
    path = Path(path)
    pairs = _read_lines(path)
    kept = [line for line, r in pairs if step is None or not isinstance(r.get("step"), int) or r["step"] <= step]
    if path.exists():
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return len(pairs) - len(kept)


def _open_tensorboard(log_dir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(_MISSING.format(what="TensorBoard", pkg="tensorboard")) from e
    # purge_step hides events a killed run wrote past the checkpoint; flush often so a crash loses little.
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=10)


def _open_wandb(run_dir: Path, init_kwargs: dict, resume: bool):
    try:
        import wandb
    except ImportError as e:
        raise ImportError(_MISSING.format(what="W&B", pkg="wandb")) from e
    kwargs = {"dir": str(run_dir), **init_kwargs}
    id_file = run_dir / "wandb_run_id"
    if resume and id_file.exists() and "id" not in kwargs:
        # Continue the same W&B run rather than starting a second one for the same training run.
        kwargs.update(id=id_file.read_text().strip(), resume="allow")
    run = wandb.init(**kwargs)
    id_file.write_text(run.id)
    return run


class MetricsLogger:
    """Append records to run_dir/metrics.jsonl, mirroring scalars to TensorBoard (run_dir/tensorboard) / W&B.

    tensorboard: also write TensorBoard event files. wandb: None, or the kwargs for wandb.init (project, name,
    ...). resume: append to an existing metrics.jsonl instead of starting it afresh; with truncate_after_step
    (the step of the checkpoint resumed from), records past that step are dropped first. Missing optional
    packages raise ImportError here, before training starts.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = False, wandb: dict | None = None,
                 resume: bool = False, truncate_after_step: int | None = None):
        if truncate_after_step is not None and not resume:
            raise ValueError("truncate_after_step only applies when resuming: pass resume=True as well")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        # Optional backends first, so a missing package fails before metrics.jsonl is touched.
        purge = None if truncate_after_step is None else truncate_after_step + 1
        self._tb = _open_tensorboard(self.run_dir / "tensorboard", purge) if tensorboard else None
        self._wandb = _open_wandb(self.run_dir, wandb, resume) if wandb is not None else None
        self._wandb_kinds: set[str] = set()
        if resume:
            truncate_metrics(self.path, truncate_after_step)
        self._file = open(self.path, "a" if resume else "w", encoding="utf-8")

    def log(self, record: dict) -> None:
        """Write one record: needs a string "kind" and an int "step"; see the module docstring for values."""
        data = to_jsonable(record)
        kind, step = data.get("kind"), data.get("step")
        if not isinstance(kind, str) or not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"a record needs a string 'kind' and an int 'step', got kind={kind!r} step={step!r}")
        # One write and a flush per line: a killed process tears at most the line being written.
        self._file.write(json.dumps(data, allow_nan=False) + "\n")
        self._file.flush()
        scalars = {f"{kind}/{k}": float(v) for k, v in _from_json(data).items()
                   if k not in ("kind", "step") and isinstance(v, (int, float))}
        if self._tb is not None:
            for tag, v in scalars.items():
                self._tb.add_scalar(tag, v, global_step=step)
        if self._wandb is not None:
            if kind not in self._wandb_kinds:
                # Each kind gets its own x axis, so an eval logged after a later train step is not dropped.
                self._wandb.define_metric(f"{kind}/step")
                self._wandb.define_metric(f"{kind}/*", step_metric=f"{kind}/step")
                self._wandb_kinds.add(kind)
            self._wandb.log({**scalars, f"{kind}/step": step})

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
