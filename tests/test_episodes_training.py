"""Training on multi-turn episodes end to end (tiny random models): every algorithm, exact resume, and the
teacher's scores of an interleaved sequence equal its scores of the same turns scored one prefix at a time."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from reopold.config.loader import from_dict
from reopold.config.schema import TrainConfig
from reopold.environments import Observation
from reopold.models.loading import load_model
from reopold.registry import TASKS
from reopold.rollout import HFRolloutEngine
from reopold.rollout.batch import Rollout
from reopold.rollout.episodes import EpisodeEngine
from reopold.rollout.turns import PlainFormat
from reopold.tasks import ArithmeticTask, build_tokenizer
from reopold.teacher.local import LocalTeacher
from reopold.train.run import train
from tests import test_trainer
from tests.test_trainer import records, without_timings
from tests.tiny import tiny_config


class Counter:
    """An environment that answers every turn with a tool message holding the turn number, for 3 turns."""

    def reset(self, problem):
        self.turn = 0
        return [{"role": "user", "content": problem.prompt}]

    def step(self, reply: str) -> Observation:
        self.turn += 1
        return Observation(messages=[{"role": "tool", "content": str(self.turn)}], done=self.turn >= 3, tool_calls=1)


class CounterTask(ArithmeticTask):
    """The arithmetic task in episodes of three turns (the answer is read from the last turn)."""

    def environment(self, call_format: str) -> Counter:
        return Counter()


class Rewarding(Counter):
    """Counter whose last step grades the episode 1.0 whatever the text says."""

    def step(self, reply: str) -> Observation:
        observation = super().step(reply)
        observation.reward = 1.0 if observation.done else None
        return observation


class RewardingTask(ArithmeticTask):
    def environment(self, call_format: str) -> Rewarding:
        return Rewarding()


if "counter-episodes" not in TASKS:
    TASKS.register("counter-episodes", CounterTask)
    TASKS.register("rewarding-episodes", RewardingTask)


models = test_trainer.models  # the tiny teacher and student of the trainer's end-to-end tests


def episode_config(tmp_path, models, **sections):
    config = tiny_config(tmp_path, *models, **sections)
    config["data"]["task"] = "counter-episodes"
    config["rollout"].update({"max_turns": 3, "max_new_tokens": 8})
    return from_dict(TrainConfig, config)


@pytest.mark.parametrize("algo", ["reopold", "rkl", "grpo", "sft", "gkd"])
def test_every_algorithm_trains_on_episodes(tmp_path, models, algo):
    run_dir = train(episode_config(tmp_path, models, algo={"name": algo}, run={"steps": 2, "eval_every": 2}))
    rows = records(run_dir, "train")
    assert len(rows) == 2
    for row in rows:
        assert row["turns_mean"] == 3 and row["env_error_frac"] == 0
        assert math.isfinite(row["loss"]) and not row["skipped"]
    assert "accuracy" in records(run_dir, "eval")[-1]


def test_grpo_takes_the_environments_reward(tmp_path, models):
    config = episode_config(tmp_path, models, algo={"name": "grpo"}, run={"steps": 2, "eval_every": 0})
    config.data.task = "rewarding-episodes"
    run_dir = train(config)
    # The checker would reject a random student's answers; the environment graded every episode 1.0.
    assert [row["train_accuracy"] for row in records(run_dir, "train")] == [1.0, 1.0]


def test_resume_mid_run_is_exact_on_episodes(tmp_path, models):
    run_dir = train(episode_config(tmp_path, models))  # checkpoints at steps 2 and 4
    full = records(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")
    (run_dir / "checkpoints" / "latest").write_text("step-000002\n")
    train(episode_config(tmp_path, models), resume=str(run_dir))
    assert without_timings(records(run_dir)) == without_timings(full)


def test_the_teacher_scores_an_episode_in_one_piece_as_turn_by_turn(models):
    """Teacher-forced log-probs of each turn's tokens, from the whole interleaved sequence, equal those from the
    sequence cut after that turn (causal attention: later turns and observations cannot leak backwards)."""
    tokenizer = build_tokenizer()
    student = load_model(str(models[1]), dtype="float32", device="cpu", trainable=False)
    teacher = LocalTeacher(load_model(str(models[0]), dtype="float32", device="cpu", trainable=False))
    engine = EpisodeEngine(HFRolloutEngine(student, tokenizer, max_new_tokens=6), tokenizer, Counter,
                           PlainFormat(tokenizer), max_turns=3)
    problems = ArithmeticTask().problems("train", 4)
    torch.manual_seed(0)
    rollout = engine.generate([[]] * 4, problems, num_samples=2)
    whole = teacher.logprobs(rollout)
    for row in range(len(rollout)):
        mask = rollout.completion_mask[row]
        real = int(rollout.attention_mask[row, rollout.prompt_length :].sum())
        for end in range(1, real + 1):  # every cut point, inside turns and observations alike
            cut = Rollout(rollout.input_ids[row : row + 1, : rollout.prompt_length + end],
                          rollout.attention_mask[row : row + 1, : rollout.prompt_length + end],
                          mask[None, :end], rollout.prompt_length)
            part = teacher.logprobs(cut)[0]
            torch.testing.assert_close(part[mask[:end]], whole[row, :end][mask[:end]], rtol=0, atol=1e-5)


def test_the_agentic_recipe_holds_the_papers_settings():
    from pathlib import Path

    from reopold.config.loader import load_config

    recipe = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "agentic-3b.yaml"
    config = load_config(TrainConfig, recipe)
    assert config.teacher.model == "TIGER-Lab/PixelReasoner-RL-v1" and config.student.freeze_vision
    assert (config.run.steps, config.algo.switch_step, config.algo.beta, config.optim.lr) == (40, 10, 0.4, 1e-6)
    assert (config.rollout.samples_per_prompt, config.rollout.prompts_per_step, config.optim.mini_batch_prompts) == (
        8, 128, 64)
    assert (config.rollout.max_turns, config.rollout.max_episode_tokens, config.rollout.temperature) == (3, 8192, 1.0)
    assert config.data.task == "image-tool-prompts" and config.rollout.engine == "hf"


def test_max_turns_without_an_environment_is_refused():
    from reopold.train.run import build_run_episodes

    config = lambda turns: from_dict(TrainConfig, {"rollout": {"max_turns": turns}})
    with pytest.raises(ValueError, match="needs a task with an environment"):
        build_run_episodes(config(3), ArithmeticTask(), build_tokenizer(), encode=None)
    assert build_run_episodes(config(1), ArithmeticTask(), build_tokenizer(), encode=None) is None
