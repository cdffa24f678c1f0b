"""The paper's baselines: rkl, rkl_sg (and Remark 3.1), grpo, sft, generalized JSD (gkd)."""

import math

import pytest
import torch

from reopold.core import (
    generalized_jsd_loss,
    grpo_advantages,
    grpo_loss,
    reopold_loss,
    rkl_loss,
    rkl_sg_loss,
    sft_loss,
)
from tests import reference as ref

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)  # float64 vs the float64 reference: only summation order differs


def leaf(x):
    return x.detach().clone().requires_grad_()


def assert_matches(loss, x, ref_loss, ref_x):
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TIGHT)
    torch.testing.assert_close(ref.grad(loss, x), ref.grad(ref_loss, ref_x), **TIGHT)


# ---------------------------------------------------------------- Remark 3.1: stop-gradient
def per_sample_grads(loss_fn, theta, log_teacher):
    """Gradient wrt theta of the one-token loss for each possible sampled token y: (V, V)."""
    grads = []
    for y in range(theta.shape[0]):
        s = torch.log_softmax(theta, 0)[y].reshape(1, 1)  # (B=1, T=1)
        loss, _ = loss_fn(s, s.detach(), log_teacher[y].reshape(1, 1), torch.ones(1, 1, dtype=torch.bool))
        grads.append(ref.grad(loss, theta))
    return torch.stack(grads)


def test_stop_gradient_keeps_expected_gradient_and_lowers_variance():
    # Student pi = softmax(theta) over V = 5 tokens, fixed teacher; on-policy (old = current, rho = 1).
    # Per sample y: sg loss gives g_y = -R_y * score_y, the vanilla loss g_y + score_y, score_y = grad log pi(y).
    # E[score] = sum_y grad pi(y) = 0, so both estimators have mean grad KL(pi || pi_T), exactly.
    # Var(vanilla) - Var(sg) = E[(1 - R)^2 |score|^2] - E[R^2 |score|^2] = E[(1 - 2R) |score|^2],
    # = 1.244 > 0 here (the student's likely tokens are ones the teacher dislikes: R < 1/2 there).
    theta = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5], dtype=F64, requires_grad=True)  # (V,)
    log_teacher = torch.log_softmax(torch.tensor([-1.0, 0.0, 1.5, 0.5, -0.5], dtype=F64), 0)  # (V,)
    probs = torch.softmax(theta, 0).detach()  # (V,) sampling distribution

    g_vanilla = per_sample_grads(rkl_loss, theta, log_teacher)  # (V samples, V params)
    g_sg = per_sample_grads(rkl_sg_loss, theta, log_teacher)
    mean_vanilla, mean_sg = probs @ g_vanilla, probs @ g_sg
    torch.testing.assert_close(mean_vanilla, mean_sg, rtol=0, atol=1e-10)

    log_pi = torch.log_softmax(theta, 0)
    kl = (log_pi.exp() * (log_pi - log_teacher)).sum()
    torch.testing.assert_close(mean_sg, ref.grad(kl, theta), rtol=0, atol=1e-10)
    assert mean_sg.abs().max() > 0.1  # a real gradient, not 0 == 0

    var_vanilla = (probs * ((g_vanilla - mean_vanilla) ** 2).sum(1)).sum()  # trace of the covariance
    var_sg = (probs * ((g_sg - mean_sg) ** 2).sum(1)).sum()
    rewards = (log_teacher - log_pi).detach()
    score_sq = ((torch.eye(5, dtype=F64) - probs) ** 2).sum(1)  # |e_y - pi|^2 = |grad_theta log pi(y)|^2
    predicted = (probs * (1 - 2 * rewards) * score_sq).sum()
    assert float(var_sg) < float(var_vanilla)
    assert float(var_vanilla - var_sg) == pytest.approx(float(predicted), abs=1e-10)
    assert float(predicted) == pytest.approx(1.2440119803, abs=1e-9)


# ---------------------------------------------------------------- rkl / rkl_sg
def test_rkl_teacher_equal_student_has_zero_loss_but_unit_gradient():
    # R = t - s = 0, rho = 1: loss 0. Without stop-gradient dl/ds = -(rho*R - rho) = +1 per token, / N = 3:
    # the zero-mean term -rho*grad(log pi) that rkl_sg drops (Remark 3.1). With sg: zero gradient.
    s = leaf(torch.tensor([[-0.2, -1.3], [-2.0, -0.7]], dtype=F64))  # (2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    loss, _ = rkl_loss(s, s.detach(), s.detach().clone(), mask)
    assert loss.item() == 0.0
    expected = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64) / 3
    torch.testing.assert_close(ref.grad(loss, s), expected, rtol=0, atol=1e-15)
    loss, _ = rkl_sg_loss(s, s.detach(), s.detach().clone(), mask)
    assert loss.item() == 0.0
    assert torch.equal(ref.grad(loss, s), torch.zeros(2, 2, dtype=F64))


def test_rkl_on_policy_loss_is_sampled_reverse_kl():
    # rho = 1: loss = mean over valid tokens of -(t - s) = mean(log pi - log pi_T)
    s = torch.tensor([[-0.5, -1.0, -2.0]], dtype=F64)
    t = torch.tensor([[-1.5, -0.5, -4.0]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    loss, _ = rkl_loss(s, s, t, mask)
    assert loss.item() == pytest.approx((1.0 - 0.5) / 2, abs=1e-15)


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_rkl_matches_reference(stop_gradient):
    fn = rkl_sg_loss if stop_gradient else rkl_loss
    for seed in range(3):
        student, old, teacher, _, mask = ref.random_batch(3, 6, seed=30 + seed)  # (3, 6)
        s1, s2 = leaf(student), leaf(student)
        loss, _ = fn(s1, old, teacher, mask, clip_eps=0.15, num_tokens=None if seed else 20)
        ref_loss, _ = ref.rkl_loss(s2, old, teacher, mask, clip_eps=0.15, num_tokens=None if seed else 20,
                                   stop_gradient=stop_gradient)
        assert_matches(loss, s1, ref_loss, s2)


@pytest.mark.parametrize("stop_gradient", [False, True])
def test_rkl_is_reopold_with_switches_off(stop_gradient):
    fn = rkl_sg_loss if stop_gradient else rkl_loss
    student, old, teacher, entropy, mask = ref.random_batch(3, 6, seed=40)
    s1, s2 = leaf(student), leaf(student)
    loss, _ = fn(s1, old, teacher, mask)
    same, _ = reopold_loss(s2, old, teacher, entropy, mask, phase="refinement", stop_gradient=stop_gradient,
                           reward_floor=False, entropy_selection=False)
    assert_matches(loss, s1, same, s2)


# ---------------------------------------------------------------- grpo
def test_grpo_advantages_hand_case():
    # group_size 2: [1, 0] -> mean 0.5, unbiased std sqrt((0.25 + 0.25)/1) = 0.70711, A = +-0.5/0.70711
    #               [1, 1] -> std 0: A = 0 / (0 + eps) = 0 (no nan for a solved prompt)
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64), group_size=2)  # (4,)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([a, -a, 0.0, 0.0], dtype=F64), rtol=0, atol=1e-12)


def test_grpo_advantages_match_reference():
    rewards = torch.rand(12, generator=torch.Generator().manual_seed(0), dtype=F64)  # (12,)
    for group_size in (2, 3, 4, 6, 12):
        torch.testing.assert_close(grpo_advantages(rewards, group_size=group_size),
                                   ref.grpo_advantages(rewards, group_size), **TIGHT)


@pytest.mark.parametrize("group_size", [1, 0, 5])
def test_grpo_advantages_reject_bad_group_size(group_size):
    # B = 8: group_size 1 has no spread (unbiased std undefined); 5 does not divide 8
    with pytest.raises(ValueError, match=ref.naming("group_size", group_size)):
        grpo_advantages(torch.zeros(8), group_size=group_size)


def test_grpo_loss_matches_reference():
    for seed in range(3):
        student, old, _, _, mask = ref.random_batch(6, 5, seed=50 + seed)  # (6, 5), 2 prompts x 3 samples
        rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5], dtype=F64)  # (6,)
        s1, s2 = leaf(student), leaf(student)
        loss, m = grpo_loss(s1, old, rewards, mask, group_size=3)
        ref_loss, rm = ref.grpo_loss(s2, old, rewards, mask, group_size=3)
        assert_matches(loss, s1, ref_loss, s2)
        assert float(m["reward_mean"]) == pytest.approx(rm["reward_mean"], abs=1e-6)  # logging metrics
        assert float(m["clip_frac"]) == pytest.approx(rm["clip_frac"], abs=1e-6)


def test_grpo_loss_rejects_group_size_not_dividing_batch():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=ref.naming("group_size", 3)):
        grpo_loss(x, x, torch.zeros(4), torch.ones(4, 3, dtype=torch.bool), group_size=3)


def test_grpo_loss_rejects_reward_count_mismatch():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=ref.naming("sequence_rewards")):
        grpo_loss(x, x, torch.zeros(6), torch.ones(4, 3, dtype=torch.bool), group_size=2)


# ---------------------------------------------------------------- sft
def test_sft_hand_case():
    # valid log-probs -1, -2, -3 (the -50 is padding): nll mean = (1 + 2 + 3) / 3 = 2; dl/ds = -1/3
    s = leaf(torch.tensor([[-1.0, -2.0], [-3.0, -50.0]], dtype=F64))  # (2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    loss, m = sft_loss(s, mask)
    assert loss.item() == pytest.approx(2.0, abs=1e-15)
    assert float(m["nll"]) == pytest.approx(2.0, abs=1e-15)
    torch.testing.assert_close(ref.grad(loss, s), torch.tensor([[-1.0, -1.0], [-1.0, 0.0]], dtype=F64) / 3,
                               rtol=0, atol=1e-15)
    loss, _ = sft_loss(s, mask, num_tokens=12)
    assert loss.item() == pytest.approx(0.5, abs=1e-15)


def test_sft_matches_reference():
    student, _, _, _, mask = ref.random_batch(4, 6, seed=60)
    s1, s2 = leaf(student), leaf(student)
    assert_matches(sft_loss(s1, mask)[0], s1, ref.sft_loss(s2, mask), s2)


def test_sft_rejects_non_bool_mask():
    with pytest.raises(ValueError, match=ref.naming("completion_mask", "int64")):
        sft_loss(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.long))


# ---------------------------------------------------------------- generalized JSD (gkd)
# One token, V = 2: student logits [0, 0] -> P_S = [1/2, 1/2]; teacher [log 3, 0] -> P_T = [3/4, 1/4].
#   beta = 1 (reverse):  KL(P_S||P_T) = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3)          = 0.143841
#   beta = 0 (forward):  KL(P_T||P_S) = 3/4 log(3/2) + 1/4 log(1/2)                       = 0.130812
#   beta = 0.5: M = [5/8, 3/8]; KL(P_T||M) = 3/4 log(6/5) + 1/4 log(2/3)                   = 0.035375
#               KL(P_S||M) = 1/2 log(4/5) + 1/2 log(4/3)                                   = 0.032269
#               JSD = (0.035375 + 0.032269) / 2                                           = 0.033822
GKD_HAND = [
    (1.0, 0.5 * math.log(4 / 3)),
    (0.0, 0.75 * math.log(1.5) + 0.25 * math.log(0.5)),
    (0.5, 0.5 * (0.75 * math.log(1.2) + 0.25 * math.log(2 / 3)) + 0.5 * (0.5 * math.log(0.8)
                                                                          + 0.5 * math.log(4 / 3))),
]


@pytest.mark.parametrize("beta, expected", GKD_HAND)
def test_gkd_hand_case(beta, expected):
    student = torch.zeros(1, 1, 2, dtype=F64)  # (B=1, T=1, V=2)
    teacher = torch.tensor([[[math.log(3.0), 0.0]]], dtype=F64)
    loss, _ = generalized_jsd_loss(student, teacher, torch.ones(1, 1, dtype=torch.bool), beta=beta)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert expected > 0.03  # the three values above, not a degenerate 0


def test_gkd_reverse_kl_gradient_hand_case():
    # d KL(P_S||P_T)/dz = P_S * (log P_S - log P_T - KL) = 1/2 * ([log(2/3), log 2] - 1/2 log(4/3))
    #                   = [-log(3)/4, +log(3)/4]
    student = leaf(torch.zeros(1, 1, 2, dtype=F64))
    teacher = torch.tensor([[[math.log(3.0), 0.0]]], dtype=F64)
    loss, _ = generalized_jsd_loss(student, teacher, torch.ones(1, 1, dtype=torch.bool), beta=1.0)
    expected = torch.tensor([[[-1.0, 1.0]]], dtype=F64) * math.log(3.0) / 4
    torch.testing.assert_close(ref.grad(loss, student), expected, rtol=0, atol=1e-12)


def test_gkd_top1_is_zero():
    # top_k = 1: both distributions restricted to the teacher's argmax and renormalised -> [1] vs [1]
    student = leaf(torch.randn(2, 3, 6, dtype=F64, generator=torch.Generator().manual_seed(0)))
    teacher = torch.randn(2, 3, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    loss, _ = generalized_jsd_loss(student, teacher, torch.ones(2, 3, dtype=torch.bool), beta=0.5, top_k=1)
    assert abs(loss.item()) < 1e-12
    assert ref.grad(loss, student).abs().max() < 1e-12


@pytest.mark.parametrize("beta, top_k, temperature", [
    (0.0, None, 1.0), (1.0, None, 1.0), (0.5, None, 1.0), (0.3, None, 0.7),
    (0.5, 3, 1.0), (1.0, 2, 1.3), (0.0, 4, 1.0),
])
def test_gkd_matches_reference(beta, top_k, temperature):
    mask = ref.random_mask(3, 4, torch.Generator().manual_seed(7))  # (3, 4)
    student = ref.random_logits(3, 4, 6, seed=70)  # (3, 4, 6)
    teacher = ref.random_logits(3, 4, 6, seed=71)
    s1, s2 = leaf(student), leaf(student)
    loss, _ = generalized_jsd_loss(s1, teacher, mask, beta=beta, temperature=temperature, top_k=top_k)
    ref_loss = ref.generalized_jsd_loss(s2, teacher, mask, beta, temperature, top_k)
    assert ref_loss.item() > 1e-3  # non-trivial
    assert_matches(loss, s1, ref_loss, s2)


@pytest.mark.parametrize("beta, top_k", [(0.0, None), (0.5, None), (1.0, None), (0.5, 3)])
def test_gkd_teacher_equal_student_gives_zero_loss_and_grad(beta, top_k):
    logits = ref.random_logits(2, 3, 5, seed=72)  # (2, 3, 5)
    s = leaf(logits)
    loss, _ = generalized_jsd_loss(s, logits.clone(), torch.ones(2, 3, dtype=torch.bool), beta=beta,
                                   top_k=top_k)
    assert abs(loss.item()) < 1e-14
    assert ref.grad(loss, s).abs().max() < 1e-14


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_gkd_rejects_beta_outside_unit_interval(beta):
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=ref.naming("beta", beta)):
        generalized_jsd_loss(x, x, torch.ones(1, 2, dtype=torch.bool), beta=beta)


def test_gkd_rejects_vocab_mismatch():
    with pytest.raises(ValueError, match=ref.naming("teacher_logits", "1, 2, 4")):
        generalized_jsd_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))


# ---------------------------------------------------------------- all-masked batches
def _all_masked_losses(student, logits):
    zeros = torch.zeros(2, 3, dtype=F64)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    yield "rkl", rkl_loss(student, zeros, zeros - 1.0, mask)[0], student
    yield "rkl_sg", rkl_sg_loss(student, zeros, zeros - 1.0, mask)[0], student
    yield "grpo", grpo_loss(student, zeros, torch.tensor([1.0, 0.0], dtype=F64), mask, group_size=2)[0], student
    yield "sft", sft_loss(student, mask)[0], student
    yield "gkd", generalized_jsd_loss(logits, torch.zeros(2, 3, 4, dtype=F64), mask)[0], logits


def test_baselines_all_masked_give_finite_zero_loss_and_zero_grad():
    student = leaf(-torch.rand(2, 3, dtype=F64, generator=torch.Generator().manual_seed(8)))
    logits = leaf(ref.random_logits(2, 3, 4, seed=9))
    for name, loss, x in _all_masked_losses(student, logits):
        assert loss.item() == 0.0, name
        assert torch.equal(ref.grad(loss, x), torch.zeros_like(x)), name
