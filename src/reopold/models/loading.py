"""Loading student and teacher: Hugging Face causal LMs by name or path, the bundled demo pair, and the checks that
must pass before any expensive work (same vocabulary, EOS and pad set).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DEMO_DIR = Path(__file__).parent.parent / "assets" / "demo"
DEMO_MODELS = {"demo-teacher": DEMO_DIR / "teacher", "demo-student": DEMO_DIR / "student",
               "demo-teacher-merges": DEMO_DIR / "teacher-merges"}  # the demo teacher, digit+operator tokens
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


def load_tokenizer(name: str):
    """The tokenizer of a model, with a pad token (EOS when the tokenizer has none) and an EOS token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name!r} has no EOS token; responses could never end. Set eos_token.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, *, dtype: str = "float32", device: torch.device | str = "cpu", trainable: bool = True):
    """A causal LM in ``dtype`` on ``device``; a frozen one (eval mode, no grad) when ``trainable`` is False."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got dtype={dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=DTYPES[dtype]).to(device)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_name: str, teacher_name: str) -> None:
    """Teacher log-probs are looked up by the student's token ids, so both must mean the same thing by each id."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    only_student = sorted(set(student_vocab) - set(teacher_vocab))[:5]
    only_teacher = sorted(set(teacher_vocab) - set(student_vocab))[:5]
    moved = sorted(t for t in set(student_vocab) & set(teacher_vocab) if student_vocab[t] != teacher_vocab[t])[:5]
    raise ValueError(
        f"student {student_name!r} ({len(student_vocab)} tokens) and teacher {teacher_name!r} ({len(teacher_vocab)} "
        f"tokens) have different vocabularies: only in the student {only_student}, only in the teacher "
        f"{only_teacher}, different ids for {moved}. Use a teacher and student from the same model family "
        "(cross-tokenizer distillation is not supported yet)."
    )


def check_output_size(model, tokenizer, name: str) -> None:
    """The model must produce a logit for every token id of the tokenizer (padded embeddings are fine)."""
    size = model.get_output_embeddings().weight.shape[0]
    if size < len(tokenizer):
        raise ValueError(f"model {name!r} has {size} output logits but its tokenizer has {len(tokenizer)} tokens")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def apply_lora(model, lora, checkpoint: str | Path | None = None):
    """Wrap ``model`` with PEFT LoRA adapters (fresh, or the trainable ones saved in ``checkpoint``)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if checkpoint is not None:
        return PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
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
