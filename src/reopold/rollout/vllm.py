"""Rollouts with vLLM: the same ``generate(prompt_ids, problems, *, num_samples) -> Rollout`` as HFRolloutEngine, plus
``sync_weights(model)`` to push the student's weights into the engine after each update.

Two backends, chosen by constructor:

    VLLMRolloutEngine.offline(model_path, tokenizer, ...)  a colocated ``vllm.LLM`` in this process (one GPU, TP=1)
    VLLMRolloutEngine.server(base_url, tokenizer, ...)     a separate server driven by TRL's ``VLLMClient``

vLLM and TRL are imported only inside this module's constructors, so ``import reopold.rollout.vllm`` works without
them. vLLM pins its own torch/transformers (vLLM 0.33 pins torch 2.14 and
transformers < 5.21), so it lives in a separate environment from the CPU stack: ``pip install 'reopold[vllm]'``.

What was checked, and where (read, not run: no GPU and no vLLM install on the machine this was written on; the
``gpu``-marked tests in tests/test_vllm_engine.py are the end-to-end check):

- ``SamplingParams`` (vllm/sampling_params.py on main; docs.vllm.ai/en/v0.8.3/api/inference_params.html): fields
  ``n, temperature, top_p, top_k, min_p, repetition_penalty, max_tokens, stop_token_ids, logprobs, detokenize``.
  ``top_k`` defaulted to -1 (disabled) up to about v0.8 and 0 later; main "quietly accept[s] -1 as disabled, but
  prefer[s] 0" while older releases reject 0, so -1 is the value that disables top-k on every version.
  ``temperature`` < 1e-5 means greedy and forces n=1; values in (0, 0.01) are clamped up to 0.01; > 2 is rejected.
  ``logprobs=None`` returns none: the trainer rescores pi_old itself at the sampling temperature (vLLM's default
  ``logprobs_mode`` reports raw, untempered log-probs, and its bf16 kernels differ from the training forward).
- Token-id prompts: ``LLM.generate`` accepts ``TokensPrompt`` dicts ``{"prompt_token_ids": [...]}`` (vllm.inputs;
  TRL's colocate path passes the same dicts) and returns one ``RequestOutput`` per prompt in input order, with
  ``.outputs`` holding the n ``CompletionOutput``s (``.index``, ``.token_ids``; an EOS that stopped generation is
  included in ``token_ids``). TRL notes that a non-FINAL_ONLY output kind can drop some of the n on the async
  server path, so the count is checked here.
- Weight reload into a running LLM: ``LLM.apply_model(func)`` "Run[s] a function directly on the model inside each
  worker" (vllm/entrypoints/llm.py, V1 engine); older V0 releases expose the model only through
  ``llm.llm_engine.model_executor.driver_worker.model_runner.model`` (the route TRL's GRPO colocate mode and
  vllm-project/vllm#5723 use). Either way the model's ``load_weights(iterable of (hf_name, tensor))`` takes
  Hugging Face parameter names and fuses q/k/v and gate/up itself. With V1's default multiprocess engine core the
  function and tensors are pickled into the engine process: set ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` to keep the
  engine in-process (no copy), or ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` to allow the pickling. The prefix cache
  holds KV computed with the old weights, so ``LLM.reset_prefix_cache()`` follows every reload (as TRL does).
  Newer vLLM also has a pluggable weight-transfer API (``WeightTransferConfig(backend="ipc"|"nccl")``,
  docs/training/weight_transfer/) for trainers in another process; it is not used here.
- Server mode: TRL's ``VLLMClient`` (``trl.generation.vllm_client`` in current TRL, ``trl.extras.vllm_client``
  before) with ``generate(prompts, n=, repetition_penalty=, temperature=, top_p=, top_k=, min_p=, max_tokens=)``
  (prompt-major results: the n completions of a prompt are consecutive; a list of completion ids in old releases, a
  dict with ``"completion_ids"`` in new ones), ``init_communicator(device=)`` (no argument in old releases),
  ``update_model_params(model)`` (NCCL broadcast, needs CUDA) and ``reset_prefix_cache()``. Token-id prompts need a
  TRL whose client accepts ``list[list[int]]`` prompts; old releases took text only. Start the server with
  ``trl vllm-serve --model PATH`` (old TRL) or ``VLLM_SERVER_DEV_MODE=1 vllm serve PATH --weight-transfer-config
  '{"backend": "nccl"}'`` (current TRL).

Known differences from HFRolloutEngine: vLLM also stops at EOS ids from the model's generation_config (the mask
stays right because responses are laid out by their real length), and its sampling is not bit-reproducible from
the trainer's torch seed.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch

from reopold.rollout.batch import Rollout, build_rollout

INSTALL_HINT = "pip install 'reopold[vllm]' (vLLM needs an NVIDIA GPU and CUDA)"


def _import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"VLLMRolloutEngine needs vLLM, which is not installed: {INSTALL_HINT}") from error
    return vllm


def _import_vllm_client():
    try:
        from trl.generation.vllm_client import VLLMClient
    except ImportError:
        try:
            from trl.extras.vllm_client import VLLMClient
        except ImportError as error:
            raise ImportError(
                f"VLLMRolloutEngine.server needs TRL's VLLMClient, which is not installed: {INSTALL_HINT} and "
                "pip install 'reopold[trl]'"
            ) from error
    return VLLMClient


def sampling_request(*, num_samples: int, temperature: float, max_tokens: int, stop_token_ids: list[int]) -> dict:
    """Keyword arguments for ``vllm.SamplingParams``: plain temperature sampling from the full distribution.

    top-k, top-p, min-p and the repetition penalty are pinned off because the trainer scores the sampled tokens
    under softmax(logits / temperature); the sampler must draw from exactly that distribution.
    """
    return {
        "n": num_samples, "temperature": temperature, "top_k": -1, "top_p": 1.0, "min_p": 0.0,
        "repetition_penalty": 1.0, "max_tokens": max_tokens, "stop_token_ids": stop_token_ids, "logprobs": None,
        "detokenize": False,
    }  # fmt: skip


def _load_weights(weights: list[tuple[str, torch.Tensor]], model) -> None:
    model.load_weights(weights=weights)


class OfflineLLM:
    """A ``vllm.LLM`` in this process (colocated with the trainer on one GPU)."""

    def __init__(self, llm):
        self.llm = llm
        self.vllm = _import_vllm()

    def sample(self, prompt_ids: list[list[int]], request: dict) -> list[list[int]]:
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]  # vllm.inputs.TokensPrompt
        outputs = self.llm.generate(prompts, sampling_params=self.vllm.SamplingParams(**request), use_tqdm=False)
        completions = []
        for output in outputs:
            if len(output.outputs) != request["n"]:
                raise RuntimeError(f"vLLM returned {len(output.outputs)} samples for a prompt; asked for "
                                   f"n={request['n']}")
            completions += [list(c.token_ids) for c in sorted(output.outputs, key=lambda c: c.index)]
        return completions

    def load_weights(self, model: torch.nn.Module) -> None:
        weights = [(name, param.detach()) for name, param in model.named_parameters()]
        if hasattr(self.llm, "apply_model"):  # V1: runs in the worker (pickled there when multiprocess)
            self.llm.apply_model(partial(_load_weights, weights))
        else:  # V0: the worker lives in this process
            _load_weights(weights, self.llm.llm_engine.model_executor.driver_worker.model_runner.model)
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights


class TRLServer:
    """A vLLM server reached through TRL's ``VLLMClient`` (HTTP for sampling, NCCL for weights)."""

    def __init__(self, client):
        self.client = client
        self.communicator_ready = False

    def sample(self, prompt_ids: list[list[int]], request: dict) -> list[list[int]]:
        keys = ("n", "repetition_penalty", "temperature", "top_p", "top_k", "min_p", "max_tokens")  # every version
        out = self.client.generate([list(ids) for ids in prompt_ids], **{k: request[k] for k in keys})
        completions = out["completion_ids"] if isinstance(out, dict) else out  # dict in new TRL, list in old
        if len(completions) != len(prompt_ids) * request["n"]:
            raise RuntimeError(f"the server returned {len(completions)} completions for {len(prompt_ids)} prompts "
                               f"x n={request['n']}")
        return [list(c) for c in completions]

    def load_weights(self, model: torch.nn.Module) -> None:
        if not self.communicator_ready:
            if "device" in inspect.signature(self.client.init_communicator).parameters:
                self.client.init_communicator(device=next(model.parameters()).device)
            else:
                self.client.init_communicator()
            self.communicator_ready = True
        self.client.update_model_params(model)
        self.client.reset_prefix_cache()


class VLLMRolloutEngine:
    """Samples n answers per prompt with vLLM at ``temperature`` from the model's full distribution.

    ``backend`` is an OfflineLLM or a TRLServer (or anything with their ``sample`` and ``load_weights``); the
    ``offline`` and ``server`` constructors build them. Call ``sync_weights(student)`` after every optimizer update
    (and once before the first rollout when the engine was not started from the student's current weights), with
    the plain Hugging Face model, not a DDP/accelerate wrapper: parameter names must be the checkpoint's. Rollouts
    are returned on ``device`` (the trainer's, e.g. ``accelerator.device``), as HFRolloutEngine returns them on the
    model's.
    """

    def __init__(self, backend, tokenizer, *, max_new_tokens: int, temperature: float = 1.0,
                 device: torch.device | str = "cpu"):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampled rollouts; got {temperature} (vLLM treats 0 as "
                             "greedy and then allows only one sample per prompt)")
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device = device

    @classmethod
    def offline(cls, model_path: str, tokenizer, *, max_new_tokens: int, temperature: float = 1.0,
                device: torch.device | str = "cpu", **llm_kwargs):
        """A colocated ``vllm.LLM(model=model_path, **llm_kwargs)``; pass e.g. ``gpu_memory_utilization=0.3`` to
        leave room for training, ``dtype="bfloat16"``, ``max_model_len=``."""
        llm = _import_vllm().LLM(model=str(model_path), **llm_kwargs)
        return cls(OfflineLLM(llm), tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, device=device)

    @classmethod
    def server(cls, base_url: str, tokenizer, *, max_new_tokens: int, temperature: float = 1.0,
               device: torch.device | str = "cpu", connection_timeout: float = 240.0):
        """A running vLLM server at ``base_url`` (see the module docstring for how to start it)."""
        client = _import_vllm_client()(base_url=base_url, connection_timeout=connection_timeout)
        return cls(TRLServer(client), tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, device=device)

    def generate(self, prompt_ids: list[list[int]], problems: list, *, num_samples: int = 1) -> Rollout:
        eos = self.tokenizer.eos_token_id
        stop_token_ids = list(eos) if isinstance(eos, list) else [eos]
        request = sampling_request(num_samples=num_samples, temperature=self.temperature,
                                   max_tokens=self.max_new_tokens, stop_token_ids=stop_token_ids)
        completions = self.backend.sample(prompt_ids, request)  # (B * n,) prompt-major
        rows = [i for i in range(len(prompt_ids)) for _ in range(num_samples)]  # the n samples of a prompt together
        rollout = build_rollout(
            [prompt_ids[i] for i in rows], completions, [problems[i] for i in rows],
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos, tokenizer=self.tokenizer,
        )  # fmt: skip
        return rollout.to(self.device)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current parameters into the engine; later rollouts sample from them."""
        with torch.no_grad():
            self.backend.load_weights(model)
