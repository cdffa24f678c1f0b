"""`reopold eval`: metrics agree with the written samples, a run folder evaluates its latest checkpoint, grading is
right on references built from the model's own answers, and bad input fails with one line before any model loads."""

from __future__ import annotations

import json

import pytest

import reopold.models.loading
from reopold.cli import main
from reopold.evaluation.commands import default_ks
from reopold.evaluation.metrics import summarize
from reopold.models.loading import load_model, load_tokenizer
from reopold.train.checkpoint import save_checkpoint
from tests.tiny import make_model


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "student", hidden=16, layers=1, seed=2, sharpness=4.0)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_writes_samples_and_matching_metrics(tmp_path, student, capsys):
    out = tmp_path / "eval"
    argv = ["eval", str(student), "--num-problems", "3", "--n", "4", "--k", "1,2,4", "--max-new-tokens", "6",
            "--out", str(out), "--seed", "5"]
    assert main(argv) == 0
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 3 * 4
    assert [(s["problem"], s["sample"]) for s in samples] == [(p, i) for p in range(3) for i in range(4)]
    assert set(samples[0]) == {"problem", "sample", "prompt", "reference", "completion", "answer", "correct", "length"}
    assert all(1 <= s["length"] <= 6 for s in samples)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n"] == 4 and saved["ks"] == [1, 2, 4] and saved["num_problems"] == 3
    metrics = saved["metrics"]
    correct = [[s["correct"] for s in samples if s["problem"] == p] for p in range(3)]
    answers = [[s["answer"] for s in samples if s["problem"] == p] for p in range(3)]
    expected = summarize(correct, answers, [1, 2, 4])
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert metrics["response_length"] == pytest.approx(sum(s["length"] for s in samples) / 12)
    assert metrics["no_answer_rate"] == pytest.approx(sum(s["answer"] is None for s in samples) / 12)
    assert "maj@4" in capsys.readouterr().out
    # Same seed, same samples.
    assert main([*argv[:-2], "--out", str(tmp_path / "again"), "--seed", "5"]) == 0
    assert read_jsonl(tmp_path / "again" / "samples.jsonl") == samples


def test_grading_counts_answers_equal_to_the_reference(tmp_path, student):
    # Greedy answers of the model to a file of prompts, then the same prompts with those answers as references:
    # every sample that has a parsed answer must be graded right, the others wrong.
    prompts = ["12*34=", "56*78=", "90*12=", "3*4="]
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps({"question": p, "answer": "0"}) + "\n" for p in prompts))
    common = ["--prompt-key", "question", "--temperature", "0", "--n", "1", "--max-new-tokens", "12"]
    assert main(["eval", str(student), "--problems", str(first), *common, "--out", str(tmp_path / "a")]) == 0
    greedy = read_jsonl(tmp_path / "a" / "samples.jsonl")
    second = tmp_path / "second.jsonl"
    second.write_text("".join(json.dumps({"question": s["prompt"], "answer": s["answer"] or "none"}) + "\n"
                              for s in greedy))
    assert main(["eval", str(student), "--problems", str(second), *common, "--out", str(tmp_path / "b")]) == 0
    regraded = read_jsonl(tmp_path / "b" / "samples.jsonl")
    assert [s["completion"] for s in regraded] == [s["completion"] for s in greedy]  # greedy is deterministic
    assert [s["correct"] for s in regraded] == [s["answer"] is not None for s in greedy]
    accuracy = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]["pass@1"]
    assert accuracy == pytest.approx(sum(s["answer"] is not None for s in greedy) / len(prompts))


def test_run_folder_evaluates_its_latest_checkpoint(tmp_path, student):
    run = tmp_path / "run"
    model, tokenizer = load_model(str(student)), load_tokenizer(str(student))
    save_checkpoint(run, 2, model, tokenizer, {})
    save_checkpoint(run, 4, model, tokenizer, {})
    assert main(["eval", str(run), "--num-problems", "2", "--n", "1", "--max-new-tokens", "3"]) == 0
    saved = json.loads((run / "eval-step-000004" / "metrics.json").read_text())
    assert saved["path"].endswith("step-000004")


def test_default_ks_are_powers_of_two_and_n():
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(1) == [1]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model or tokenizer is loaded: bad input must be rejected before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(reopold.models.loading, "load_model", refuse)
    monkeypatch.setattr(reopold.models.loading, "load_tokenizer", refuse)


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reopold: error: ") and "\n" not in err
    return err


def test_missing_checkpoint_fails_before_loading(tmp_path, capsys, no_loading):
    err = error_of(capsys, ["eval", str(tmp_path / "runs" / "nope" / "checkpoints" / "step-000100")])
    assert "does not exist" in err
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    assert "has no complete checkpoint" in error_of(capsys, ["eval", str(tmp_path / "empty-run")])


def test_jsonl_line_without_answer_fails_before_loading(tmp_path, student, capsys, no_loading):
    path = tmp_path / "problems.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    err = error_of(capsys, ["eval", str(student), "--problems", str(path)])
    assert "row 2 has no reference answer under 'answer'" in err


def test_k_above_n_fails_before_loading(student, capsys, no_loading):
    err = error_of(capsys, ["eval", str(student), "--n", "4", "--k", "1,8"])
    assert "k=8 is larger than the n=4 samples" in err


def test_greedy_with_several_samples_fails(student, capsys, no_loading):
    assert "greedy" in error_of(capsys, ["eval", str(student), "--temperature", "0", "--n", "4"])


def test_math_checker_without_math_verify_fails_before_loading(student, capsys, no_loading, monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **kw: (_ for _ in ()).throw(ImportError(name))
                        if name == "math_verify" else real_import(name, *a, **kw))
    err = error_of(capsys, ["eval", str(student), "--checker", "math"])
    assert "pip install 'reopold[math]'" in err


def test_trainer_evaluation_and_greedy_eval_agree(tmp_path, student):
    # The trainer's periodic evaluate() and `reopold eval --temperature 0 --n 1` grade the same greedy answers.
    from reopold.evaluation.heldout import evaluate
    from reopold.tasks import ArithmeticTask
    from reopold.tasks.prompts import PromptEncoder

    task = ArithmeticTask()
    tokenizer = load_tokenizer(str(student))
    trainer_metrics = evaluate(load_model(str(student)), tokenizer, task, task.problems("test", 3),
                               PromptEncoder(tokenizer), max_new_tokens=6)
    argv = ["eval", str(student), "--temperature", "0", "--n", "1", "--num-problems", "3", "--max-new-tokens", "6",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["pass@1"] == trainer_metrics["accuracy"]
    assert metrics["response_length"] == pytest.approx(trainer_metrics["response_length"])
