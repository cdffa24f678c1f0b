"""Training against a teacher server on loopback: same trajectory as the local teacher, and a clean stop with a
checkpoint when the server goes away."""

from __future__ import annotations

import json
import threading

import pytest

from reopold.config.loader import from_dict
from reopold.config.schema import TrainConfig
from reopold.errors import TrainingStopped
from reopold.teacher.server import build_server
from reopold.train.checkpoint import latest_checkpoint
from reopold.train.run import train
from tests.tiny import make_model, tiny_config


@pytest.fixture()
def server_and_models(tmp_path):
    teacher = make_model(tmp_path / "teacher", hidden=32, layers=1, seed=1, sharpness=4.0)
    student = make_model(tmp_path / "student", hidden=16, layers=1, seed=2)
    server = build_server(str(teacher), port=0, device="cpu", log_requests=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    stopped = []

    def stop():
        if not stopped:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            stopped.append(True)

    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", teacher, student, stop
    finally:
        stop()


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k and k != "time"} for r in rows]


def test_remote_teacher_gives_the_local_trajectory(tmp_path, server_and_models):
    url, teacher, student, _ = server_and_models
    sections = {"run": {"steps": 2, "eval_every": 2, "save_every": 2}}
    local = train(from_dict(TrainConfig, tiny_config(tmp_path / "local", teacher, student, **sections)))
    remote_config = tiny_config(tmp_path / "remote", teacher, student, **sections)
    remote_config["teacher"].update(url=url, model=str(teacher))
    remote = train(from_dict(TrainConfig, remote_config))
    for a, b in zip(metrics(local), metrics(remote), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
            else:
                assert b[key] == a[key], key


def test_dead_server_stops_training_with_a_checkpoint(tmp_path, server_and_models, monkeypatch):
    url, teacher, student, stop = server_and_models
    from reopold.train.trainer import Trainer

    original = Trainer.save

    def save_then_kill_server(self):  # the server dies right after the first checkpoint
        path = original(self)
        stop()
        return path

    monkeypatch.setattr(Trainer, "save", save_then_kill_server)
    config = tiny_config(tmp_path, teacher, student, run={"steps": 4, "eval_every": 0, "save_every": 1})
    config["teacher"].update(url=url, model=str(teacher), retries=2, backoff=0.01, timeout=2.0)
    with pytest.raises(TrainingStopped, match="resume with: reopold train --resume"):
        train(from_dict(TrainConfig, config))
    run_dir = tmp_path / "runs" / "reopold-seed0"
    assert latest_checkpoint(run_dir).name == "step-000001"  # nothing lost beyond the last checkpoint
    assert [r["step"] for r in metrics(run_dir) if r["kind"] == "train"] == [1]


def test_remote_teacher_refuses_algorithms_that_need_a_local_one(tmp_path):
    from reopold.config.loader import ConfigError

    for name in ("gkd", "sft"):
        with pytest.raises(ConfigError, match="needs a local teacher"):
            from_dict(TrainConfig, {"teacher": {"url": "http://127.0.0.1:1"}, "algo": {"name": name}})
