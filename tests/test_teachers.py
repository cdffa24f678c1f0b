"""Several teachers in one run (reopold.teacher.routed, the teachers config): rows routed by a key, per-teacher
metrics, the refusal of an unknown key, and an exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from reopold.config.loader import ConfigError, from_dict, load_config
from reopold.config.schema import TrainConfig
from reopold.rollout import build_rollout
from reopold.tasks import ArithmeticTask, build_tokenizer
from reopold.tasks.arithmetic import Problem
from reopold.tasks.tokenizer import DIGIT_PAIRS
from reopold.teacher.local import LocalTeacher
from reopold.teacher.routed import RoutedTeacher
from reopold.train.checkpoint import latest_checkpoint
from reopold.train.run import train
from tests.test_cross_tokenizer import make_pair_model
from tests.tiny import make_model, tiny_config

CHARS = build_tokenizer()
TIMING_KEYS = {"time", "rollout_seconds", "score_seconds", "update_seconds"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sharp = make_model(root / "sharp", hidden=32, layers=1, seed=1, sharpness=8.0)
    flat = make_model(root / "flat", hidden=32, layers=1, seed=3, sharpness=0.1)  # near-uniform: about -log 18
    pairs = make_pair_model(root / "pairs", hidden=32, layers=1, seed=4, sharpness=4.0)
    student = make_model(root / "student", hidden=16, layers=1, seed=2)
    return {"sharp": sharp, "flat": flat, "pairs": pairs, "student": student}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """400 arithmetic prompts, each with a 'domain' column: sharp, flat or pairs by the first digit (mod 3)."""
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    problems = ArithmeticTask().problems("train", 400)
    rows = [{"prompt": p.prompt, "answer": p.answer, "domain": ("sharp", "flat", "pairs")[int(p.prompt[0]) % 3]}
            for p in problems]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def teachers_config(tmp_path, models, prompts, names=("sharp", "flat", "pairs"), **sections):
    config = tiny_config(tmp_path, models["sharp"], models["student"], **sections)
    del config["teacher"]
    config["teachers"] = [{"name": name, "model": str(models[name])} for name in names]
    config["data"].update(task="prompts", prompts=str(prompts), teacher_key="domain")
    return config


def records(run_dir, kind=None):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows if kind is None or r["kind"] == kind]


def local(path) -> LocalTeacher:
    from reopold.models.loading import load_model

    return LocalTeacher(load_model(str(path), trainable=False))


def test_each_row_is_scored_by_the_teacher_its_key_names(models):
    problems = [Problem("12*34=", "408", key) for key in ("sharp", "flat", "flat", "sharp", "flat")]
    rng = torch.Generator().manual_seed(0)
    responses = [torch.randint(3, 18, (int(torch.randint(2, 9, (1,), generator=rng)),), generator=rng).tolist()
                 for _ in problems]
    rollout = build_rollout([CHARS(p.prompt)["input_ids"] for p in problems], responses, problems,
                            pad_token_id=CHARS.pad_token_id, eos_token_id=CHARS.eos_token_id)
    teachers = {"sharp": local(models["sharp"]), "flat": local(models["flat"])}
    scores = RoutedTeacher(teachers, lambda p: p.key).score(rollout)
    assert scores.names == ["sharp", "flat", "flat", "sharp", "flat"]
    assert scores.spans is None  # one vocabulary: exact token rewards
    for i, name in enumerate(scores.names):
        alone = teachers[name].logprobs(rollout.select([i]))[0]
        mask = rollout.completion_mask[i]
        assert torch.allclose(scores.logprobs[i, mask], alone[: int(mask.sum())], atol=1e-5)
        other = teachers["flat" if name == "sharp" else "sharp"].logprobs(rollout.select([i]))[0]
        assert not torch.allclose(scores.logprobs[i, mask], other[: int(mask.sum())], atol=1e-2)
    # The flat teacher is near-uniform over 18 tokens; the sharp one is not: the rows tell them apart.
    flat_rows = [i for i, n in enumerate(scores.names) if n == "flat"]
    flat_values = scores.logprobs[flat_rows][rollout.completion_mask[flat_rows]]
    assert torch.allclose(flat_values, torch.full_like(flat_values, -torch.log(torch.tensor(18.0))), atol=0.3)


def test_a_routed_pair_teacher_gives_spans_and_the_others_one_token_spans(models):
    problems = [Problem("12*34=", "408", key) for key in ("pairs", "sharp")]
    responses = [[CHARS.convert_tokens_to_ids(c) for c in "4080;12"] + [1]] * 2
    rollout = build_rollout([CHARS(p.prompt)["input_ids"] for p in problems], responses, problems,
                            pad_token_id=CHARS.pad_token_id, eos_token_id=CHARS.eos_token_id)
    from reopold.tasks.prompts import PromptEncoder
    from reopold.teacher.cross import CrossTokenizerTeacher

    pair_tokenizer = build_tokenizer(merges=DIGIT_PAIRS)
    teachers = {"pairs": CrossTokenizerTeacher(local(models["pairs"]), pair_tokenizer, CHARS,
                                               PromptEncoder(pair_tokenizer, "off")),
                "sharp": local(models["sharp"])}
    scores = RoutedTeacher(teachers, lambda p: p.key).score(rollout)
    # "40" "80" ";" "12" <eos> on the pair side: span ends after 2, 4, 5, 7 characters and at the EOS.
    assert scores.spans.span_end_mask[0].tolist() == [False, True, False, True, True, False, True, True]
    assert scores.spans.span_end_mask[1].tolist() == [True] * 8  # the char teacher's row: one-token spans
    alone = teachers["sharp"].logprobs(rollout.select([1]))[0]
    assert torch.allclose(scores.logprobs[1], alone, atol=1e-5)


def test_training_logs_metrics_per_teacher(tmp_path, models, prompts):
    config = teachers_config(tmp_path, models, prompts, run={"steps": 2, "eval_every": 0, "save_every": 2,
                                                             "report": True})
    run_dir = train(from_dict(TrainConfig, config))
    rows = records(run_dir, "train")
    for row in rows:
        for name in ("sharp", "flat", "pairs"):
            for metric in ("reward_mean", "reverse_kl", "below_floor_frac"):
                assert f"{metric}/{name}" in row
        # The near-uniform teacher gives the student's tokens higher log-probs than the sharp random one.
        assert row["reward_mean/flat"] > row["reward_mean/sharp"]
    report = (run_dir / "report.md").read_text()
    assert "## Teachers" in report and "| sharp | 2 |" in report and "| pairs | 2 |" in report
    assert "multi-token spans" in report
    saved = load_config(TrainConfig, run_dir / "config.yaml")
    assert [t.name for t in saved.teachers] == ["sharp", "flat", "pairs"] and saved.data.teacher_key == "domain"


def test_a_prompt_routed_to_an_unknown_teacher_is_refused_before_training(tmp_path, models, prompts):
    config = teachers_config(tmp_path, models, prompts)
    config["teachers"][1]["name"] = "flatt"
    with pytest.raises(ValueError, match="routed to teacher 'flat'.*sharp, flatt, pairs.*did you mean 'flatt'"):
        train(from_dict(TrainConfig, config))
    assert not (tmp_path / "runs" / "reopold-seed0" / "checkpoints").exists()


def test_resume_with_several_teachers_continues_on_the_same_trajectory(tmp_path, models, prompts):
    config = teachers_config(tmp_path, models, prompts)  # a third of the prompts go to the pair teacher
    run_dir = train(from_dict(TrainConfig, config))  # checkpoints at steps 2 and 4
    full = records(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")
    (run_dir / "checkpoints" / "latest").write_text("step-000002\n")
    assert latest_checkpoint(run_dir).name == "step-000002"
    train(from_dict(TrainConfig, config), resume=str(run_dir))
    assert records(run_dir) == full


def test_teachers_config_is_checked(tmp_path, models, prompts):
    base = teachers_config(tmp_path, models, prompts)
    twice = {**base, "teachers": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]}
    with pytest.raises(ConfigError, match="each a different one"):
        from_dict(TrainConfig, twice)
    with pytest.raises(ConfigError, match="several teachers grade sampled tokens"):
        from_dict(TrainConfig, {**base, "algo": {"name": "gkd"}})
    with pytest.raises(ConfigError, match=r"unknown key 'teachers\[1\].modle'; did you mean 'teachers\[1\].model'"):
        from_dict(TrainConfig, {**base, "teachers": [{"name": "a"}, {"name": "b", "modle": "x"}]})
    arithmetic = {**base, "data": {**base["data"], "task": "arithmetic"}}
    with pytest.raises(ConfigError, match="data.teacher_key .* needs data.task=prompts"):
        from_dict(TrainConfig, arithmetic)
