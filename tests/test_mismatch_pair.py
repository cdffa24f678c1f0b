"""The mismatched-teacher variant (benchmarks/mismatch): choosing which solution paths a model is trained on, and the
shipped pair (a teacher of paths 0-1, a student of paths 2-3)."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import pytest
import torch

from reopold.tasks import ArithmeticTask, Problem, build_tokenizer
from reopold.tasks.arithmetic import PATHS, check_paths

ROOT = Path(__file__).resolve().parents[1]
MISMATCH = ROOT / "benchmarks" / "mismatch"
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def task() -> ArithmeticTask:
    return ArithmeticTask(digits=(3, 2))


def _path_of(task, problem, text) -> tuple[bool, bool]:
    """Which path wrote ``text`` (ValueError when none did)."""
    return next(p for p in PATHS if task.solution(problem, path=p) == text)


# ---- choosing paths --------------------------------------------------------------------------------------
@pytest.mark.parametrize("paths", [(0, 1), (2, 3), (1,), (0, 3)])
def test_solution_draws_only_the_chosen_paths_and_all_of_them(task, paths):
    rng = random.Random(0)
    seen = set()
    for problem in task.problems("train", 200):
        text = task.solution(problem, rng, paths=paths)
        assert task.check(problem, text)
        seen.add(PATHS.index(_path_of(task, problem, text)))
    assert seen == set(paths)


def test_default_draw_is_unchanged(task):
    """Without ``paths`` the draw is the demo models' (uniform over ``paths(problem)``, the same rng stream)."""
    problems = task.problems("train", 50)
    a, b = random.Random(3), random.Random(3)
    assert [task.solution(p, a) for p in problems] == [task.solution(p, path=b.choice(task.paths(p))) for p in problems]


def test_first_factor_paths_start_with_the_second_factor(task):
    problem = task.problems("train", 1)[0]
    first, second = problem.prompt[:-1].split("*")
    rng = random.Random(0)
    for _ in range(20):
        assert task.solution(problem, rng, paths=(0, 1)).startswith(first + "*")
        assert task.solution(problem, rng, paths=(2, 3)).startswith(second + "*")


@pytest.mark.parametrize("bad", [(), (0, 0), (4,), (-1,)])
def test_bad_paths_are_refused(task, bad):
    with pytest.raises(ValueError, match="paths"):
        check_paths(bad)
    with pytest.raises(ValueError, match="paths"):
        task.solution(task.problems("train", 1)[0], random.Random(0), paths=bad)


def test_scripts_parse_paths_and_train_on_them(task):
    from train_teacher import gold_batch, parse_paths

    assert parse_paths("2,3") == (2, 3)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_paths("1,7")
    tokenizer = build_tokenizer(task.alphabet)
    input_ids, _, labels = gold_batch(task, tokenizer, random.Random(0), 32, (2, 3))
    for ids, lab in zip(input_ids.tolist(), labels.tolist(), strict=True):
        prompt = tokenizer.decode([t for t, y in zip(ids, lab, strict=True) if y == -100], skip_special_tokens=True)
        completion = tokenizer.decode([y for y in lab if y != -100], skip_special_tokens=True)
        problem = Problem(prompt=prompt, answer="")
        assert completion.startswith(prompt[:-1].split("*")[1] + "*"), (prompt, completion)
        assert _path_of(task, problem, completion)[0] is True  # a first-factor path


# ---- the shipped pair -----------------------------------------------------------------------------------
def _load(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(MISMATCH / name)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return tok, model


def _greedy(tok, model, task, n=200) -> tuple[list, list[str]]:
    problems = task.problems("test", n)
    enc = tok([p.prompt for p in problems], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=task.max_completion_chars() + 8,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return problems, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("teacher_dir", ["teacher", "teacher-scratch"])
def test_mismatched_pair_loads_shares_the_vocabulary_and_answers_in_its_own_style(task, teacher_dir):
    torch.set_num_threads(1)
    t_tok, teacher = _load(teacher_dir)
    s_tok, student = _load("student")
    assert t_tok.get_vocab() == s_tok.get_vocab() == build_tokenizer(task.alphabet).get_vocab()
    assert teacher.config.vocab_size == student.config.vocab_size == len(t_tok)
    assert sum(p.numel() for p in student.parameters()) * 3 <= sum(p.numel() for p in teacher.parameters())

    problems, t_texts = _greedy(t_tok, teacher, task)
    _, s_texts = _greedy(s_tok, student, task)
    teacher_acc = sum(task.check(p, t) for p, t in zip(problems, t_texts, strict=True)) / len(problems)
    student_acc = sum(task.check(p, t) for p, t in zip(problems, s_texts, strict=True)) / len(problems)
    assert teacher_acc >= 0.9 and student_acc <= teacher_acc - 0.4, (teacher_acc, student_acc)
    # The styles: the teacher keeps the first factor (paths 0-1), the student the second (paths 2-3).
    first = [p.prompt.split("*")[0] + "*" for p in problems]
    second = [p.prompt[:-1].split("*")[1] + "*" for p in problems]
    assert sum(t.startswith(f) for t, f in zip(t_texts, first, strict=True)) >= 0.95 * len(problems)
    assert sum(s.startswith(f) for s, f in zip(s_texts, second, strict=True)) >= 0.95 * len(problems)


def test_styles_classify_the_paths_by_the_factor_kept(task):
    sys.path.insert(0, str(MISMATCH))
    from styles import style_of

    for problem in task.problems("test", 50):
        a, b = problem.prompt.rstrip("=").split("*")
        if a == b:
            continue
        for index, path in enumerate(PATHS):
            expected = "teacher" if index < 2 else "student"
            assert style_of(problem.prompt, task.solution(problem, path=path)) == expected
        assert style_of(problem.prompt, a + "0*" + b[0] + "=1;") == "other"  # a factor with a digit added


def test_the_mismatch_benchmark_runs_quick(tmp_path, monkeypatch):
    """`reopold benchmark --config benchmarks/mismatch/config.yaml --quick`: the shipped pair through the sweep's
    pipeline (two methods, two steps); the full sweep runs outside CI (docs/results.md)."""
    import json

    from reopold.cli import main

    monkeypatch.chdir(ROOT)  # the config names its models relative to the repository root
    out = tmp_path / "out"
    assert main(["benchmark", "--config", "benchmarks/mismatch/config.yaml", "--quick", "--jobs", "1",
                 "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert set(data["methods"]) == {"reopold", "rkl"} and data["failed"] == []
    start = data["methods"]["reopold"]["accuracy_curve"][0]["mean"]
    assert 0.0 < start < 0.6  # the shipped student, far below its teacher
