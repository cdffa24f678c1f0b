"""Sampled-token log-probs and entropies from logits or hidden states, chunked and unchunked."""

import math

import pytest
import torch

from reopold.core.tokens import entropy_from_logits, logprobs_and_entropy, logprobs_from_hidden, sampled_logprobs
from tests import reference as ref

F64 = torch.float64
# The contract computes in float32: against the float64 reference, log-probs of magnitude <= ~10 carry
# a rounding error of a few float32 ulps (1.2e-7 relative), hence 2e-5.
F32_TOL = dict(rtol=2e-5, atol=2e-5)
# Two float32 computations of the same rows (chunked vs not, hidden vs logits) differ only by matmul/reduction
# order: a few ulps.
SAME_TOL = dict(rtol=1e-5, atol=1e-6)


def random_tokens(B, T, V, seed):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_hand_case_logprob_and_entropy():
    # logits [0, log 3] -> softmax [1/4, 3/4]; token 1: log(3/4) = -0.287682
    # entropy = -(1/4 log 1/4 + 3/4 log 3/4) = 0.562335
    # temperature 2: logits/2 = [0, log sqrt 3] -> p1 = sqrt3/(1+sqrt3) = 0.633975
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # (B=1, T=1, V=2)
    tokens = torch.tensor([[1]])
    lp, ent = logprobs_and_entropy(logits, tokens)
    assert float(lp) == pytest.approx(math.log(0.75), abs=1e-6)
    assert float(ent) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    assert float(sampled_logprobs(logits, tokens, temperature=2.0)) == pytest.approx(math.log(p1), abs=1e-6)
    ent2 = -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1))
    assert float(entropy_from_logits(logits, temperature=2.0)) == pytest.approx(ent2, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_logprobs_and_entropy_match_reference_values_and_grads(temperature):
    logits64 = ref.random_logits(2, 5, 7, seed=0, scale=3.0)  # (2, 5, 7)
    tokens = random_tokens(2, 5, 7, seed=1)  # (2, 5)
    g = torch.Generator().manual_seed(2)
    w_lp, w_ent = torch.randn(2, 5, dtype=F64, generator=g), torch.randn(2, 5, dtype=F64, generator=g)
    leaf32 = logits64.float().requires_grad_()
    lp, ent = logprobs_and_entropy(leaf32, tokens, temperature=temperature, chunk_size=3)
    x64 = logits64.clone().requires_grad_()
    ref_lp, ref_ent = ref.sampled_logprobs(x64, tokens, temperature), ref.entropy(x64, temperature)
    torch.testing.assert_close(lp.double(), ref_lp.detach(), **F32_TOL)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), **F32_TOL)
    grad = ref.grad((lp.double() * w_lp).sum() + (ent.double() * w_ent).sum(), leaf32)
    grad_ref = ref.grad((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum(), x64)
    torch.testing.assert_close(grad.double(), grad_ref, **F32_TOL)


def test_separate_functions_agree_with_combined():
    logits = ref.random_logits(3, 4, 6, seed=2, dtype=torch.float32)
    tokens = random_tokens(3, 4, 6, seed=3)
    lp, ent = logprobs_and_entropy(logits, tokens, temperature=0.9)
    torch.testing.assert_close(sampled_logprobs(logits, tokens, temperature=0.9), lp, **SAME_TOL)
    torch.testing.assert_close(entropy_from_logits(logits, temperature=0.9), ent, **SAME_TOL)


def test_bfloat16_logits_are_computed_in_float32():
    # bf16 logits, upcast exactly to float64 for the reference. Computing the softmax in bf16 would be off
    # by ~1e-2 (8-bit mantissa); float32 keeps it ~1e-6. Also checks the result is not cast back to bf16.
    logits = ref.random_logits(2, 3, 50, seed=4, scale=4.0, dtype=torch.bfloat16)  # (2, 3, 50)
    tokens = random_tokens(2, 3, 50, seed=5)
    lp, ent = logprobs_and_entropy(logits, tokens)
    exact = logits.double()
    torch.testing.assert_close(lp.double(), ref.sampled_logprobs(exact, tokens), rtol=0, atol=1e-4)
    torch.testing.assert_close(ent.double(), ref.entropy(exact), rtol=0, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 6, 1000])
def test_chunked_equals_unchunked(chunk_size):
    # B*T = 6 positions: chunks of 1, a size that does not divide 6, exactly 6, and more than 6.
    logits = ref.random_logits(2, 3, 9, seed=6, dtype=torch.float32)  # (2, 3, 9)
    tokens = random_tokens(2, 3, 9, seed=7)
    w = torch.randn(2, 3, generator=torch.Generator().manual_seed(8))
    full = logits.clone().requires_grad_()
    part = logits.clone().requires_grad_()
    lp_full, ent_full = logprobs_and_entropy(full, tokens, chunk_size=6)
    lp, ent = logprobs_and_entropy(part, tokens, chunk_size=chunk_size)
    torch.testing.assert_close(lp, lp_full, **SAME_TOL)
    torch.testing.assert_close(ent, ent_full, **SAME_TOL)
    g_full = ref.grad((lp_full * w).sum() + ent_full.sum(), full)
    torch.testing.assert_close(ref.grad((lp * w).sum() + ent.sum(), part), g_full, **SAME_TOL)
    torch.testing.assert_close(sampled_logprobs(logits, tokens, chunk_size=chunk_size), lp_full, **SAME_TOL)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=chunk_size), ent_full, **SAME_TOL)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_hidden_path_matches_full_logits_values_and_grads(chunk_size, with_bias):
    # hidden (B=2, T=3, D=4), lm_head (V=7, D=4): logits = hidden @ W.T (+ b), then the logits path.
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 3, 4, generator=g)
    weight = torch.randn(7, 4, generator=g)
    bias = torch.randn(7, generator=g) if with_bias else None
    tokens = random_tokens(2, 3, 7, seed=10)
    w_lp, w_ent = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)

    def run(fn):
        h, wt = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        b = bias.clone().requires_grad_() if with_bias else None
        lp, ent = fn(h, wt, b)
        out = (lp * w_lp).sum() + (ent * w_ent).sum()
        grads = torch.autograd.grad(out, [h, wt] + ([b] if with_bias else []))
        return lp.detach(), ent.detach(), grads

    def via_logits(h, wt, b):
        logits = h @ wt.T + (b if b is not None else 0)  # (2, 3, 7)
        return logprobs_and_entropy(logits, tokens)

    def via_hidden(h, wt, b):
        return logprobs_from_hidden(h, wt, tokens, chunk_size=chunk_size, lm_head_bias=b)

    lp_a, ent_a, grads_a = run(via_logits)
    lp_b, ent_b, grads_b = run(via_hidden)
    torch.testing.assert_close(lp_b, lp_a, **SAME_TOL)
    torch.testing.assert_close(ent_b, ent_a, **SAME_TOL)
    for got, want in zip(grads_b, grads_a, strict=True):
        torch.testing.assert_close(got, want, **SAME_TOL)
        assert want.abs().max() > 1e-3  # the gradient under test is not all zero


def test_hidden_path_temperature_and_no_entropy():
    g = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(2, 3, 4, generator=g), torch.randn(5, 4, generator=g)
    tokens = random_tokens(2, 3, 5, seed=12)
    lp, ent = logprobs_from_hidden(hidden, weight, tokens, temperature=0.6, with_entropy=False, chunk_size=2)
    assert ent is None
    torch.testing.assert_close(lp, sampled_logprobs(hidden @ weight.T, tokens, temperature=0.6), **SAME_TOL)


def test_sampled_logprobs_rejects_token_shape_mismatch():
    with pytest.raises(ValueError, match=ref.naming("tokens", "2, 4")):
        sampled_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
