"""Token reward (Eq. 3), stop-gradient (Remark 3.1) and the mixture-based reward floor (Eq. 5/7)."""

import math

import pytest
import torch

from reopold.core.rewards import clipped_rewards, reward_floor, token_rewards
from tests import reference as ref

F64 = torch.float64


# floor(lam) = log(lam) / (1 - lam), by hand:
#   lam=0.1: log 0.1 = -2.302585 / 0.9 = -2.558428
#   lam=0.2: log 0.2 = -1.609438 / 0.8 = -2.011797
#   lam=0.3: log 0.3 = -1.203973 / 0.7 = -1.719961
#   lam=0.5: log 0.5 = -0.693147 / 0.5 = -1.386294
#   lam=0.7: log 0.7 = -0.356675 / 0.3 = -1.188916
FLOOR_TABLE = [(0.1, -2.5584), (0.2, -2.0118), (0.3, -1.7200), (0.5, -1.3863), (0.7, -1.1889)]


@pytest.mark.parametrize("lam, expected", FLOOR_TABLE)
def test_reward_floor_matches_spec_table(lam, expected):
    # The reference table (docs/algorithm.md) gives 4 decimals: agree to half a unit in the last place.
    assert abs(reward_floor(lam) - expected) < 5e-5
    assert reward_floor(lam) == pytest.approx(math.log(lam) / (1 - lam), abs=1e-15)


@pytest.mark.parametrize("lam", [lam for lam, _ in FLOOR_TABLE])
def test_reward_floor_is_not_log_odds(lam):
    # The published bug log(lam / (1 - lam)) gives -2.197, -1.386, -0.847, 0.000, +0.847 for the table:
    # at least 0.36 away from the right value everywhere (and > 0 for lam > 0.5, i.e. no floor at all).
    assert abs(reward_floor(lam) - math.log(lam / (1 - lam))) > 0.3


@pytest.mark.parametrize("lam", [0.1, 0.3, 0.7])
def test_reward_floor_is_infimum_of_jensen_bound(lam):
    # App. A.2: R = log pT - log pS <= (1/(1-lam)) log(((1-lam) pT + lam pS) / pS) =: bound(pT, pS);
    # bound falls as pT -> 0 and equals log(lam)/(1-lam) at pT = 0 for every pS.
    g = torch.Generator().manual_seed(0)
    p_teacher = torch.rand(1000, generator=g, dtype=F64)
    p_student = torch.rand(1000, generator=g, dtype=F64) + 1e-3
    bound = torch.log((1 - lam) * p_teacher + lam * p_student) - torch.log(p_student)
    bound = bound / (1 - lam)
    assert (bound >= torch.log(p_teacher) - torch.log(p_student) - 1e-12).all()
    assert (bound >= reward_floor(lam) - 1e-12).all()
    at_zero = (math.log(lam * 0.37) - math.log(0.37)) / (1 - lam)
    assert reward_floor(lam) == pytest.approx(at_zero, abs=1e-12)


@pytest.mark.parametrize("lam", [0, 1, -0.1, 1.5])
def test_reward_floor_rejects_lam_outside_open_unit_interval(lam):
    with pytest.raises(ValueError, match=ref.naming("lam", lam)):
        reward_floor(lam)


def test_token_rewards_hand_case():
    # R = log pT - log pS: (-0.5) - (-2.0) = 1.5 ; (-3.0) - (-1.0) = -2.0 ; (-1.0) - (-1.0) = 0
    student = torch.tensor([[-2.0, -1.0, -1.0]], dtype=F64)  # (B=1, T=3)
    teacher = torch.tensor([[-0.5, -3.0, -1.0]], dtype=F64)
    torch.testing.assert_close(token_rewards(student, teacher),
                               torch.tensor([[1.5, -2.0, 0.0]], dtype=F64), rtol=0, atol=0)


def test_token_rewards_matches_reference():
    student, _, teacher, _, _ = ref.random_batch(3, 5, seed=1)
    torch.testing.assert_close(token_rewards(student, teacher), ref.token_rewards(student, teacher),
                               rtol=1e-12, atol=1e-12)


def test_token_rewards_stop_gradient_detaches():
    student = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    teacher = torch.zeros(2, 3, dtype=F64)
    assert not token_rewards(student, teacher).requires_grad  # stop_gradient=True is the default
    assert not token_rewards(student, teacher, stop_gradient=True).requires_grad


def test_token_rewards_without_stop_gradient_carries_minus_student_gradient():
    student = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    teacher = torch.zeros(2, 3, dtype=F64)
    rewards = token_rewards(student, teacher, stop_gradient=False)
    (g,) = torch.autograd.grad(rewards.sum(), student)
    # d(teacher - student)/d student = -1 everywhere
    torch.testing.assert_close(g, -torch.ones(2, 3, dtype=F64), rtol=0, atol=0)


def test_teacher_equal_student_gives_zero_reward():
    student, _, _, _, _ = ref.random_batch(2, 4, seed=4)
    assert (token_rewards(student, student.clone()) == 0).all()


def test_token_rewards_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=ref.naming("teacher_logprobs", "2, 4")):
        token_rewards(torch.zeros(2, 3), torch.zeros(2, 4))


def test_clipped_rewards_is_one_sided_max():
    lo = reward_floor(0.3)  # -1.7200
    rewards = torch.tensor([[2.0, -0.5, -1.0], [-1.9, -5.0, lo]], dtype=F64)  # (2, 3)
    expected = torch.tensor([[2.0, -0.5, -1.0], [lo, lo, lo]], dtype=F64)  # positives never clipped
    torch.testing.assert_close(clipped_rewards(rewards, lo), expected, rtol=0, atol=0)
    torch.testing.assert_close(clipped_rewards(rewards, None), rewards, rtol=0, atol=0)


def test_clipped_rewards_gradient_passes_above_floor_only():
    lo = reward_floor(0.3)
    rewards = torch.tensor([0.5, -1.0, -2.0, -9.0], dtype=F64, requires_grad=True)  # (4,)
    (g,) = torch.autograd.grad(clipped_rewards(rewards, lo).sum(), rewards)
    torch.testing.assert_close(g, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64), rtol=0, atol=0)
