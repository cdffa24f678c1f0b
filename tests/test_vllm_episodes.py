"""Multi-turn episodes with a real vLLM as the turn sampler: every turn is sampled by vLLM, observations are
appended as context, and vLLM's sampled-token log-probs are stitched into pi_old at the student's tokens only.
Needs vLLM (scripts/install_vllm.sh); run with
``.venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_episodes.py``."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs vLLM: scripts/install_vllm.sh")

os.environ.setdefault("OMP_NUM_THREADS", "1")

from reopold.models.scorer import TokenScorer  # noqa: E402
from reopold.rollout.episodes import EpisodeEngine  # noqa: E402
from reopold.rollout.turns import PlainFormat  # noqa: E402
from reopold.tasks import ArithmeticTask, build_tokenizer  # noqa: E402
from tests.test_episodes_training import Counter  # noqa: E402
from tests.test_vllm_real import TEMPERATURE, load, make_student, report, start_engine  # noqa: E402


def test_vllm_samples_every_turn_and_its_logprobs_are_pi_old(tmp_path):
    path = make_student(tmp_path / "model", tied=False, seed=3)
    engine, _ = start_engine(path, logprobs=True)
    try:
        tokenizer = build_tokenizer()
        episodes = EpisodeEngine(engine, tokenizer, Counter, PlainFormat(tokenizer), max_turns=3)
        problems = ArithmeticTask().problems("train", 6)
        rollout = episodes.generate([[]] * 6, problems, num_samples=2)
    finally:
        engine.close()
    assert rollout.episode_stats["turns_mean"] == 3 and rollout.old_logprobs is not None
    observed = ~rollout.completion_mask & rollout.attention_mask[:, rollout.prompt_length :].bool()
    assert observed.sum() >= 12 * 6  # two observations of at least three tokens ("{1}", "{2}") per episode
    assert (rollout.old_logprobs[observed] == 0).all()
    # vLLM's log-probs of the sampled tokens equal the Hugging Face student's teacher-forced ones over the whole
    # interleaved sequence (observations as context) at the sampling temperature.
    scored, _ = TokenScorer(load(path), temperature=TEMPERATURE)(rollout)
    gap = float((scored - rollout.old_logprobs)[rollout.completion_mask].abs().max())
    report("vLLM episode pi_old vs HF, max |diff| over sampled tokens", gap)
    assert gap < 1e-4
