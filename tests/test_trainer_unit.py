"""The Trainer with fake engine, teacher and task (tests/fakes.py): ``fit()`` runs in milliseconds, needs nothing
beyond the Protocols, and learns (the reverse KL to the teacher falls, the parameters move)."""

from __future__ import annotations

import pytest
import torch

from reopold.config.loader import from_dict
from reopold.config.schema import TrainConfig
from reopold.registry import ALGORITHMS
from reopold.train.trainer import Backends, Optimization, Prompts, Student, Trainer
from tests.fakes import BigramEngine, BigramTeacher, DigitTask, FakeTokenizer, SavableBigram, V


class Sampler:
    def __init__(self, problems, size):
        self.problems, self.size = problems, size

    def batch(self, step):
        return [self.problems[(step * self.size + i) % len(self.problems)] for i in range(self.size)]


class ListLogger:
    def __init__(self):
        self.records = []

    def log(self, record):
        self.records.append(record)

    def close(self):
        pass


def fake_trainer(tmp_path, name: str, steps: int = 30, **algo):
    from accelerate import Accelerator

    config = from_dict(TrainConfig, {
        "algo": {"name": name, **algo},
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 4},
        "optim": {"lr": 0.1, "mini_batch_prompts": 8, "micro_batch_size": 16},
        "run": {"steps": steps, "eval_every": 0, "save_every": steps, "progress": False, "output_dir": str(tmp_path)},
    })  # fmt: skip
    torch.manual_seed(0)
    model = SavableBigram(seed=0)
    with torch.no_grad():
        model.table.zero_()  # uniform logits: the student starts knowing nothing
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    task = DigitTask()
    student = Student(policy=model, model=model, generator=model, tokenizer=FakeTokenizer(),
                      encode=lambda prompt: [int(prompt)])
    teacher = BigramTeacher(seed=5, sharpness=3.0)
    backends = Backends(engine=BigramEngine(model), teacher=teacher, task=task,
                        teacher_engine=BigramEngine(teacher.policy))
    logger = ListLogger()
    trainer = Trainer(config, tmp_path / "run", accelerator=Accelerator(cpu=True), student=student,
                      backends=backends, prompts=Prompts(Sampler(task.problems("train", 64), 8), []),
                      optimization=Optimization(optimizer, scheduler),
                      algorithm=ALGORITHMS.get(name)(config, V), logger=logger)
    return trainer, model, teacher, logger


def reverse_kl(model, teacher) -> float:
    """Exact KL(student || teacher) of the next-token distributions, averaged over the previous token."""
    log_s = torch.log_softmax(model.table.detach(), -1)
    log_t = torch.log_softmax(teacher.policy.table.detach(), -1)
    return float((log_s.exp() * (log_s - log_t)).sum(-1).mean())


@pytest.mark.parametrize("name", ["reopold", "rkl", "rkl_sg", "sft", "gkd"])
def test_every_distillation_algorithm_learns_the_teacher_through_the_protocols(tmp_path, name):
    trainer, model, teacher, logger = fake_trainer(tmp_path, name)
    before = reverse_kl(model, teacher)
    state = trainer.fit()
    assert state.step == 30 and state.samples == 30 * 32
    after = reverse_kl(model, teacher)
    assert after < 0.7 * before, (before, after)  # measured: every algorithm cuts it by more than half
    train = [r for r in logger.records if r["kind"] == "train"]
    assert len(train) == 30 and all(r["skipped"] is False for r in train)
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_grpo_learns_the_task_reward_through_the_protocols(tmp_path):
    trainer, model, teacher, logger = fake_trainer(tmp_path, "grpo", steps=40)
    trainer.fit()
    accuracy = [r["train_accuracy"] for r in logger.records if r["kind"] == "train"]
    # The task rewards answering d + 1 first: from chance (about 1/7) to most of the time.
    assert sum(accuracy[:5]) / 5 < 0.3 and sum(accuracy[-5:]) / 5 > 0.6, accuracy
