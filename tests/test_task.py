"""The bundled demo task, its tokenizer and the shipped teacher/student checkpoints."""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

import pytest
import torch

from reopold.tasks import TASKS, ArithmeticTask, Problem, build_tokenizer, get_task

DEMO = resources.files("reopold") / "assets" / "demo"
HARD = Path(__file__).resolve().parents[1] / "benchmarks" / "hard"  # the benchmark's harder variant (3x3 digits)


@pytest.fixture(scope="module")
def task() -> ArithmeticTask:
    return ArithmeticTask(digits=(3, 2))


# ---- task ----------------------------------------------------------------------------------------------
def test_problems_are_deterministic_distinct_and_correct(task):
    first, again = task.problems("train", 500), ArithmeticTask(digits=(3, 2)).problems("train", 500)
    assert first == again
    assert len({p.prompt for p in first}) == 500
    assert task.problems("train", 100) == first[:100]  # a prefix of the same stream
    for p in first:
        a, b = map(int, p.prompt[:-1].split("*"))
        assert 100 <= a <= 999 and 10 <= b <= 99 and p.answer == str(a * b)


def test_splits_are_disjoint_even_when_factors_are_swapped():
    sym = ArithmeticTask(digits=(2, 2))  # 2x2 has both a*b and b*a
    pairs = {s: {frozenset(map(int, p.prompt[:-1].split("*"))) for p in sym.problems(s, 200)}
             for s in ("train", "validation", "test")}
    assert not pairs["train"] & pairs["test"]
    assert not pairs["train"] & pairs["validation"]
    assert not pairs["validation"] & pairs["test"]
    big = ArithmeticTask(digits=(3, 2))
    train = {p.prompt for p in big.problems("train", 20000)}
    assert not train & {p.prompt for p in big.problems("test", 1000)}
    rng = random.Random(0)
    streamed = {big.sample_problem(rng, "train").prompt for _ in range(2000)}
    assert not streamed & {p.prompt for p in big.problems("test", 4000)}


def test_bad_split_and_oversized_requests_fail(task):
    with pytest.raises(ValueError, match="split"):
        task.problems("dev", 10)
    with pytest.raises(ValueError, match="too many"):
        task.problems("test", 10_000)


def test_every_gold_path_checks_and_paths_differ(task):
    # 347*26: decompose 26 -> 2 partial products, decompose 347 -> 3; each in either order.
    p = Problem(prompt="347*26=", answer="9022")
    sols = {path: task.solution(p, path=path) for path in task.paths(p)}
    assert sols[(False, False)] == "347*6=2082;347*20=6940;2082+6940=9022:9022"
    assert sols[(True, True)] == "26*300=7800;26*40=1040;26*7=182;7800+1040=8840;8840+182=9022:9022"
    assert len(set(sols.values())) == 4
    for problem in task.problems("test", 300):
        for path in task.paths(problem):
            assert task.check(problem, task.solution(problem, path=path))
        assert task.check(problem, task.solution(problem, random.Random(0)))
    same = Problem(prompt="12*12=", answer="144")
    assert len(ArithmeticTask(digits=(2, 2)).paths(same)) == 2


def test_random_paths_cover_all_paths_and_lengths_fit(task):
    rng = random.Random(0)
    p = task.problems("train", 1)[0]
    assert {task.solution(p, rng) for _ in range(200)} == {task.solution(p, path=x) for x in task.paths(p)}
    lengths = [len(task.solution(q, path=x)) for q in task.problems("train", 300) for x in task.paths(q)]
    assert 30 <= min(lengths) and max(lengths) <= task.max_completion_chars() <= 80


@pytest.mark.parametrize("completion,answer", [
    ("347*6=2082;347*20=6940;2082+6940=9022:9022", "9022"),
    (":9022", "9022"),
    ("347*6=2082;347*20=6940;2082+6940=9023:9023", "9023"),  # parses; check() rejects it
    ("347*6=2082;347*20=6940;2082+6940=9022", None),  # no answer marker
    ("347*6=2082:9022:9022", None),  # two markers
    ("2082+6940=9022:09022", None),  # leading zero
    ("2082+6940=9022:", None),
    ("2082+6940=9022:90a2", None),
    ("", None),
])
def test_parse_answer(task, completion, answer):
    assert task.parse_answer(completion) == answer


def test_check_rejects_wrong_and_malformed(task):
    p = Problem(prompt="347*26=", answer="9022")
    assert not task.check(p, "347*6=2082;347*20=6940;2082+6940=9023:9023")
    assert not task.check(p, "347*6=2082;347*20=6940;2082+6940=9022")
    assert not task.check(p, "9022")
    assert not task.check(p, ":9022:9022")


def test_registry():
    assert isinstance(get_task("arithmetic", digits=(2, 2)), ArithmeticTask)
    with pytest.raises(KeyError, match="arithmetic"):
        get_task("arithmetc")
    with pytest.raises(ValueError, match="already registered"):
        TASKS.register("arithmetic", ArithmeticTask)


# ---- tokenizer -----------------------------------------------------------------------------------------
def test_tokenizer_round_trips_every_character(task, tmp_path):
    tok = build_tokenizer(task.alphabet)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    ids = tok(task.alphabet)["input_ids"]
    assert len(ids) == len(task.alphabet) and len(set(ids)) == len(ids)
    assert tok.unk_token_id not in ids
    p = task.problems("test", 1)[0]
    text = p.prompt + task.solution(p)
    enc = tok(text)["input_ids"]
    assert len(enc) == len(text) and tok.decode(enc) == text
    assert tok.decode(enc + [tok.eos_token_id], skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == enc and again.decode(enc) == text
    assert again.padding_side == "left"


# ---- shipped checkpoints -------------------------------------------------------------------------------
def _load(name, root=DEMO):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(root / name)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return tok, model


def _greedy_accuracy(tok, model, task, n=200) -> float:
    problems = task.problems("test", n)
    enc = tok([p.prompt for p in problems], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=task.max_completion_chars() + 8,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(task.check(p, t) for p, t in zip(problems, texts, strict=True)) / len(problems)


@pytest.mark.parametrize("root", [DEMO, HARD], ids=["demo", "hard"])
def test_shipped_checkpoints_load_offline_and_share_the_vocabulary(task, root):
    t_tok, teacher = _load("teacher", root)
    s_tok, student = _load("student", root)
    assert t_tok.get_vocab() == s_tok.get_vocab() == build_tokenizer(task.alphabet).get_vocab()
    assert teacher.config.vocab_size == student.config.vocab_size == len(t_tok)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert n_student * 3 <= n_teacher
    size = sum(f.stat().st_size for f in (root / "teacher").iterdir() if f.is_file())  # type: ignore[attr-defined]
    assert size <= 25 * 2**20


def test_shipped_teacher_is_accurate(task):
    tok, teacher = _load("teacher")
    acc = _greedy_accuracy(tok, teacher, task)
    assert acc >= 0.85, acc


def test_shipped_student_fits_vllms_cpu_attention_and_sits_well_below_the_teacher(task):
    """vLLM's CPU attention supports head dimensions 32, 64, ... only, so the demo student has 2 heads of 32
    (``scripts/make_student.py``); measured on 1,000 test problems: 39.1% greedy (the teacher: 97.0%)."""
    tok, student = _load("student")
    config = student.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert head_dim == config.hidden_size // config.num_attention_heads == 32
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 2, 3)
    acc = _greedy_accuracy(tok, student, task)
    print(f"[measured] shipped student, greedy accuracy on 200 test problems: {acc:.3f}")
    assert 0.25 <= acc <= 0.55, acc  # has the format and some digits; far from the teacher's 97%


def test_hard_variant_has_a_wide_gap():
    """The harder variant's point: a teacher that solves 3x3 digits and a student far below it (measured on 1,000
    test problems: 99% and 20%)."""
    task = ArithmeticTask(digits=(3, 3))
    teacher_acc = _greedy_accuracy(*_load("teacher", HARD), task)
    student_acc = _greedy_accuracy(*_load("student", HARD), task)
    assert teacher_acc >= 0.95 and student_acc <= 0.35, (teacher_acc, student_acc)
