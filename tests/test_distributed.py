"""Two CPU ranks (gloo), data-parallel or FSDP2-sharded, give the same parameters as one process on the same global
batch; a sharded run's checkpoint resumes on two ranks or on one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reopold.checkpoint import latest_checkpoint
from tests.tiny import make_model, tiny_config

ROOT = Path(__file__).resolve().parents[1]
DIAGNOSTICS = ("reward_mean", "below_floor_frac", "kept_frac", "reverse_kl", "entropy_mean", "response_length",
               "train_accuracy")


def launch(command: list[str], tmp_path: Path) -> None:
    # tests/ and, for an uninstalled checkout, src/ importable in the launched ranks
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


SINGLE = [sys.executable, str(ROOT / "tests" / "ddp_worker.py")]
TWO_RANKS = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(ROOT / "tests" / "ddp_worker.py")]


@pytest.mark.parametrize(("algo", "mode"), [("reopold", "ddp"), ("grpo", "ddp"), ("reopold", "fsdp"), ("gkd", "fsdp")])
def test_two_ranks_match_one_process(tmp_path, algo, mode):
    teacher = make_model(tmp_path / "teacher", hidden=32, layers=1, seed=1, sharpness=4.0)
    student = make_model(tmp_path / "student", hidden=16, layers=2, seed=2)
    weights, logged, diagnostics = {}, {}, {}
    flags = ["--fsdp"] if mode == "fsdp" else []  # FSDP2: each rank holds half of every weight
    for name, command in {"single": SINGLE, "ranks": TWO_RANKS}.items():
        # 2 steps, T_switch = 1: both phases, so the global entropy threshold and kept-token count are exercised.
        # (Longer runs drift apart at float-noise level when a token's entropy sits on the threshold and the
        # differently padded batches put it on either side; Adam then amplifies that.)
        config = tiny_config(tmp_path / name, teacher, student, algo={"name": algo, "switch_step": 1},
                             rollout={"prompts_per_step": 8, "samples_per_prompt": 4},
                             optim={"mini_batch_prompts": 8, "micro_batch_size": 8, "lr": 1e-2},
                             run={"steps": 2, "eval_every": 0, "save_every": 2, "name": name})
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        launch([*command, str(path), *(flags if name == "ranks" else [])], tmp_path)
        run_dir = tmp_path / name / "runs" / name
        weights[name] = load_file(latest_checkpoint(run_dir) / "model.safetensors")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        logged[name] = [(r["loss"], r["grad_norm"]) for r in rows]
        diagnostics[name] = [[r[k] for k in DIAGNOSTICS if k in r] for r in rows]
    # Loss (summed over ranks) and the gradient norm (of the all-reduced gradient) of every update agree: a missing
    # world-size factor in the loss would show here even though Adam's update is blind to the gradient's scale.
    assert len(logged["ranks"]) == 2
    torch.testing.assert_close(torch.tensor(logged["ranks"]), torch.tensor(logged["single"]), rtol=1e-5, atol=1e-7)
    # The logged diagnostics describe the whole global batch, not the main rank's half of it.
    assert len(diagnostics["single"][0]) >= 4
    torch.testing.assert_close(torch.tensor(diagnostics["ranks"]), torch.tensor(diagnostics["single"]), rtol=1e-5,
                               atol=1e-6)
    initial = load_file(student / "model.safetensors")
    assert any(not torch.equal(weights["single"][k], initial[k]) for k in initial)  # training moved the weights
    for key, value in weights["single"].items():
        torch.testing.assert_close(weights["ranks"][key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_sharded_checkpoint_resumes_on_two_ranks_or_one(tmp_path):
    """FSDP2 on two ranks for 2 steps, then resumed for a third on two ranks (and, from a copy, on one process):
    the same weights, losses and evaluation as one process training 3 steps straight. The checkpoint holds the full
    weights and a full optimizer state keyed by parameter names; evaluation generates through the sharded model."""
    teacher = make_model(tmp_path / "teacher", hidden=32, layers=1, seed=1, sharpness=4.0)
    student = make_model(tmp_path / "student", hidden=16, layers=2, seed=2)
    runs = {}
    for name, steps in {"single": 3, "sharded": 2}.items():
        config = tiny_config(tmp_path / name, teacher, student, algo={"name": "reopold", "switch_step": 1},
                             rollout={"prompts_per_step": 8, "samples_per_prompt": 4},
                             optim={"mini_batch_prompts": 8, "micro_batch_size": 4, "lr": 1e-2},
                             run={"steps": steps, "eval_every": 1, "save_every": 1, "name": name},
                             data={"eval_problems": 8})
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        launch([*(SINGLE if name == "single" else TWO_RANKS), str(path), *([] if name == "single" else ["--fsdp"])],
               tmp_path)
        runs[name] = tmp_path / name / "runs" / name
    runs["one_process"] = tmp_path / "one_process"
    shutil.copytree(runs["sharded"], runs["one_process"])
    launch([*TWO_RANKS, "-", "--fsdp", "--resume", str(runs["sharded"]), "--steps", "3"], tmp_path)
    launch([*SINGLE, "-", "--resume", str(runs["one_process"]), "--steps", "3"], tmp_path)

    def outcome(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [(r["loss"], r["grad_norm"]) for r in rows if r["kind"] == "train"]
        evals = [(r["accuracy"], r["reverse_kl"]) for r in rows if r["kind"] == "eval"]
        return load_file(latest_checkpoint(run_dir) / "model.safetensors"), train, evals

    expected_weights, expected_train, expected_evals = outcome(runs["single"])
    assert len(expected_train) == 3 and len(expected_evals) == 4
    for name in ("sharded", "one_process"):
        weights, train, evals = outcome(runs[name])
        torch.testing.assert_close(torch.tensor(train), torch.tensor(expected_train), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(evals), torch.tensor(expected_evals), rtol=1e-4, atol=1e-6)
        for key, value in expected_weights.items():
            torch.testing.assert_close(weights[key], value, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")
