"""The command line: help lists every key, shipped configs load, bad input fails early with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from reopold.cli import DEMO_CONFIG, main
from reopold.config.loader import _walk as config_keys
from reopold.config.loader import load_config, save_config, to_dict
from reopold.config.schema import TrainConfig
from tests.tiny import make_model, tiny_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted({*ROOT.glob("configs/recipes/*.yaml"), *DEMO_CONFIG.parent.glob("*.yaml"),
                          *(ROOT / "benchmarks" / v / "config.yaml" for v in ("hard", "mismatch"))})
ACCELERATE_CONFIGS = sorted(ROOT.glob("configs/accelerate/*.yaml"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_model(root / "teacher", hidden=32, layers=1, seed=1), make_model(root / "student", hidden=16,
                                                                               layers=1, seed=2)


def config_file(tmp_path, models, **sections) -> Path:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, *models, **sections)))
    return path


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reopold: error: ") and "\n" not in err  # one line that says what to fix
    return err


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "report" in out


def test_train_help_lists_every_key_with_its_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    keys = [(key, f) for key, f, _, is_section in config_keys(TrainConfig) if not is_section]
    assert len(keys) > 50
    for key, field in keys:
        assert f"--{key}" in out
        assert " ".join(field.metadata["help"].split())[:40] in out


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    config = load_config(TrainConfig, path)
    save_config(config, tmp_path / "again.yaml")
    assert load_config(TrainConfig, tmp_path / "again.yaml") == config


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_are_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader: unknown keys fail here
    assert config.num_processes >= 2 and config.distributed_type in ("MULTI_GPU", "DEEPSPEED", "FSDP")


def test_sharded_accelerate_configs_ask_for_what_the_trainer_runs():
    """The settings tests/ddp_worker.py runs FSDP and ZeRO-3 with on CPU are the shipped configs' settings."""
    import yaml

    fsdp = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    assert (fsdp["fsdp_version"], fsdp["fsdp_auto_wrap_policy"], fsdp["fsdp_state_dict_type"]) == (
        2, "TRANSFORMER_BASED_WRAP", "FULL_STATE_DICT")
    for stage in (2, 3):
        deepspeed = yaml.safe_load((ROOT / "configs" / "accelerate" / f"zero{stage}.yaml").read_text())
        assert deepspeed["distributed_type"] == "DEEPSPEED" and deepspeed["deepspeed_config"]["zero_stage"] == stage
    zero3 = yaml.safe_load((ROOT / "configs" / "accelerate" / "zero3.yaml").read_text())["deepspeed_config"]
    assert zero3["zero3_save_16bit_model"] is True


def test_paper_recipe_has_the_paper_values():
    config = load_config(TrainConfig, ROOT / "configs" / "recipes" / "math-1.5b.yaml")
    assert (config.algo.lam, config.algo.beta, config.switch_step, config.run.steps) == (0.3, 0.2, 100, 300)
    assert (config.rollout.prompts_per_step, config.rollout.samples_per_prompt, config.optim.mini_batch_prompts) == (
        128, 8, 32)
    assert (config.optim.lr, config.rollout.max_new_tokens, config.rollout.temperature) == (1e-5, 8192, 1.0)
    assert config.student.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert config.teacher.model == "Skywork/Skywork-OR1-Math-7B"


def test_demo_config_is_shipped():
    assert DEMO_CONFIG in SHIPPED_CONFIGS


def test_show_config_applies_overrides(capsys):
    assert main(["train", "--show-config", "--algo.name", "rkl", "--run.steps", "12"]) == 0
    out = capsys.readouterr().out
    assert "name: rkl" in out and "steps: 12" in out


def test_unknown_key_suggests_the_nearest(capsys):
    err = error_of(capsys, ["train", "--algo.lamda", "0.5"])
    assert "'algo.lamda'" in err and "'algo.lam'" in err


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["--rollout.prompts_per_step", "0"], "rollout.prompts_per_step must be > 0"),
        (["--optim.micro_batch_size", "-1"], "optim.micro_batch_size must be > 0"),
        (["--rollout.max_new_tokens", "0"], "rollout.max_new_tokens must be > 0"),
        (["--algo.lam", "1.5"], "algo.lam must be in (0, 1)"),
        (["--algo.name", "ppo"], "'ppo'"),
        (["--algo.name", "grpo", "--algo.two_phase", "null", "--rollout.samples_per_prompt", "1"],
         "samples_per_prompt >= 2"),
        (["--algo.name", "sft", "--algo.two_phase", "false"], "no meaning for algo.name=sft"),
    ],
)
def test_bad_values_fail_before_any_work(capsys, override, fragment):
    assert fragment in error_of(capsys, ["train", *override])


def test_missing_model_path_fails_before_loading(capsys, tmp_path, models):
    path = config_file(tmp_path, models, student={"model": str(tmp_path / "nowhere")})
    err = error_of(capsys, ["train", "--config", str(path)])
    assert "nowhere" in err and "does not exist" in err


def test_missing_config_file(capsys, tmp_path):
    assert "does not exist" in error_of(capsys, ["train", "--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize(
    "content, fragment",
    [("", "holds no prompts"), ("{\"prompt\": \"1*2=\"}\nnot json\n", ":2 is not valid JSON"),
     ("{\"question\": \"1*2=\"}\n", "has no text under 'prompt'")],
)
def test_bad_prompt_files(capsys, tmp_path, models, content, fragment):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    path = config_file(tmp_path, models, data={"task": "prompts", "prompts": str(prompts)})
    assert fragment in error_of(capsys, ["train", "--config", str(path)])


def test_checker_rejecting_every_teacher_answer_stops_before_training(capsys, tmp_path, models):
    # The tiny random teacher never writes a correct product.
    path = config_file(tmp_path, models, data={"preflight_problems": 4})
    err = error_of(capsys, ["train", "--config", str(path)])
    assert "rejected all 4 of the teacher's greedy answers" in err
    assert not (tmp_path / "runs" / "reopold-seed0" / "metrics.jsonl").exists()


def test_a_teacher_that_cannot_write_the_students_text_is_refused(capsys, tmp_path, models):
    from reopold.tasks import build_tokenizer

    other = make_model(tmp_path / "other", hidden=16, layers=1, seed=4)
    build_tokenizer("0123456789*+=;:x").save_pretrained(other)  # one extra token
    path = config_file(tmp_path, models, student={"model": str(other)})
    err = error_of(capsys, ["train", "--config", str(path)])
    # Different vocabularies mean span alignment (docs/cross_tokenizer.md), but the teacher has no 'x' to score.
    assert "does not decode its tokens of the student's text" in err and "'x'" in err


def test_existing_run_folder_is_not_overwritten(capsys, tmp_path, models):
    path = config_file(tmp_path, models, run={"steps": 1, "eval_every": 0, "save_every": 1})
    assert main(["train", "--config", str(path)]) == 0
    capsys.readouterr()
    assert "--resume" in error_of(capsys, ["train", "--config", str(path)])


def test_prompt_file_run_and_report(capsys, tmp_path, models):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"question": f"{a}*{b}=", "result": str(a * b)} for a in range(10, 40) for b in range(10, 20)]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    path = config_file(tmp_path, models, data={"task": "prompts", "prompts": str(prompts), "prompt_key": "question",
                                               "answer_key": "result", "eval_problems": 16},
                       run={"steps": 2, "eval_every": 2, "save_every": 2, "report": True})
    assert main(["train", "--config", str(path)]) == 0
    run_dir = tmp_path / "runs" / "reopold-seed0"
    saved = load_config(TrainConfig, run_dir / "config.yaml")
    assert to_dict(saved)["data"]["prompt_key"] == "question"
    report = (run_dir / "report.md").read_text()
    assert "plots/accuracy.png" in report and (run_dir / "plots" / "accuracy.png").exists()


def test_an_algorithm_registered_from_outside_is_accepted_by_the_config_and_run(tmp_path, models, capsys):
    """The registry is the extension point: a name registered in this test is a valid algo.name, end to end."""
    from reopold.registry import ALGORITHMS
    from reopold.train.algorithms import build_distillation

    calls = []

    def build_mine(config, vocab_size):
        calls.append(config.algo.name)
        return build_distillation(config, vocab_size)

    ALGORITHMS.register("my_reopold", build_mine)
    try:
        with pytest.raises(ValueError, match="already registered"):
            ALGORITHMS.register("my_reopold", build_mine)
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump(tiny_config(tmp_path, *models, algo={"name": "my_reopold"})))
        assert main(["train", "--config", str(config), "--run.steps", "1", "--run.eval_every", "0"]) == 0
        assert calls == ["my_reopold"]
    finally:
        ALGORITHMS._entries.pop("my_reopold")
    assert main(["train", "--config", str(config), "--algo.name", "my_reopld"]) == 2
    assert "did you mean" in capsys.readouterr().err
