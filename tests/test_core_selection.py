"""Entropy threshold (Eq. 8), keep masks (Eq. 9/10) and the phase switch."""

import math

import pytest
import torch

from reopold.core.rewards import reward_floor
from reopold.core.selection import entropy_threshold, keep_mask, phase_at
from tests import reference as ref

F64 = torch.float64


def test_threshold_hand_case_keeps_all_ties():
    # Valid entropies [0.1, 0.5, 0.5, 0.9, 0.3] (the 100.0 is padding); N = 5, beta = 0.3:
    # k = ceil(1.5) = 2; sorted descending [0.9, 0.5, 0.5, 0.3, 0.1] -> tau = 0.5.
    # H >= 0.5 keeps 3 tokens: more than k, because both tied 0.5s stay.
    entropy = torch.tensor([[0.1, 0.5, 0.5], [0.9, 0.3, 100.0]], dtype=F64)  # (2, 3)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    tau = entropy_threshold(entropy, mask, beta=0.3)
    assert tau.dim() == 0
    assert float(tau) == 0.5
    keep = keep_mask(torch.zeros_like(entropy), entropy, mask, phase="refinement", floor=None, threshold=tau)
    assert keep.tolist() == [[False, True, True], [True, False, False]]


def test_threshold_all_tied_keeps_everything():
    # Every valid token has H = 0.7: the k-th largest is 0.7 and every token ties with it.
    entropy = torch.full((2, 4), 0.7, dtype=F64)  # (2, 4)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    tau = entropy_threshold(entropy, mask, beta=0.2)
    assert float(tau) == 0.7
    keep = keep_mask(torch.zeros_like(entropy), entropy, mask, phase="refinement", floor=None, threshold=tau)
    assert torch.equal(keep, mask)


def test_threshold_beta_one_is_min_valid_entropy():
    entropy = torch.tensor([[0.4, 0.2, -5.0], [1.0, 0.3, 0.6]], dtype=F64)  # (2, 3); -5.0 is masked
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert float(entropy_threshold(entropy, mask, beta=1.0)) == 0.2


def test_threshold_empty_batch_is_inf_and_keeps_nothing():
    entropy = torch.linspace(0, 1, 6, dtype=F64).reshape(2, 3)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    tau = entropy_threshold(entropy, mask, beta=0.2)
    assert math.isinf(float(tau)) and float(tau) > 0
    keep = keep_mask(torch.zeros_like(entropy), entropy, mask, phase="refinement", floor=None, threshold=tau)
    assert not keep.any()


@pytest.mark.parametrize("beta, n, k", [(0.2, 10, 2), (0.2, 15, 3), (0.3, 50, 15), (0.6, 25, 15),
                                        (0.2, 7, 2), (0.5, 1, 1), (0.01, 3, 1)])
def test_threshold_keeps_exactly_ceil_beta_n_distinct_tokens(beta, n, k):
    # Distinct entropies 0, 1, ..., n-1: the k-th largest is n - k, so exactly k = ceil(beta*n) are kept.
    # (0.3, 50): 0.3*50 = 15 exactly; float32 arithmetic gives ceil(15.000001) = 16: must not happen.
    entropy = torch.arange(n, dtype=F64)[None, :]  # (1, n)
    mask = torch.ones(1, n, dtype=torch.bool)
    tau = entropy_threshold(entropy, mask, beta=beta)
    assert float(tau) == n - k
    assert int((entropy >= tau).sum()) == k


def test_threshold_matches_reference_on_random_batches():
    for seed in range(5):
        _, _, _, entropy, mask = ref.random_batch(4, 7, seed=seed)  # (4, 7)
        for beta in (0.2, 0.25, 0.5, 1.0):
            assert float(entropy_threshold(entropy, mask, beta=beta)) == ref.threshold(entropy, mask, beta)


def test_threshold_is_detached():
    entropy = torch.rand(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert not entropy_threshold(entropy, torch.ones(2, 3, dtype=torch.bool), beta=0.5).requires_grad


def test_threshold_ignores_nan_at_masked_positions():
    entropy = torch.tensor([[0.3, float("nan")], [0.9, float("inf")]], dtype=F64)  # (2, 2)
    mask = torch.tensor([[True, False], [True, False]])
    assert float(entropy_threshold(entropy, mask, beta=0.5)) == 0.9  # N=2, k=1


@pytest.mark.parametrize("beta", [0, -0.1, 1.5])
def test_threshold_rejects_beta_outside_half_open_unit_interval(beta):
    with pytest.raises(ValueError, match=ref.naming("beta", beta)):
        entropy_threshold(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), beta=beta)


def test_threshold_rejects_non_bool_mask():
    with pytest.raises(ValueError, match=ref.naming("completion_mask", "float32")):
        entropy_threshold(torch.zeros(2, 3), torch.ones(2, 3), beta=0.5)


def test_threshold_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=ref.naming("completion_mask", "2, 4")):
        entropy_threshold(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool), beta=0.5)


def test_exploration_mask_keeps_tokens_on_the_floor():
    # floor(0.3) = -1.7200. R = [0.5, floor, -1.72001, -3.0, 9.0(masked)] -> keep [T, T, F, F, F].
    lo = reward_floor(0.3)
    rewards = torch.tensor([[0.5, lo, lo - 1e-5, -3.0, 9.0]], dtype=F64)  # (1, 5)
    mask = torch.tensor([[True, True, True, True, False]])
    keep = keep_mask(rewards, torch.zeros_like(rewards), mask, phase="exploration", floor=lo, threshold=None)
    assert keep.tolist() == [[True, True, False, False, False]]
    assert keep.dtype == torch.bool


def test_exploration_mask_without_floor_is_completion_mask():
    rewards = torch.tensor([[-50.0, 1.0], [-3.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    keep = keep_mask(rewards, torch.zeros_like(rewards), mask, phase="exploration", floor=None, threshold=None)
    assert torch.equal(keep, mask)


def test_refinement_mask_keeps_tokens_on_the_threshold_and_ignores_rewards():
    entropy = torch.tensor([[0.2, 0.5, 0.8], [0.5, 0.49, 3.0]], dtype=F64)  # (2, 3)
    rewards = torch.full((2, 3), -100.0, dtype=F64)  # far below any floor: irrelevant in refinement
    mask = torch.tensor([[True, True, True], [True, True, False]])
    keep = keep_mask(rewards, entropy, mask, phase="refinement", floor=reward_floor(0.3), threshold=0.5)
    assert keep.tolist() == [[False, True, True], [True, False, False]]
    no_threshold = keep_mask(rewards, entropy, mask, phase="refinement", floor=None, threshold=None)
    assert torch.equal(no_threshold, mask)


def test_keep_mask_matches_reference():
    lo = reward_floor(0.3)
    for seed in range(4):
        student, _, teacher, entropy, mask = ref.random_batch(3, 6, seed=seed)  # (3, 6)
        rewards = teacher - student
        tau = ref.threshold(entropy, mask, 0.25)
        got = keep_mask(rewards, entropy, mask, phase="exploration", floor=lo, threshold=None)
        assert torch.equal(got, ref.keep_mask(rewards, entropy, mask, "exploration", floor=lo))
        got = keep_mask(rewards, entropy, mask, phase="refinement", floor=None, threshold=tau)
        assert torch.equal(got, ref.keep_mask(rewards, entropy, mask, "refinement", threshold=tau))


def test_keep_mask_rejects_unknown_phase():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=ref.naming("phase", "explore")):
        keep_mask(x, x, torch.ones(1, 2, dtype=torch.bool), phase="explore", floor=None, threshold=None)


def test_keep_mask_rejects_non_bool_mask():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=ref.naming("completion_mask", "int64")):
        keep_mask(x, x, torch.ones(1, 2, dtype=torch.long), phase="exploration", floor=-1.0, threshold=None)


@pytest.mark.parametrize("step, switch_step, phase", [
    (0, 100, "exploration"), (99, 100, "exploration"), (100, 100, "refinement"), (299, 100, "refinement"),
    (0, 0, "refinement"),  # switch_step = 0: the two_phase switch off, refinement from the start
])
def test_phase_at_hard_switch(step, switch_step, phase):
    assert phase_at(step, switch_step) == phase
