"""Two CPU ranks (gloo), data-parallel, FSDP2 or DeepSpeed ZeRO-2/3, give the same parameters as one process on the
same global batch; sharded runs' checkpoints resume."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reopold.train.checkpoint import latest_checkpoint
from tests.tiny import make_model, tiny_config

ROOT = Path(__file__).resolve().parents[1]
DIAGNOSTICS = ("reward_mean", "below_floor_frac", "kept_frac", "reverse_kl", "entropy_mean", "response_length",
               "train_accuracy")


EXTENSIONS = Path(tempfile.mkdtemp(prefix="reopold-torch-extensions-"))


def launch(command: list[str], tmp_path: Path, *, expect_failure: bool = False) -> str:
    """Run a worker command; its stderr. It must succeed, or, with ``expect_failure``, fail."""
    # tests/ and, for an uninstalled checkout, src/ importable in the launched ranks
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    # DeepSpeed builds a C++ extension on first use under TORCH_EXTENSIONS_DIR; in the shared default folder a lock
    # left by another (killed) process makes that build wait forever. This test run's own folder cannot be stale.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "TORCH_EXTENSIONS_DIR": str(EXTENSIONS)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert (result.returncode != 0) == expect_failure, result.stderr[-3000:]
    return result.stderr


SINGLE = [sys.executable, str(ROOT / "tests" / "ddp_worker.py")]
TWO_RANKS = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(ROOT / "tests" / "ddp_worker.py")]


MODES = {"ddp": [], "fsdp": ["--fsdp"], "zero2": ["--zero", "2"], "zero3": ["--zero", "3"]}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")


slow = pytest.mark.slow


# One check per engine in the default run; the rest of the matrix under `pytest -m slow`.
@pytest.mark.parametrize(("algo", "mode"), [("reopold", "ddp"), ("reopold", "ddp-reuse"),
                                            pytest.param("grpo", "ddp", marks=slow),
                                            ("reopold", "fsdp"), pytest.param("gkd", "fsdp", marks=slow),
                                            pytest.param("reopold", "fsdp-lora", marks=slow),
                                            pytest.param("reopold", "fsdp-ckpt", marks=slow),
                                            pytest.param("reopold", "zero2", marks=needs_deepspeed),
                                            pytest.param("reopold", "zero3", marks=needs_deepspeed)])
def test_two_ranks_match_one_process(tmp_path, algo, mode):
    teacher = make_model(tmp_path / "teacher", hidden=32, layers=1, seed=1, sharpness=4.0)
    student = make_model(tmp_path / "student", hidden=16, layers=2, seed=2)
    weights, logged, diagnostics = {}, {}, {}
    lora, checkpointing = mode.endswith("-lora"), mode.endswith("-ckpt")  # LoRA adapters; activation checkpointing
    reuse = mode.endswith("-reuse")  # one micro-batch per update: pi_old from the update's own forward (no pass)
    mode = mode.removesuffix("-lora").removesuffix("-ckpt").removesuffix("-reuse")
    flags = MODES[mode]  # FSDP2 and ZeRO-3: each rank holds half of every weight
    for name, command in {"single": SINGLE, "ranks": TWO_RANKS}.items():
        # 2 steps, T_switch = 1: both phases, so the global entropy threshold and kept-token count are exercised.
        # (Longer runs drift apart at float-noise level when a token's entropy sits on the threshold and the
        # differently padded batches put it on either side; Adam then amplifies that.)
        config = tiny_config(tmp_path / name, teacher, student, algo={"name": algo, "switch_step": 1},
                             rollout={"prompts_per_step": 8, "samples_per_prompt": 4},
                             optim={"mini_batch_prompts": 8, "micro_batch_size": 32 if reuse else 8, "lr": 1e-2},
                             run={"steps": 2, "eval_every": 0, "save_every": 2, "name": name},
                             lora={"r": 4, "alpha": 8} if lora else {},
                             student={"gradient_checkpointing": checkpointing})
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        launch([*command, str(path), *(flags if name == "ranks" else [])], tmp_path)
        run_dir = tmp_path / name / "runs" / name
        weights[name] = load_file(latest_checkpoint(run_dir) / f"{'adapter_' if lora else ''}model.safetensors")
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
    if not lora:
        initial = load_file(student / "model.safetensors")
        assert any(not torch.equal(weights["single"][k], initial[k]) for k in initial)  # training moved the weights
    else:  # LoRA's B matrices start at zero
        assert any(k.endswith("lora_B.weight") and weights["single"][k].abs().max() > 0 for k in weights["single"])
    # LoRA: summation order alone moves lora_A by up to 1e-5 (one process with micro-batches of 4 instead of 8 did,
    # measured), as Adam normalises its tiny early gradients; 1e-4 still catches a missed rank (lr 1e-2 steps).
    atol = 1e-4 if lora else 1e-5
    for key, value in weights["single"].items():
        torch.testing.assert_close(weights["ranks"][key], value, atol=atol, rtol=1e-4, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", pytest.param("zero3", marks=needs_deepspeed)])
def test_sharded_checkpoint_resumes(tmp_path, mode):
    """Sharded on two ranks for 2 steps, then resumed for a third on two ranks: the same weights, losses and
    evaluation as one process training 3 steps straight. The checkpoint holds the full weights; evaluation generates
    through the sharded model. FSDP saves one full optimizer state keyed by parameter names, so its checkpoint also
    resumes on one process; DeepSpeed saves each rank's partition, and resuming on one process is refused."""
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
        launch([*(SINGLE if name == "single" else TWO_RANKS), str(path), *([] if name == "single" else MODES[mode])],
               tmp_path)
        runs[name] = tmp_path / name / "runs" / name
    runs["one_process"] = tmp_path / "one_process"
    shutil.copytree(runs["sharded"], runs["one_process"])
    launch([*TWO_RANKS, "-", *MODES[mode], "--resume", str(runs["sharded"]), "--steps", "3"], tmp_path)
    one_process = [*SINGLE, "-", "--resume", str(runs["one_process"]), "--steps", "3"]
    if mode == "zero3":
        message = launch(one_process, tmp_path, expect_failure=True)
        assert "written by a DeepSpeed run; resume it under DeepSpeed" in message
    else:
        launch(one_process, tmp_path)

    def outcome(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [(r["loss"], r["grad_norm"]) for r in rows if r["kind"] == "train"]
        evals = [(r["accuracy"], r["reverse_kl"]) for r in rows if r["kind"] == "eval"]
        return load_file(latest_checkpoint(run_dir) / "model.safetensors"), train, evals

    expected_weights, expected_train, expected_evals = outcome(runs["single"])
    assert len(expected_train) == 3 and len(expected_evals) == 4
    for name in ("sharded", "one_process") if mode == "fsdp" else ("sharded",):
        weights, train, evals = outcome(runs[name])
        torch.testing.assert_close(torch.tensor(train), torch.tensor(expected_train), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(evals), torch.tensor(expected_evals), rtol=1e-4, atol=1e-6)
        for key, value in expected_weights.items():
            torch.testing.assert_close(weights[key], value, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", pytest.param("zero2", marks=needs_deepspeed)])
def test_a_nan_update_on_one_rank_is_skipped_or_stops_the_run(tmp_path, mode):
    """Rank 0's loss is NaN in step 3 of 4 (scores finite). FSDP skips that update on every rank and goes on;
    DeepSpeed has applied it inside backward by the time it is seen, so the run stops without saving, its last
    checkpoint (step 2) intact for a resume."""
    teacher = make_model(tmp_path / "teacher", hidden=32, layers=1, seed=1, sharpness=4.0)
    student = make_model(tmp_path / "student", hidden=16, layers=2, seed=2)
    config = tiny_config(tmp_path, teacher, student, algo={"name": "reopold", "switch_step": 1},
                         optim={"mini_batch_prompts": 8, "micro_batch_size": 8},
                         run={"steps": 4, "eval_every": 0, "save_every": 1, "name": mode})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    run_dir = tmp_path / "runs" / mode
    command = [*TWO_RANKS, str(path), *MODES[mode], "--nan-loss-at", "2"]
    if mode == "zero2":
        message = launch(command, tmp_path, expect_failure=True)
        assert "DeepSpeed applies the update inside backward" in message
        assert latest_checkpoint(run_dir).name == "step-000002"
        return
    launch(command, tmp_path)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows if r["kind"] == "train"] == [False, False, True, False]
    assert latest_checkpoint(run_dir).name == "step-000004"


def fake_accelerator(kind: str, *, fsdp_version: int = 2, zero_stage: int = 2, processes: int = 2):
    from types import SimpleNamespace

    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version),
                            deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage, deepspeed_config={}))
    return SimpleNamespace(distributed_type=kind, state=state, num_processes=processes)


def test_sharding_names_what_the_trainer_runs_and_refuses_fsdp1():
    from reopold.config.loader import ConfigError
    from reopold.train.distributed import deepspeed_stage, sharding

    assert sharding(fake_accelerator("FSDP")) == "fsdp2"
    assert sharding(fake_accelerator("DEEPSPEED", zero_stage=3)) == "zero3"
    assert sharding(fake_accelerator("DEEPSPEED", zero_stage=2)) is None
    assert deepspeed_stage(fake_accelerator("DEEPSPEED", zero_stage=2)) == 2
    assert sharding(fake_accelerator("MULTI_CPU")) is None and deepspeed_stage(fake_accelerator("MULTI_GPU")) is None
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        sharding(fake_accelerator("FSDP", fsdp_version=1))


def test_deepspeed_gets_the_trainers_batch_sizes_and_clipping():
    from reopold.train.distributed import configure_deepspeed

    accelerator = fake_accelerator("DEEPSPEED", zero_stage=3, processes=4)
    configure_deepspeed(accelerator, micro_batch_size=8, micro_batches=3, grad_clip=0.0)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (8, 3)
    assert config["train_batch_size"] == 8 * 3 * 4 and config["gradient_clipping"] == 0.0  # 0: no clipping
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(("written", "expected"), [("torch", "full"), ("per_rank", "torch"), ("full", "per_rank")])
def test_resume_under_another_launch_setup_is_refused_clearly(tmp_path, written, expected):
    from reopold.config.loader import ConfigError
    from reopold.train.distributed import load_optimizer_state

    with pytest.raises(ConfigError, match="resume it under"):
        load_optimizer_state(None, None, None, {"optimizer": {}, "optimizer_format": written}, tmp_path,
                             expected=expected)


def test_launch_precision_that_the_run_would_ignore_is_refused(monkeypatch, tmp_path):
    from reopold.config.loader import ConfigError, from_dict
    from reopold.config.schema import TrainConfig
    from reopold.train.preflight import check_launch_precision

    config = from_dict(TrainConfig, tiny_config(tmp_path, tmp_path / "t", tmp_path / "s"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` sets from its config
    with pytest.raises(ConfigError, match="--run.mixed_precision bf16"):
        check_launch_precision(config)
    config.run.mixed_precision = "bf16"
    check_launch_precision(config)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    check_launch_precision(config)  # bf16 asked by reopold alone is fine
