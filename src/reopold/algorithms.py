"""The objectives the trainer can run, behind one interface, in a name -> class registry.

Each algorithm says where its responses come from (the student, or the teacher for SFT), shapes a scored rollout
once per step (rewards, keep masks, thresholds: fixed for every update of that step), and gives the loss of a
micro-batch. All the math is in ``reopold.core``; this module only wires it to the trainer's tensors.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from reopold import core
from reopold.rollout import Rollout

REWARD_HIST_EDGES = [-12.0 + 0.5 * i for i in range(29)]  # fixed edges so histograms add up across steps


@dataclass
class ScoredRollout:
    """A rollout with everything computed once per step, before any update."""

    rollout: Rollout
    old_logprobs: torch.Tensor  # (B, T) rollout-time student pi_old, at the sampling temperature
    entropy: torch.Tensor  # (B, T) entropy of pi_old's full next-token distribution
    sequence_rewards: torch.Tensor  # (B,) 1.0 where the task's checker accepts the response
    teacher_logprobs: torch.Tensor | None = None  # (B, T) teacher-forced log pi_T of the same tokens

    def is_finite(self) -> bool:
        """No NaN/inf on a valid token: a NaN reward must stop the step, not be silently masked away."""
        mask = self.rollout.completion_mask
        tensors = [self.old_logprobs, self.entropy, self.teacher_logprobs]
        return all(bool(torch.isfinite(t[mask]).all()) for t in tensors if t is not None)

    def select(self, rows: list[int]) -> ScoredRollout:
        sub = self.rollout.select(rows)
        width = sub.completion_mask.shape[1]
        take = lambda t: None if t is None else t[rows, :width]
        return ScoredRollout(sub, take(self.old_logprobs), take(self.entropy), self.sequence_rewards[rows],
                             take(self.teacher_logprobs))


@dataclass
class Shaped:
    """What the updates of one step train on."""

    keep: torch.Tensor  # (B, T) bool, tokens whose loss counts
    advantages: torch.Tensor | None = None  # (B, T) fixed advantages; None when the loss recomputes them
    metrics: dict = field(default_factory=dict)

    def select(self, rows: list[int], width: int) -> Shaped:
        adv = None if self.advantages is None else self.advantages[rows, :width]
        return replace(self, keep=self.keep[rows, :width], advantages=adv)


Gather = Callable[[torch.Tensor], torch.Tensor]  # 1-D local values -> the same from every rank, concatenated


def _token_metrics(scored: ScoredRollout, gather: Gather, all_entropy: torch.Tensor | None = None) -> dict:
    """Diagnostics of the whole step's batch (every rank's share, through ``gather``); ``all_entropy``: the valid
    entropies of every rank when the caller has gathered them already."""
    mask = scored.rollout.completion_mask
    if all_entropy is None:
        all_entropy = gather(scored.entropy[mask])
    return {
        "entropy_mean": all_entropy.float().mean(),
        "response_length": gather(mask.sum(-1).float()).mean(),
        "train_accuracy": gather(scored.sequence_rewards.float()).mean(),
    }


def _reward_histogram(rewards: torch.Tensor) -> dict:
    """Counts of 1-D token rewards in REWARD_HIST_EDGES' bins (the outermost bins also count what lies beyond)."""
    values = rewards.clamp(REWARD_HIST_EDGES[0], REWARD_HIST_EDGES[-1]).float()
    counts = torch.histc(values, bins=len(REWARD_HIST_EDGES) - 1, min=REWARD_HIST_EDGES[0], max=REWARD_HIST_EDGES[-1])
    return {"edges": REWARD_HIST_EDGES, "counts": counts.tolist()}


class Distillation:
    """REOPOLD and its baselines rkl / rkl_sg, with the four ablation switches of SPEC section 7.

    Shape: R = log pi_T - log pi_old (Eq. 3), the keep mask of the step's phase (Eq. 9/10, threshold over the whole
    rollout batch of all ranks) and R_hat = max(R, floor) (Eq. 7). With stop-gradient the advantages are fixed
    for the step, like PPO's; without it (vanilla RKL) R is recomputed from the current policy in the loss, so its
    gradient flows.
    """

    rollout_source = "student"
    needs_teacher_logprobs = True

    def __init__(self, algo, switch_step: int):
        self.algo = algo
        self.switches = algo.switches()
        self.switch_step = switch_step if self.switches["two_phase"] else 0
        self.floor = core.reward_floor(algo.lam)

    def shape(self, scored: ScoredRollout, *, step: int, gather: Gather) -> Shaped:
        mask = scored.rollout.completion_mask
        rewards = core.token_rewards(scored.old_logprobs, scored.teacher_logprobs)  # (B, T)
        phase = core.phase_at(step, self.switch_step)
        threshold = None
        all_entropy = gather(scored.entropy[mask])  # valid entropies of every rank: the threshold and the metrics
        if phase == "refinement" and self.switches["entropy_selection"]:
            threshold = core.entropy_threshold(all_entropy, torch.ones_like(all_entropy, dtype=torch.bool),
                                               beta=self.algo.beta)
        keep = core.keep_mask(rewards, scored.entropy, mask, phase=phase, floor=self.floor, threshold=threshold)
        floor = self.floor if self.switches["reward_floor"] else None
        advantages = core.clipped_rewards(rewards, floor) if self.switches["stop_gradient"] else None
        all_rewards = gather(rewards[mask].float())  # valid token rewards of every rank
        metrics = {
            "phase": phase,
            "floor": self.floor,
            "reward_mean": all_rewards.mean(),
            "below_floor_frac": (all_rewards < self.floor).float().mean(),
            "kept_frac": gather(keep[mask].float()).mean(),
            "threshold": float("nan") if threshold is None else threshold,
            "reverse_kl": -all_rewards.mean(),
            "reward_hist": _reward_histogram(all_rewards),
            **_token_metrics(scored, gather, all_entropy),
        }
        return Shaped(keep=keep, advantages=advantages, metrics=metrics)

    def loss(self, policy, teacher, micro: ScoredRollout, shaped: Shaped, num_tokens: torch.Tensor):
        logprobs, _ = policy(micro.rollout, with_entropy=False)
        advantages = shaped.advantages
        if advantages is None:  # no stop-gradient: R carries the gradient of -log pi_theta
            floor = self.floor if self.switches["reward_floor"] else None
            rewards = core.token_rewards(logprobs, micro.teacher_logprobs, stop_gradient=False)
            advantages = core.clipped_rewards(rewards, floor)
        return core.policy_loss(logprobs, micro.old_logprobs, advantages, shaped.keep, clip_eps=self.algo.clip_eps,
                                clip_eps_high=self.algo.clip_eps_high, num_tokens=num_tokens)


class GRPO:
    """Outcome reward from the task's checker, group-normalised per prompt, on every token of the response."""

    rollout_source = "student"
    needs_teacher_logprobs = False

    def __init__(self, algo, samples_per_prompt: int):
        self.algo = algo
        self.group_size = samples_per_prompt

    def shape(self, scored: ScoredRollout, *, step: int, gather: Gather) -> Shaped:
        mask = scored.rollout.completion_mask
        advantages = core.grpo_advantages(scored.sequence_rewards.float(), group_size=self.group_size)  # (B,)
        metrics = {"kept_frac": 1.0, **_token_metrics(scored, gather)}
        metrics["reward_mean"] = metrics["train_accuracy"]  # the outcome reward is the checker's verdict
        return Shaped(keep=mask, advantages=advantages[:, None].expand_as(scored.old_logprobs), metrics=metrics)

    def loss(self, policy, teacher, micro: ScoredRollout, shaped: Shaped, num_tokens: torch.Tensor):
        logprobs, _ = policy(micro.rollout, with_entropy=False)
        return core.policy_loss(logprobs, micro.old_logprobs, shaped.advantages, shaped.keep,
                                clip_eps=self.algo.clip_eps, clip_eps_high=self.algo.clip_eps_high,
                                num_tokens=num_tokens)


class SFT:
    """Off-policy sequence-level distillation: maximum likelihood on answers the teacher samples (temperature 1)."""

    rollout_source = "teacher"
    needs_teacher_logprobs = False

    def __init__(self, algo):
        self.algo = algo

    def shape(self, scored: ScoredRollout, *, step: int, gather: Gather) -> Shaped:
        metrics = {"kept_frac": 1.0, **_token_metrics(scored, gather)}
        metrics["teacher_accuracy"] = metrics.pop("train_accuracy")
        return Shaped(keep=scored.rollout.completion_mask, metrics=metrics)

    def loss(self, policy, teacher, micro: ScoredRollout, shaped: Shaped, num_tokens: torch.Tensor):
        logprobs, _ = policy(micro.rollout, with_entropy=False)
        return core.sft_loss(logprobs, shaped.keep, num_tokens=num_tokens)


class GKD:
    """Generalized JSD between the full student and teacher distributions on the student's samples."""

    rollout_source = "student"
    needs_teacher_logprobs = False

    def __init__(self, algo, vocab_size: int, temperature: float):
        self.algo = algo
        self.vocab_size = vocab_size
        self.temperature = temperature

    def shape(self, scored: ScoredRollout, *, step: int, gather: Gather) -> Shaped:
        return Shaped(keep=scored.rollout.completion_mask, metrics={"kept_frac": 1.0, **_token_metrics(scored, gather)})

    def loss(self, policy, teacher, micro: ScoredRollout, shaped: Shaped, num_tokens: torch.Tensor):
        student_logits = policy(micro.rollout, return_logits=True)[..., : self.vocab_size]
        teacher_logits = teacher.logits(micro.rollout, self.vocab_size)
        return core.generalized_jsd_loss(student_logits, teacher_logits, shaped.keep, beta=self.algo.gkd_beta,
                                         temperature=self.temperature, top_k=self.algo.gkd_top_k,
                                         num_tokens=num_tokens)


ALGORITHMS: dict[str, Callable] = {}


def register(name: str, factory: Callable) -> None:
    """Add an algorithm factory ``(config, vocab_size) -> algorithm``; names are unique."""
    if name in ALGORITHMS:
        raise ValueError(f"algorithm {name!r} is already registered")
    ALGORITHMS[name] = factory


def build_algorithm(config, vocab_size: int):
    """The algorithm of ``config.algo.name``; a typo lists the valid names and the nearest one."""
    name = config.algo.name
    if name not in ALGORITHMS:
        close = difflib.get_close_matches(name, ALGORITHMS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHMS)}{hint}")
    return ALGORITHMS[name](config, vocab_size)


for _name in ("reopold", "rkl", "rkl_sg"):
    register(_name, lambda config, vocab_size: Distillation(config.algo, config.switch_step))
register("grpo", lambda config, vocab_size: GRPO(config.algo, config.rollout.samples_per_prompt))
register("sft", lambda config, vocab_size: SFT(config.algo))
register("gkd", lambda config, vocab_size: GKD(config.algo, vocab_size, config.rollout.temperature))
