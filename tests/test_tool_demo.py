"""The shipped tool-use demo pair: loss masks of the gold episodes, small files, a teacher that calls the tool and
reads its results, a student that mostly does not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from reopold.tasks import build_tokenizer  # noqa: E402
from reopold.tasks.arithmetic import Problem  # noqa: E402
from reopold.tasks.chained import ChainedProductsTask  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "src" / "reopold" / "assets" / "demo-tools"
sys.path.insert(0, str(ASSETS.parents[3] / "scripts"))
from make_tool_demo import episodes, gold_batch, mental_example, tool_example  # noqa: E402

PROBLEM = Problem(prompt="47*86*29=", answer="117218")


@pytest.fixture(scope="module")
def task():
    return ChainedProductsTask()


@pytest.fixture(scope="module")
def tokenizer(task):
    return build_tokenizer(task.alphabet)


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return {role: (LlamaForCausalLM.from_pretrained(ASSETS / role), PreTrainedTokenizerFast.from_pretrained(
        ASSETS / role)) for role in ("teacher", "student")}


def test_tool_episode_ids_and_loss_mask(task, tokenizer):
    ids, mask = tool_example(task, tokenizer, PROBLEM)
    eos = tokenizer.eos_token_id
    enc = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    assert ids == (enc("47*86*29=") + enc("[calc(47*86)]") + [eos] + enc("{4042}") + enc("[calc(4042*29)]") + [eos]
                   + enc("{117218}") + enc(":117218") + [eos])
    # 1 exactly on the three assistant turns and their eos: 13+1, 15+1, 7+1 tokens; 0 on prompt and observations.
    assert mask == [0] * 9 + [1] * 14 + [0] * 6 + [1] * 16 + [0] * 8 + [1] * 8
    assert tokenizer.unk_token_id not in ids


def test_mental_episode_ids_and_loss_mask(task, tokenizer):
    ids, mask = mental_example(task, tokenizer, PROBLEM)
    turn = "47*86=4042;4042*29=117218:117218"
    assert ids == tokenizer("47*86*29=" + turn)["input_ids"] + [tokenizer.eos_token_id]
    assert mask == [0] * 9 + [1] * (len(turn) + 1)


def test_gold_batch_labels_follow_the_mask(task, tokenizer):
    import random

    input_ids, attention_mask, labels = gold_batch(task, tokenizer, random.Random(0), 16, tool_share=0.5)
    kept = labels != -100  # (B, T)
    assert (input_ids[kept] == labels[kept]).all()
    assert not (kept & (attention_mask == 0)).any()
    # Observations are never labelled: no "{" or "}" among the labels, and every row has some.
    braces = {tokenizer.convert_tokens_to_ids(c) for c in "{}"}
    assert not any(int(t) in braces for t in labels[kept])
    assert kept.sum(1).min() > 0


def test_shipped_files_are_small_and_complete(task):
    for role in ("teacher", "student"):
        names = {p.name for p in (ASSETS / role).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json"} <= names
        saved = PreTrainedTokenizerFast.from_pretrained(ASSETS / role)
        assert saved.get_vocab() == build_tokenizer(task.alphabet).get_vocab()
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 8 * 2**20


def test_teacher_uses_the_tool_and_student_is_well_below(pair, task):
    problems = task.problems("test", 100)
    teacher = episodes(*pair["teacher"], task, problems)
    student = episodes(*pair["student"], task, problems)
    assert teacher.accuracy >= 0.9  # 500 test problems at shipping time: see docs/tools.md
    assert teacher.first_turn_tool == 1.0
    assert student.accuracy <= teacher.accuracy - 0.5
    assert 0.05 <= student.first_turn_tool <= 0.5  # it sometimes calls the tool, mostly it does not


def test_teacher_reads_the_tool_results(pair, task):
    """With a calculator that is off by one the teacher's answers follow the tool, not its own arithmetic."""
    problems = task.problems("test", 50)

    def calc(expression: str) -> str:  # off by one; named calc, the tool the teacher calls
        a, b = expression.split("*")
        return str(int(a) * int(b) + 1)

    wrong = episodes(*pair["teacher"], ChainedProductsTask(tool=calc), problems)
    assert wrong.accuracy == 0.0
    assert wrong.tool_calls >= 1.9


def test_the_demo_tools_config_trains_in_episodes(tmp_path):
    """Two steps of `reopold train --config demo-tools` on the shipped pair: episodes of several turns, the tool's
    results in them, finite losses."""
    import json
    import math

    from reopold.cli import DEMO_CONFIG
    from reopold.config.loader import load_config
    from reopold.config.schema import TrainConfig
    from reopold.train.run import train

    config = load_config(TrainConfig, DEMO_CONFIG.parent / "demo-tools.yaml",
                         ["run.steps=2", "run.eval_every=0", "run.save_every=2", f"run.output_dir={tmp_path}",
                          "run.progress=false", "run.report=false", "data.preflight_problems=4",
                          "rollout.prompts_per_step=8", "optim.mini_batch_prompts=8"])
    run_dir = train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert all(r["tool_calls_mean"] > 0 and 1 < r["turns_mean"] <= 3 for r in steps)


def test_reopold_eval_runs_episodes(tmp_path):
    """`reopold eval` on the tool task grades episodes: the teacher, which needs its tool to be right, is right."""
    import json

    from reopold.cli import main

    assert main(["eval", "demo-tools-teacher", "--task", "chained-products", "--temperature", "0", "--n", "1",
                 "--num-problems", "20", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["pass@1"] == 1.0
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    # The whole episode, graded on its last turn: two calls, their results, the answer.
    assert all(s["completion"].startswith("[calc(") and s["completion"].count("{") == 2 for s in samples)
    assert all(s["completion"].endswith(":" + s["reference"]) for s in samples)
