"""Loading student and teacher: Hugging Face causal LMs by name or path, the bundled demo pair, and the checks that
must pass before any expensive work (same vocabulary, EOS and pad set).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

DEMO_DIR = Path(__file__).parent.parent / "assets" / "demo"
VISUAL_DEMO_DIR = Path(__file__).parent.parent / "assets" / "demo-visual"
TOOLS_DEMO_DIR = Path(__file__).parent.parent / "assets" / "demo-tools"
DEMO_MODELS = {"demo-teacher": DEMO_DIR / "teacher", "demo-student": DEMO_DIR / "student",
               "demo-teacher-merges": DEMO_DIR / "teacher-merges",  # the demo teacher, digit+operator tokens
               "demo-visual-teacher": VISUAL_DEMO_DIR / "teacher", "demo-visual-student": VISUAL_DEMO_DIR / "student",
               "demo-tools-teacher": TOOLS_DEMO_DIR / "teacher", "demo-tools-student": TOOLS_DEMO_DIR / "student"}
# Parameters of a vision tower or its projector (Qwen-VL "visual", LLaVA "vision_tower" / "multi_modal_projector").
VISION_MODULES = r".*(visual|vision_tower|vision_model|multi_modal_projector)\b.*"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(name: str) -> str:
    """Map the demo aliases to their bundled directories; fail early on a local path that does not exist.

    Anything that does not look like a local path (no leading ``.``/``/``/``~`` and not an existing directory) is
    passed to ``from_pretrained`` as a hub name.
    """
    if name in DEMO_MODELS:
        path = DEMO_MODELS[name]
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the bundled model {name!r} is missing from {path}; reinstall reopold")
        return str(path)
    expanded = os.path.expanduser(name)
    # Hub names are "name" or "org/name"; anything else is a local directory.
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(expanded).exists()
    if looks_local:
        if not Path(expanded).is_dir():
            raise FileNotFoundError(f"model path {name!r} does not exist; pass a directory saved with save_pretrained")
        if not (Path(expanded) / "config.json").exists():
            raise FileNotFoundError(f"model path {name!r} has no config.json; it is not a Hugging Face model directory")
        return expanded
    check_hub_reachable(name)
    return expanded


def check_hub_reachable(name: str, timeout: float = 5.0) -> None:
    """A hub name must be in the local Hugging Face cache or the hub must answer; otherwise fail in one line now,
    not after transformers' retries (about 70 s). Only a TCP connection is tried: the download itself (and any
    authentication) is left to transformers."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id either
        raise FileNotFoundError(f"model {name!r} is neither a local folder nor a Hugging Face hub name "
                                "(org/name); pass a directory saved with save_pretrained") from None
    if isinstance(cached, str):
        return
    hint = "pass a local directory saved with save_pretrained, or download the model first (huggingface-cli download)"
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"model {name!r} is not a local folder and is not in the Hugging Face cache, and the "
                                f"hub is off (HF_HUB_OFFLINE); {hint}")
    reason = _hub_unreachable(constants.ENDPOINT, timeout)
    if reason:
        raise FileNotFoundError(f"model {name!r} is not a local folder and the Hugging Face hub "
                                f"({constants.ENDPOINT}) cannot be reached ({reason}); {hint}")


_HUB_CHECKED: dict[str, str | None] = {}


def _hub_unreachable(endpoint: str, timeout: float) -> str | None:
    """Why a TCP connection to ``endpoint`` fails (cached per endpoint), or None when it connects."""
    import socket
    from urllib.parse import urlparse

    if endpoint not in _HUB_CHECKED:
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            _HUB_CHECKED[endpoint] = None
        except OSError as err:
            _HUB_CHECKED[endpoint] = (type(err).__name__ if isinstance(err, TimeoutError) else
                                      (err.strerror or type(err).__name__))
    return _HUB_CHECKED[endpoint]


def load_tokenizer(name: str):
    """The tokenizer of a model, with a pad token (EOS when the tokenizer has none) and an EOS token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name!r} has no EOS token; responses could never end. Set eos_token.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(name: str) -> dict:
    """The config.json of a local model folder (empty for a hub name not in the cache)."""
    import json

    path = Path(resolve_model(name)) / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def is_vision_model(name: str) -> bool:
    """True for an image-text-to-text model (its config has a vision part)."""
    config = model_config(name)
    return "vision_config" in config or "image_token_id" in config or "image_token_index" in config


def image_token_ids(name: str) -> dict:
    """The ids a vision-language model gives its image placeholders (from config.json)."""
    config = model_config(name)
    keys = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {k: config[k] for k in keys if k in config}


def load_processor(name: str):
    """The processor of a vision-language model. Qwen2-VL / Qwen2.5-VL get the image-only processor (no
    torchvision: docs/vision.md); others AutoProcessor."""
    path = resolve_model(name)
    if model_config(name).get("model_type") in ("qwen2_vl", "qwen2_5_vl"):
        from reopold.models.vision import _processor_class

        processor = _processor_class().from_pretrained(path)
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return processor


def freeze_vision(model) -> int:
    """Stop gradients to the vision tower and projector; returns the number of frozen parameters."""
    import re

    frozen = 0
    for name, param in model.named_parameters():
        if re.fullmatch(VISION_MODULES, name):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def load_model(name: str, *, dtype: str = "float32", device: torch.device | str = "cpu", trainable: bool = True):
    """A causal LM (or an image-text-to-text model) in ``dtype`` on ``device``; a frozen one (eval mode, no grad)
    when ``trainable`` is False."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got dtype={dtype!r}")
    path = resolve_model(name)
    auto = AutoModelForImageTextToText if is_vision_model(name) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=DTYPES[dtype])
    except Exception as err:  # a cut or corrupt weights file, a hub refusal: one line naming the model
        if not _is_load_error(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the model {name!r} ({type(err).__name__}: {first}); a damaged or incomplete "
                         "weights file?") from err
    model = model.to(device)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def _is_load_error(err: Exception) -> bool:
    import pickle

    return isinstance(err, (OSError, EOFError, pickle.UnpicklingError)) or type(err).__name__ == "SafetensorError"


def check_output_size(model, tokenizer, name: str) -> None:
    """The model must produce a logit for every token id of the tokenizer (padded embeddings are fine)."""
    size = model.get_output_embeddings().weight.shape[0]
    if size < len(tokenizer):
        raise ValueError(f"model {name!r} has {size} output logits but its tokenizer has {len(tokenizer)} tokens")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def apply_lora(model, lora, checkpoint: str | Path | None = None, *, freeze_vision: bool = True):
    """Wrap ``model`` with PEFT LoRA adapters (fresh, or the trainable ones saved in ``checkpoint``). With
    ``freeze_vision`` a vision-language model's vision tower and projector get no adapters."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if checkpoint is not None:
        return PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    targets = lora.target_modules
    has_vision = any(re.fullmatch(VISION_MODULES, name) for name, _ in model.named_modules())
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        exclude_modules=VISION_MODULES if freeze_vision and has_vision else None,  # text models: nothing to exclude
    )  # fmt: skip
    return get_peft_model(model, config)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def merge_adapter(checkpoint: str | Path, output: str | Path, *, base: str | None = None) -> Path:
    """Fold a LoRA checkpoint into its base model and save a plain HF model (with the tokenizer) to ``output``."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not is_adapter_dir(checkpoint):
        raise FileNotFoundError(f"{checkpoint} holds no LoRA adapter (adapter_config.json); nothing to merge")
    base = base or json.loads((Path(checkpoint) / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(resolve_model(base))
    merged = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
    merged.save_pretrained(output)
    AutoTokenizer.from_pretrained(str(checkpoint)).save_pretrained(output)
    return Path(output)
