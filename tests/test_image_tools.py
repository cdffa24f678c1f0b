"""The crop tool of data.task=image-tool-prompts (the agentic visual setting) and its episodes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from reopold.tasks.image_tools import CropEnvironment, ImageToolPromptTask
from reopold.train.run import train
from tests import test_vision_training
from tests.test_trainer import records

vlm, vlm_pair = test_vision_training.vlm, test_vision_training.vlm_pair  # the tiny Qwen2.5-VL fixtures


def call(bbox, target=1) -> str:
    arguments = {"bbox_2d": bbox, "target_image": target}
    return f'<tool_call>{json.dumps({"name": "crop_image", "arguments": arguments})}</tool_call>'


@pytest.fixture
def prompts(tmp_path):
    pixels = np.zeros((56, 112, 3), np.uint8)
    pixels[:, 56:] = 255  # left half black, right half white
    Image.fromarray(pixels).save(tmp_path / "a.png")
    rows = [{"problem": f"<image>what is on the right {i}", "answer": "white", "images": ["a.png"]} for i in range(30)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path / "p.jsonl"


def test_crop_returns_the_region_and_can_target_earlier_crops(prompts):
    task = ImageToolPromptTask(str(prompts), prompt_key="problem", held_out=4)
    env = CropEnvironment()
    first = env.reset(task.problems("train", 1)[0])
    assert [part["type"] for part in first[0]["content"]] == ["image", "text"]
    right = env.step(call([56, 0, 112, 56]))
    crop = right.messages[0]["content"][0]["image"]
    assert right.tool_errors == 0 and crop.size == (56, 56) and np.asarray(crop).min() == 255
    normalised = env.step(call([0, 0, 0.5, 1.0], target=1)).messages[0]["content"][0]["image"]
    assert np.asarray(normalised).max() == 0  # the left half of image 1
    small = env.step(call([0, 0, 10, 10], target=2)).messages[0]["content"][0]["image"]
    assert min(small.size) == 28  # scaled up to Qwen-VL's smallest side
    for bad, why in [(call([0, 0, 10, 10], target=9), "target_image must be between 1 and 4"),
                     (call([5, 5, 5, 5]), "is empty"), (call([1, 2, 3]), "four numbers")]:
        observation = env.step(bad)
        assert observation.tool_errors == 1 and why in observation.messages[0]["content"]
    assert env.step("the right half is white").done


def test_training_with_the_crop_tool(tmp_path, prompts, vlm_pair):
    config = test_vision_training._config(
        tmp_path, vlm_pair,
        data={"task": "image-tool-prompts", "prompts": str(prompts), "prompt_key": "problem", "eval_problems": 4},
        rollout={"samples_per_prompt": 2, "max_new_tokens": 6, "max_turns": 3}, run={"steps": 2, "save_every": 2})
    run_dir = train(config)
    for row in records(run_dir, "train"):
        assert math.isfinite(row["loss"]) and not row["skipped"] and row["env_error_frac"] == 0
        assert 1 <= row["turns_mean"] <= 3
