"""Lockstep: the loss and gradient the trainer's algorithms produce (shape once per step, prepare the update, loss
per micro-batch with the global kept-token count) equal the public ``reopold.core`` functions on the whole
mini-batch, for every algorithm and ablation switch, on the first and the second update of a rollout step."""

from __future__ import annotations

import itertools

import pytest
import torch

from reopold import core
from reopold.config.loader import from_dict
from reopold.config.schema import TrainConfig
from reopold.registry import ALGORITHMS
from reopold.rollout import build_rollout
from reopold.train.algorithms import ScoredRollout
from tests.fakes import EOS, PAD, BigramPolicy, BigramTeacher, V


def make_scored(policy, teacher, *, seed: int = 0, prompts: int = 4, n: int = 2) -> ScoredRollout:
    rng = torch.Generator().manual_seed(seed)
    prompt_ids = [[2 + int(torch.randint(5, (1,), generator=rng))] for _ in range(prompts) for _ in range(n)]
    responses = []
    for _ in range(prompts * n):
        length = int(torch.randint(2, 7, (1,), generator=rng))
        responses.append(torch.randint(2, V, (length,), generator=rng).tolist() + [EOS])
    rollout = build_rollout(prompt_ids, responses, [None] * len(responses), pad_token_id=PAD, eos_token_id=EOS)
    with torch.no_grad():
        old, entropy = policy(rollout)
        teacher_logprobs, _ = teacher.policy(rollout)
    verdicts = torch.randint(2, (len(responses),), generator=rng).float()
    return ScoredRollout(rollout, old, entropy, verdicts, teacher_logprobs)


def make_config(name: str, **algo) -> TrainConfig:
    return from_dict(TrainConfig, {
        "algo": {"name": name, "lam": 0.3, "beta": 0.3, "clip_eps": 0.2, "clip_eps_high": 0.28, **algo},
        "rollout": {"samples_per_prompt": 2, "prompts_per_step": 4}, "optim": {"mini_batch_prompts": 4},
        "run": {"steps": 9},
    })  # fmt: skip


def trainer_loss(algorithm, policy, teacher, scored, shaped, micro_size=3):
    """What Trainer._update does for one update over every row, on one rank."""
    rows = list(range(len(scored.rollout)))
    micro_batches = []
    for start in range(0, len(rows), micro_size):
        micro = scored.select(rows[start : start + micro_size])
        micro_batches.append((micro, shaped.select(rows[start : start + micro_size],
                                                   micro.rollout.completion_mask.shape[1])))
    micro_batches = algorithm.prepare_update(policy, micro_batches)
    num_tokens = sum(part.keep.sum() for _, part in micro_batches).float()
    policy.zero_grad()
    total = torch.zeros(())
    for micro, part in micro_batches:
        loss, _ = algorithm.loss(policy, teacher, micro, part, num_tokens)
        loss.backward()
        total = total + loss.detach()
    return total, policy.table.grad.clone()


def core_loss(name, config, policy, teacher, scored, shaped, step):
    policy.zero_grad()
    mask = scored.rollout.completion_mask
    algo = config.algo
    if name == "grpo":
        logprobs, _ = policy(scored.rollout)
        loss, _ = core.grpo_loss(logprobs, scored.old_logprobs, scored.sequence_rewards, mask, group_size=2,
                                 clip_eps=algo.clip_eps, clip_eps_high=algo.clip_eps_high)
    elif name == "sft":
        logprobs, _ = policy(scored.rollout)
        loss, _ = core.sft_loss(logprobs, mask)
    elif name == "gkd":
        loss, _ = core.generalized_jsd_loss(policy(scored.rollout, return_logits=True),
                                            teacher.logits(scored.rollout), mask, beta=algo.gkd_beta)
    else:
        switches = algo.switches()
        logprobs, _ = policy(scored.rollout)
        phase = core.phase_at(step, config.switch_step if switches["two_phase"] else 0)
        loss, _ = core.reopold_loss(
            logprobs, scored.old_logprobs, scored.teacher_logprobs, scored.entropy, mask, phase=phase,
            lam=algo.lam, beta=algo.beta, clip_eps=algo.clip_eps, clip_eps_high=algo.clip_eps_high,
            stop_gradient=switches["stop_gradient"], reward_floor=switches["reward_floor"],
            entropy_selection=switches["entropy_selection"], reward_policy=algo.reward_policy,
        )  # fmt: skip
    loss.backward()
    return loss.detach(), policy.table.grad.clone()


SWITCH_NAMES = ("stop_gradient", "reward_floor", "entropy_selection", "two_phase")
CASES = [("grpo", {}), ("sft", {}), ("gkd", {}), ("gkd", {"gkd_beta": 1.0}), ("rkl", {}), ("rkl_sg", {})] + [
    ("reopold", {**dict(zip(SWITCH_NAMES, bits, strict=True)), "reward_policy": policy})
    for bits in itertools.product((True, False), repeat=4) for policy in ("old", "current")
]


@pytest.mark.parametrize("step", [0, 5], ids=["exploration", "refinement"])
@pytest.mark.parametrize("name, algo", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in a.items())}"
                                                   for n, a in CASES])
def test_trainer_algorithm_equals_core_on_updates_one_and_two(name, algo, step):
    config = make_config(name, **algo)
    algorithm = ALGORITHMS.get(name)(config, V)
    policy, teacher = BigramPolicy(seed=1), BigramTeacher(seed=2)
    scored = make_scored(policy, teacher, seed=3)
    shaped = algorithm.shape(scored, step=step, gather=lambda t: t)
    for update in (1, 2):
        got, got_grad = trainer_loss(algorithm, policy, teacher, scored, shaped)
        want, want_grad = core_loss(name, config, policy, teacher, scored, shaped, step)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"loss, update {update}")
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6, msg=f"gradient, update {update}")
        with torch.no_grad():  # the optimizer step between update 1 and 2: pi_theta moves away from pi_old
            policy.table.add_(0.3 * torch.randn(V, V, generator=torch.Generator().manual_seed(update)))


def test_the_two_reward_policies_differ_on_update_two():
    """The switch matters: after the policy moved, grading R against pi_old or the current policy differ."""
    policy, teacher = BigramPolicy(seed=1), BigramTeacher(seed=2)
    scored = make_scored(policy, teacher, seed=3)
    with torch.no_grad():
        policy.table.add_(0.5 * torch.randn(V, V, generator=torch.Generator().manual_seed(9)))
    losses = []
    for reward_policy in ("old", "current"):
        config = make_config("reopold", reward_policy=reward_policy)
        algorithm = ALGORITHMS.get("reopold")(config, V)
        shaped = algorithm.shape(scored, step=0, gather=lambda t: t)
        losses.append(trainer_loss(algorithm, policy, teacher, scored, shaped)[0])
    assert abs(float(losses[0] - losses[1])) > 1e-3
