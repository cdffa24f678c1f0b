"""Episodes of a vision-language student: images in the prompt and in tool observations, through sampling, the
teacher-forced passes and training (tiny Qwen2.5-VL models built here, nothing downloaded)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from reopold.environments import Observation  # noqa: E402
from reopold.models.scorer import TokenScorer  # noqa: E402
from reopold.models.vision import never_sampled_ids  # noqa: E402
from reopold.registry import TASKS  # noqa: E402
from reopold.rollout import HFRolloutEngine, Rollout  # noqa: E402
from reopold.rollout.batch import ImageInputs  # noqa: E402
from reopold.rollout.episodes import EpisodeEngine  # noqa: E402
from reopold.rollout.turns import VisionChatFormat  # noqa: E402
from reopold.tasks.visual import VisionPromptEncoder, VisualAdditionTask, problem_images  # noqa: E402
from reopold.train.run import train  # noqa: E402
from tests import test_vision_training  # noqa: E402
from tests.test_trainer import records  # noqa: E402

vlm, vlm_pair = test_vision_training.vlm, test_vision_training.vlm_pair  # the tiny Qwen2.5-VL fixtures


class Zoom:
    """Answers each of the first two turns with a crop of the problem's image (scaled back to full size) and a
    line of text, then ends the episode: a visual tool that returns images."""

    def reset(self, problem):
        from PIL import Image

        image = problem_images(problem)[0]
        self.image, self.turn = image if hasattr(image, "crop") else Image.fromarray(image), 0
        return [{"role": "user", "content": [{"type": "image", "image": self.image},
                                             {"type": "text", "text": problem.prompt}]}]

    def step(self, reply: str) -> Observation:
        self.turn += 1
        side = self.image.size[0]
        crop = self.image.crop((0, 0, side // 2 + 14 * self.turn, side)).resize((side, side))
        content = [{"type": "image", "image": crop}, {"type": "text", "text": f"zoom {self.turn}"}]
        return Observation(messages=[{"role": "tool", "content": content}], done=self.turn >= 3, tool_calls=1)


class ZoomTask(VisualAdditionTask):
    def environment(self, call_format: str) -> Zoom:
        return Zoom()


if "visual-zoom" not in TASKS:
    TASKS.register("visual-zoom", ZoomTask)


def _episodes(model, processor, *, max_new_tokens=6):
    turn_engine = HFRolloutEngine(model, processor.tokenizer, max_new_tokens=max_new_tokens,
                                  vision=VisionPromptEncoder(processor),
                                  suppress_tokens=never_sampled_ids(processor.tokenizer))
    return EpisodeEngine(turn_engine, processor.tokenizer, Zoom, VisionChatFormat(processor), max_turns=3)


def _prefix(rollout: Rollout, row: int, end: int, image_token_id: int) -> Rollout:
    """Row ``row`` cut after ``end`` response tokens, with only the images whose tokens lie before the cut."""
    ids = rollout.input_ids[row : row + 1, : rollout.prompt_length + end]
    images = rollout.images.select([row])
    per_image = (images.image_grid_thw.prod(-1) // 4).tolist()  # image tokens after the 2x2 merge
    present, tokens = 0, int((ids == image_token_id).sum())
    while present < len(per_image) and sum(per_image[: present + 1]) <= tokens:
        present += 1
    blocks = torch.split(images.pixel_values, images.image_grid_thw.prod(-1).tolist())
    kept = [(blocks[i], images.image_grid_thw[i : i + 1]) for i in range(present)]
    return Rollout(ids, rollout.attention_mask[row : row + 1, : ids.shape[1]],
                   rollout.completion_mask[row : row + 1, :end], rollout.prompt_length,
                   images=ImageInputs.of_rows(ids, [kept], image_token_id))


def test_image_observations_reach_the_sequence_and_every_pass(vlm):
    model, processor = vlm
    problems = VisualAdditionTask().problems("test", 3)
    torch.manual_seed(0)
    rollout = _episodes(model, processor).generate([[]] * 3, problems, num_samples=2)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # Every row holds its prompt image and two zoomed images, each expanded to 4 image tokens.
    assert rollout.images.images_per_row.tolist() == [3] * 6
    assert ((rollout.input_ids == image_token).sum(-1) == 12).all()
    assert rollout.images.pixel_values.shape[0] == rollout.images.image_grid_thw.prod(-1).sum()
    assert rollout.episode_stats["turns_mean"] == 3
    # Observation tokens (the zoomed images among them) are context, never sampled.
    response_images = rollout.input_ids[:, rollout.prompt_length :] == image_token
    assert response_images.sum() == 6 * 8 and not (rollout.completion_mask & response_images).any()
    # The teacher-forced pass over the whole interleaved sequence gives each turn's tokens the log-probs of a pass
    # over the sequence cut after that turn, with only the images seen so far: what generate() saw when sampling.
    scorer = TokenScorer(model, chunk_size=5)
    whole, _ = scorer(rollout)
    for row in range(len(rollout)):
        mask = rollout.completion_mask[row]
        sampled_ends = [t + 1 for t in range(mask.shape[0]) if mask[t] and (t + 1 == mask.shape[0] or not mask[t + 1])]
        for end in sampled_ends:
            part, _ = scorer(_prefix(rollout, row, end, image_token))
            torch.testing.assert_close(part[0][mask[:end]], whole[row, :end][mask[:end]], rtol=0, atol=1e-5)


def test_dropping_an_observation_image_changes_the_next_turns_scores(vlm):
    """The zoomed images are really read: blanking their pixels moves the log-probs of the turns after them."""
    model, processor = vlm
    problems = VisualAdditionTask().problems("test", 2)
    torch.manual_seed(1)
    rollout = _episodes(model, processor).generate([[]] * 2, problems)
    scorer = TokenScorer(model)
    seeing, _ = scorer(rollout)
    images = rollout.images
    blocks = list(torch.split(images.pixel_values, images.image_grid_thw.prod(-1).tolist()))
    blank = torch.cat([b if i % 3 == 0 else torch.zeros_like(b) for i, b in enumerate(blocks)])  # keep prompt images
    import dataclasses

    blind, _ = scorer(dataclasses.replace(rollout, images=dataclasses.replace(images, pixel_values=blank)))
    first_turn = rollout.completion_mask.cumsum(-1) <= 0  # nothing before the first observation changes
    first_end = [int((~rollout.completion_mask[r]).nonzero()[0]) for r in range(len(rollout))]
    for row, end in enumerate(first_end):
        assert torch.equal(seeing[row, :end], blind[row, :end])
        later = rollout.completion_mask[row, end:]
        assert (seeing[row, end:][later] - blind[row, end:][later]).abs().max() > 1e-4
    assert first_turn.shape == seeing.shape


def test_training_on_visual_episodes(tmp_path, vlm_pair):
    config = test_vision_training._config(
        tmp_path, vlm_pair, data={"task": "visual-zoom", "eval_problems": 8, "train_problems": 100},
        rollout={"samples_per_prompt": 2, "max_new_tokens": 6, "max_turns": 3}, run={"steps": 2, "save_every": 2})
    run_dir = train(config)
    for row in records(run_dir, "train"):
        assert row["turns_mean"] == 3 and row["env_error_frac"] == 0
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0 and not row["skipped"]
    assert "accuracy" in records(run_dir, "eval")[-1]
