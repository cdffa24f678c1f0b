"""A real vLLM against the Hugging Face student: sampling distribution, prompt and sampled-token log-probs, weight sync
(untied and tied heads, full and LoRA students), a clean shutdown, and the remote teacher client against vLLM's
OpenAI server. Needs vLLM (the CPU build: scripts/install_vllm.sh); run with
``.venv-vllm/bin/python -m pytest -m "vllm and not slow" tests/test_vllm_real.py`` (add the slow one with ``-m vllm``).

The models are tiny Llamas built here (no downloads) with head_dim 32: vLLM's CPU attention supports 32, 64, ...
Everything runs in fp32, so vLLM and Hugging Face should agree to float rounding.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs vLLM: scripts/install_vllm.sh")

os.environ.setdefault("OMP_NUM_THREADS", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from reopold.models.scorer import TokenScorer  # noqa: E402
from reopold.rollout import build_rollout  # noqa: E402
from reopold.rollout.vllm import VLLMRolloutEngine, checkpoint_weights  # noqa: E402
from reopold.tasks import build_tokenizer  # noqa: E402
from reopold.teacher.local import LocalTeacher  # noqa: E402

TEMPERATURE = 0.7
ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "skip_tokenizer_init": True, "max_model_len": 128,
               "kv_cache_memory_bytes": 64 << 20, "seed": 0}  # 64 MiB of KV cache: the CPU default takes 92% of RAM
PROMPTS = [[3, 4, 13, 5], [6, 7, 8, 9, 10, 11], [12, 5], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4]]


def make_student(path: Path, *, tied: bool, seed: int) -> Path:
    """A random 2-layer Llama with 2 heads of 32 (hidden 64) and a peaky output layer, saved with the char
    tokenizer."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)  # sharper next-token distributions
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load(path: Path) -> torch.nn.Module:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """An update of every parameter (embedding, and with it a tied head, included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale * param.abs().mean())


def hf_prompt_logprobs(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt, log p(token j | tokens < j) for j >= 1 at temperature 1, float64."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), -1)  # (L, V)
            out.append(logprobs[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0])
    return out


def vllm_prompt_logprobs(engine: VLLMRolloutEngine, prompts: list[list[int]]) -> list[torch.Tensor]:
    """The same through vLLM's ``prompt_logprobs`` (entry 0 is None: the first token has no context)."""
    import vllm

    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
    outputs = engine.backend.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [torch.tensor([entry[t].logprob for entry, t in zip(o.prompt_logprobs[1:], p[1:], strict=True)],
                         dtype=torch.float64) for o, p in zip(outputs, prompts, strict=True)]


def max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def start_engine(path: Path, **kwargs) -> tuple[VLLMRolloutEngine, float]:
    started = time.perf_counter()
    engine = VLLMRolloutEngine.offline(path, build_tokenizer(), max_new_tokens=16, temperature=TEMPERATURE,
                                       **ENGINE_ARGS, **kwargs)
    return engine, time.perf_counter() - started


def report(name: str, value: float) -> None:
    print(f"[measured] {name}: {value:.3g}")


@pytest.fixture(scope="class")
def untied(tmp_path_factory):
    """One engine for the tests of a class (closed after them: one engine in the process at a time)."""
    path = make_student(tmp_path_factory.mktemp("untied") / "model", tied=False, seed=1)
    engine, seconds = start_engine(path, logprobs=True)
    report("LLM start-up seconds (in process)", seconds)
    yield engine, path
    engine.close()


@pytest.fixture(scope="class")
def tied(tmp_path_factory):
    path = make_student(tmp_path_factory.mktemp("tied") / "model", tied=True, seed=2)
    engine, _ = start_engine(path)
    yield engine, path
    engine.close()


class TestUntiedStudent:
    """A student with its own output layer."""

    def test_samples_follow_the_students_distribution(self, untied):
        engine, path = untied
        model = load(path)
        engine.max_new_tokens = 1
        try:
            rollout = engine.generate([PROMPTS[0]] * 8, [None] * 8, num_samples=500)  # 4000 draws
        finally:
            engine.max_new_tokens = 16
        counts = torch.bincount(rollout.completion_ids[:, 0], minlength=model.config.vocab_size).double()
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([PROMPTS[0]])).logits[0, -1].double() / TEMPERATURE, -1)
        assert probs.max() > 0.1  # a peaked distribution: uniform sampling would fail the bound below
        # The standard error of a frequency over 4000 draws is at most 0.008; 0.035 is over 4 of them.
        gap = float((counts / 4000 - probs).abs().max())
        report("sampling frequency vs softmax(z/T), max abs gap over 4000 draws", gap)
        assert gap < 0.035

    def test_prompt_logprobs_equal_hugging_face(self, untied):
        engine, path = untied
        gap = max_gap(vllm_prompt_logprobs(engine, PROMPTS), hf_prompt_logprobs(load(path), PROMPTS))
        report("prompt log-probs vs HF, fp32, max abs diff", gap)
        assert gap < 1e-4

    def test_sampled_token_logprobs_equal_the_trainers_old_logprobs(self, untied):
        engine, path = untied
        rollout = engine.generate(PROMPTS, [None] * len(PROMPTS), num_samples=8)
        mask = rollout.completion_mask
        assert int(mask.sum()) > 100
        with torch.no_grad():
            old_logprobs, _ = TokenScorer(load(path), temperature=TEMPERATURE)(rollout)  # the trainer's pi_old pass
        gap = float((rollout.old_logprobs - old_logprobs)[mask].abs().max())
        report(f"sampled-token log-probs (T={TEMPERATURE}) vs the trainer's pi_old pass, fp32, max abs diff "
               f"over {int(mask.sum())} tokens", gap)
        assert gap < 1e-4
        assert float(rollout.old_logprobs[~mask].abs().max()) == 0.0

    def test_sync_then_vllm_scores_like_the_updated_student(self, untied):
        engine, path = untied
        student = load(path)
        perturb(student, seed=0)
        stale = max_gap(vllm_prompt_logprobs(engine, PROMPTS), hf_prompt_logprobs(student, PROMPTS))
        started = time.perf_counter()
        engine.sync_weights(student)
        report("sync_weights seconds (tiny model, in process)", time.perf_counter() - started)
        gap = max_gap(vllm_prompt_logprobs(engine, PROMPTS), hf_prompt_logprobs(student, PROMPTS))
        report("after sync (untied), prompt log-probs vs the updated student, max abs diff", gap)
        assert stale > 0.05  # the update moved the log-probs: a sync that did nothing would fail below
        assert gap < 1e-4

    def test_sync_of_a_lora_student_sends_the_merged_weights(self, untied):
        from peft import LoraConfig, get_peft_model

        engine, path = untied
        student = get_peft_model(load(path), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for name, param in student.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
        student.eval()
        stale = max_gap(vllm_prompt_logprobs(engine, PROMPTS), hf_prompt_logprobs(student, PROMPTS))
        engine.sync_weights(student)
        gap = max_gap(vllm_prompt_logprobs(engine, PROMPTS), hf_prompt_logprobs(student, PROMPTS))
        report("after sync (LoRA), prompt log-probs vs the PEFT student, max abs diff", gap)
        assert stale > 0.05 and gap < 1e-4
        assert any("lora_A" in name for name, _ in student.named_parameters())  # adapters untouched


class TestTiedStudent:
    """A student whose output layer is its embedding: vLLM's CPU backend packs a copy of it for the LM head."""

    def test_plain_reload_leaves_a_tied_head_stale_and_sync_fixes_it(self, tied):
        engine, path = tied
        student = load(path)
        assert student.lm_head.weight is student.model.embed_tokens.weight
        perturb(student, seed=1, scale=0.3)
        llm = engine.backend.llm
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checkpoint_weights(student)})  # vLLM alone
        llm.reset_prefix_cache()
        stale = max_gap(vllm_prompt_logprobs(engine, PROMPTS), hf_prompt_logprobs(student, PROMPTS))
        report("tied head after vLLM's reload_weights alone, max abs diff", stale)
        engine.sync_weights(student)
        gap = max_gap(vllm_prompt_logprobs(engine, PROMPTS), hf_prompt_logprobs(student, PROMPTS))
        report("after sync (tied), prompt log-probs vs the updated student, max abs diff", gap)
        assert stale > 0.05  # why the engine re-packs; if vLLM fixes this, the re-pack is merely redundant
        assert gap < 1e-4

    def test_a_second_sync_follows_a_second_update(self, tied):
        engine, path = tied
        student = load(path)
        for seed in (2, 3):
            perturb(student, seed=seed)
            engine.sync_weights(student)
            assert max_gap(vllm_prompt_logprobs(engine, PROMPTS), hf_prompt_logprobs(student, PROMPTS)) < 1e-4


def test_training_with_the_vllm_engine_learns_and_leaves_the_engine_on_the_final_student(tmp_path):
    from reopold.config.loader import from_dict
    from reopold.config.schema import TrainConfig
    from reopold.train.checkpoint import latest_checkpoint
    from reopold.train.run import train
    from tests.tiny import make_model, tiny_config

    teacher = make_model(tmp_path / "teacher", hidden=64, layers=2, seed=1, sharpness=8.0)
    student = make_model(tmp_path / "student", hidden=64, layers=1, seed=2)  # 2 heads of 32
    config = from_dict(TrainConfig, tiny_config(tmp_path, teacher, student, rollout={"engine": "vllm"},
                                                run={"steps": 6, "eval_every": 3, "save_every": 6}))
    engine, _ = start_engine(student)
    engine.temperature = config.rollout.temperature
    engine.max_new_tokens = config.rollout.max_new_tokens
    with engine:
        run_dir = train(config, engine=engine)  # the trainer syncs after every update
        final = load(latest_checkpoint(run_dir))
        gap = max_gap(vllm_prompt_logprobs(engine, PROMPTS), hf_prompt_logprobs(final, PROMPTS))
    report("after 6 training steps, vLLM vs the saved final student, max abs diff", gap)
    assert gap < 1e-4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kl = [r["reverse_kl"] for r in rows if r["kind"] == "eval"]
    report("held-out reverse KL, step 0 -> 6 (vLLM rollouts)", kl[-1] / kl[0])
    assert kl[-1] < 0.8 * kl[0]


def test_a_lora_run_with_a_vllm_engine_built_from_the_config(tmp_path):
    from reopold.config.loader import from_dict
    from reopold.config.schema import TrainConfig
    from reopold.train.run import train
    from tests.tiny import make_model, tiny_config

    teacher = make_model(tmp_path / "teacher", hidden=64, layers=2, seed=1, sharpness=8.0)
    student = make_model(tmp_path / "student", hidden=64, layers=1, seed=2)
    config = from_dict(TrainConfig, tiny_config(
        tmp_path, teacher, student, rollout={"engine": "vllm", "vllm_cpu_kv_cache_mb": 64},
        lora={"r": 8, "alpha": 16.0}, optim={"lr": 1e-2}, run={"steps": 2, "eval_every": 0, "save_every": 2},
    ))  # fmt: skip
    run_dir = train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in train_rows)


def test_reopold_train_runs_the_shipped_demo_with_the_vllm_engine(tmp_path):
    """The bundled demo pair out of the box (its student has 2 heads of 32): ``reopold train --rollout.engine vllm``
    with the demo config, as a user runs it, in its own process; 3 steps, evaluated on 64 problems."""
    from safetensors.torch import load_file

    from reopold.models.loading import resolve_model
    from reopold.train.checkpoint import latest_checkpoint

    command = [sys.executable, "-m", "reopold", "train", "--rollout.engine", "vllm", "--run.steps", "3",
               "--run.eval_every", "3", "--run.save_every", "3", "--data.eval_problems", "64", "--run.report", "false",
               "--run.output_dir", str(tmp_path), "--run.name", "demo-vllm", "--rollout.vllm_cpu_kv_cache_mb", "64"]
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, timeout=420,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    report("reopold train, 3 demo steps with the vLLM engine, wall seconds", time.perf_counter() - started)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    run_dir = tmp_path / "demo-vllm"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2, 3] and [r["step"] for r in evals] == [0, 3]
    for r in train_rows:
        assert all(math.isfinite(r[key]) for key in ("loss", "reward_mean", "grad_norm", "entropy_mean")), r
        assert r["response_length"] > 10  # the demo student writes scratchpads, not empty answers
    for r in evals:
        assert math.isfinite(r["reverse_kl"]) and r["reverse_kl"] > 0 and 0.0 <= r["accuracy"] <= 1.0, r
    shipped = load_file(Path(resolve_model("demo-student")) / "model.safetensors")
    final = load_file(latest_checkpoint(run_dir) / "model.safetensors")
    assert final.keys() == shipped.keys()
    assert all(torch.isfinite(t).all() for t in final.values())
    change = max(float((final[k] - shipped[k]).abs().max()) for k in shipped)
    steps = sum(r["lr"] for r in train_rows)  # AdamW moves a weight by about lr per step (the warmup's small lrs)
    report("largest weight change after 3 demo steps / the sum of their lrs", change / steps)
    assert 0.3 * steps < change < 3 * steps


def test_training_takes_pi_old_from_the_engine_and_skips_the_pass(tmp_path, monkeypatch):
    """rkl_sg needs no entropies: with an fp32 engine built from the config, every step's pi_old is vLLM's
    sampled-token log-probs (after each weight sync), equal to the student's own pass, which does not run."""
    from reopold.config.loader import from_dict
    from reopold.config.schema import TrainConfig
    from reopold.train.run import train
    from reopold.train.trainer import Trainer
    from tests.tiny import make_model, tiny_config

    teacher = make_model(tmp_path / "teacher", hidden=64, layers=2, seed=1, sharpness=8.0)
    student = make_model(tmp_path / "student", hidden=64, layers=1, seed=2)
    config = from_dict(TrainConfig, tiny_config(
        tmp_path, teacher, student, algo={"name": "rkl_sg"}, rollout={"engine": "vllm", "vllm_cpu_kv_cache_mb": 64},
        optim={"lr": 1e-2}, run={"steps": 3, "eval_every": 0, "save_every": 3},
    ))  # fmt: skip
    old_pass, gaps = Trainer._old_pass, []

    def checked(self, rollout, pi_old):
        old, entropy = old_pass(self, rollout, pi_old)
        assert entropy is None and old is rollout.old_logprobs  # the engine's, no pass
        with torch.no_grad():
            own, _ = self.policy(rollout)
        gaps.append(float((own - old)[rollout.completion_mask].abs().max()))
        return old, entropy

    monkeypatch.setattr(Trainer, "_old_pass", checked)
    train(config)
    report("vLLM's sampled-token log-probs vs the trainer's pass, during 3 rkl_sg steps, max abs diff", max(gaps))
    assert len(gaps) == 3 and max(gaps) < 1e-4


def test_a_script_that_closes_the_engine_exits_cleanly(tmp_path):
    path = make_student(tmp_path / "model", tied=False, seed=3)
    script = textwrap.dedent(f"""
        import torch
        from reopold.tasks import build_tokenizer
        from reopold.rollout.vllm import VLLMRolloutEngine
        from transformers import AutoModelForCausalLM
        engine = VLLMRolloutEngine.offline({str(path)!r}, build_tokenizer(), max_new_tokens=8, **{ENGINE_ARGS!r})
        rollout = engine.generate([[3, 4, 5]], [None], num_samples=4)
        engine.sync_weights(AutoModelForCausalLM.from_pretrained({str(path)!r}))
        engine.close()
        print("rows", len(rollout))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "rows 4"
    assert "Traceback" not in out.stderr


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float = 240.0) -> float:
    """Poll vLLM's GET /health once a second until it answers 200; returns the seconds waited."""
    import urllib.error
    import urllib.request

    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with code {server.returncode} while starting")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the vLLM server at {url} did not answer /health within {timeout} s")


@pytest.mark.slow  # a separate engine process starts in 1-3 minutes here: -m "vllm and slow"
def test_sync_into_a_separate_engine_process_goes_through_a_file(tmp_path):
    path = make_student(tmp_path / "model", tied=True, seed=5)
    script = tmp_path / "sync.py"  # vLLM spawns its engine process: the script needs a __main__ guard
    script.write_text(textwrap.dedent(f"""
        from pathlib import Path
        from tests.test_vllm_real import PROMPTS, hf_prompt_logprobs, load, max_gap, perturb, start_engine
        from tests.test_vllm_real import vllm_prompt_logprobs

        if __name__ == "__main__":
            path = Path({str(path)!r})
            engine, _ = start_engine(path)
            assert not engine.backend.in_process
            student = load(path)
            for seed in (1, 2):
                perturb(student, seed=seed, scale=0.3)
                engine.sync_weights(student)
                print("gap", max_gap(vllm_prompt_logprobs(engine, PROMPTS), hf_prompt_logprobs(student, PROMPTS)))
            folder = engine.backend.sync_dir
            engine.close()
            print("folder left", folder.exists())
    """))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=480, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    gaps = [float(line.split()[1]) for line in lines if line.startswith("gap")]
    assert len(gaps) == 2 and max(gaps) < 1e-4, lines
    assert lines[-1] == "folder left False"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def vllm_server(path: Path, tmp_path: Path):
    """vLLM's OpenAI server for the model at ``path`` on a free loopback port: yields (url, process); stopped with
    the engine process it started."""
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--host",
               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
               "--kv-cache-memory-bytes", str(64 << 20)]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_remote_teacher_against_a_vllm_openai_server_matches_the_local_teacher_and_trains(tmp_path):
    from reopold.teacher.remote import RemoteTeacher

    path = make_student(tmp_path / "teacher", tied=False, seed=4)
    with vllm_server(path, tmp_path) as (url, server):
        report("OpenAI server start-up seconds (until /health answers)", wait_until_healthy(url, server))
        teacher = RemoteTeacher(url, str(path), timeout=60, retries=2)
        tokenizer = build_tokenizer()
        assert teacher.check_tokenizer(tokenizer)  # the server's tokenizer (the saved char tokenizer) agrees
        generator = torch.Generator().manual_seed(0)
        responses = [torch.randint(3, len(tokenizer), (int(n),), generator=generator).tolist() + [1]
                     for n in torch.randint(1, 20, (16,), generator=generator)]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
        rollout = build_rollout(prompts, responses, [None] * 16, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
        remote = teacher.logprobs(rollout)
        local = LocalTeacher(load(path)).logprobs(rollout)
        mask = rollout.completion_mask
        gap = float((remote - local)[mask].abs().max())
        report(f"remote teacher (vLLM server) vs local HF teacher, max abs diff over {int(mask.sum())} tokens", gap)
        assert gap < 1e-4
        assert float(local[mask].std()) > 0.1  # real, varied log-probs, not a constant both sides agree on
        # vLLM returns no covers (reopold serve-teacher's extension): a teacher of another tokenizer served by it
        # reads spans with its own cut (docs/cross_tokenizer.md), and the probe says so without an error.
        assert teacher.supports_cover() is False
        # A few training steps scored by the served teacher (a student of the same vocabulary, HF rollouts).
        from reopold.config.loader import from_dict
        from reopold.config.schema import TrainConfig
        from reopold.train.run import train
        from tests.tiny import make_model, tiny_config

        student = make_model(tmp_path / "student", hidden=32, layers=1, seed=2)
        config = from_dict(TrainConfig, tiny_config(tmp_path, path, student, teacher={"url": url},
                                                    run={"steps": 2, "eval_every": 2, "save_every": 2}))
        rows = [json.loads(line) for line in (train(config) / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if r["kind"] == "train"]
        assert len(steps) == 2 and all(math.isfinite(r["loss"]) and not r["skipped"] for r in steps)
        assert all(math.isfinite(r["reverse_kl"]) for r in rows if r["kind"] == "eval")


def test_covers_from_a_vllm_served_teacher_of_another_tokenizer(tmp_path):
    """A vLLM server returns no covers, so the client takes them from its top-20 prompt_logprobs: a lower bound of
    the local teacher's exact covers, equal where the written token's extensions are all among the 20."""
    from reopold.core.marginal import extensions
    from reopold.tasks.tokenizer import DIGIT_PAIRS
    from reopold.teacher.cross import token_bytes
    from reopold.teacher.remote import RemoteTeacher
    from tests.tiny import make_model

    pairs = build_tokenizer(merges=DIGIT_PAIRS)
    path = make_model(tmp_path / "pair_teacher", hidden=64, layers=2, seed=1, sharpness=8.0, tokenizer=pairs)
    with vllm_server(path, tmp_path) as (url, server):
        wait_until_healthy(url, server)
        teacher = RemoteTeacher(url, str(path), timeout=60, retries=2)
        assert teacher.check_tokenizer(pairs) and teacher.supports_cover() is False
        generator = torch.Generator().manual_seed(0)
        digits = [pairs.convert_tokens_to_ids(c) for c in "0123456789*=;"]
        responses = [[digits[int(i)] for i in torch.randint(len(digits), (int(n),), generator=generator)] + [1]
                     for n in torch.randint(2, 20, (12,), generator=generator)]
        prompts = [pairs("347*26=")["input_ids"]] * 12
        rollout = build_rollout(prompts, responses, [None] * 12, pad_token_id=pairs.pad_token_id,
                                eos_token_id=pairs.eos_token_id)
        table = extensions(token_bytes(pairs))
        remote_lp, remote_cover = teacher.logprobs_and_cover(rollout, table)
        local_lp, local_cover = LocalTeacher(load(path)).logprobs_and_cover(rollout, table)
        mask = rollout.completion_mask
        assert float((remote_lp - local_lp)[mask].abs().max()) < 1e-4
        gap = (local_cover - remote_cover)[mask]
        report(f"vLLM top-20 covers below the exact ones, max nats over {int(mask.sum())} tokens", float(gap.max()))
        report("the same, mean nats", float(gap.mean()))
        assert float(gap.min()) > -1e-4  # a lower bound
        assert float((remote_cover - remote_lp)[mask].max()) > 0.01  # extensions among the candidates do count
