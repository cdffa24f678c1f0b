"""REOPOLD inside TRL: REOPOLDTrainer trains tiny local Llamas on CPU; its loss is checked against the float64
reference on log-probs computed independently from full logits, and it must learn (held-out reverse KL falls)."""

import math
import os

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from reopold import core  # noqa: E402
from reopold.integrations.trl import REOPOLDConfig, REOPOLDTrainer, _check_trl_version  # noqa: E402
from tests import reference as ref  # noqa: E402
from tests.tiny import make_model  # noqa: E402

pytestmark = pytest.mark.integrations
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def _prompts(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, 50, (2, n), generator=g).tolist()
    return [f"{x}+{y}=" for x, y in zip(a, b, strict=True)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_models")
    teacher = make_model(root / "teacher", hidden=32, layers=2, seed=1, sharpness=10.0)  # peaky teacher
    student = make_model(root / "student", hidden=32, layers=2, seed=2)
    return student, teacher


def _trainer(models, tmp_path, trainer_class=REOPOLDTrainer, **overrides):
    student_path, teacher_path = models
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=6, switch_step=3, max_completion_length=10, learning_rate=3e-3, lr_scheduler_type="constant",
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], logging_steps=1,
        save_strategy="no", seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    settings.update(overrides)
    return trainer_class(
        model=AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32),
        args=REOPOLDConfig(**settings),
        train_dataset=Dataset.from_dict({"prompt": _prompts(64, seed=0)}),
        processing_class=AutoTokenizer.from_pretrained(student_path),
    )


def _full_logit_stats(model, inputs):
    """float64 log-probs of the completion tokens and entropies from the model's full logits (no reopold code)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.double()  # (B, P+C, V)
    width = inputs["completion_ids"].shape[1]
    logits = logits[:, -width - 1 : -1]  # position t predicts completion token t
    logprobs = torch.log_softmax(logits, dim=-1)
    sampled = logprobs.gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
    return sampled, -(logprobs.exp() * logprobs).sum(-1)


class CapturingTrainer(REOPOLDTrainer):
    """Records, for every micro-batch, the loss TRL computes and independent full-logit statistics."""

    records: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_lp, student_entropy = _full_logit_stats(self.accelerator.unwrap_model(model), inputs)
        teacher_lp, _ = _full_logit_stats(self.teacher_model, inputs)
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.records.append(dict(
            step=self.state.global_step, loss=loss.detach().double(), inputs=inputs, student=student_lp,
            teacher=teacher_lp, entropy=student_entropy, mask=inputs["completion_mask"].bool(),
            metrics={k: float(v) for k, v in self._last_loss_metrics.items()},
        ))  # fmt: skip
        return loss


def _pad_cat(tensors, value):
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])


def test_loss_equals_float64_reference_in_both_phases(models, tmp_path):
    trainer = _trainer(models, tmp_path, CapturingTrainer)
    trainer.records = []
    trainer.train()
    records = trainer.records
    assert len(records) == 12  # 6 optimizer steps x 2 micro-batches
    floor = ref.floor(0.3)
    phases, dropped_by_floor = [], []
    for step in range(6):
        group = [r for r in records if r["step"] == step]
        assert len(group) == 2
        phase = core.phase_at(step, 3)
        phases.append(phase)
        # The pass that scored the generation batch ran under the same weights as the loss (one step per batch).
        for r in group:
            valid = r["mask"]
            for key, expected in (
                ("old_logprobs", r["student"]),
                ("teacher_logprobs", r["teacher"]),
                ("entropy", r["entropy"]),
            ):
                assert torch.allclose(r["inputs"][key].double()[valid], expected[valid], atol=2e-5), key
        # tau_beta and the kept count of the whole generation batch, from the float64 statistics.
        entropy = _pad_cat([r["entropy"] for r in group], 0.0)
        mask = _pad_cat([r["mask"] for r in group], False)
        rewards = _pad_cat([r["teacher"] - r["student"] for r in group], 0.0)
        tau = ref.threshold(entropy, mask, 0.2) if phase == "refinement" else None
        keep = ref.keep_mask(rewards, entropy, mask, phase, floor=floor, threshold=tau)
        kept = int(keep.sum())
        assert float(group[0]["inputs"]["num_items_in_batch"]) == kept
        if phase == "exploration":
            assert kept == int((mask & (rewards >= floor)).sum())
        else:  # top-beta entropy tokens: at least ceil(0.2 N), well under all of them
            assert math.ceil(0.2 * int(mask.sum())) <= kept < int(mask.sum())
            assert float(group[0]["inputs"]["reopold_threshold"]) == pytest.approx(tau, abs=1e-5)
        for r in group:
            expected, _ = ref.reopold_loss(
                r["student"],
                r["student"],
                r["teacher"],
                r["entropy"],
                r["mask"],
                phase,
                threshold_value=tau,
                num_tokens=kept,
            )
            assert float(r["loss"]) == pytest.approx(float(expected), abs=1e-5)
            assert r["metrics"]["refinement"] == float(phase == "refinement")
        dropped_by_floor.append(int((mask & (rewards < floor)).sum()) if phase == "exploration" else 0)
    assert phases == ["exploration"] * 3 + ["refinement"] * 3
    assert sum(dropped_by_floor) > 0  # the exploration mask was exercised, not just "all valid tokens"


def test_loss_is_core_reopold_loss_on_the_captured_tensors(models, tmp_path):
    """The plug-in adds no math: its loss is core.reopold_loss on the tensors it hands over."""
    trainer = _trainer(models, tmp_path, CapturingTrainer, max_steps=4, switch_step=2)
    trainer.records = []
    trainer.train()
    for r in trainer.records:
        inputs = r["inputs"]
        refinement = bool(inputs["reopold_refinement"])
        threshold = None if torch.isnan(inputs["reopold_threshold"]) else inputs["reopold_threshold"]
        expected, _ = core.reopold_loss(
            r["student"].float(), inputs["old_logprobs"], inputs["teacher_logprobs"], inputs["entropy"], r["mask"],
            phase="refinement" if refinement else "exploration", threshold=threshold,
            num_tokens=inputs["num_items_in_batch"],
        )  # fmt: skip
        assert float(r["loss"]) == pytest.approx(float(expected), abs=1e-6)


def _heldout_reverse_kl(student, teacher, tokenizer, prompts, seed=123) -> float:
    """Per-token KL(student || teacher) over full distributions, on the student's own samples of held-out prompts."""
    torch.manual_seed(seed)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = student.generate(
            **batch, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id
        )
        width = out.shape[1] - batch["input_ids"].shape[1]
        completion = out[:, -width:]
        is_eos = (completion == tokenizer.eos_token_id).long()
        valid = (is_eos.cumsum(-1) - is_eos) == 0  # up to and including the first eos
        attention = torch.cat([batch["attention_mask"], valid.long()], dim=1)
        s = torch.log_softmax(student(input_ids=out, attention_mask=attention).logits[:, -width - 1 : -1].double(), -1)
        t = torch.log_softmax(teacher(input_ids=out, attention_mask=attention).logits[:, -width - 1 : -1].double(), -1)
    kl = (s.exp() * (s - t)).sum(-1)  # (B, C)
    return float(kl[valid].mean())


def test_it_learns_heldout_reverse_kl_falls(models, tmp_path):
    trainer = _trainer(models, tmp_path, max_steps=60, switch_step=20, learning_rate=3e-3)
    tokenizer = trainer.processing_class
    heldout = _prompts(32, seed=99)
    teacher = trainer.teacher_model
    before = _heldout_reverse_kl(trainer.model, teacher, tokenizer, heldout)
    trainer.train()
    after = _heldout_reverse_kl(trainer.model.eval(), teacher, tokenizer, heldout)
    print(f"held-out reverse KL per token: {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before
    logged = [h for h in trainer.state.log_history if "reopold/kept_frac" in h]
    assert logged and logged[-1]["reopold/refinement"] == 1.0 and logged[0]["reopold/refinement"] == 0.0


def test_model_card_names_the_paper(models, tmp_path):
    trainer = _trainer(models, tmp_path, max_steps=1)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2603.11137" in card and "Relaxed On-Policy Distillation" in card and "reopold" in card


def test_config_rejects_bad_values_with_the_paper_symbol(tmp_path):
    with pytest.raises(ValueError, match="lam"):
        REOPOLDConfig(output_dir=str(tmp_path), lam=1.5, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="beta"):
        REOPOLDConfig(output_dir=str(tmp_path), beta=0.0, use_cpu=True, bf16=False)
    help_text = REOPOLDConfig.__dataclass_fields__["switch_step"].metadata["help"]
    assert "T_switch" in help_text


def test_untested_trl_version_is_refused_with_a_clear_message():
    with pytest.raises(ImportError, match="trl>=1.16,<1.17"):
        _check_trl_version("1.17.0")
    with pytest.raises(ImportError, match="tested"):
        _check_trl_version("1.15.2")
    _check_trl_version("1.16.0")


@pytest.mark.slow
def test_two_ranks_share_the_threshold_and_the_kept_token_count(models, tmp_path):
    """Under DDP (2 CPU ranks, gloo) tau_beta and the loss normaliser cover the generation batch of every rank."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    student, teacher = models
    path = os.pathsep.join(p for p in (str(root), str(root / "src"), os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(root / "tests" / "trl_ddp_worker.py"), str(student), str(teacher), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(records) for records in ranks] == [4, 4]
    floor = ref.floor(0.3)
    for first, second in zip(*ranks, strict=True):
        assert first["step"] == second["step"] and first["num_items"] == second["num_items"]
        entropy = torch.tensor(first["entropy"] + second["entropy"], dtype=torch.float64)
        rewards = torch.tensor(first["rewards"] + second["rewards"], dtype=torch.float64)
        if first["refinement"]:
            tau = ref.threshold(entropy[None], torch.ones(1, len(entropy), dtype=torch.bool), 0.2)
            assert first["threshold"] == pytest.approx(tau, abs=1e-6) and second["threshold"] == first["threshold"]
            kept = int((entropy >= first["threshold"]).sum())
        else:
            kept = int((rewards >= floor).sum())
        assert first["num_items"] == kept
    assert [r["refinement"] for r in ranks[0]] == [False, False, True, True]
