"""Sampling and scoring agree: the student's log-probs are those of the distribution that sampled the tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from reopold.models.scorer import TokenScorer
from reopold.rollout import HFRolloutEngine, build_rollout, completion_mask_from
from reopold.teacher.local import LocalTeacher
from tests.tiny import make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_model(tmp_path_factory.mktemp("m") / "model", hidden=32, layers=2, seed=3, sharpness=3.0)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_completion_mask_keeps_tokens_up_to_the_first_eos():
    eos = 1
    ids = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(completion_mask_from(ids, eos), expected)


def test_build_rollout_layout():
    # Prompts of length 2 and 1 are left-padded to 2; responses are cut after their first EOS (id 1).
    rollout = build_rollout([[4, 5], [6]], [[7, 1, 9], [8]], ["p", "q"], pad_token_id=0, eos_token_id=1)
    assert rollout.prompt_length == 2
    assert rollout.input_ids.tolist() == [[4, 5, 7, 1, 0], [0, 6, 8, 0, 0]]
    assert rollout.attention_mask.tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 0, 0]]
    assert rollout.completion_mask.tolist() == [[True, True, False], [True, False, False]]
    assert rollout.position_ids.tolist() == [[0, 1, 2, 3, 3], [0, 0, 1, 1, 1]]
    sub = rollout.select([1])
    assert sub.completion_mask.tolist() == [[True]] and sub.input_ids.tolist() == [[0, 6, 8]]


def test_scorer_log_probs_equal_the_sampler_scores(tiny):
    """Left-padded prompts of different lengths, temperature 0.7: the teacher-forced log-prob of every sampled
    token equals log_softmax of the (temperature-scaled) scores generate() sampled it from."""
    model, tokenizer = tiny
    temperature = 0.7
    prompts = [tokenizer(p)["input_ids"] for p in ["12*34=", "5*6=", "123*45="]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=12,
                              pad_token_id=0, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=attention, generation_config=config, output_scores=True,
                         return_dict_in_generate=True)
    sampled = out.sequences[:, width:]  # (B, T)
    expected = torch.stack([torch.log_softmax(s, -1) for s in out.scores], dim=1)  # (B, T, V)
    expected = expected.gather(-1, sampled[..., None]).squeeze(-1)
    rollout = build_rollout(prompts, sampled.tolist(), [None] * 3, pad_token_id=0,
                            eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        logprobs, entropy = TokenScorer(model, temperature=temperature)(rollout)
    mask = rollout.completion_mask
    torch.testing.assert_close(logprobs[mask], expected[:, : mask.shape[1]][mask], atol=1e-5, rtol=0)
    assert bool((entropy[mask] > 0).all())
    teacher = LocalTeacher(model, temperature=temperature, micro_batch_size=2)  # split into micro-batches
    torch.testing.assert_close(teacher.logprobs(rollout)[mask], logprobs[mask], atol=1e-5, rtol=0)


def test_sampling_frequencies_follow_softmax_at_the_temperature(tiny):
    model, tokenizer = tiny
    temperature = 0.3
    prompt = tokenizer("12*3")["input_ids"]
    engine = HFRolloutEngine(model, tokenizer, max_new_tokens=1, temperature=temperature)
    torch.manual_seed(0)
    rollout = engine.generate([prompt], [None], num_samples=4000)
    counts = torch.bincount(rollout.completion_ids[:, 0], minlength=len(tokenizer)).double()
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
    # 4000 draws: the standard error of a frequency is at most 0.008; 0.035 is over 4 of them.
    assert (counts / 4000 - probs).abs().max() < 0.035
    # And not the temperature-1 distribution (the bug class of sampling at one temperature, scoring at another).
    with torch.no_grad():
        probs_t1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
    assert (probs - probs_t1).abs().max() > 0.1
