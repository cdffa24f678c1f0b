"""Qwen2.5-VL positions: the teacher-forced pass must see the same 3-D (mrope) positions as generate().

Qwen2.5-VL computes mrope positions only when ``mm_token_type_ids`` is passed; without it the forward pass
silently uses 1-D positions (no error). These tests pin that on a tiny model built here: log-probs of the
sampled tokens from one forced pass over prompt + completion equal the log-probs of ``generate()``'s raw
logits (``output_logits=True``), and dropping ``mm_token_type_ids`` changes them.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")

from reopold.models.vision import (  # noqa: E402
    IMAGE_PAD,
    build_processor,
    build_tiny_vlm,
    build_vlm_tokenizer,
    forced_inputs,
    load_vlm,
    never_sampled_ids,
    pixel_values_per_image,
    save_vlm,
)
from reopold.tasks.visual import VisualAdditionTask  # noqa: E402

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    processor = build_processor(build_vlm_tokenizer())
    model = build_tiny_vlm(processor.tokenizer, hidden=32, layers=2, heads=4, kv_heads=2, seed=0).eval()
    # Sharpen the random init (std 0.02 gives near-uniform logits) so position effects are well above float noise.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    task = VisualAdditionTask()
    problems = task.problems("test", 3)
    messages = [task.messages(p) for p in problems]
    messages[1][0]["content"][1]["text"] = "add"  # a shorter prompt: rows are left-padded differently
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    enc = processor(text=texts, images=[p.image for p in problems], return_tensors="pt", padding=True)
    return model, processor, enc


def _sample(model, processor, enc):
    """Sampled completions and the log-probs of their tokens under generate()'s raw logits."""
    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    out = model.generate(
        **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS, suppress_tokens=never_sampled_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        output_logits=True, return_dict_in_generate=True,
    )
    completion = out.sequences[:, enc["input_ids"].shape[1]:]  # (B, N)
    raw = torch.stack(out.logits, dim=1).log_softmax(-1)  # (B, N, V): raw logits, before suppress_tokens
    return completion, raw.gather(-1, completion.unsqueeze(-1)).squeeze(-1)  # (B, N)


def _forced(model, enc, completion, *, with_mm_types: bool):
    """Log-probs of ``completion`` from one teacher-forced pass (no KV cache) over prompt + completion."""
    prompt_len = enc["input_ids"].shape[1]
    kwargs = forced_inputs(enc, completion, torch.ones_like(completion))
    if not with_mm_types:
        del kwargs["mm_token_type_ids"]
    with torch.no_grad():
        logits = model(**kwargs).logits  # (B, P + N, V)
    logprobs = logits[:, prompt_len - 1:-1].log_softmax(-1)  # (B, N, V): position t predicts token t + 1
    return logprobs.gather(-1, completion.unsqueeze(-1)).squeeze(-1)


def test_processor_expands_image_tokens_and_marks_them(setup):
    _, processor, enc = setup
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    # 56x56 image -> grid (1, 4, 4) patches -> 16 / merge 2**2 = 4 image tokens per row.
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]] * 3
    assert tuple(enc["pixel_values"].shape) == (3 * 16, 3 * 2 * 14 * 14)
    assert (enc["input_ids"] == image_id).sum(dim=1).tolist() == [4, 4, 4]
    assert torch.equal(enc["mm_token_type_ids"].bool(), enc["input_ids"] == image_id)
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] - lengths[1] == len("add the numbers") - len("add")  # left-padded, not truncated


def test_mrope_sections_sum_to_half_head_dim(setup):
    model, _, _ = setup
    text = model.config.text_config
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2 == 4


def test_forced_pass_matches_generate_raw_logits(setup):
    model, processor, enc = setup
    completion, generated = _sample(model, processor, enc)
    assert not torch.isin(completion, torch.tensor(never_sampled_ids(processor.tokenizer))).any()
    forced = _forced(model, enc, completion, with_mm_types=True)
    assert generated.shape == forced.shape == (3, NEW_TOKENS)
    assert (forced - generated).abs().max().item() < 1e-5


def test_forced_pass_without_mm_token_type_ids_is_silently_wrong(setup):
    model, processor, enc = setup
    completion, generated = _sample(model, processor, enc)
    wrong = _forced(model, enc, completion, with_mm_types=False)  # runs without any error...
    diff = (wrong - generated).abs()
    # ...but with 1-D positions: a 2x2 image grid spans 2 mrope positions instead of 4, so every completion
    # token sits 2 positions later than at sampling time (more in the left-padded row).
    assert diff.max().item() > 1e-3
    assert (diff > 1e-5).float().mean().item() > 0.5


def test_forced_pass_with_precomputed_positions_matches(setup):
    """The alternative to passing mm_token_type_ids: 3-D position ids from get_rope_index, (3, B, T)."""
    model, processor, enc = setup
    completion, generated = _sample(model, processor, enc)
    kwargs = forced_inputs(enc, completion, torch.ones_like(completion))
    positions, _ = model.model.get_rope_index(kwargs["input_ids"], mm_token_type_ids=kwargs.pop("mm_token_type_ids"),
                                              image_grid_thw=kwargs["image_grid_thw"],
                                              attention_mask=kwargs["attention_mask"])
    assert positions.shape == (3, *kwargs["input_ids"].shape)
    with torch.no_grad():
        logits = model(**kwargs, position_ids=positions).logits
    forced = logits[:, enc["input_ids"].shape[1] - 1:-1].log_softmax(-1).gather(-1, completion.unsqueeze(-1))
    assert (forced.squeeze(-1) - generated).abs().max().item() < 1e-5


def test_pixel_values_follow_their_rows(setup):
    """Selecting rows = re-joining those rows' image blocks; it equals processing the rows alone."""
    model, processor, enc = setup
    blocks = pixel_values_per_image(enc["pixel_values"], enc["image_grid_thw"])
    assert [b.shape[0] for b in blocks] == [16, 16, 16]
    keep = [2, 0]
    sub = {k: enc[k][keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    sub["image_grid_thw"] = enc["image_grid_thw"][keep]
    sub["pixel_values"] = torch.cat([blocks[i] for i in keep])
    with torch.no_grad():
        full = model(**enc).logits[keep]
        selected = model(**sub).logits
    assert (full - selected).abs().max().item() < 1e-5
    with pytest.raises(KeyError, match="mm_token_type_ids"):
        forced_inputs({k: v for k, v in enc.items() if k != "mm_token_type_ids"}, enc["input_ids"][:, :1],
                      torch.ones_like(enc["input_ids"][:, :1]))


def test_save_and_load_round_trip(setup, tmp_path):
    model, processor, enc = setup
    save_vlm(model, processor, tmp_path)
    loaded, loaded_processor = load_vlm(tmp_path)
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert not hasattr(loaded_processor, "video_processor")
    with torch.no_grad():
        a = model(**enc).logits
        b = loaded.eval()(**enc).logits
    assert torch.equal(a, b)


def test_visual_task_answer_needs_the_image():
    task = VisualAdditionTask()
    problems = task.problems("test", 50)
    assert len({p.prompt for p in problems}) == 1  # the text is the same for every problem...
    assert len({p.answer for p in problems}) > 10  # ...so only the image tells the answers apart
    p = problems[0]
    a, b = p.numbers
    assert task.check(p, task.solution(p)) and p.answer == str(a + b)
    assert not task.check(p, task.solution(p).replace(f":{a + b}", f":{a + b + 1}"))
    assert task.parse_answer("12+34=4+2=6:46:46") is None  # exactly one ':' before the answer
    splits = {s: {tuple(sorted(q.numbers)) for q in task.problems(s, 100)} for s in ("train", "validation", "test")}
    assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["validation"])
    rng = random.Random(0)
    x, y = task.make_problem(47, 36, rng), task.make_problem(47, 36, rng)
    assert x.image.shape == (56, 56, 3) and x.image.dtype.name == "uint8"
    assert not (x.image == y.image).all()  # fresh colours / jitter per draw
