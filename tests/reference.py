"""Naive float64 reference for reopold.core, written straight from the paper's equations (docs/algorithm.md).

Shares no code with reopold (it never imports it). Every loss is an explicit loop over (sequence i, position t)
that skips masked positions, built from per-element torch ops on 0-dim float64 tensors, so torch.autograd
through it gives the reference gradient. Slow on purpose: use it on tiny batches only.

Also holds the seeded input makers the tests share (`random_batch`, `random_logits`).
"""

import math
import re
from fractions import Fraction

import torch

F64 = torch.float64


# ---------------------------------------------------------------- rewards (paper 2-3)
def floor(lam: float) -> float:
    """Eq. 5/7: the infimum of the mixture bound, log(lam) / (1 - lam)."""
    return math.log(lam) / (1.0 - lam)


def token_rewards(student_logprobs, teacher_logprobs, stop_gradient=True):
    """Eq. 3: R = log pi_T - log pi_theta; sg(R) when stop_gradient (Remark 3.1)."""
    s = student_logprobs.detach() if stop_gradient else student_logprobs
    return teacher_logprobs - s


def valid_positions(mask):
    return [(i, t) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if bool(mask[i, t])]


# ---------------------------------------------------------------- selection (paper 4)
def threshold(entropy, mask, beta) -> float:
    """Eq. 8: tau = the k-th largest valid entropy, k = ceil(beta * N); +inf when N == 0."""
    values = sorted((float(entropy[i, t]) for i, t in valid_positions(mask)), reverse=True)
    if not values:
        return math.inf
    # Exact decimal arithmetic: beta=0.3, N=50 is k=15 (float32 arithmetic would give 16).
    k = math.ceil(Fraction(str(beta)) * len(values))
    return values[k - 1]


def keep_mask(rewards, entropy, mask, phase, floor=None, threshold=None):
    """Eq. 9/10: exploration keeps R >= floor, refinement keeps H >= tau, both inside the completion mask."""
    keep = torch.zeros(mask.shape, dtype=torch.bool)
    for i, t in valid_positions(mask):
        if phase == "exploration":
            keep[i, t] = floor is None or rewards[i, t].item() >= floor
        else:
            keep[i, t] = threshold is None or float(entropy[i, t]) >= threshold
    return keep


# ---------------------------------------------------------------- PPO objective (paper 5)
def ppo_token(student_lp, old_lp, advantage, eps_low, eps_high):
    """One token: returns (-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A), rho, clipped-term-binds)."""
    rho = torch.exp(student_lp - old_lp)
    unclipped = rho * advantage
    clipped_rho = rho
    if rho.item() < 1.0 - eps_low:
        clipped_rho = torch.tensor(1.0 - eps_low, dtype=F64)  # clamp: no gradient outside the range
    elif rho.item() > 1.0 + eps_high:
        clipped_rho = torch.tensor(1.0 + eps_high, dtype=F64)
    clipped = clipped_rho * advantage
    binds = clipped.item() < unclipped.item()
    return -(clipped if binds else unclipped), rho, binds


def zero_like_graph(x):
    """A 0-dim zero attached to x's graph (nan-safe), so autograd works on an empty sum."""
    return torch.where(torch.zeros_like(x, dtype=torch.bool), x, torch.zeros_like(x)).sum()


def policy_loss(student, old, advantages, mask, clip_eps=0.2, clip_eps_high=None,
                aggregation="token_mean", num_tokens=None):
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    total = zero_like_graph(student)
    seq_means = []
    n_tok, n_clip, rho_sum = 0, 0, 0.0
    for i in range(mask.shape[0]):
        seq_sum, seq_n = zero_like_graph(student), 0
        for t in range(mask.shape[1]):
            if not bool(mask[i, t]):
                continue
            loss_t, rho, binds = ppo_token(student[i, t], old[i, t], advantages[i, t], clip_eps, eps_high)
            total = total + loss_t
            seq_sum, seq_n = seq_sum + loss_t, seq_n + 1
            n_tok, n_clip, rho_sum = n_tok + 1, n_clip + int(binds), rho_sum + rho.item()
        if seq_n:
            seq_means.append(seq_sum / seq_n)
    if aggregation == "token_mean":
        denom = num_tokens if num_tokens is not None else max(n_tok, 1)
        loss = total / denom
    else:  # "sequence_mean"
        denom = num_tokens if num_tokens is not None else max(len(seq_means), 1)
        loss = sum(seq_means, zero_like_graph(student)) / denom
    metrics = {"clip_frac": n_clip / max(n_tok, 1), "ratio_mean": rho_sum / max(n_tok, 1)}
    return loss, metrics


def _stack(rows):
    return torch.stack([torch.stack(row) for row in rows])


def reopold_loss(student, old, teacher, entropy, mask, phase, lam=0.3, beta=0.2, clip_eps=0.2,
                 threshold_value=None, num_tokens=None, stop_gradient=True, reward_floor=True,
                 entropy_selection=True, reward_policy="old", clip_eps_high=None):
    """Eq. 4-10 with the paper's ablation switches. R is graded against pi_old ("old") or the current policy
    ("current"); without stop-gradient it is always the current policy (its gradient is the point)."""
    graded = student if reward_policy == "current" or not stop_gradient else old
    rewards = token_rewards(graded, teacher, stop_gradient)
    lo = floor(lam)
    tau = math.nan
    if phase == "exploration":
        keep = keep_mask(rewards, entropy, mask, "exploration", floor=lo)
    else:
        if entropy_selection:
            tau = threshold(entropy, mask, beta) if threshold_value is None else float(threshold_value)
        keep = keep_mask(rewards, entropy, mask, "refinement", threshold=None if math.isnan(tau) else tau)
    zero = torch.zeros((), dtype=F64)
    rows = []
    for i in range(mask.shape[0]):
        row = []
        for t in range(mask.shape[1]):
            r = rewards[i, t]
            if not bool(keep[i, t]):
                row.append(zero)
            elif phase == "refinement" and reward_floor and r.item() < lo:
                row.append(torch.tensor(lo, dtype=F64))  # max(R, floor) = floor: constant
            else:
                row.append(r)
        rows.append(row)
    loss, pm = policy_loss(student, old, _stack(rows), keep, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                           num_tokens=num_tokens)
    valid = valid_positions(mask)
    n = max(len(valid), 1)
    reward_values = [rewards[i, t].item() for i, t in valid]
    metrics = {
        "reward_mean": sum(reward_values) / n,
        "reverse_kl": -sum(reward_values) / n,
        "below_floor_frac": sum(r < lo for r in reward_values) / n,
        "kept_frac": int(keep.sum()) / n,
        "threshold": tau,
        "entropy_mean": sum(float(entropy[i, t]) for i, t in valid) / n,
        "clip_frac": pm["clip_frac"],
        "loss": loss.item(),
    }
    return loss, metrics


def rkl_loss(student, old, teacher, mask, clip_eps=0.2, num_tokens=None, stop_gradient=False, reward_policy="old"):
    """Sampled-token reverse KL as a policy gradient, advantage R on every valid token (graded against pi_old
    only with stop-gradient and reward_policy "old")."""
    graded = student if reward_policy == "current" or not stop_gradient else old
    rewards = token_rewards(graded, teacher, stop_gradient)
    return policy_loss(student, old, rewards, mask, clip_eps=clip_eps, num_tokens=num_tokens)


# ---------------------------------------------------------------- GRPO, SFT (the paper's baselines)
def grpo_advantages(sequence_rewards, group_size, eps=1e-6):
    out = []
    for g in range(0, len(sequence_rewards), group_size):
        group = [float(r) for r in sequence_rewards[g:g + group_size]]
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))  # unbiased
        out.extend((r - mean) / (std + eps) for r in group)
    return torch.tensor(out, dtype=F64)


def grpo_loss(student, old, sequence_rewards, mask, group_size, clip_eps=0.2, num_tokens=None, clip_eps_high=None):
    adv = grpo_advantages(sequence_rewards, group_size)
    advantages = adv[:, None].expand(mask.shape)
    loss, pm = policy_loss(student, old, advantages, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                           num_tokens=num_tokens)
    metrics = {"reward_mean": float(sum(float(r) for r in sequence_rewards) / len(sequence_rewards)),
               "clip_frac": pm["clip_frac"]}
    return loss, metrics


def sft_loss(student, mask, num_tokens=None):
    valid = valid_positions(mask)
    total = zero_like_graph(student)
    for i, t in valid:
        total = total - student[i, t]
    denom = num_tokens if num_tokens is not None else max(len(valid), 1)
    return total / denom


# ---------------------------------------------------------------- distributions
def log_softmax_row(z):
    m = z.max().detach()  # the shift cancels exactly; detaching it changes no gradient
    return z - (m + torch.log(torch.exp(z - m).sum()))


def generalized_jsd_loss(student_logits, teacher_logits, mask, beta=0.5, temperature=1.0, top_k=None,
                         num_tokens=None):
    """the paper's baselines gkd: per token JSD_beta(P_T, P_S) with M = beta*P_T + (1-beta)*P_S; token mean."""
    valid = valid_positions(mask)
    total = zero_like_graph(student_logits)
    for i, t in valid:
        zs, zt = student_logits[i, t] / temperature, teacher_logits[i, t] / temperature
        if top_k is not None:
            order = sorted(range(zt.shape[0]), key=lambda v: float(zt[v]), reverse=True)[:top_k]
            zs = torch.stack([zs[v] for v in order])
            zt = torch.stack([zt[v] for v in order])
        log_ps, log_pt = log_softmax_row(zs), log_softmax_row(zt)
        ps, pt = torch.exp(log_ps), torch.exp(log_pt)
        if beta == 0:
            div = (pt * (log_pt - log_ps)).sum()  # KL(P_T || P_S), forward
        elif beta == 1:
            div = (ps * (log_ps - log_pt)).sum()  # KL(P_S || P_T), reverse
        else:
            log_m = torch.log(beta * pt + (1 - beta) * ps)
            div = beta * (pt * (log_pt - log_m)).sum() + (1 - beta) * (ps * (log_ps - log_m)).sum()
        total = total + div
    denom = num_tokens if num_tokens is not None else max(len(valid), 1)
    return total / denom


def sampled_logprobs(logits, tokens, temperature=1.0):
    rows = [[log_softmax_row(logits[i, t] / temperature)[int(tokens[i, t])] for t in range(tokens.shape[1])]
            for i in range(tokens.shape[0])]
    return _stack(rows)


def entropy(logits, temperature=1.0):
    rows = []
    for i in range(logits.shape[0]):
        row = []
        for t in range(logits.shape[1]):
            lp = log_softmax_row(logits[i, t] / temperature)
            row.append(-(torch.exp(lp) * lp).sum())
        rows.append(row)
    return _stack(rows)


# ---------------------------------------------------------------- autograd helper
def grad(loss, x):
    """d loss / d x; zeros where x is unused (an all-masked batch)."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


# ---------------------------------------------------------------- seeded inputs
def random_mask(B, T, generator, min_len=0):
    """Right-padded (B, T) bool mask with random lengths in [min_len, T]."""
    lengths = torch.randint(min_len, T + 1, (B,), generator=generator)
    return torch.arange(T)[None, :] < lengths[:, None]


def random_batch(B, T, seed, min_len=0):
    """(B, T) float64 tensors: student/old/teacher log-probs, entropy, and a right-padded mask.

    Rewards R = teacher - student spread over about (-5, 3) so some fall below floor(0.3) = -1.72;
    old = student + N(0, 0.25) noise so some ratios leave [0.8, 1.2] and get clipped.
    """
    g = torch.Generator().manual_seed(seed)
    student = -3.0 * torch.rand(B, T, generator=g, dtype=F64)
    old = student + 0.25 * torch.randn(B, T, generator=g, dtype=F64)
    teacher = -5.0 * torch.rand(B, T, generator=g, dtype=F64)
    ent = 3.0 * torch.rand(B, T, generator=g, dtype=F64)
    mask = random_mask(B, T, g, min_len)
    return student, old, teacher, ent, mask


def random_logits(B, T, V, seed, scale=2.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, T, V, generator=g, dtype=F64)).to(dtype)


def naming(*parts) -> str:
    """A regex for pytest.raises(match=...) that requires every part (argument name, bad value) in any order."""
    return "".join(f"(?=[\\s\\S]*{re.escape(str(p))})" for p in parts)


# ---------------------------------------------------------------- spans across tokenizers (docs/cross_tokenizer.md)
def align_token_strings(student_tokens, teacher_tokens):
    """Two-pointer walk over the tokens' byte strings of one completion (no offsets, no tensors).

    A span takes the next token of each side, then more tokens on the side that has covered fewer bytes, until
    both have covered the same number. Right after a span closes, empty (zero-byte) tokens on both sides pair up
    one per span; an empty token on one side only joins the span that just closed (the first span if none has).
    Returns (student span ids, teacher span ids, number of spans); -1 = in no span (the other side is empty).
    """
    assert b"".join(student_tokens) == b"".join(teacher_tokens), "both sides must spell the same text"
    s_ids, t_ids = [], []
    i = j = 0
    s_bytes = t_bytes = 0
    span = -1
    while i < len(student_tokens) and j < len(teacher_tokens):
        s_empty, t_empty = len(student_tokens[i]) == 0, len(teacher_tokens[j]) == 0
        if span >= 0 and s_empty != t_empty:
            if s_empty:
                s_ids.append(span)
                i += 1
            else:
                t_ids.append(span)
                j += 1
            continue
        span += 1
        s_ids.append(span)
        s_bytes += len(student_tokens[i])
        i += 1
        t_ids.append(span)
        t_bytes += len(teacher_tokens[j])
        j += 1
        while s_bytes != t_bytes:
            if s_bytes < t_bytes:
                s_ids.append(span)
                s_bytes += len(student_tokens[i])
                i += 1
            else:
                t_ids.append(span)
                t_bytes += len(teacher_tokens[j])
                j += 1
    s_ids += [span] * (len(student_tokens) - i)  # what is left is empty tokens at the end
    t_ids += [span] * (len(teacher_tokens) - j)
    return s_ids, t_ids, span + 1


def span_sums_on_ends(values, span_ids):
    """[sum of values over each span placed on its last token, 0.0 elsewhere] (values: 0-dim tensors or floats)."""
    last = {span: t for t, span in enumerate(span_ids) if span >= 0}
    out = []
    for t, span in enumerate(span_ids):
        if span >= 0 and last[span] == t:
            members = [values[u] for u, other in enumerate(span_ids) if other == span]
            out.append(sum(members[1:], members[0]))
        else:
            out.append(0.0 * values[t] if torch.is_tensor(values[t]) else 0.0)
    return out


def teacher_sums_on_student_ends(teacher_values, student_span_ids, teacher_span_ids):
    """The teacher's span sums, placed on the last student token of each span (0.0 elsewhere)."""
    last = {span: t for t, span in enumerate(student_span_ids) if span >= 0}
    out = []
    for t, span in enumerate(student_span_ids):
        if span >= 0 and last[span] == t:
            out.append(sum(float(teacher_values[u]) for u, o in enumerate(teacher_span_ids) if o == span))
        else:
            out.append(0.0)
    return out
