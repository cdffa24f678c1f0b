"""REOPOLD inside verl: the registered distillation loss, called through verl's own loss function on verl's own
batch structures (DataProto -> TensorDict in the no-padding layout), equals reopold's core on the same batch."""

import math
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

verl = pytest.importorskip("verl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.distillation.losses import distillation_ppo_loss  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from reopold import core  # noqa: E402
from reopold.integrations import verl as reopold_verl  # noqa: E402
from tests import reference as ref  # noqa: E402

pytestmark = pytest.mark.integrations
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _batch(seed: int, *, step: int, B: int = 6, P: int = 4, R: int = 7):
    """A rollout batch as verl's agent loop hands it over (left-padded prompts, right-padded responses, the
    teacher's log-probs over the whole sequence) plus the (B, R) tensors reopold's core takes."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, P + 1, (B,), generator=g)
    response_lens = torch.randint(1, R + 1, (B,), generator=g)
    response_lens[0] = R  # one full-length response
    prompt_mask = torch.arange(P)[None, :] >= (P - prompt_lens)[:, None]  # left padding
    response_mask = torch.arange(R)[None, :] < response_lens[:, None]  # right padding
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    old = -torch.rand(B, R, generator=g) * 3  # log pi_old of the sampled tokens
    student = old + (torch.rand(B, R, generator=g) - 0.5) * 0.6  # the current policy, ratios within [0.74, 1.35]
    teacher = old + torch.randn(B, R, generator=g) * 1.5  # some rewards under the floor log(0.3)/0.7 = -1.72
    entropy = torch.rand(B, R, generator=g) * 4
    # verl stores the teacher's and the actor's per-token values in full-sequence layout; response token t sits at
    # padded column P - 1 + t (the layout is shifted left by one, see verl's no_padding_2_padding).
    teacher_full = torch.zeros(B, P + R, 1)
    teacher_full[:, P - 1 : P - 1 + R, 0] = teacher
    batch = DataProto.from_single_dict({
        "prompts": torch.randint(3, 10, (B, P), generator=g),
        "responses": torch.randint(3, 10, (B, R), generator=g),
        "input_ids": torch.randint(3, 10, (B, P + R), generator=g),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "response_mask": response_mask.long(),
        "old_log_probs": old,
        "advantages": torch.zeros(B, R),  # the task-reward advantages verl computes anyway (unused here)
        "teacher_logprobs": teacher_full,
        "teacher_ids": torch.zeros(B, P + R, 1, dtype=torch.long),
        "uid": np.array([str(i // 2) for i in range(B)], dtype=object),
        "min_global_steps": np.array([step] * B, dtype=object),
    })  # fmt: skip
    data = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(response_mask.sum()), global_batch_size=B)
    student = student.clone().requires_grad_(True)
    model_output = {
        "log_probs": _full_sequence_nested(student, prompt_lens, response_lens),
        "entropy": _full_sequence_nested(entropy, prompt_lens, response_lens),
    }
    mask = response_mask
    lens = (prompt_lens, response_lens)
    return data, model_output, dict(student=student, old=old, teacher=teacher, entropy=entropy, mask=mask, lens=lens)


def _full_sequence_nested(values: torch.Tensor, prompt_lens, response_lens) -> torch.Tensor:
    """(B, R) response values -> the actor's no-padding output: one (prompt + response,) row per sample."""
    rows = []
    for i in range(values.shape[0]):
        p, r = int(prompt_lens[i]), int(response_lens[i])
        before = torch.zeros(p - 1, dtype=values.dtype)
        rows.append(torch.cat([before, values[i, :r], torch.zeros(1, dtype=values.dtype)]))  # (p + r,)
    offsets = torch.tensor([0] + [len(row) for row in rows]).cumsum(0)
    return torch.nested.nested_tensor_from_jagged(torch.cat(rows), offsets=offsets)


def _configs(**loss_overrides):
    actor = ActorConfig(strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=6, loss_agg_mode="token-mean")
    loss = DistillationLossConfig(**{
        "loss_mode": "reopold", "use_task_rewards": False, "use_policy_gradient": True, "loss_max_clamp": None,
        **loss_overrides,
    })  # fmt: skip
    return actor, DistillationConfig(distillation_loss=loss)


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("REOPOLD_SWITCH_STEP", "3")
    for name in ("REOPOLD_LAM", "REOPOLD_BETA", "REOPOLD_REWARD_FLOOR", "REOPOLD_ENTROPY_SELECTION"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("step, phase", [(2, "exploration"), (3, "refinement"), (40, "refinement")])
def test_verl_loss_equals_reopold_core_and_float64_reference(env, step, phase):
    data, model_output, t = _batch(seed=step, step=step)
    actor, distillation = _configs()
    loss, metrics = distillation_ppo_loss(actor, distillation, model_output, data)  # verl's actor loss function
    expected, core_metrics = core.reopold_loss(
        t["student"], t["old"], t["teacher"], t["entropy"], t["mask"], phase=phase
    )  # one micro-batch = the mini-batch: the threshold and the kept count are this batch's
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)
    (grad,) = torch.autograd.grad(loss, t["student"])
    (expected_grad,) = torch.autograd.grad(expected, t["student"])
    assert torch.allclose(grad, expected_grad, atol=1e-7)
    # And against the float64 reference written from the equations.
    student64 = t["student"].detach().double().requires_grad_(True)
    expected64, _ = ref.reopold_loss(student64, t["old"].double(), t["teacher"].double(), t["entropy"].double(),
                                     t["mask"], phase)  # fmt: skip
    assert float(loss) == pytest.approx(float(expected64), abs=1e-5)
    assert float(metrics["reopold/refinement"].aggregate()) == float(phase == "refinement")
    assert float(metrics["reopold/normaliser_exact"].aggregate()) == 1.0
    kept_frac = float(metrics["reopold/kept_frac"].aggregate())
    assert kept_frac == pytest.approx(float(core_metrics["kept_frac"]))
    if phase == "exploration":
        assert float(core_metrics["below_floor_frac"]) > 0 and kept_frac < 1  # the floor's mask is exercised
    else:
        assert 0.2 <= kept_frac < 0.4


def test_kept_token_normaliser_differs_from_verl_token_mean(env):
    """Without the rescaling, verl's token-mean would divide the refinement loss by every valid token."""
    data, model_output, t = _batch(seed=7, step=5)
    actor, distillation = _configs()
    loss, _ = distillation_ppo_loss(actor, distillation, model_output, data)
    valid = int(t["mask"].sum())
    all_tokens, _ = core.reopold_loss(t["student"], t["old"], t["teacher"], t["entropy"], t["mask"],
                                      phase="refinement", num_tokens=valid)  # fmt: skip
    kept, _ = core.reopold_loss(t["student"], t["old"], t["teacher"], t["entropy"], t["mask"], phase="refinement")
    assert float(loss) == pytest.approx(float(kept), abs=1e-6)
    assert abs(float(all_tokens)) < 0.5 * abs(float(kept))  # kept/valid is about beta = 0.2


def test_several_micro_batches_use_their_own_kept_fraction(env):
    data, model_output, t = _batch(seed=11, step=1)
    actor, distillation = _configs()
    first = data[:3]  # a micro-batch of half the mini-batch: batch_num_tokens still counts all of it
    tu.assign_non_tensor(first, dp_size=1, batch_num_tokens=int(t["mask"].sum()), global_batch_size=6)
    output = {k: torch.nested.nested_tensor_from_jagged(v.values()[: int(v.offsets()[3])], offsets=v.offsets()[:4])
              for k, v in model_output.items()}  # fmt: skip
    loss, metrics = distillation_ppo_loss(actor, distillation, output, first)
    assert float(metrics["reopold/normaliser_exact"].aggregate()) == 0.0
    sl = slice(0, 3)
    mask = t["mask"][sl]
    shaped = core.distillation_shaping(t["old"][sl], t["teacher"][sl], t["entropy"][sl], mask, phase="exploration")
    estimated = shaped.keep_mask.sum() / mask.sum() * t["mask"].sum()  # this micro-batch's kept fraction
    expected, _ = core.reopold_loss(t["student"][sl], t["old"][sl], t["teacher"][sl], t["entropy"][sl], mask,
                                    phase="exploration", num_tokens=estimated)  # fmt: skip
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)


def test_settings_come_from_the_environment(env):
    env.setenv("REOPOLD_LAM", "0.5")
    env.setenv("REOPOLD_ENTROPY_SELECTION", "0")
    data, model_output, t = _batch(seed=3, step=4)
    actor, distillation = _configs()
    loss, _ = distillation_ppo_loss(actor, distillation, model_output, data)
    expected, _ = core.reopold_loss(t["student"], t["old"], t["teacher"], None, t["mask"], phase="refinement",
                                    lam=0.5, entropy_selection=False)  # fmt: skip
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)
    env.delenv("REOPOLD_SWITCH_STEP")
    with pytest.raises(ValueError, match="REOPOLD_SWITCH_STEP"):
        distillation_ppo_loss(actor, distillation, model_output, data)


@pytest.mark.parametrize(
    "overrides, needed",
    [({"loss_max_clamp": 10.0}, "loss_max_clamp=null"), ({"use_task_rewards": True}, "use_task_rewards=false"),
     ({"loss_agg_mode": "seq-mean-token-mean"}, "loss_agg_mode=token-mean"), ({"strategy": "megatron"}, "strategy")],
)  # fmt: skip
def test_verl_settings_that_would_change_the_objective_are_refused(env, overrides, needed):
    data, model_output, _ = _batch(seed=0, step=0)
    actor_keys = {"loss_agg_mode", "strategy"}
    actor, distillation = _configs(**{k: v for k, v in overrides.items() if k not in actor_keys})
    if actor_keys & overrides.keys():
        settings = {"strategy": "fsdp", "loss_agg_mode": "token-mean"} | {
            k: overrides[k] for k in actor_keys & overrides.keys()
        }
        actor = ActorConfig(rollout_n=2, ppo_micro_batch_size_per_gpu=6, **settings)
    with pytest.raises(ValueError, match=needed):
        distillation_ppo_loss(actor, distillation, model_output, data)


def test_plugin_registers_on_import_verl_through_the_entry_point():
    if not any(ep.value == "reopold.integrations.verl" for ep in entry_points(group="verl.plugins")):
        pytest.skip("reopold is not pip-installed here, so its verl.plugins entry point is not visible")
    code = ("import sys, verl; from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY as r; "
            "print('reopold' in r, 'reopold.integrations.verl' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True True"


def test_shipped_verl_recipe_composes_and_satisfies_the_plugin():
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    with initialize_config_dir(config_dir=str(REPO / "configs" / "verl"), version_base=None):
        cfg = compose("reopold_math_1.5b")
    distillation = omega_conf_to_dataclass(cfg.distillation)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    reopold_verl.check_verl_config(actor, distillation.distillation_loss)
    assert distillation.distillation_loss.loss_mode == "reopold" and actor.calculate_entropy
    assert (cfg.data.train_batch_size, actor.ppo_mini_batch_size, cfg.actor_rollout_ref.rollout.n) == (128, 32, 8)
    assert (actor.optim.lr, cfg.data.max_response_length, cfg.trainer.total_training_steps) == (1e-5, 8192, 300)
    assert cfg.actor_rollout_ref.rollout.temperature == 1.0


def test_untested_verl_version_is_refused():
    with pytest.raises(ImportError, match="verl>=0.9.1,<0.10"):
        reopold_verl._check_verl_version("0.10.0")
    reopold_verl._check_verl_version("0.9.1")


def test_the_one_difference_left_is_verls_dual_clip(env):
    """verl's vanilla policy loss caps -A * rho at -3 A for negative advantages (dual clip, clip_ratio_c = 3, not
    settable for distillation); REOPOLD has no such cap. Equal while every ratio stays below 3."""
    data, model_output, t = _batch(seed=2, step=2)
    actor, distillation = _configs()
    shaped = core.distillation_shaping(t["old"], t["teacher"], t["entropy"], t["mask"], phase="exploration")
    row, col = torch.nonzero(shaped.keep_mask & (shaped.advantages < 0))[0].tolist()
    student = t["student"].detach().clone()
    student[row, col] = t["old"][row, col] + 2.0  # ratio e^2 = 7.4 > 3 on a kept token with a negative advantage
    model_output["log_probs"] = _full_sequence_nested(student, *t["lens"])
    loss, _ = distillation_ppo_loss(actor, distillation, model_output, data)
    reopold, _ = core.reopold_loss(student, t["old"], t["teacher"], t["entropy"], t["mask"], phase="exploration")
    kept = int(shaped.keep_mask.sum())
    advantage = float(shaped.advantages[row, col])
    # Only that token differs: REOPOLD's -A * clip-max(rho) = -A * e^2 against verl's -A * 3.
    assert float(loss) - float(reopold) == pytest.approx(advantage * (math.exp(2.0) - 3.0) / kept, abs=1e-6)
