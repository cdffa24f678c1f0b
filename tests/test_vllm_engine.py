"""VLLMRolloutEngine: the request it sends (plain temperature sampling, token-id prompts), the Rollout it builds, the
weights it pushes, and its import guard. CPU tests use fake ``vllm`` / TRL client objects; the ``gpu`` tests run a
real vLLM against the Hugging Face model (pytest -m gpu)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from reopold.rollout import build_rollout
from reopold.rollout.vllm import OfflineLLM, TRLServer, VLLMRolloutEngine
from reopold.tasks import build_tokenizer

EOS = 1  # the char tokenizer's <eos>; <pad> is 0


def scripted(prompt: list[int], k: int) -> list[int]:
    """Sample k of a prompt: two digits, then (for even k) EOS and a token after it that the layout must drop."""
    return [4 + k, 5 + prompt[-1] % 5] + ([EOS, 9] if k % 2 == 0 else [])


class FakeLLM:
    """Records what vllm.LLM would be asked; answers with scripted() samples in reversed index order."""

    def __init__(self, model, **kwargs):
        self.init = {"model": model, **kwargs}
        self.calls, self.resets = [], 0
        self.model = SimpleNamespace(loaded=[], load_weights=lambda weights: self.model.loaded.append(list(weights)))

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append({"prompts": prompts, "params": sampling_params.kwargs, "use_tqdm": use_tqdm})
        n = sampling_params.kwargs["n"]
        return [
            SimpleNamespace(outputs=[SimpleNamespace(index=k, token_ids=tuple(scripted(p["prompt_token_ids"], k)))
                                     for k in reversed(range(n))])
            for p in prompts
        ]  # fmt: skip

    def apply_model(self, func):
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_request_is_plain_temperature_sampling_from_token_ids(fake_vllm, tokenizer):
    engine = VLLMRolloutEngine.offline("/models/student", tokenizer, max_new_tokens=12, temperature=0.7,
                                       gpu_memory_utilization=0.3)
    prompts = [[3, 4, 5], [6]]
    engine.generate(prompts, ["p", "q"], num_samples=3)
    llm = engine.backend.llm
    assert llm.init == {"model": "/models/student", "gpu_memory_utilization": 0.3}
    (call,) = llm.calls
    assert call["prompts"] == [{"prompt_token_ids": [3, 4, 5]}, {"prompt_token_ids": [6]}]
    assert call["use_tqdm"] is False
    params = call["params"]
    assert params["temperature"] == 0.7 and params["n"] == 3 and params["max_tokens"] == 12
    assert params["top_k"] in (-1, 0) and params["top_p"] == 1.0 and params["min_p"] == 0.0  # truncation off
    assert params["repetition_penalty"] == 1.0 and params["stop_token_ids"] == [EOS]
    assert params["logprobs"] is None


def test_rollout_layout_matches_build_rollout(fake_vllm, tokenizer):
    engine = VLLMRolloutEngine.offline("m", tokenizer, max_new_tokens=8)
    prompts, problems = [[3, 4, 5], [6]], ["p", "q"]
    rollout = engine.generate(prompts, problems, num_samples=2)
    # Rows are prompt-major (p0 s0, p0 s1, p1 s0, p1 s1) and samples sorted by vLLM's index, not arrival order.
    responses = [scripted([3, 4, 5], 0), scripted([3, 4, 5], 1), scripted([6], 0), scripted([6], 1)]
    expected = build_rollout([prompts[0]] * 2 + [prompts[1]] * 2, responses, ["p", "p", "q", "q"], pad_token_id=0,
                             eos_token_id=EOS, tokenizer=tokenizer)
    for name in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(getattr(rollout, name), getattr(expected, name)), name
    assert (rollout.prompt_length, rollout.problems, rollout.texts) == (3, ["p", "p", "q", "q"], expected.texts)
    # By hand: row 2 is prompt [6] left-padded to 3, then sample 0 = [4, 6, EOS, 9] cut after EOS and padded.
    assert rollout.input_ids[2].tolist() == [0, 0, 6, 4, 6, EOS, 0]
    assert rollout.completion_mask[2].tolist() == [True, True, True, False]
    assert rollout.completion_mask[3].tolist() == [True, True, False, False]  # sample 1 sampled no EOS


def test_rollout_lands_on_the_requested_device(fake_vllm, tokenizer):
    engine = VLLMRolloutEngine.offline("m", tokenizer, max_new_tokens=4, device="meta")
    rollout = engine.generate([[3, 4]], ["p"], num_samples=2)
    assert {t.device.type for t in (rollout.input_ids, rollout.attention_mask, rollout.completion_mask)} == {"meta"}


def test_missing_sample_count_is_an_error(fake_vllm, tokenizer):
    engine = VLLMRolloutEngine.offline("m", tokenizer, max_new_tokens=4)
    engine.backend.llm.generate = lambda prompts, sampling_params, use_tqdm: [
        SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[4])])]
    with pytest.raises(RuntimeError, match="asked for n=2"):
        engine.generate([[3]], ["p"], num_samples=2)


def test_temperature_zero_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        VLLMRolloutEngine(backend=None, tokenizer=tokenizer, max_new_tokens=4, temperature=0.0)


def _student():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))


def test_sync_weights_loads_every_named_parameter_then_resets_the_prefix_cache(fake_vllm, tokenizer):
    engine = VLLMRolloutEngine.offline("m", tokenizer, max_new_tokens=4)
    student = _student()
    engine.sync_weights(student)
    llm = engine.backend.llm
    (loaded,) = llm.model.loaded
    assert [name for name, _ in loaded] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    for (_, sent), param in zip(loaded, student.parameters(), strict=True):
        assert torch.equal(sent, param) and not sent.requires_grad
    assert llm.resets == 1


def test_sync_weights_on_a_v0_engine_uses_the_driver_worker_model(fake_vllm, tokenizer):
    model = SimpleNamespace(loaded=[])
    model.load_weights = lambda weights: model.loaded.append(list(weights))
    resets = []
    worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
    llm = SimpleNamespace(llm_engine=SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker)),
                          reset_prefix_cache=lambda: resets.append(1))  # no apply_model: a V0 LLM
    engine = VLLMRolloutEngine(OfflineLLM(llm), tokenizer, max_new_tokens=4)
    engine.sync_weights(_student())
    assert [name for name, _ in model.loaded[0]] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert resets == [1]


class FakeClient:
    """TRL's VLLMClient surface: generate returns prompt-major completions; old=True mimics an old release."""

    def __init__(self, old: bool = False):
        self.old, self.calls, self.log = old, [], []
        if old:
            self.init_communicator = lambda: self.log.append(("init", None))

    def generate(self, prompts, **kwargs):
        self.calls.append({"prompts": prompts, **kwargs})
        completions = [scripted(p, k) for p in prompts for k in range(kwargs["n"])]
        return completions if self.old else {"prompt_ids": prompts, "completion_ids": completions, "logprobs": None}

    def init_communicator(self, device=0):
        self.log.append(("init", device))

    def update_model_params(self, model):
        self.log.append(("update", model))

    def reset_prefix_cache(self):
        self.log.append(("reset", None))


@pytest.mark.parametrize("old", [False, True])
def test_server_backend_request_layout_and_weight_push(tokenizer, old):
    client = FakeClient(old=old)
    engine = VLLMRolloutEngine(TRLServer(client), tokenizer, max_new_tokens=8, temperature=0.6)
    prompts = [[3, 4, 5], [6]]
    rollout = engine.generate(prompts, ["p", "q"], num_samples=2)
    (call,) = client.calls
    assert call == {"prompts": prompts, "n": 2, "repetition_penalty": 1.0, "temperature": 0.6, "top_p": 1.0,
                    "top_k": -1, "min_p": 0.0, "max_tokens": 8}
    assert rollout.input_ids[2].tolist() == [0, 0, 6, 4, 6, EOS, 0]
    student = _student()
    engine.sync_weights(student)
    engine.sync_weights(student)
    device = None if old else torch.device("cpu")
    assert client.log == [("init", device), ("update", student), ("reset", None), ("update", student),
                          ("reset", None)]  # the communicator is set up once


def test_missing_vllm_names_the_extra(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'reopold\[vllm\]'"):
        VLLMRolloutEngine.offline("m", tokenizer, max_new_tokens=4)


def test_missing_trl_names_the_extras(monkeypatch, tokenizer):
    for name in ("trl", "trl.generation", "trl.generation.vllm_client", "trl.extras", "trl.extras.vllm_client"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'reopold\[vllm\]'.*pip install 'reopold\[trl\]'"):
        VLLMRolloutEngine.server("http://localhost:8000", tokenizer, max_new_tokens=4)


def test_importing_the_module_does_not_import_vllm_or_trl():
    code = (
        "import json, sys; import reopold, reopold.rollout.vllm; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'trl'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# ---- real vLLM (pytest -m gpu) ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_engine(tmp_path_factory):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from transformers import AutoModelForCausalLM

    from tests.tiny import make_model

    path = make_model(tmp_path_factory.mktemp("m") / "model", hidden=128, layers=2, seed=3, sharpness=3.0)
    engine = VLLMRolloutEngine.offline(path, build_tokenizer(), max_new_tokens=1, temperature=0.5, dtype="float32",
                                       gpu_memory_utilization=0.2, enforce_eager=True, skip_tokenizer_init=True)
    return engine, AutoModelForCausalLM.from_pretrained(path).eval()


def _frequencies_match(engine, model, prompt, temperature):
    rollout = engine.generate([prompt] * 8, [None] * 8, num_samples=500)  # 4000 draws
    counts = torch.bincount(rollout.completion_ids[:, 0], minlength=model.config.vocab_size).double()
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
    # The standard error of a frequency over 4000 draws is at most 0.008; 0.035 is over 4 of them.
    return float((counts / 4000 - probs).abs().max())


@pytest.mark.gpu
def test_vllm_samples_from_softmax_at_the_temperature(real_engine):
    engine, model = real_engine
    assert _frequencies_match(engine, model, [3, 4, 13, 5], engine.temperature) < 0.035


@pytest.mark.gpu
def test_sync_weights_changes_what_vllm_samples(real_engine):
    engine, model = real_engine
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # a different distribution: the old weights would fail the check below
    engine.sync_weights(model)
    assert _frequencies_match(engine, model, [3, 4, 13, 5], engine.temperature) < 0.035
