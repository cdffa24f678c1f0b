"""A teacher with another tokenizer (reopold.teacher.cross): its scores in the student's layout, the exact reduction
to the one-tokenizer path, training on span rewards, the refusals, and a served teacher with a local tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from reopold import core
from reopold.config.loader import ConfigError, from_dict
from reopold.config.schema import TrainConfig
from reopold.core.spans import span_metrics
from reopold.rollout import HFRolloutEngine, build_rollout
from reopold.tasks import ArithmeticTask, build_tokenizer
from reopold.tasks.prompts import PromptEncoder
from reopold.tasks.tokenizer import DIGIT_PAIRS
from reopold.teacher.cross import CrossTokenizerTeacher, check_offsets, token_bytes
from reopold.teacher.local import LocalTeacher
from reopold.train.algorithms import ScoredRollout, build_algorithm
from reopold.train.run import train
from reopold.train.teachers import describe, plan_teachers
from tests.test_serve_limits import Running
from tests.tiny import make_model, tiny_config

PAIRS = build_tokenizer(merges=DIGIT_PAIRS)
CHARS = build_tokenizer()


def make_pair_model(path: Path, **kwargs) -> Path:
    """A random Llama over the digit-pair tokenizer (118 tokens)."""
    return make_model(path, tokenizer=PAIRS, **kwargs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    pair_teacher = make_pair_model(root / "pair_teacher", hidden=64, layers=2, seed=1, sharpness=8.0)
    char_teacher = make_model(root / "char_teacher", hidden=64, layers=2, seed=1, sharpness=8.0)
    student = make_model(root / "student", hidden=32, layers=1, seed=2)
    return pair_teacher, char_teacher, student


def student_rollout(student_path, n: int = 6, seed: int = 0):
    from reopold.models.loading import load_model

    task = ArithmeticTask()
    problems = task.problems("train", n)
    torch.manual_seed(seed)
    engine = HFRolloutEngine(load_model(str(student_path)), CHARS, max_new_tokens=20, temperature=1.0)
    return engine.generate([CHARS(p.prompt)["input_ids"] for p in problems], problems)


def text_rollout(n: int = 8, seed: int = 0):
    """Completions of random characters of the task's alphabet (no special token inside), half ending in EOS."""
    task = ArithmeticTask()
    problems = task.problems("train", n)
    rng = torch.Generator().manual_seed(seed)
    alphabet = [CHARS.convert_tokens_to_ids(c) for c in task.alphabet]
    responses = []
    for i in range(n):
        length = int(torch.randint(3, 16, (1,), generator=rng))
        ids = [alphabet[int(j)] for j in torch.randint(len(alphabet), (length,), generator=rng)]
        responses.append(ids + [CHARS.eos_token_id] * (i % 2))
    prompts = [CHARS(p.prompt)["input_ids"] for p in problems]
    return build_rollout(prompts, responses, problems, pad_token_id=CHARS.pad_token_id,
                         eos_token_id=CHARS.eos_token_id)


def local(path) -> LocalTeacher:
    from reopold.models.loading import load_model

    return LocalTeacher(load_model(str(path), trainable=False))


def test_identical_tokenizers_through_the_cross_path_equal_the_plain_path(models):
    _, char_teacher, student = models
    rollout = text_rollout()
    plain = local(char_teacher).logprobs(rollout)
    cross = CrossTokenizerTeacher(local(char_teacher), CHARS, CHARS, PromptEncoder(CHARS, "off"))
    scores = cross.score(rollout)
    mask = rollout.completion_mask
    assert torch.equal(scores.spans.span_end_mask, mask)  # every token its own span
    assert torch.allclose(scores.logprobs[mask], plain[mask], atol=1e-6, rtol=0)
    assert float(span_metrics(scores.spans)["multi_token_span_frac"]) == 0.0

    # The trainer's loss and gradient with one-token spans are the plain path's, bit for bit.
    from reopold.models.loading import load_model
    from reopold.models.scorer import TokenScorer

    policy = TokenScorer(load_model(str(student)))
    with torch.no_grad():
        old, entropy = policy(rollout)
    config = from_dict(TrainConfig, {"algo": {"name": "reopold", "two_phase": False, "beta": 0.5},
                                     "rollout": {"samples_per_prompt": 2, "prompts_per_step": 8},
                                     "optim": {"mini_batch_prompts": 8}})
    results = []
    for spans in (None, scores.spans):
        algorithm = build_algorithm(config, len(CHARS))
        scored = ScoredRollout(rollout, old, entropy, torch.zeros(len(rollout)), plain, spans)
        shaped = algorithm.shape(scored, step=0, gather=lambda x: x)
        policy.zero_grad()
        loss, _ = algorithm.loss(policy, None, scored, shaped, shaped.keep.sum().float())
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in policy.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_pair_teacher_span_sums_are_its_token_log_probs(models):
    pair_teacher, _, student = models
    rollout = student_rollout(student)
    inner = local(pair_teacher)
    cross = CrossTokenizerTeacher(inner, PAIRS, CHARS, PromptEncoder(PAIRS, "off"))
    scores = cross.score(rollout)
    _, teacher_rollout = cross.align(rollout)
    direct = inner.logprobs(teacher_rollout)  # (B, Tt) the teacher's own tokens
    # Per row, the span sums add up to the teacher's log-prob of the whole completion text (+ its EOS), and
    # UNWRITABLE_LOGPROB for each special token the random student sampled inside its completion.
    from reopold.teacher.cross import UNWRITABLE_LOGPROB

    expected = (direct * teacher_rollout.completion_mask).sum(1) + UNWRITABLE_LOGPROB * cross.unwritable(rollout).sum(1)
    assert cross.unwritable(rollout).any()  # the random student does sample some
    assert torch.allclose(scores.logprobs.sum(1), expected, atol=1e-4)
    metrics = span_metrics(scores.spans)
    assert 0.2 < float(metrics["multi_token_span_frac"]) < 1.0  # digit pairs merge two student tokens
    assert float(metrics["student_tokens_per_span"]) > float(metrics["teacher_tokens_per_span"])
    # The teacher's prompt is its own tokenisation of the prompt: "347*26=" -> "34" "7" "*" "26" "=".
    first = rollout.problems[0].prompt
    row = teacher_rollout.input_ids[0, : teacher_rollout.prompt_length]
    assert row[teacher_rollout.attention_mask[0, : teacher_rollout.prompt_length].bool()].tolist() == \
        PAIRS(first)["input_ids"]
    # A completion that ended with EOS gets the teacher's EOS as its own span, graded like a token.
    ended = [i for i in range(len(rollout)) if rollout.completion_ids[i][rollout.completion_mask[i]][-1] == 1]
    for i in ended:
        ids = teacher_rollout.completion_ids[i][teacher_rollout.completion_mask[i]]
        assert int(ids[-1]) == PAIRS.eos_token_id


def test_marginal_span_log_probs_of_a_pair_teacher(models):
    """The marginal reading (teacher.span_logprob, the default in this process): the teacher's log-probs are its
    plain ones, each cover is the summed probability of the tokens that start with the written one (checked against
    the full logits), and a completion that ended with EOS still sums to log pi_T(text) (the lookahead telescopes);
    a cut one sums to more (its last cover: the probability of the text as a prefix)."""
    pair_teacher, _, student = models
    rollout = student_rollout(student)
    inner = local(pair_teacher)
    canonical = CrossTokenizerTeacher(inner, PAIRS, CHARS, PromptEncoder(PAIRS, "off"))
    marginal = CrossTokenizerTeacher(inner, PAIRS, CHARS, PromptEncoder(PAIRS, "off"), marginal=True)
    _, teacher_rollout = marginal.align(rollout)
    logprobs, cover = inner.logprobs_and_cover(teacher_rollout, marginal.extensions)
    mask = teacher_rollout.completion_mask
    torch.testing.assert_close(logprobs[mask], inner.logprobs(teacher_rollout)[mask], atol=1e-5, rtol=0)
    full = inner.logits(teacher_rollout).double().log_softmax(-1)  # (B, Tt, V)
    table = token_bytes(PAIRS)
    ids = teacher_rollout.completion_ids
    for i, t in mask.nonzero().tolist()[:40]:
        token = int(ids[i, t])
        piece = table[token]
        members = [u for u, other in enumerate(table) if other and other.startswith(piece)] if piece else [token]
        assert cover[i, t].item() == pytest.approx(float(full[i, t, members].logsumexp(0)), abs=1e-4)
    assert (cover[mask] >= logprobs[mask] - 1e-6).all() and (cover[mask] > logprobs[mask] + 1e-3).any()
    ended = torch.tensor([bool(rollout.completion_ids[i][rollout.completion_mask[i]][-1] == CHARS.eos_token_id)
                          for i in range(len(rollout))])
    a, b = canonical.score(rollout).logprobs.sum(1), marginal.score(rollout).logprobs.sum(1)
    assert ended.any() and (~ended).any()
    torch.testing.assert_close(b[ended], a[ended], atol=1e-4, rtol=0)
    assert (b[~ended] >= a[~ended] - 1e-4).all()


def test_training_with_a_pair_teacher_lowers_the_held_out_reverse_kl(tmp_path, models, capfd):
    pair_teacher, _, student = models
    config = tiny_config(tmp_path, pair_teacher, student, run={"steps": 10, "eval_every": 5, "save_every": 10})
    run_dir = train(from_dict(TrainConfig, config))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    steps = [r for r in rows if r["kind"] == "train"]
    # Measured: 37.9 -> 31.3 -> 28.8 nats per response (a random student samples special tokens the teacher cannot
    # write, each scored UNWRITABLE_LOGPROB); require a 15% drop.
    assert evals[-1]["reverse_kl"] < 0.85 * evals[0]["reverse_kl"], [e["reverse_kl"] for e in evals]
    assert all(0 < r["multi_token_span_frac"] < 1 and math.isfinite(r["loss"]) for r in steps)
    err = capfd.readouterr().err
    assert "another tokenizer (118 vs the student's 18 tokens): span alignment" in err
    assert "of the student's tokens fall in multi-token spans" in err


def test_the_same_vocabulary_is_reported_as_exact(tmp_path, models):
    _, char_teacher, student = models
    config = from_dict(TrainConfig, tiny_config(tmp_path, char_teacher, student))
    plans = plan_teachers(config, CHARS, str(student))
    assert [p.mode for p in plans] == ["exact"]
    assert "the student's vocabulary: exact token rewards" in describe(plans[0], CHARS)


@pytest.mark.parametrize("algo", ["gkd", "sft"])
def test_full_distribution_and_teacher_sample_objectives_are_refused(tmp_path, models, algo):
    pair_teacher, _, student = models
    config = from_dict(TrainConfig, tiny_config(tmp_path, pair_teacher, student, algo={"name": algo}))
    with pytest.raises(ValueError, match=f"algo.name={algo}.*another tokenizer"):
        train(config)
    assert not (tmp_path / "runs" / f"{algo}-seed0" / "checkpoints").exists()  # refused before training


def test_a_tokenizer_without_offsets_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="without offsets"):
        check_offsets(Slow(), "slow-teacher", "12")


def test_student_token_bytes_spell_its_text():
    table = token_bytes(CHARS)
    ids = CHARS("347*26=1;2")["input_ids"] + [CHARS.eos_token_id]
    assert b"".join(table[i] for i in ids) == b"347*26=1;2"  # EOS has no bytes


@pytest.mark.parametrize("reading", ["marginal", "canonical"])
def test_a_served_pair_teacher_with_a_local_tokenizer_gives_the_local_trajectory(tmp_path, models, reading, capfd):
    """reopold serve-teacher returns covers, so a served teacher reads spans as a local one, in both readings."""
    pair_teacher, _, student = models
    server = Running(pair_teacher)
    try:
        sections = {"run": {"steps": 2, "eval_every": 2, "save_every": 2}}
        local = tiny_config(tmp_path / "local", pair_teacher, student, **sections)
        local["teacher"]["span_logprob"] = reading
        local_run = train(from_dict(TrainConfig, local))
        remote = tiny_config(tmp_path / "remote", pair_teacher, student, **sections)
        remote["teacher"].update(url=server.url, model=str(pair_teacher), tokenizer=str(pair_teacher),
                                 span_logprob=reading)
        remote_run = train(from_dict(TrainConfig, remote))
    finally:
        server.close()
    assert capfd.readouterr().err.count(f"({reading})") == 2  # both runs' pre-flight lines
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(read(local_run), read(remote_run), strict=True):
        for key in ("reward_mean", "reverse_kl", "multi_token_span_frac", "accuracy", "loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_a_served_teacher_of_another_tokenizer_without_a_local_copy_is_refused(tmp_path, models):
    pair_teacher, _, student = models
    server = Running(pair_teacher)
    try:
        config = tiny_config(tmp_path, pair_teacher, student)
        config["teacher"].update(url=server.url, model=str(pair_teacher))
        with pytest.raises(ValueError, match="tokenizes the probe .* differently"):
            train(from_dict(TrainConfig, config))
    finally:
        server.close()


def test_teacher_and_teachers_together_are_refused(tmp_path, models):
    pair_teacher, _, student = models
    config = tiny_config(tmp_path, pair_teacher, student)
    config["teachers"] = [{"name": "a", "model": str(pair_teacher)}]
    with pytest.raises(ConfigError, match="either teacher .* or teachers"):
        from_dict(TrainConfig, config)


def test_core_reward_of_a_merged_span_is_the_difference_of_sums():
    # "12" under the student ("1", "2") and the teacher ("12"): one span, R = log pT(12) - (log p(1) + log p(2)).
    student_ends, student_mask = torch.tensor([[1, 2]]), torch.tensor([[True, True]])
    teacher_ends, teacher_mask = torch.tensor([[2]]), torch.tensor([[True]])
    from reopold.core.spans import align_spans, span_rewards

    alignment = align_spans(student_ends, teacher_ends, student_mask, teacher_mask)
    rewards = span_rewards(torch.tensor([[-0.5, -0.25]]), torch.tensor([[-1.0]]), alignment)
    assert rewards.tolist() == [[0.0, -0.25]]
    assert core.reward_floor(0.3) < -0.25
    rollout = build_rollout([[5]], [[6, 7]], [None], pad_token_id=0, eos_token_id=1)
    assert rollout.completion_mask.tolist() == [[True, True]]


def test_merged_tokenizers_cut_greedily_from_the_left():
    from reopold.tasks.tokenizer import DIGIT_OPERATORS

    operators = build_tokenizer(merges=DIGIT_OPERATORS)
    pieces = lambda tok, text: tok.convert_ids_to_tokens(tok(text)["input_ids"])
    assert pieces(operators, "347*6=2082;") == ["3", "4", "7*", "6=", "2", "0", "8", "2;"]
    assert pieces(PAIRS, "347*26=2082") == ["34", "7", "*", "26", "=", "20", "82"]
    assert len(operators) == len(CHARS) + 50 and len(PAIRS) == len(CHARS) + 100
    assert operators.get_vocab()["7"] == CHARS.get_vocab()["7"]  # the characters keep their ids
    with pytest.raises(ValueError, match="merges must be"):
        build_tokenizer(merges=["7x"])


def test_a_student_token_the_teacher_cannot_write_is_scored_as_unwritable(models):
    from reopold.teacher.cross import UNWRITABLE_LOGPROB

    pair_teacher, _, _ = models
    digit = lambda c: CHARS.convert_tokens_to_ids(c)
    clean = [digit("4"), digit("0"), digit("8"), CHARS.eos_token_id]
    junk = [digit("4"), digit("0"), CHARS.pad_token_id, digit("8"), CHARS.eos_token_id]  # a <pad> inside
    problems = ArithmeticTask().problems("train", 1) * 2  # one prompt: the rows differ by the <pad> only
    rollout = build_rollout([CHARS(p.prompt)["input_ids"] for p in problems], [clean, junk], problems,
                            pad_token_id=CHARS.pad_token_id, eos_token_id=CHARS.eos_token_id)
    cross = CrossTokenizerTeacher(local(pair_teacher), PAIRS, CHARS, PromptEncoder(PAIRS, "off"))
    assert cross.unwritable(rollout).tolist() == [[False] * 5, [False, False, True, False, False]]
    scores = cross.score(rollout)
    # Same text "408" for the teacher in both rows ("40" "8" <eos>); the <pad> joins (and ends) the span "40".
    assert scores.spans.span_end_mask.tolist() == [[False, True, True, True, False], [False, False, True, True, True]]
    teacher_clean, teacher_junk = scores.logprobs[0, [1, 2, 3]], scores.logprobs[1, [2, 3, 4]]
    assert torch.allclose(teacher_junk - teacher_clean, torch.tensor([UNWRITABLE_LOGPROB, 0.0, 0.0]), atol=1e-4)


def test_token_credit_trains_per_token_and_lowers_the_held_out_reverse_kl(tmp_path, models):
    pair_teacher, _, student = models
    config = tiny_config(tmp_path, pair_teacher, student, algo={"span_credit": "token"},
                         run={"steps": 10, "eval_every": 5, "save_every": 10})
    run_dir = train(from_dict(TrainConfig, config))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    steps = [r for r in rows if r["kind"] == "train"]
    assert evals[-1]["reverse_kl"] < 0.85 * evals[0]["reverse_kl"], [e["reverse_kl"] for e in evals]
    # Graded per student token: the span metrics are gone, every step's loss is finite.
    assert all("multi_token_span_frac" not in r and math.isfinite(r["loss"]) for r in steps)


def test_covers_from_a_servers_top_k_candidates(models):
    """A server without covers (vLLM) gives top-k prompt_logprobs: the cover from the candidates that extend the
    written token equals the full cover when they hold every extension, and bounds it from below otherwise."""
    from reopold.core.marginal import cover_from_candidates, cover_logprobs, extensions

    table = extensions(token_bytes(PAIRS))
    g = torch.Generator().manual_seed(0)
    logprobs = (torch.randn(64, len(PAIRS), generator=g, dtype=torch.float64) * 3).log_softmax(-1)
    tokens = torch.tensor([PAIRS.convert_tokens_to_ids(c) for c in "0123456789"] * 6 + [PAIRS.eos_token_id] * 4)
    full = cover_logprobs(logprobs, tokens, table)
    everything = torch.arange(len(PAIRS)).expand(64, -1)
    torch.testing.assert_close(cover_from_candidates(everything, logprobs, tokens, table), full, rtol=0, atol=1e-12)
    top = logprobs.topk(20, dim=1).indices
    candidates = torch.cat([top, tokens[:, None]], dim=1)  # vLLM returns the written token beside its top-k
    partial = cover_from_candidates(candidates, logprobs.gather(1, candidates), tokens, table)
    assert (partial <= full + 1e-12).all() and (partial >= logprobs[torch.arange(64), tokens] - 1e-12).all()
    with pytest.raises(ValueError, match="written token"):
        cover_from_candidates(top[:, :1], logprobs.gather(1, top[:, :1]), tokens, table)
