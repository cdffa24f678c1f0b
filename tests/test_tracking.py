"""MetricsLogger / read_metrics: exact round trip, strict JSON lines, resume truncation, optional backends."""

import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from reopold.train.tracking import MetricsLogger, read_metrics, truncate_metrics


def _strict_loads(line):
    # json.loads accepts NaN/Infinity literals by default; other JSON parsers do not, so refuse them here.
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(line, parse_constant=refuse)


def test_round_trip_is_exact_including_nonfinite_tensors_and_numpy(tmp_path):
    record = {
        "kind": "train", "step": 3, "loss": 0.1, "count": 7, "phase": "exploration", "missing": None,
        "ok": True, "nan": math.nan, "inf": math.inf, "ninf": -math.inf,
        "tensor": torch.tensor(0.25), "grad_tensor": torch.tensor(1.5, requires_grad=True),
        "np32": np.float32(0.5), "np_int": np.int64(12), "np_nan": np.float64("nan"),
        "hist": {"edges": np.array([-1.0, 0.0, 1.0]), "counts": torch.tensor([4, 5])},
        "nested": [1, [math.inf, "x"]],
    }
    with MetricsLogger(tmp_path) as logger:
        logger.log(record)
        logger.log({"kind": "eval", "step": 3, "accuracy": 0.75})

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    raw = _strict_loads(lines[0])
    assert (raw["nan"], raw["inf"], raw["ninf"]) == ("nan", "inf", "-inf")  # the documented encoding

    train, evaluation = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(train.pop("nan")) and math.isnan(train.pop("np_nan"))
    assert train == {
        "kind": "train", "step": 3, "loss": 0.1, "count": 7, "phase": "exploration", "missing": None,
        "ok": True, "inf": math.inf, "ninf": -math.inf, "tensor": 0.25, "grad_tensor": 1.5, "np32": 0.5,
        "np_int": 12, "hist": {"edges": [-1.0, 0.0, 1.0], "counts": [4, 5]}, "nested": [1, [math.inf, "x"]],
    }
    assert type(train["np_int"]) is int and type(train["tensor"]) is float
    assert evaluation == {"kind": "eval", "step": 3, "accuracy": 0.75}
    assert read_metrics(tmp_path) == read_metrics(tmp_path / "metrics.jsonl")  # a run dir works too


def test_each_line_is_flushed_before_close(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log({"kind": "train", "step": 1, "x": 1.0})
    # Not closed: a process killed now must still have the line on disk.
    assert read_metrics(tmp_path) == [{"kind": "train", "step": 1, "x": 1.0}]
    logger.close()
    logger.close()  # idempotent
    assert logger._file.closed


def test_log_rejects_records_without_kind_or_int_step(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(ValueError, match="'kind'"):
            logger.log({"step": 1, "x": 1.0})
        with pytest.raises(ValueError, match="'step'"):
            logger.log({"kind": "train", "step": 1.5})
        with pytest.raises(TypeError, match="cannot log"):
            logger.log({"kind": "train", "step": 1, "x": object()})
    assert read_metrics(tmp_path) == []


def test_resume_truncates_records_after_checkpoint_step_and_torn_line(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log({"kind": "train", "step": step, "loss": float(step)})
            if step % 2 == 0:
                logger.log({"kind": "eval", "step": step, "accuracy": step / 10})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 2, 3, 4, 4, 5]  # torn line ignored

    # Resume from the checkpoint at step 3: steps 4, 5 (and the torn 6) will be redone, so they go.
    with MetricsLogger(tmp_path, resume=True, truncate_after_step=3) as logger:
        logger.log({"kind": "train", "step": 4, "loss": 40.0})
    records = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4)]
    assert records[-1]["loss"] == 40.0
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        assert isinstance(_strict_loads(line), dict)


def test_truncate_metrics_function_and_fresh_run_overwrites(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(4):
            logger.log({"kind": "train", "step": step})
    assert truncate_metrics(tmp_path / "metrics.jsonl", 1) == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    assert truncate_metrics(tmp_path / "absent.jsonl", 1) == 0
    with MetricsLogger(tmp_path) as logger:  # resume=False: a new run starts a new file
        logger.log({"kind": "train", "step": 0, "new": 1})
    assert read_metrics(tmp_path) == [{"kind": "train", "step": 0, "new": 1}]
    with pytest.raises(ValueError, match="resume=True"):
        MetricsLogger(tmp_path, truncate_after_step=3)


@pytest.mark.parametrize("option, module", [({"tensorboard": True}, "torch.utils.tensorboard"),
                                            ({"wandb": {"project": "p"}}, "wandb")])
def test_missing_optional_backend_fails_at_construction(tmp_path, monkeypatch, option, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'reopold\[tracking\]'"):
        MetricsLogger(tmp_path / "run", **option)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before touching the run's metrics


def test_import_does_not_pull_in_tensorboard_or_wandb():
    code = ("import sys, reopold.train.tracking; "
            "print(sorted(m for m in sys.modules if m.startswith(('torch.utils.tensorboard', 'wandb'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tensorboard_gets_scalars_under_kind_prefix(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        for step in range(3):
            logger.log({"kind": "train", "step": step, "reward_mean": 0.5 * step, "phase": "exploration",
                        "reward_hist": {"edges": [0, 1], "counts": [3]}})
        logger.log({"kind": "eval", "step": 2, "accuracy": 0.25})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["eval/accuracy", "train/reward_mean"]  # strings/dicts skipped
    assert [(e.step, e.value) for e in acc.Scalars("train/reward_mean")] == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy")] == [(2, 0.25)]

    # Resuming from step 1 purges the old steps 2.. so TensorBoard shows the redone values only.
    with MetricsLogger(tmp_path, tensorboard=True, resume=True, truncate_after_step=1) as logger:
        logger.log({"kind": "train", "step": 2, "reward_mean": 7.0})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/reward_mean")] == [(0, 0.0), (1, 0.5), (2, 7.0)]


class _FakeRun:
    def __init__(self, kwargs):
        self.kwargs, self.id, self.logged, self.defined, self.finished = kwargs, "run123", [], [], False

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def log(self, data):
        self.logged.append(data)

    def finish(self):
        self.finished = True


def test_wandb_logs_scalars_with_per_kind_step_and_resumes_same_run(tmp_path, monkeypatch):
    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(_FakeRun(kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)

    with MetricsLogger(tmp_path, wandb={"project": "p"}) as logger:
        logger.log({"kind": "train", "step": 5, "reward_mean": 0.5, "phase": "refinement", "flag": None})
    run = runs[0]
    assert run.kwargs == {"dir": str(tmp_path), "project": "p"}
    assert run.logged == [{"train/reward_mean": 0.5, "train/step": 5}]
    assert run.defined == [("train/step", None), ("train/*", "train/step")]
    assert run.finished and (tmp_path / "wandb_run_id").read_text() == "run123"

    MetricsLogger(tmp_path, wandb={"project": "p"}, resume=True).close()
    assert runs[1].kwargs == {"dir": str(tmp_path), "project": "p", "id": "run123", "resume": "allow"}
