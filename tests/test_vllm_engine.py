"""VLLMRolloutEngine: the request it sends (plain temperature sampling, token-id prompts), the Rollout it builds, the
weights it pushes (LoRA merged, tied heads re-packed), its version and import guards. These tests use fake ``vllm``
/ TRL client objects; tests/test_vllm_real.py runs a real vLLM (pytest -m vllm, in the environment
scripts/install_vllm.sh builds)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from reopold.rollout import build_rollout
from reopold.rollout.vllm import (
    TRLServer,
    VLLMRolloutEngine,
    check_vllm_version,
    checkpoint_weights,
    repack_shared_weights,
)
from reopold.tasks import build_tokenizer

EOS = 1  # the char tokenizer's <eos>; <pad> is 0


def scripted(prompt: list[int], k: int) -> list[int]:
    """Sample k of a prompt: two digits, then (for even k) EOS and a token after it that the layout must drop."""
    return [4 + k, 5 + prompt[-1] % 5] + ([EOS, 9] if k % 2 == 0 else [])


class FakeLLM:
    """Records what vllm.LLM would be asked; answers with scripted() samples in reversed index order."""

    def __init__(self, model, **kwargs):
        self.init = {"model": model, **kwargs}
        self.calls, self.resets, self.rpcs, self.shutdowns = [], 0, [], 0
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))

    def _shutdown(self):
        self.shutdowns += 1

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append({"prompts": prompts, "params": sampling_params.kwargs, "use_tqdm": use_tqdm})
        n = sampling_params.kwargs["n"]
        return [
            SimpleNamespace(outputs=[SimpleNamespace(index=k, token_ids=tuple(scripted(p["prompt_token_ids"], k)))
                                     for k in reversed(range(n))])
            for p in prompts
        ]  # fmt: skip

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.rpcs.append((method, kwargs))
        return [None]

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__version__ = "0.32.0"
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    module.envs = SimpleNamespace(VLLM_ENABLE_V1_MULTIPROCESSING=False)
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
    assert llm.init == {"model": "/models/student", "gpu_memory_utilization": 0.3,
                        "worker_extension_cls": "reopold.rollout.vllm.WeightSyncExtension",
                        "logprobs_mode": "processed_logprobs"}  # log-probs at the sampling temperature
    (call,) = llm.calls
    assert call["prompts"] == [{"prompt_token_ids": [3, 4, 5]}, {"prompt_token_ids": [6]}]
    assert call["use_tqdm"] is False
    params = call["params"]
    assert params["temperature"] == 0.7 and params["n"] == 3 and params["max_tokens"] == 12
    assert params["top_k"] in (-1, 0) and params["top_p"] == 1.0 and params["min_p"] == 0.0  # truncation off
    assert params["repetition_penalty"] == 1.0 and params["stop_token_ids"] == [EOS]
    assert params["logprobs"] is None and params["detokenize"] is False


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


def test_sync_weights_sends_every_named_parameter_by_name_then_resets_the_prefix_cache(fake_vllm, tokenizer):
    engine = VLLMRolloutEngine.offline("m", tokenizer, max_new_tokens=4)
    student = _student()
    engine.sync_weights(student)
    llm = engine.backend.llm
    ((method, kwargs),) = llm.rpcs
    assert method == "reopold_reload_weights" and set(kwargs) == {"weights"}  # in process: tensors, no callable
    assert [name for name, _ in kwargs["weights"]] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    for (_, sent), param in zip(kwargs["weights"], student.parameters(), strict=True):
        assert torch.equal(sent, param) and not sent.requires_grad
    assert llm.resets == 1


def test_sync_weights_to_an_engine_process_goes_through_a_safetensors_file(fake_vllm, tokenizer):
    from safetensors.torch import load_file

    fake_vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING = True
    engine = VLLMRolloutEngine.offline("m", tokenizer, max_new_tokens=4)
    student = _student()
    engine.sync_weights(student)
    ((method, kwargs),) = engine.backend.llm.rpcs
    assert method == "reopold_reload_weights" and set(kwargs) == {"path"}
    saved = load_file(f"{kwargs['path']}/model.safetensors")
    assert sorted(saved) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert all(torch.equal(saved[name], param) for name, param in student.named_parameters())
    engine.close()
    assert not __import__("os").path.exists(kwargs["path"])  # the hand-over folder goes with the engine


def test_close_shuts_the_engine_down(fake_vllm, tokenizer):
    with VLLMRolloutEngine.offline("m", tokenizer, max_new_tokens=4) as engine:
        pass
    assert engine.backend.llm.shutdowns == 1


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_unchecked_vllm_releases_are_refused_with_the_checked_range(fake_vllm, tokenizer, version):
    fake_vllm.__version__ = version
    with pytest.raises(RuntimeError, match=r"checked against vLLM 0\.32\.x.*vllm>=0\.32,<0\.33"):
        VLLMRolloutEngine.offline("m", tokenizer, max_new_tokens=4)


def test_check_vllm_version_accepts_local_build_suffixes():
    for version in ("0.32.0", "0.32.5+cpu", "0.32.1.dev3"):
        check_vllm_version(version)


def _tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_weights_of_a_full_model_are_its_state_dict_names(tied):
    model = _tiny_llama(tied)
    weights = dict(checkpoint_weights(model))
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert sorted(weights) == sorted(expected)  # a tied head is sent once, as the embedding
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_checkpoint_weights_of_a_lora_model_equal_peft_merge_and_unload():
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(False), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    base = dict(checkpoint_weights(model))  # B starts at zero: the base weights, under their plain names
    with torch.no_grad():  # give the adapters a real update
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = dict(checkpoint_weights(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert sorted(weights) == sorted(merged) == sorted(base)
    assert max(float((weights[k] - merged[k]).abs().max()) for k in merged) < 1e-6
    changed = sorted(k.split(".")[-2] for k in merged if not torch.equal(merged[k], base[k]))
    assert changed == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # not lm_head
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the student keeps its adapters


def test_repack_shared_weights_reprocesses_only_layers_sharing_a_weight():
    processed = []
    method = SimpleNamespace(process_weights_after_loading=lambda layer: processed.append(layer))
    embed, head, other = (torch.nn.Module() for _ in range(3))
    embed.weight = head.weight = torch.nn.Parameter(torch.zeros(2, 2))  # tied
    other.weight = torch.nn.Parameter(torch.zeros(2, 2))
    for layer in (embed, head, other):
        layer.quant_method = method
    model = torch.nn.ModuleDict({"embed": embed, "head": head, "other": other})
    assert repack_shared_weights(model) == 2
    assert processed == [embed, head]


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


def test_logprobs_must_be_at_the_sampling_temperature(fake_vllm, tokenizer):
    with pytest.raises(ValueError, match="processed_logprobs"):
        VLLMRolloutEngine.offline("m", tokenizer, max_new_tokens=4, logprobs=True, logprobs_mode="raw_logprobs")


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, True),  # fp32, no autocast: the engine's log-probs are pi_old (the trainer skips its pass where it can)
    ({"run": {"mixed_precision": "bf16"}}, False),
    ({"student": {"dtype": "bfloat16"}}, False),
    ({"rollout": {"engine": "vllm", "engine_logprobs": False}}, False),
])  # fmt: skip
def test_the_trainer_asks_for_sampled_token_logprobs_only_in_float32(fake_vllm, tokenizer, monkeypatch, overrides,
                                                                     expected):
    from reopold.config.loader import from_dict
    from reopold.config.schema import TrainConfig
    from reopold.train.run import build_engine

    monkeypatch.setattr(VLLMRolloutEngine, "sync_weights", lambda self, model: None)
    data = {"rollout": {"engine": "vllm"}, **overrides}
    engine = build_engine(from_dict(TrainConfig, data), None, "demo-student", tokenizer, "cpu")
    assert engine.logprobs is expected
    assert engine.backend.llm.init["logprobs_mode"] == "processed_logprobs"
