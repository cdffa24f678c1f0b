"""The fault catalogue: one case per row of the reliability audit (docs/training.md, "Failure modes").

Every bad input or fault must end in one clear line (``reopold: error: ...`` exit 2, ``reopold: stopped: ...`` exit 1,
``reopold: interrupted: ...`` exit 130) or, where the fault can be recovered from, in the run going on with a one-line
note. When a case fails, its message starts with what happened instead: ``outcome=traceback`` (an exception reached
the user), ``outcome=silent`` (exit 0 without the required refusal) or ``outcome=clear`` (a one-line message, but not
the required one), so a failing run of this file is its own tally.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import yaml

from reopold.cli import main
from tests.tiny import make_model, tiny_config

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_model(root / "teacher", hidden=32, layers=1, seed=1), make_model(root / "student", hidden=16,
                                                                               layers=1, seed=2)


def config_file(tmp_path: Path, models, **sections) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, *models, **sections)))
    return path


def outcome(rc, err: str) -> str:
    if rc is None or "Traceback" in err:
        return "traceback"
    if rc == 0:
        return "silent"
    return "clear"


def call(capsys, argv: list[str]) -> tuple[int | None, str]:
    """reopold's exit code and stderr, in this process; an exception escaping main is a traceback (rc None)."""
    try:
        rc = main(argv)
    except SystemExit as err:
        rc = err.code
    except Exception:
        return None, capsys.readouterr().err + traceback.format_exc()
    captured = capsys.readouterr()
    call.out = captured.out
    return rc, captured.err


def expect_error(result, code: int, fragment: str, *, one_line: bool = True) -> str:
    rc, err = result
    lines = [line for line in err.strip().splitlines() if line.startswith("reopold:")]
    last = lines[-1] if lines else ""
    ok = rc == code and fragment in last and (not one_line or err.strip() == last)
    assert ok, f"outcome={outcome(rc, err)} rc={rc}: {err.strip()[-600:]}"
    return last


def reopold_process(args: list[str], cwd: Path, **env) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **env}
    # SIGINT back to its default: a shell starts background jobs (this test run, maybe) with it ignored, and Python
    # then installs no KeyboardInterrupt handler.
    return subprocess.Popen([sys.executable, "-m", "reopold", *args], cwd=cwd, env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# ---- 1. numeric keys are validated when the config loads ---------------------------------------------------------
@pytest.mark.parametrize("key, value, says", [
    ("optim.warmup_steps", "-5", "optim.warmup_steps must be >= 0"),
    ("optim.weight_decay", "-0.1", "optim.weight_decay must be >= 0"),
    ("optim.adam_beta1", "1.5", "optim.adam_beta1 must be in [0, 1)"),
    ("optim.adam_beta2", "-0.5", "optim.adam_beta2 must be in [0, 1)"),
    ("optim.grad_clip", "-1", "optim.grad_clip must be >= 0"),
    ("optim.lr", ".inf", "optim.lr must be a finite number"),
    ("teacher.timeout", "0", "teacher.timeout must be > 0"),
    ("teacher.retries", "-1", "teacher.retries must be >= 0"),
])  # fmt: skip
def test_row1_negative_or_out_of_range_numbers_are_refused(capsys, tmp_path, models, key, value, says):
    result = call(capsys, ["train", "--config", str(config_file(tmp_path, models)), f"--{key}", value])
    expect_error(result, 2, says)
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def numeric_keys() -> list[tuple[str, type]]:
    from typing import get_args

    from reopold.config.loader import _walk
    from reopold.config.schema import TrainConfig

    keys = []
    for key, _, tp, is_section in _walk(TrainConfig):
        kinds = {tp} | set(get_args(tp))
        if not is_section and kinds & {int, float}:
            keys.append((key, float if float in kinds else int))
    return keys


@pytest.mark.parametrize("key, kind", numeric_keys(), ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_row1_every_numeric_key_refuses_negative_and_nan(key, kind):
    """No numeric key of the schema takes a negative value (or NaN), so a future key without a check fails here."""
    from reopold.config.loader import ConfigError, load_config
    from reopold.config.schema import TrainConfig

    base = ["lora.r=4"] if key.startswith("lora.") else []  # lora.alpha only matters with adapters
    for value in ["-1", ".nan"] if kind is float else ["-1"]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(TrainConfig, None, [*base, f"{key}={value}"])


# ---- 2. two processes on one run folder ----------------------------------------------------------------------------
def test_row2_a_second_process_on_the_same_run_is_refused(tmp_path, models):
    config = config_file(tmp_path, models, run={"steps": 8, "eval_every": 0, "save_every": 4})
    procs = [reopold_process(["train", "--config", str(config)], tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    results = [(p.returncode, err) for p, (_, err) in zip(procs, outputs, strict=True)]
    codes = sorted(rc for rc, _ in results)
    refused = [err for rc, err in results if rc != 0]
    detail = " | ".join(err.strip()[-300:] for _, err in results)
    kind = "silent" if codes == [0, 0] else outcome(max(codes), refused[0] if refused else "")
    assert codes == [0, 2], f"outcome={kind} rc={codes}: {detail}"
    assert "is in use by another reopold process" in refused[0].strip().splitlines()[-1], detail
    for out, err in outputs:  # what a newcomer on CPU must not see (DeepSpeed logs to stdout)
        assert "Setting accelerator to CPU" not in out + err
    run = tmp_path / "runs" / "reopold-seed0"
    assert (run / "checkpoints" / "step-000008").is_dir() and not (run / ".lock").exists()


def test_row2_a_lock_left_by_a_dead_process_is_taken_over(capsys, tmp_path, models):
    run = tmp_path / "runs" / "reopold-seed0"
    run.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (run / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    config = config_file(tmp_path, models, run={"steps": 2, "eval_every": 0})
    rc, err = call(capsys, ["train", "--config", str(config)])
    assert rc == 0, f"outcome={outcome(rc, err)}: {err[-600:]}"
    assert not (run / ".lock").exists() and (run / "checkpoints" / "step-000002").is_dir()


def test_row2_a_live_lock_refuses_at_once(capsys, tmp_path, models):
    import socket

    run = tmp_path / "runs" / "reopold-seed0"
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        result = call(capsys, ["train", "--config", str(config_file(tmp_path, models))])
    finally:
        holder.kill()
        holder.wait()
    expect_error(result, 2, f"is in use by another reopold process (pid {holder.pid}")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the other process's folder is left alone


# ---- 3. reopold report on a folder that is not a run ------------------------------------------------------------
def test_row3_report_of_a_missing_run_folder(capsys, tmp_path):
    result = call(capsys, ["report", str(tmp_path / "runs" / "typo")])
    expect_error(result, 2, "no run folder")
    assert not (tmp_path / "runs").exists()


# ---- 4. run.name stays inside run.output_dir -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "a/b", ".."])
def test_row4_run_name_must_be_a_plain_folder_name(capsys, tmp_path, models, name):
    result = call(capsys, ["train", "--config", str(config_file(tmp_path, models)), "--run.name", name,
                           "--show-config"])
    expect_error(result, 2, "run.name must be a plain folder name")


# ---- 5. ablation switches of the base config do not block another algorithm ------------------------------------------
@pytest.mark.parametrize("algo", ["sft", "grpo", "gkd"])
def test_row5_demo_config_switch_does_not_block_another_algorithm(capsys, algo):
    rc, err = call(capsys, ["train", "--algo.name", algo, "--show-config"])
    assert rc == 0, f"outcome={outcome(rc, err)} rc={rc}: {err.strip()}"
    shown = yaml.safe_load(call.out)
    assert shown["algo"]["name"] == algo and shown["algo"]["two_phase"] is None


def test_row5_demo_config_trains_sft(capsys, tmp_path):
    """The README's `reopold train --algo.name sft`, cut to one step on the bundled demo models."""
    rc, err = call(capsys, ["train", "--algo.name", "sft", "--run.steps", "1", "--run.eval_every", "0",
                            "--run.output_dir", str(tmp_path), "--run.report", "false", "--run.progress", "false",
                            "--data.preflight_problems", "0", "--data.eval_problems", "4"])
    assert rc == 0, f"outcome={outcome(rc, err)} rc={rc}: {err.strip()[-600:]}"
    assert (tmp_path / "reopold-demo" / "checkpoints" / "step-000001").is_dir()


def test_row5_a_switch_the_user_gives_still_fails_clearly(capsys):
    result = call(capsys, ["train", "--algo.name", "sft", "--algo.two_phase", "false", "--show-config"])
    expect_error(result, 2, "algo.two_phase is an ablation switch of reopold/rkl/rkl_sg")


def test_row5_gkd_with_a_served_teacher_names_the_real_problem(capsys):
    result = call(capsys, ["train", "--algo.name", "gkd", "--teacher.url", "http://127.0.0.1:9", "--show-config"])
    expect_error(result, 2, "algo.name=gkd needs a local teacher")


# ---- 6. damaged checkpoints -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("run")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root, *models, run={"eval_every": 0})))
    assert main(["train", "--config", str(config)]) == 0
    return root / "runs" / "reopold-seed0"  # checkpoints after steps 2 and 4


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.pt"])
def test_row6_damaged_latest_checkpoint_resumes_from_the_newest_intact_one(capsys, tmp_path, finished_run, damaged):
    run = shutil.copytree(finished_run, tmp_path / "run")
    truncate(run / "checkpoints" / "step-000004" / damaged)
    rc, err = call(capsys, ["train", "--resume", str(run), "--run.steps", "6"])
    notes = [line for line in err.splitlines() if "damaged" in line]
    assert rc == 0 and notes, f"outcome={outcome(rc, err)} rc={rc}: {err.strip()[-600:]}"
    assert "step-000004" in notes[0] and damaged in notes[0] and "step-000002" in notes[0], notes[0]
    assert (run / "checkpoints" / "step-000006").is_dir()


def test_row6_every_checkpoint_damaged_is_one_line(capsys, tmp_path, finished_run):
    run = shutil.copytree(finished_run, tmp_path / "run")
    for step in ("step-000002", "step-000004"):
        truncate(run / "checkpoints" / step / "model.safetensors")
    result = call(capsys, ["train", "--resume", str(run), "--run.steps", "6"])
    expect_error(result, 2, "no intact checkpoint")


def test_row6_damaged_checkpoint_without_manifest_is_one_line(capsys, tmp_path, finished_run):
    """A checkpoint written before manifests existed is trusted; a cut weights file then fails in one line."""
    run = shutil.copytree(finished_run, tmp_path / "run")
    (run / "checkpoints" / "step-000004" / "manifest.json").unlink()
    truncate(run / "checkpoints" / "step-000004" / "model.safetensors")
    result = call(capsys, ["train", "--resume", str(run), "--run.steps", "6"])
    expect_error(result, 2, "step-000004' (SafetensorError: Error while deserializing header")


# ---- 7. a hub name without hub access -----------------------------------------------------------------------------
def test_row7_hub_name_without_hub_access_fails_at_once(tmp_path, models):
    config = config_file(tmp_path, models)
    started = time.monotonic()
    proc = reopold_process(["train", "--config", str(config), "--teacher.model", "org/name"], tmp_path,
                           HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    elapsed = time.monotonic() - started
    expect_error((proc.returncode, err), 2, "'org/name' is not a local folder and the Hugging Face hub",
                 one_line=False)
    assert "Traceback" not in err
    assert elapsed < 60, f"took {elapsed:.0f} s"


# ---- 8. threads, port, Ctrl-C -------------------------------------------------------------------------------------
def test_row8_negative_threads(capsys, tmp_path, models):
    result = call(capsys, ["train", "--config", str(config_file(tmp_path, models)), "--run.threads", "-1"])
    expect_error(result, 2, "run.threads must be >= 0")


def test_row8_port_out_of_range(capsys, models):
    result = call(capsys, ["serve-teacher", str(models[0]), "--port", "99999"])
    expect_error(result, 2, "--port must be in 0..65535")


def test_row8_ctrl_c_says_where_to_resume(tmp_path, models):
    config = config_file(tmp_path, models, run={"steps": 500, "eval_every": 0, "save_every": 2})
    proc = reopold_process(["train", "--config", str(config)], tmp_path)
    run = tmp_path / "runs" / "reopold-seed0"
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "latest").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    last = expect_error((proc.returncode, err), 130, f"resume with: reopold train --resume {run}", one_line=False)
    assert "Traceback" not in err, err[-2000:]
    assert "last checkpoint" in last and "step-" in last
    assert "Setting accelerator to CPU" not in out + err


# ---- also seen: threads on small machines, DeepSpeed's extension lock ----------------------------------------------
def test_thread_default_is_one_on_two_cores_unless_the_user_chose():
    from reopold.train.run import auto_threads

    assert auto_threads(cores=2, environ={}) == 1
    assert auto_threads(cores=1, environ={}) == 1
    assert auto_threads(cores=16, environ={}) is None  # torch's default
    assert auto_threads(cores=2, environ={"OMP_NUM_THREADS": "2"}) is None


def test_oversubscribed_machine_is_named_once_it_is():
    from reopold.train.run import oversubscribed

    assert oversubscribed(load=1.5, cores=2) is None
    message = oversubscribed(load=7.1, cores=2)
    assert message.startswith("this machine is busy (load average 7.1 on 2 cores)") and "run.threads" in message


def test_stale_extension_build_lock_fails_in_one_line(tmp_path, monkeypatch):
    from reopold.config.loader import ConfigError
    from reopold.train.distributed import check_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    check_extension_locks()  # a build running now: wait for it as torch does
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    with pytest.raises(ConfigError, match=r"a stale lock .*deepspeed_shm_comm/lock \(60 minutes old\)"):
        check_extension_locks()
