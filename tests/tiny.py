"""Tiny random Llama models with the bundled char tokenizer, built in a temp folder (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reopold.tasks import build_tokenizer


def make_model(path: Path, *, hidden: int, layers: int, seed: int, sharpness: float = 1.0, tokenizer=None) -> Path:
    """Save a random Llama of the given size over ``tokenizer`` (default: the char tokenizer); ``sharpness`` scales
    the output layer (peakier distributions)."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_config(tmp_path: Path, teacher_path: Path, student_path: Path, **sections) -> dict:
    """A config dict for a seconds-long run on the tiny models; ``sections`` update it section by section."""
    config = {
        "student": {"model": str(student_path)},
        "teacher": {"model": str(teacher_path)},
        "data": {"eval_problems": 32, "train_problems": 400, "preflight_problems": 0},
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 4, "max_new_tokens": 24},
        "optim": {"lr": 3e-3, "mini_batch_prompts": 4, "micro_batch_size": 16, "warmup_steps": 0},
        "run": {"steps": 4, "eval_every": 2, "save_every": 2, "output_dir": str(tmp_path / "runs"),
                "progress": False, "report": False, "keep_checkpoints": 10},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config
