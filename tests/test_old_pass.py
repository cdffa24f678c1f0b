"""The trainer's separate pi_old pass (a no-grad student forward for log-probs and entropies) is skipped where the
step does not need it: SFT and GKD never read pi_old, and a sampler that reports its sampled-token log-probs (vLLM)
supplies them unless the step's mask needs entropies. Skipping it must not change what is trained: every test runs
the same steps with the pass forced (the behaviour before) and compares losses, gradient norms and rewards."""

from __future__ import annotations

import pytest
import torch

from reopold import core
from tests.fakes import BigramEngine
from tests.test_trainer_unit import fake_trainer


class LogprobEngine(BigramEngine):
    """Like vLLM with ``logprobs=True``: each rollout carries the sampler's log-prob of every response token."""

    def generate(self, prompt_ids, problems, *, num_samples: int = 1):
        rollout = super().generate(prompt_ids, problems, num_samples=num_samples)
        with torch.no_grad():
            logprobs, _ = core.logprobs_and_entropy(self.policy._logits(rollout), rollout.completion_ids)
        rollout.old_logprobs = torch.where(rollout.completion_mask, logprobs, torch.zeros_like(logprobs))
        return rollout


def count_passes(model) -> list[int]:
    """Counts the scoring passes: forwards without gradients that return log-probs (not the update's, not logits)."""
    calls, forward = [], model.forward

    def counted(rollout, *, with_entropy: bool = True, return_logits: bool = False):
        if not torch.is_grad_enabled() and not return_logits:
            calls.append(len(rollout))
        return forward(rollout, with_entropy=with_entropy, return_logits=return_logits)

    model.forward = counted
    return calls


def run(tmp_path, name: str, *, force_pass: bool, engine_logprobs: bool = False, steps: int = 6, **algo):
    trainer, model, _, logger = fake_trainer(tmp_path / ("forced" if force_pass else "default"), name, steps, **algo)
    if engine_logprobs:
        trainer.engine = LogprobEngine(model)
    if force_pass:  # what every step did before the pass could be skipped
        trainer.algorithm.needs_entropy = lambda step: True
    calls = count_passes(model)
    trainer.fit()
    return [r for r in logger.records if r["kind"] == "train"], calls, model


def assert_same_training(skipped, forced):
    for key in ("loss", "grad_norm", "reward_mean"):
        if key in forced[0]:
            got, want = [float(r[key]) for r in skipped], [float(r[key]) for r in forced]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("name", ["sft", "gkd"])
def test_algorithms_without_pi_old_skip_the_pass_and_train_the_same(tmp_path, name):
    skipped, calls, model = run(tmp_path, name, force_pass=False)
    forced, forced_calls, forced_model = run(tmp_path, name, force_pass=True)
    assert calls == [] and forced_calls == [16] * 12  # two micro-batches of 16 a step when forced, none otherwise
    assert_same_training(skipped, forced)
    torch.testing.assert_close(model.table, forced_model.table)


def test_gkd_reports_the_entropy_from_its_own_logits(tmp_path):
    skipped, _, _ = run(tmp_path, "gkd", force_pass=False)
    forced, _, _ = run(tmp_path, "gkd", force_pass=True)
    # One update per rollout: the update's student is pi_old, so its entropy is the pass's (token-weighted mean).
    got, want = [r["entropy_mean"] for r in skipped], [float(r["entropy_mean"]) for r in forced]
    assert got == pytest.approx(want, rel=1e-5)
    assert all(0.1 < h < 2.0 for h in got)  # a real entropy over V = 7 (at most log 7 = 1.95), not a zero


def test_sft_logs_no_entropy_without_the_pass(tmp_path):
    skipped, _, _ = run(tmp_path, "sft", force_pass=False, steps=2)
    assert all("entropy_mean" not in r and 0.0 <= r["teacher_accuracy"] <= 1.0 for r in skipped)


@pytest.mark.parametrize(("name", "algo"), [("rkl_sg", {}), ("grpo", {}), ("reopold", {"entropy_selection": False})])
def test_sampler_logprobs_replace_the_pass(tmp_path, name, algo):
    skipped, calls, model = run(tmp_path, name, force_pass=False, engine_logprobs=True, **algo)
    forced, forced_calls, forced_model = run(tmp_path, name, force_pass=True, engine_logprobs=True, **algo)
    assert calls == [] and forced_calls == [16] * 12
    assert_same_training(skipped, forced)
    torch.testing.assert_close(model.table, forced_model.table)


def test_reopold_keeps_the_pass_only_for_the_entropy_mask(tmp_path):
    """Exploration (steps 0-2) needs no entropies: the sampler's log-probs do; refinement (3-5) needs the pass."""
    skipped, calls, model = run(tmp_path, "reopold", force_pass=False, engine_logprobs=True, switch_step=3)
    forced, _, forced_model = run(tmp_path, "reopold", force_pass=True, engine_logprobs=True, switch_step=3)
    assert calls == [16] * 6  # steps 3, 4, 5: two micro-batches each
    assert [r["phase"] for r in skipped] == ["exploration"] * 3 + ["refinement"] * 3
    assert all(("entropy_mean" in r) == (r["phase"] == "refinement") for r in skipped)
    assert_same_training(skipped, forced)
    torch.testing.assert_close(model.table, forced_model.table)


@pytest.mark.parametrize("name", ["reopold", "rkl", "grpo"])
def test_without_sampler_logprobs_the_pass_runs_every_step(tmp_path, name):
    records, calls, _ = run(tmp_path, name, force_pass=False, steps=4)
    assert len(calls) >= 8 and calls[:2] == [16, 16]  # two micro-batches a step at least
    assert all("entropy_mean" in r for r in records)  # unchanged: the pass's entropies are logged


def test_prompt_sampler_shuffles_once_per_epoch(monkeypatch):
    import random

    from reopold.tasks import prompts
    from reopold.tasks.arithmetic import Problem

    made = []

    class Counted(random.Random):
        def __init__(self, seed):
            made.append(seed)
            super().__init__(seed)

    monkeypatch.setattr(prompts.random, "Random", Counted)
    sampler = prompts.PromptSampler([Problem(str(i), str(i)) for i in range(100)], 32, seed=0)
    batches = [sampler.batch(step) for step in range(6)]  # 192 prompts: epochs 0 and 1
    assert len(made) == 2  # one shuffle per epoch, not per prompt or per step
    assert len({p.prompt for b in batches[:3] for p in b} | {p.prompt for p in batches[3][:4]}) == 100  # a permutation


def test_training_imports_no_matplotlib_until_a_report_is_written():
    import subprocess
    import sys

    code = "import sys, reopold.cli, reopold.train.run; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def count_forwards(model) -> list[bool]:
    """Every forward of the student: whether it ran with gradients."""
    calls, forward = [], model.forward

    def counted(rollout, *, with_entropy: bool = True, return_logits: bool = False):
        calls.append(torch.is_grad_enabled())
        return forward(rollout, with_entropy=with_entropy, return_logits=return_logits)

    model.forward = counted
    return calls


@pytest.mark.parametrize(("name", "algo"), [("reopold", {"switch_step": 2}), ("rkl", {"switch_step": 2}),
                                            ("grpo", {}), ("rkl_sg", {})])
def test_one_micro_batch_update_reuses_its_forward_as_pi_old(tmp_path, name, algo):
    """One update of one micro-batch per rollout: the update's own forward gives pi_old (one forward a step, not
    two), and training is the same as with the separate pass."""
    results = {}
    for reuse in (True, False):
        trainer, model, _, logger = fake_trainer(tmp_path / str(reuse), name, 5, **algo)
        trainer.config.optim.micro_batch_size = 32  # every row of the step in one micro-batch
        trainer.reuse_update_forward = reuse
        calls = count_forwards(model)
        trainer.fit()
        results[reuse] = ([r for r in logger.records if r["kind"] == "train"], calls, model.table.detach().clone())
    (records, calls, table), (forced, forced_calls, forced_table) = results[True], results[False]
    assert all(calls) and len(calls) == 5  # one forward a step, with gradients (rkl's exploration re-grading too)
    assert forced_calls.count(False) >= 5 and forced_calls.count(True) == 5
    assert_same_training(records, forced)
    assert [float(r["entropy_mean"]) for r in records] == pytest.approx([float(r["entropy_mean"]) for r in forced])
    torch.testing.assert_close(table, forced_table)


def test_no_reuse_with_dropout_or_several_micro_batches(tmp_path):
    trainer, model, _, _ = fake_trainer(tmp_path, "reopold", 1)
    assert not trainer._reuses_update_forward(32)  # 32 rows, micro-batches of 16
    trainer.config.optim.micro_batch_size = 32
    assert trainer._reuses_update_forward(32)
    model.dropout = torch.nn.Dropout(0.1)
    assert not trainer._reuses_update_forward(32)  # training-mode forwards are random: not pi_old's
