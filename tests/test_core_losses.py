"""Clipped policy objective (Eq. 6) and the REOPOLD loss in both phases with every ablation switch."""

import math

import pytest
import torch

from reopold.core import policy_loss, reopold_loss
from reopold.core.rewards import reward_floor
from tests import reference as ref

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)  # float64 vs the float64 reference: only summation order differs
LO = reward_floor(0.3)  # -1.7199611
# Metrics are logging scalars: the contract leaves their dtype open (float32 is fine), so ~float32 precision.
METRIC = 1e-6


def leaf(x):
    return x.detach().clone().requires_grad_()


def assert_matches(loss, student, ref_loss, ref_student):
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TIGHT)
    torch.testing.assert_close(ref.grad(loss, student), ref.grad(ref_loss, ref_student), **TIGHT)


# ---------------------------------------------------------------- policy_loss by hand
# rho = exp(student - old), eps = 0.2 -> clip range [0.8, 1.2]; l = -min(rho*A, clip(rho)*A)
#   (0,0) rho=1.0 A= 1: min(1.0, 1.0)  =  1.0 -> l = -1.0   dl/ds = -A*rho = -1.0
#   (0,1) rho=1.5 A= 2: min(3.0, 2.4)  =  2.4 -> l = -2.4   clipped binds: dl/ds = 0
#   (0,2) rho=0.5 A= 2: min(1.0, 1.6)  =  1.0 -> l = -1.0   dl/ds = -1.0 (pessimistic: no clip)
#   (1,0) rho=0.9 A=-1: min(-0.9,-0.9) = -0.9 -> l =  0.9   dl/ds = +0.9
#   (1,1) rho=1.3 A=-1: min(-1.3,-1.2) = -1.3 -> l =  1.3   dl/ds = +1.3 (A<0, rho high: no clip)
#   (1,2) rho=0.7 A=-2: min(-1.4,-1.6) = -1.6 -> l =  1.6   clipped binds: dl/ds = 0
# sum = -0.6, token mean over 6 = -0.1; clip_frac = 2/6; ratio_mean = 5.9/6
RHO = [[1.0, 1.5, 0.5], [0.9, 1.3, 0.7]]
ADV = [[1.0, 2.0, 2.0], [-1.0, -1.0, -2.0]]


def hand_batch():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, -2.2]], dtype=F64)  # (2, 3)
    student = leaf(old + torch.log(torch.tensor(RHO, dtype=F64)))
    return student, old, torch.tensor(ADV, dtype=F64), torch.ones(2, 3, dtype=torch.bool)


def test_policy_loss_hand_case_2x3():
    student, old, adv, mask = hand_batch()
    loss, metrics = policy_loss(student, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.1, abs=1e-12)
    expected_grad = torch.tensor([[-1.0, 0.0, -1.0], [0.9, 1.3, 0.0]], dtype=F64) / 6
    torch.testing.assert_close(ref.grad(loss, student), expected_grad, rtol=0, atol=1e-12)
    assert float(metrics["clip_frac"]) == pytest.approx(2 / 6, abs=METRIC)
    assert float(metrics["ratio_mean"]) == pytest.approx(5.9 / 6, abs=METRIC)


def test_policy_loss_asymmetric_clip_high():
    # clip_eps_high = 0.6 -> range [0.8, 1.6]: (0,1) rho=1.5 no longer clipped, l = -3.0 instead of -2.4,
    # and gets dl/ds = -3.0. Sum = -0.6 - 0.6 = -1.2, mean -0.2; clip_frac = 1/6 (only (1,2)).
    student, old, adv, mask = hand_batch()
    loss, metrics = policy_loss(student, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    assert loss.item() == pytest.approx(-0.2, abs=1e-12)
    assert float(ref.grad(loss, student)[0, 1]) == pytest.approx(-3.0 / 6, abs=1e-12)
    assert float(metrics["clip_frac"]) == pytest.approx(1 / 6, abs=METRIC)


def test_policy_loss_masked_token_drops_out_of_mean():
    # Masking (0,1) and (1,2), the two clipped tokens: sum = -1 - 1 + 0.9 + 1.3 = 0.2 over 4 tokens = 0.05
    student, old, adv, _ = hand_batch()
    mask = torch.tensor([[True, False, True], [True, True, False]])
    loss, metrics = policy_loss(student, old, adv, mask)
    assert loss.item() == pytest.approx(0.05, abs=1e-12)
    assert float(metrics["clip_frac"]) == 0.0


def test_policy_loss_sequence_mean_hand_case():
    # rho = 1 everywhere so l = -A. Valid A: seq0 [1, 2], seq1 [3], seq2 none (9s are padding).
    # per-sequence means: -1.5, -3.0; sequence_mean = (-1.5 - 3.0) / 2 = -2.25  (token_mean would be -2.0)
    # with num_tokens = 4 (global count of sequences with kept tokens): -4.5 / 4 = -1.125
    adv = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [9.0, 9.0, 9.0]], dtype=F64)  # (3, 3)
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    student = leaf(torch.zeros(3, 3, dtype=F64))
    old = torch.zeros(3, 3, dtype=F64)
    loss, _ = policy_loss(student, old, adv, mask, aggregation="sequence_mean")
    assert loss.item() == pytest.approx(-2.25, abs=1e-12)
    # d/ds_t of -(rho*A) = -A, weighted 1/(len_i * n_seq): seq0 -1/4, -2/4; seq1 -3/2
    expected = torch.tensor([[-0.25, -0.5, 0.0], [-1.5, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(ref.grad(loss, student), expected, rtol=0, atol=1e-12)
    loss, _ = policy_loss(student, old, adv, mask, aggregation="token_mean")
    assert loss.item() == pytest.approx(-2.0, abs=1e-12)
    loss, _ = policy_loss(student, old, adv, mask, aggregation="sequence_mean", num_tokens=4)
    assert loss.item() == pytest.approx(-1.125, abs=1e-12)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("clip_eps, clip_eps_high, num_tokens", [(0.2, None, None), (0.1, 0.3, None),
                                                                 (0.2, None, 37)])
def test_policy_loss_matches_reference(aggregation, clip_eps, clip_eps_high, num_tokens):
    for seed in range(3):
        student, old, teacher, _, mask = ref.random_batch(4, 6, seed=seed)  # (4, 6)
        adv = teacher + 1.5  # advantages of both signs
        s1, s2 = leaf(student), leaf(student)
        loss, metrics = policy_loss(s1, old, adv, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                    aggregation=aggregation, num_tokens=num_tokens)
        ref_loss, ref_metrics = ref.policy_loss(s2, old, adv, mask, clip_eps, clip_eps_high, aggregation,
                                                num_tokens)
        assert_matches(loss, s1, ref_loss, s2)
        if aggregation == "token_mean" and num_tokens is None:
            for name in ("clip_frac", "ratio_mean"):
                assert float(metrics[name]) == pytest.approx(ref_metrics[name], abs=METRIC), name


def test_policy_loss_advantage_gradient_is_not_detached():
    # The contract: advantages are used as given. l = -rho*A at rho = 1 -> dl/dA = -1/N on every valid token.
    adv = leaf(torch.tensor([[0.3, -0.2, 0.5]], dtype=F64))  # (1, 3)
    mask = torch.tensor([[True, True, False]])
    zeros = torch.zeros(1, 3, dtype=F64)
    loss, _ = policy_loss(zeros, zeros, adv, mask)
    torch.testing.assert_close(ref.grad(loss, adv), torch.tensor([[-0.5, -0.5, 0.0]], dtype=F64),
                               rtol=0, atol=1e-15)


def test_policy_loss_all_masked_is_finite_zero_with_zero_grad():
    student = leaf(torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0)))
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for aggregation in ("token_mean", "sequence_mean"):
        loss, _ = policy_loss(student, student.detach() + 0.5, torch.ones(2, 3, dtype=F64), mask,
                              aggregation=aggregation)
        assert loss.item() == 0.0
        assert torch.equal(ref.grad(loss, student), torch.zeros(2, 3, dtype=F64))


def test_policy_loss_rejects_unknown_aggregation():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=ref.naming("aggregation", "seq_sum")):
        policy_loss(x, x, x, torch.ones(2, 3, dtype=torch.bool), aggregation="seq_sum")


def test_policy_loss_rejects_non_bool_mask():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=ref.naming("mask", "float32")):
        policy_loss(x, x, x, torch.ones(2, 3))


@pytest.mark.parametrize("bad", ["old_logprobs", "advantages", "mask"])
def test_policy_loss_rejects_shape_mismatch(bad):
    args = {"old_logprobs": torch.zeros(2, 3), "advantages": torch.zeros(2, 3),
            "mask": torch.ones(2, 3, dtype=torch.bool)}
    args[bad] = torch.ones(2, 4, dtype=args[bad].dtype)
    with pytest.raises(ValueError, match=ref.naming(bad, "2, 4")):
        policy_loss(torch.zeros(2, 3), args["old_logprobs"], args["advantages"], args["mask"])


# ---------------------------------------------------------------- reopold_loss by hand
# student = old = 0 (rho = 1, R = teacher exactly), floor(0.3) = LO = -1.72
#   R = [0.5, -1.0, LO, -3.0]   H = [0.1, 0.9, 0.5, 2.0]   all valid
# exploration: keep R >= LO -> [T, T, T, F] (the token ON the floor is kept), A = R
#   loss = -(0.5 - 1.0 + LO) / 3 = (0.5 + 1.72) / 3 = 0.73999;  dl/ds = -A*rho/3 = [-0.5, 1, -LO, 0] / 3
# refinement, beta = 0.5: N = 4, k = 2, sorted H [2.0, 0.9, 0.5, 0.1] -> tau = 0.9, keep [F, T, F, T]
#   A = max(R, LO) = [-1.0, LO]; loss = -(-1.0 + LO) / 2 = 1.35998
#   dl/ds = -A*rho/2: token 1 -> 0.5; token 3 -> -LO/2 = 0.86 (a floored reward still moves rho)
def hand_reopold():
    student = leaf(torch.zeros(1, 4, dtype=F64))
    old = torch.zeros(1, 4, dtype=F64)
    teacher = torch.tensor([[0.5, -1.0, LO, -3.0]], dtype=F64)
    entropy = torch.tensor([[0.1, 0.9, 0.5, 2.0]], dtype=F64)
    return student, old, teacher, entropy, torch.ones(1, 4, dtype=torch.bool)


def test_reopold_exploration_hand_case():
    student, old, teacher, entropy, mask = hand_reopold()
    loss, m = reopold_loss(student, old, teacher, entropy, mask, phase="exploration", lam=0.3)
    assert loss.item() == pytest.approx((0.5 - LO) / 3, abs=1e-12)
    torch.testing.assert_close(ref.grad(loss, student), torch.tensor([[-0.5, 1.0, -LO, 0.0]], dtype=F64) / 3,
                               rtol=0, atol=1e-12)
    # means over the 4 valid tokens: reward_mean = (0.5 - 1 + LO - 3)/4; below floor: only -3.0
    assert float(m["reward_mean"]) == pytest.approx((-3.5 + LO) / 4, abs=METRIC)
    assert float(m["reverse_kl"]) == pytest.approx((3.5 - LO) / 4, abs=METRIC)
    assert float(m["below_floor_frac"]) == pytest.approx(0.25, abs=METRIC)
    assert float(m["kept_frac"]) == pytest.approx(0.75, abs=METRIC)
    assert math.isnan(float(m["threshold"]))
    assert float(m["entropy_mean"]) == pytest.approx(0.875, abs=METRIC)
    assert float(m["clip_frac"]) == 0.0
    assert float(m["loss"]) == pytest.approx(loss.item(), abs=METRIC)


def test_reopold_refinement_hand_case():
    student, old, teacher, entropy, mask = hand_reopold()
    loss, m = reopold_loss(student, old, teacher, entropy, mask, phase="refinement", lam=0.3, beta=0.5)
    assert loss.item() == pytest.approx((1.0 - LO) / 2, abs=1e-12)
    torch.testing.assert_close(ref.grad(loss, student), torch.tensor([[0.0, 0.5, 0.0, -LO / 2]], dtype=F64),
                               rtol=0, atol=1e-12)
    assert float(m["threshold"]) == pytest.approx(0.9, abs=METRIC)
    assert float(m["kept_frac"]) == pytest.approx(0.5, abs=METRIC)
    assert float(m["below_floor_frac"]) == pytest.approx(0.25, abs=METRIC)


def test_reopold_refinement_without_stop_gradient_hand_case():
    # Token 1 now has A = R = t - s differentiable: l = -rho*(t - s); dl/ds = -(rho*R - rho) = -(-1 - 1)
    # = 2, over 2 kept tokens -> 1.0. Token 3 is floored (constant A = LO): unchanged -LO/2.
    student, old, teacher, entropy, mask = hand_reopold()
    loss, _ = reopold_loss(student, old, teacher, entropy, mask, phase="refinement", beta=0.5,
                           stop_gradient=False)
    torch.testing.assert_close(ref.grad(loss, student), torch.tensor([[0.0, 1.0, 0.0, -LO / 2]], dtype=F64),
                               rtol=0, atol=1e-12)


def test_reopold_refinement_without_entropy_selection_hand_case():
    # All 4 tokens kept, A = max(R, LO) = [0.5, -1.0, LO, LO]: loss = -(0.5 - 1.0 + 2 LO)/4 = 0.98498
    student, old, teacher, entropy, mask = hand_reopold()
    loss, m = reopold_loss(student, old, teacher, entropy, mask, phase="refinement", entropy_selection=False)
    assert loss.item() == pytest.approx((0.5 - 2 * LO) / 4, abs=1e-12)
    assert float(m["kept_frac"]) == 1.0
    assert math.isnan(float(m["threshold"]))


def test_reopold_refinement_uses_given_threshold():
    # threshold = 0.5 keeps H >= 0.5: tokens 1, 2, 3 with A = [-1.0, LO, LO]: loss = (1 - 2 LO) / 3
    student, old, teacher, entropy, mask = hand_reopold()
    loss, m = reopold_loss(student, old, teacher, entropy, mask, phase="refinement", beta=0.5,
                           threshold=torch.tensor(0.5, dtype=F64))
    assert loss.item() == pytest.approx((1.0 - 2 * LO) / 3, abs=1e-12)
    assert float(m["threshold"]) == pytest.approx(0.5, abs=METRIC)


# exploration: the reward_floor / entropy_selection switches are not exercised (see the report: the contract
# does not say whether reward_floor=False drops the exploration mask).
SWITCHES = [("exploration", sg, True, True) for sg in (True, False)] + [
    ("refinement", sg, fl, es) for sg in (True, False) for fl in (True, False) for es in (True, False)]


@pytest.mark.parametrize("reward_policy", ["old", "current"])
@pytest.mark.parametrize("phase, stop_gradient, floor_on, entropy_selection", SWITCHES)
def test_reopold_loss_matches_reference(phase, stop_gradient, floor_on, entropy_selection, reward_policy):
    for seed in range(3):
        student, old, teacher, entropy, mask = ref.random_batch(3, 7, seed=10 + seed)  # (3, 7)
        s1, s2 = leaf(student), leaf(student)
        kwargs = dict(phase=phase, lam=0.3, beta=0.25, stop_gradient=stop_gradient, reward_policy=reward_policy)
        loss, m = reopold_loss(s1, old, teacher, entropy, mask, reward_floor=floor_on,
                               entropy_selection=entropy_selection, **kwargs)
        ref_loss, rm = ref.reopold_loss(s2, old, teacher, entropy, mask, reward_floor=floor_on,
                                        entropy_selection=entropy_selection, **kwargs)
        assert_matches(loss, s1, ref_loss, s2)
        for name, value in rm.items():
            got = float(m[name])
            assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, abs=METRIC), name


def test_reopold_loss_with_threshold_and_num_tokens_matches_reference():
    student, old, teacher, entropy, mask = ref.random_batch(4, 5, seed=21)  # (4, 5)
    s1, s2 = leaf(student), leaf(student)
    loss, _ = reopold_loss(s1, old, teacher, entropy, mask, phase="refinement", threshold=1.1, num_tokens=50)
    ref_loss, _ = ref.reopold_loss(s2, old, teacher, entropy, mask, "refinement", threshold_value=1.1,
                                   num_tokens=50)
    assert_matches(loss, s1, ref_loss, s2)


def test_reward_policies_differ_once_the_policy_has_moved_and_agree_before():
    # R graded against pi_old vs the current policy: equal when student == old (update 1), not after.
    student, old, teacher, entropy, mask = ref.random_batch(3, 7, seed=4)
    args = dict(phase="exploration", lam=0.3)
    same = [reopold_loss(leaf(old.clone()), old, teacher, entropy, mask, reward_policy=p, **args)[0]
            for p in ("old", "current")]
    assert same[0].item() == pytest.approx(same[1].item(), abs=1e-12)
    moved = [reopold_loss(leaf(student), old, teacher, entropy, mask, reward_policy=p, **args)[0]
             for p in ("old", "current")]
    assert abs(moved[0].item() - moved[1].item()) > 1e-3


def test_policy_loss_huge_ratio_with_negative_advantage_stays_finite():
    # log rho = 800 overflows exp to inf in float64; -min(rho * A, clip * A) with A < 0 would be +inf.
    student = leaf(torch.tensor([[800.0, 0.0]], dtype=F64))
    old = torch.zeros(1, 2, dtype=F64)
    adv = torch.tensor([[-1.0, 1.0]], dtype=F64)
    loss, _ = policy_loss(student, old, adv, torch.ones(1, 2, dtype=torch.bool))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx((math.exp(20.0) - 1.0) / 2, rel=1e-9)  # the ratio saturates at e^20
    assert torch.isfinite(ref.grad(loss, student)).all()


def test_reopold_metrics_are_detached_scalars():
    student, old, teacher, entropy, mask = ref.random_batch(2, 4, seed=5, min_len=1)
    _, metrics = reopold_loss(leaf(student), old, teacher, entropy, mask, phase="refinement")
    expected = {"reward_mean", "below_floor_frac", "kept_frac", "threshold", "entropy_mean", "clip_frac",
                "reverse_kl", "loss"}
    assert expected <= set(metrics)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("phase", ["exploration", "refinement"])
def test_reopold_all_masked_is_finite_zero_with_zero_grad(phase):
    student, old, teacher, entropy, _ = ref.random_batch(2, 3, seed=6)
    student = leaf(student)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss, _ = reopold_loss(student, old, teacher, entropy, mask, phase=phase)
    assert loss.item() == 0.0
    assert torch.equal(ref.grad(loss, student), torch.zeros(2, 3, dtype=F64))


@pytest.mark.parametrize("phase", ["exploration", "refinement"])
def test_reopold_teacher_equal_student_gives_zero_loss_and_grad(phase):
    # R = 0 on every token: kept in exploration (0 >= floor), A = max(0, floor) = 0 in refinement.
    student, _, _, entropy, mask = ref.random_batch(3, 5, seed=7, min_len=1)
    s = leaf(student)
    loss, m = reopold_loss(s, student, student.clone(), entropy, mask, phase=phase)
    assert loss.item() == 0.0
    assert torch.equal(ref.grad(loss, s), torch.zeros(3, 5, dtype=F64))
    assert float(m["reward_mean"]) == 0.0 and float(m["below_floor_frac"]) == 0.0


def _hand_args():
    student, old, teacher, entropy, mask = hand_reopold()
    return (student.detach(), old, teacher, entropy, mask)


def test_reopold_rejects_unknown_phase():
    with pytest.raises(ValueError, match=ref.naming("phase", "warmup")):
        reopold_loss(*_hand_args(), phase="warmup")


@pytest.mark.parametrize("lam", [0, 1, -0.1, 1.5])
def test_reopold_rejects_bad_lam(lam):
    with pytest.raises(ValueError, match=ref.naming("lam", lam)):
        reopold_loss(*_hand_args(), phase="refinement", lam=lam)


@pytest.mark.parametrize("beta", [0, -0.1, 1.5])
def test_reopold_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match=ref.naming("beta", beta)):
        reopold_loss(*_hand_args(), phase="refinement", beta=beta)


def test_reopold_rejects_non_bool_mask():
    student, old, teacher, entropy, _ = _hand_args()
    with pytest.raises(ValueError, match=ref.naming("completion_mask", "float64")):
        reopold_loss(student, old, teacher, entropy, torch.ones(1, 4, dtype=F64), phase="exploration")


@pytest.mark.parametrize("bad", ["old_logprobs", "teacher_logprobs", "entropy", "completion_mask"])
def test_reopold_rejects_shape_mismatch(bad):
    names = ["student_logprobs", "old_logprobs", "teacher_logprobs", "entropy", "completion_mask"]
    args = dict(zip(names, _hand_args(), strict=True))
    args[bad] = torch.ones(2, 4, dtype=args[bad].dtype)
    with pytest.raises(ValueError, match=ref.naming(bad, "2, 4")):
        reopold_loss(*args.values(), phase="refinement")
