"""The shipped visual demo pair: small files, a teacher that reads the image, a student well below it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from reopold.models.vision import forced_inputs, load_vlm  # noqa: E402
from reopold.tasks.visual import VisualAdditionTask  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "src" / "reopold" / "assets" / "demo-visual"
sys.path.insert(0, str(ASSETS.parents[3] / "scripts"))
from make_visual_demo import accuracy, prompt_texts  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return {role: load_vlm(ASSETS / role) for role in ("teacher", "student")}


def test_shipped_files_are_small_and_complete():
    for role in ("teacher", "student"):
        names = {p.name for p in (ASSETS / role).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                "chat_template.jinja", "generation_config.json"} <= names
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 25 * 2**20


def test_teacher_and_student_share_vocabulary_and_image_tokens(pair):
    (teacher, t_proc), (student, s_proc) = pair["teacher"], pair["student"]
    assert t_proc.tokenizer.get_vocab() == s_proc.tokenizer.get_vocab()
    assert teacher.config.image_token_id == student.config.image_token_id
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2


def test_teacher_solves_and_student_is_well_below(pair):
    task = VisualAdditionTask()
    problems = task.problems("test", 100)
    teacher_acc = accuracy(*pair["teacher"], task, problems)
    student_acc = accuracy(*pair["student"], task, problems)
    assert teacher_acc >= 0.85  # 500 test problems at shipping time: see docs/vision.md
    assert student_acc <= teacher_acc - 0.3


def test_teacher_is_not_blind(pair):
    """The teacher's log-prob of the gold answer falls when it is shown another problem's image."""
    model, processor = pair["teacher"]
    task = VisualAdditionTask()
    problems = task.problems("test", 8)
    completions = [task.solution(p) + processor.tokenizer.eos_token for p in problems]
    ids = processor.tokenizer(completions, return_tensors="pt", padding=True, padding_side="right")
    texts = prompt_texts(processor, task, problems)

    def gold_logprob(images):
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**forced_inputs(enc, ids["input_ids"], ids["attention_mask"])).logits
        lp = logits[:, enc["input_ids"].shape[1] - 1:-1].log_softmax(-1)
        lp = lp.gather(-1, ids["input_ids"].unsqueeze(-1)).squeeze(-1)  # (B, N)
        return (lp * ids["attention_mask"]).sum(-1)  # (B,)

    right = gold_logprob([p.image for p in problems])
    shifted = gold_logprob([p.image for p in problems[1:] + problems[:1]])
    assert (right > shifted + 5.0).all()
