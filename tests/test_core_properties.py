"""Invariances (padding, batch order, micro-batch / rank splits) and hypothesis property tests."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reopold.core import (
    generalized_jsd_loss,
    grpo_loss,
    policy_loss,
    reopold_loss,
    rkl_loss,
    rkl_sg_loss,
    sft_loss,
)
from reopold.core.rewards import reward_floor
from reopold.core.selection import entropy_threshold, keep_mask
from reopold.core.tokens import logprobs_and_entropy
from tests import reference as ref

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)  # float64, only summation order differs
# Small, deterministic (derandomize) and fast: the reference is a Python loop.
FAST = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def leaf(x):
    return x.detach().clone().requires_grad_()


def loss_and_grad(fn, x):
    """fn(leaf) -> loss; returns (loss value, d loss / d leaf)."""
    x = leaf(x)
    loss = fn(x)
    return loss.detach(), ref.grad(loss, x)


# ---------------------------------------------------------------- named cases used by several invariances
# Each case: (name, fn(student_or_logits, batch) -> loss, needs logits). `batch` is a dict of (B, ...) tensors
# sliced along B, plus "num_tokens" set by the caller for splits.
def _policy(x, b):
    return policy_loss(x, b["old"], b["adv"], b["mask"], num_tokens=b.get("n"))[0]


def _policy_seq(x, b):
    return policy_loss(x, b["old"], b["adv"], b["mask"], aggregation="sequence_mean", num_tokens=b.get("n"))[0]


def _explore(x, b):
    return reopold_loss(x, b["old"], b["teacher"], b["entropy"], b["mask"], phase="exploration",
                        num_tokens=b.get("n"))[0]


def _refine(x, b):
    return reopold_loss(x, b["old"], b["teacher"], b["entropy"], b["mask"], phase="refinement",
                        threshold=b.get("tau"), num_tokens=b.get("n"))[0]


def _refine_no_sg(x, b):
    return reopold_loss(x, b["old"], b["teacher"], b["entropy"], b["mask"], phase="refinement",
                        threshold=b.get("tau"), num_tokens=b.get("n"), stop_gradient=False)[0]


def _rkl(x, b):
    return rkl_loss(x, b["old"], b["teacher"], b["mask"], num_tokens=b.get("n"))[0]


def _rkl_sg(x, b):
    return rkl_sg_loss(x, b["old"], b["teacher"], b["mask"], num_tokens=b.get("n"))[0]


def _grpo(x, b):
    return grpo_loss(x, b["old"], b["seq_rewards"], b["mask"], group_size=2, num_tokens=b.get("n"))[0]


def _sft(x, b):
    return sft_loss(x, b["mask"], num_tokens=b.get("n"))[0]


def _gkd(x, b):
    return generalized_jsd_loss(x, b["teacher_logits"], b["mask"], beta=0.5, num_tokens=b.get("n"))[0]


def _gkd_top2(x, b):
    return generalized_jsd_loss(x, b["teacher_logits"], b["mask"], beta=1.0, top_k=2, num_tokens=b.get("n"))[0]


TOKEN_CASES = {"policy": _policy, "policy_sequence_mean": _policy_seq, "exploration": _explore,
               "refinement": _refine, "refinement_no_sg": _refine_no_sg, "rkl": _rkl, "rkl_sg": _rkl_sg,
               "grpo": _grpo, "sft": _sft}
LOGIT_CASES = {"gkd": _gkd, "gkd_top2": _gkd_top2}
B, T, V = 8, 5, 6


def make_batch(seed=0):
    student, old, teacher, entropy, mask = ref.random_batch(B, T, seed=seed)  # (8, 5) each
    mask[0] = True  # at least one full row and (likely) some empty ones
    g = torch.Generator().manual_seed(seed + 1000)
    batch = {"old": old, "teacher": teacher, "entropy": entropy, "mask": mask, "adv": teacher + 1.5,
             "seq_rewards": torch.randint(0, 2, (B,), generator=g).to(F64),
             "teacher_logits": ref.random_logits(B, T, V, seed=seed + 1)}
    return student, ref.random_logits(B, T, V, seed=seed + 2), batch


def _input(name, student, logits):
    return logits if name in LOGIT_CASES else student


ALL_CASES = {**TOKEN_CASES, **LOGIT_CASES}



# ---------------------------------------------------------------- right padding
def pad(batch, student, logits, extra=3):
    """Append `extra` masked positions holding nan / inf (finite garbage for sft / gkd inputs)."""
    nan, inf = float("nan"), float("inf")

    def cat(x, value):
        filler = torch.full((x.shape[0], extra) + tuple(x.shape[2:]), value, dtype=x.dtype)
        return torch.cat([x, filler], dim=1)

    padded = dict(batch, old=cat(batch["old"], -inf), teacher=cat(batch["teacher"], inf),
                  entropy=cat(batch["entropy"], nan), adv=cat(batch["adv"], nan),
                  mask=cat(batch["mask"], False), teacher_logits=cat(batch["teacher_logits"], 1e4))
    return padded, cat(student, nan), cat(logits, -3e3)


def test_right_padding_with_nan_changes_neither_loss_nor_grad():
    # Contract: masked positions contribute exactly 0 even when nan/inf; their gradient must be exactly 0
    # (a nan there would poison the model's gradient through the log-prob at the pad position).
    student, logits, batch = make_batch(seed=1)
    padded, student_p, logits_p = pad(batch, student, logits)
    for name, fn in ALL_CASES.items():
        x, x_p = _input(name, student, logits), _input(name, student_p, logits_p)
        if name == "sft":  # sft's contract says sum(-logp * mask): use finite garbage, not nan
            x_p = torch.cat([x, torch.full((B, 3), -1e3, dtype=F64)], dim=1)
        loss, grad = loss_and_grad(lambda s, fn=fn: fn(s, batch), x)
        loss_p, grad_p = loss_and_grad(lambda s, fn=fn: fn(s, padded), x_p)
        torch.testing.assert_close(loss_p, loss, **TIGHT, msg=name)
        torch.testing.assert_close(grad_p[:, :T], grad, **TIGHT, msg=name)
        assert torch.equal(grad_p[:, T:], torch.zeros_like(grad_p[:, T:])), name


# ---------------------------------------------------------------- batch order
def test_permuting_the_batch_permutes_the_grad_and_keeps_the_loss():
    student, logits, batch = make_batch(seed=2)
    # whole GRPO groups (pairs) move together: [2,3,0,1,6,7,4,5] then swap halves
    perm = torch.tensor([6, 7, 4, 5, 2, 3, 0, 1])
    permuted = {k: v[perm] for k, v in batch.items()}
    for name, fn in ALL_CASES.items():
        x = _input(name, student, logits)
        loss, grad = loss_and_grad(lambda s, fn=fn: fn(s, batch), x)
        loss_p, grad_p = loss_and_grad(lambda s, fn=fn: fn(s, permuted), x[perm])
        torch.testing.assert_close(loss_p, loss, **TIGHT, msg=name)
        torch.testing.assert_close(grad_p, grad[perm], **TIGHT, msg=name)


# ---------------------------------------------------------------- micro-batches and ranks
# rank 0 holds rows [0:4] as micro-batches [0:2], [2:4]; rank 1 holds [4:8] as one micro-batch.
SPLITS = [(0, 2), (2, 4), (4, 8)]


def global_count(name, batch):
    """The denominator a trainer would all-reduce: kept tokens (or kept sequences) over the whole batch."""
    mask = batch["mask"]
    if name == "exploration":
        rewards = batch["teacher"] - batch["old"]  # R graded against pi_old (reward_policy "old")
        return int(keep_mask(rewards, batch["entropy"], mask, phase="exploration", floor=reward_floor(0.3),
                             threshold=None).sum())
    if name.startswith("refinement"):
        return int((mask & (batch["entropy"] >= batch["tau"])).sum())
    if name == "policy_sequence_mean":
        return int(mask.any(dim=1).sum())
    return int(mask.sum())


def test_micro_batch_and_rank_split_with_global_count_equals_full_batch():
    student, logits, batch = make_batch(seed=3)
    # tau_beta fixed once per rollout step over the whole batch (docs/algorithm.md)
    batch["tau"] = entropy_threshold(batch["entropy"], batch["mask"], beta=0.25)
    for name, fn in ALL_CASES.items():
        x = _input(name, student, logits)
        full_loss, full_grad = loss_and_grad(lambda s, fn=fn: fn(s, batch), x)
        n = global_count(name, dict(batch, student=student))
        total, grads = torch.zeros((), dtype=F64), []
        for lo, hi in SPLITS:
            part = {k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in batch.items()}
            part["n"] = n
            loss, grad = loss_and_grad(lambda s, fn=fn, part=part: fn(s, part), x[lo:hi])
            total, grads = total + loss, grads + [grad]
        torch.testing.assert_close(total, full_loss, **TIGHT, msg=name)
        torch.testing.assert_close(torch.cat(grads), full_grad, **TIGHT, msg=name)
        assert abs(float(full_loss)) > 1e-3, name  # a real loss, not 0 == 0


def test_num_tokens_as_tensor_matches_int():
    # A trainer all-reduces the count as a tensor; passing it without .item() must give the same loss.
    student, _, batch = make_batch(seed=4)
    as_int = policy_loss(student, batch["old"], batch["adv"], batch["mask"], num_tokens=17)[0]
    as_tensor = policy_loss(student, batch["old"], batch["adv"], batch["mask"], num_tokens=torch.tensor(17))[0]
    torch.testing.assert_close(as_tensor, as_int, **TIGHT)


# ---------------------------------------------------------------- hypothesis: loss vs reference
@st.composite
def batches(draw, max_b=3, max_t=5):
    b, t = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    seed = draw(st.integers(0, 2**16))
    student, old, teacher, entropy, _ = ref.random_batch(b, t, seed=seed)
    mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)))
    return student, old, teacher, entropy, mask


@FAST
@given(batches(), st.sampled_from(["token_mean", "sequence_mean"]), st.sampled_from([0.1, 0.2, 0.3]),
       st.sampled_from([None, 0.28]))
def test_policy_loss_matches_reference_on_random_masks(batch, aggregation, clip_eps, clip_eps_high):
    student, old, teacher, _, mask = batch
    s1, s2 = leaf(student), leaf(student)
    loss, _ = policy_loss(s1, old, teacher + 1.5, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                          aggregation=aggregation)
    ref_loss, _ = ref.policy_loss(s2, old, teacher + 1.5, mask, clip_eps, clip_eps_high, aggregation)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TIGHT)
    torch.testing.assert_close(ref.grad(loss, s1), ref.grad(ref_loss, s2), **TIGHT)


@FAST
@given(batches(), st.sampled_from(["exploration", "refinement"]), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.5, 1.0]), st.sampled_from([0.1, 0.3, 0.7]))
def test_reopold_loss_matches_reference_on_random_masks(batch, phase, sg, floor_on, selection, beta, lam):
    if phase == "exploration":
        floor_on = True  # the contract leaves reward_floor=False in exploration open
    student, old, teacher, entropy, mask = batch
    s1, s2 = leaf(student), leaf(student)
    kwargs = dict(phase=phase, lam=lam, beta=beta, stop_gradient=sg, reward_floor=floor_on,
                  entropy_selection=selection)
    loss, m = reopold_loss(s1, old, teacher, entropy, mask, **kwargs)
    ref_loss, rm = ref.reopold_loss(s2, old, teacher, entropy, mask, **kwargs)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TIGHT)
    torch.testing.assert_close(ref.grad(loss, s1), ref.grad(ref_loss, s2), **TIGHT)
    assert abs(float(m["kept_frac"]) - rm["kept_frac"]) < 1e-6  # a logging metric: float32 is fine


# ---------------------------------------------------------------- hypothesis: threshold characterisation
@FAST
@given(batches(max_b=4, max_t=6), st.sampled_from([0.1, 0.2, 0.25, 0.4, 0.5, 0.9, 1.0]), st.integers(0, 2**16))
def test_threshold_is_kth_largest_with_ties(batch, beta, seed):
    # Entropies on a coarse grid {0, 0.5, 1, 1.5} so ties are common. With k = ceil(beta*N):
    # #{H > tau} < k <= #{H >= tau}, tau is one of the valid entropies, and keep == mask & (H >= tau).
    _, _, _, _, mask = batch
    g = torch.Generator().manual_seed(seed)
    entropy = torch.randint(0, 4, mask.shape, generator=g).to(F64) / 2
    n = int(mask.sum())
    tau = entropy_threshold(entropy, mask, beta=beta)
    keep = keep_mask(torch.zeros_like(entropy), entropy, mask, phase="refinement", floor=None, threshold=tau)
    assert not (keep & ~mask).any()
    if n == 0:
        assert math.isinf(float(tau)) and not keep.any()
        return
    k = math.ceil(beta * n)
    valid = entropy[mask]
    assert float(tau) in valid.tolist()
    assert int((valid > tau).sum()) < k <= int(keep.sum())
    assert torch.equal(keep, mask & (entropy >= tau))


# ---------------------------------------------------------------- hypothesis: generalized JSD
@FAST
@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 6), st.integers(0, 2**16),
       st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
def test_gkd_bounds_and_swap_symmetry(b, t, v, seed, beta):
    # JSD_beta(P_T, P_S) with M = beta P_T + (1-beta) P_S is symmetric under (P_T, P_S, beta) ->
    # (P_S, P_T, 1 - beta); beta = 0 / 1 swap forward and reverse KL. For 0 < beta < 1 it lies in
    # [0, h(beta)], h the binary entropy (each KL(P||M) <= -log(weight of P in M)).
    student = ref.random_logits(b, t, v, seed=seed, scale=3.0)
    teacher = ref.random_logits(b, t, v, seed=seed + 1, scale=3.0)
    mask = torch.ones(b, t, dtype=torch.bool)
    loss, _ = generalized_jsd_loss(student, teacher, mask, beta=beta)
    swapped, _ = generalized_jsd_loss(teacher, student, mask, beta=1.0 - beta)
    torch.testing.assert_close(loss, swapped, **TIGHT)
    assert loss.item() >= -1e-12
    if 0 < beta < 1:
        assert loss.item() <= -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta)) + 1e-12


@FAST
@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 6), st.integers(0, 2**16),
       st.sampled_from([0.0, 0.3, 1.0]), st.integers(1, 6))
def test_gkd_matches_reference_on_random_shapes(b, t, v, seed, beta, top_k):
    student = ref.random_logits(b, t, v, seed=seed)
    teacher = ref.random_logits(b, t, v, seed=seed + 1)
    mask = ref.random_mask(b, t, torch.Generator().manual_seed(seed))
    top_k = min(top_k, v)
    s1, s2 = leaf(student), leaf(student)
    loss, _ = generalized_jsd_loss(s1, teacher, mask, beta=beta, top_k=top_k)
    ref_loss = ref.generalized_jsd_loss(s2, teacher, mask, beta, 1.0, top_k)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TIGHT)
    torch.testing.assert_close(ref.grad(loss, s1), ref.grad(ref_loss, s2), **TIGHT)


# ---------------------------------------------------------------- hypothesis: splits and chunks
@FAST
@given(batches(max_b=4), st.data())
def test_policy_loss_random_split_equals_full_batch(batch, data):
    student, old, teacher, _, mask = batch
    cut = data.draw(st.integers(0, student.shape[0]))  # an empty micro-batch is allowed
    n = int(mask.sum())
    full, full_grad = loss_and_grad(lambda s: policy_loss(s, old, teacher, mask)[0], student)
    parts = [loss_and_grad(lambda s, sl=sl: policy_loss(s, old[sl], teacher[sl], mask[sl], num_tokens=max(n, 1))[0],
                           student[sl]) for sl in (slice(0, cut), slice(cut, None))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full, **TIGHT)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full_grad, **TIGHT)


@FAST
@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 8), st.integers(1, 20), st.integers(0, 2**16))
def test_chunk_size_does_not_change_logprobs_or_entropy(b, t, v, chunk_size, seed):
    logits = ref.random_logits(b, t, v, seed=seed, dtype=torch.float32)
    tokens = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(seed))
    lp, ent = logprobs_and_entropy(logits, tokens, chunk_size=chunk_size)
    lp_full, ent_full = logprobs_and_entropy(logits, tokens, chunk_size=b * t)
    # same rows, same float32 kernels: only vectorisation can differ, a few ulps at most
    torch.testing.assert_close(lp, lp_full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ent_full, rtol=1e-6, atol=1e-6)
