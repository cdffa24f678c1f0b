"""The objectives the trainer runs, behind the Algorithm Protocol; ``reopold.registry.ALGORITHMS`` maps names to
the factories at the bottom of this file.

Each algorithm says where its responses come from (the student, or the teacher for SFT), shapes a scored rollout
once per step (``reopold.core``'s shaping stage: rewards, keep masks, the entropy threshold over every rank), may
re-shape a mini-batch before an update, and gives the loss of a micro-batch (``reopold.core``'s losses). All the
math is in ``reopold.core``; this module only wires it to the trainer's tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from reopold import core
from reopold.core import spans as span_core
from reopold.registry import ALGORITHMS
from reopold.rollout import Rollout

REWARD_HIST_EDGES = [-12.0 + 0.5 * i for i in range(29)]  # fixed edges so histograms add up across steps


@dataclass
class ScoredRollout:
    """A rollout with everything computed once per step, before any update."""

    rollout: Rollout
    old_logprobs: torch.Tensor | None  # (B, T) rollout-time student pi_old, at the sampling temperature
    entropy: torch.Tensor | None  # (B, T) entropy of pi_old's full next-token distribution
    sequence_rewards: torch.Tensor  # (B,) 1.0 where the task's checker accepts the response
    teacher_logprobs: torch.Tensor | None = None  # (B, T) teacher-forced log pi_T of the same tokens
    # A teacher with another tokenizer: how its tokens group with the student's (teacher_logprobs then holds each
    # span's sum on its last student token); None with one vocabulary. docs/cross_tokenizer.md
    spans: span_core.SpanAlignment | None = None
    teacher_names: list[str] | None = None  # (B,) which teacher scored each row, with several teachers

    def is_finite(self) -> bool:
        """No NaN/inf on a valid token: a NaN reward must stop the step, not be silently masked away."""
        mask = self.rollout.completion_mask
        tensors = [self.old_logprobs, self.entropy, self.teacher_logprobs]
        return all(bool(torch.isfinite(t[mask]).all()) for t in tensors if t is not None)

    def select(self, rows: list[int]) -> ScoredRollout:
        sub = self.rollout.select(rows)
        width = sub.completion_mask.shape[1]
        take = lambda t: None if t is None else t[rows, :width]
        spans = None if self.spans is None else span_core.SpanAlignment(
            take(self.spans.student_spans), self.spans.teacher_spans[rows], self.spans.num_spans[rows],
            take(self.spans.span_end_mask))
        names = None if self.teacher_names is None else [self.teacher_names[i] for i in rows]
        return ScoredRollout(sub, take(self.old_logprobs), take(self.entropy), self.sequence_rewards[rows],
                             take(self.teacher_logprobs), spans, names)

    def unit_mask(self) -> torch.Tensor:
        """(B, T) the positions that carry a reward: every valid token, or with spans the span ends."""
        mask = self.rollout.completion_mask
        return mask if self.spans is None else mask & self.spans.span_end_mask

    def per_unit(self, values: torch.Tensor | None) -> torch.Tensor | None:
        """A per-student-token quantity summed over each span onto its last token (as it is without spans)."""
        if values is None or self.spans is None:
            return values
        return span_core.student_span_sums(values, self.spans)


@dataclass
class Shaped:
    """What the updates of one step train on."""

    keep: torch.Tensor  # (B, T) bool, tokens whose loss counts
    advantages: torch.Tensor | None = None  # (B, T) fixed advantages; None when each update recomputes them
    metrics: dict = field(default_factory=dict)
    phase: str = "refinement"  # the step's phase (Eq. 9/10)
    threshold: torch.Tensor | None = None  # the step's tau_beta over every rank, when the mask is entropy-based

    def select(self, rows: list[int], width: int) -> Shaped:
        adv = None if self.advantages is None else self.advantages[rows, :width]
        return replace(self, keep=self.keep[rows, :width], advantages=adv)

MicroBatches = list[tuple[ScoredRollout, Shaped]]  # one update's micro-batches


class Algorithm(Protocol):
    """What the trainer needs from an objective (see the classes below for the built-in ones)."""

    rollout_source: str  # "student" (on-policy) or "teacher" (SFT on teacher samples)
    needs_teacher_logprobs: bool  # whether scoring asks the teacher for log pi_T of the sampled tokens
    # Whether shape/loss read ScoredRollout.old_logprobs (pi_old of the sampled tokens). False: the trainer skips
    # the separate no-grad student pass that computes them (unless ``needs_entropy`` asks for it), and
    # ``old_logprobs`` is None. A sampler that reports them at the sampling temperature (vLLM) can supply them.
    needs_old_logprobs: bool

    def needs_entropy(self, step: int) -> bool:
        """Whether ``shape`` at rollout step ``step`` needs pi_old's entropies for more than the ``entropy_mean``
        metric (REOPOLD's entropy-based mask). When neither this nor ``needs_old_logprobs`` (or the sampler's own
        log-probs) forces the scoring pass, it is skipped, ``ScoredRollout.entropy`` is None and the step logs no
        ``entropy_mean`` from it."""
        ...

    def shape(self, scored: ScoredRollout, *, step: int, gather: Gather) -> Shaped:
        """Once per rollout step, over the whole batch: keep masks, advantages and the step's metrics."""
        ...

    def prepare_update(self, policy, micro_batches: MicroBatches) -> MicroBatches:
        """Before an update: re-shape its micro-batches under the current policy where the objective asks for it
        (the kept-token count of the update is read from the result)."""
        ...

    def loss(self, policy, teacher, micro: ScoredRollout, shaped: Shaped, num_tokens: torch.Tensor):
        """(loss, metrics) of one micro-batch, normalised by the update's global kept-token count."""
        ...


Gather = Callable[[torch.Tensor], torch.Tensor]  # 1-D local values -> the same from every rank, concatenated


def _token_metrics(scored: ScoredRollout, gather: Gather, all_entropy: torch.Tensor | None = None) -> dict:
    """Diagnostics of the whole step's batch (every rank's share, through ``gather``); ``all_entropy``: the valid
    entropies of every rank when the caller has gathered them already."""
    mask = scored.rollout.completion_mask
    if all_entropy is None and scored.entropy is not None:
        all_entropy = gather(scored.entropy[mask])
    entropy = {} if all_entropy is None else {"entropy_mean": all_entropy.float().mean()}  # no pass, no entropy
    return {
        **entropy,
        "response_length": gather(mask.sum(-1).float()).mean(),
        "train_accuracy": gather(scored.sequence_rewards.float()).mean(),
    }


def _reward_histogram(rewards: torch.Tensor) -> dict:
    """Counts of 1-D token rewards in REWARD_HIST_EDGES' bins (the outermost bins also count what lies beyond)."""
    values = rewards.clamp(REWARD_HIST_EDGES[0], REWARD_HIST_EDGES[-1]).float()
    counts = torch.histc(values, bins=len(REWARD_HIST_EDGES) - 1, min=REWARD_HIST_EDGES[0], max=REWARD_HIST_EDGES[-1])
    return {"edges": REWARD_HIST_EDGES, "counts": counts.tolist()}


def _per_teacher_metrics(scored: ScoredRollout, rewards: torch.Tensor, mask: torch.Tensor, floor: float,
                         gather: Gather) -> dict:
    """reward_mean, reverse_kl and below_floor_frac of each teacher's rows, as ``<metric>/<teacher name>``."""
    metrics = {}
    for name in sorted(set(scored.teacher_names)):
        rows = torch.tensor([n == name for n in scored.teacher_names], device=mask.device)
        values = gather(rewards[mask & rows[:, None]].float())
        metrics[f"reward_mean/{name}"] = values.mean()
        metrics[f"reverse_kl/{name}"] = -values.mean()
        metrics[f"below_floor_frac/{name}"] = (values < floor).float().mean()
    return metrics


class Distillation:
    """REOPOLD and its baselines rkl / rkl_sg, with the four ablation switches of the paper's ablation.

    Shape (once per step): R = log pi_T - log pi_old (Eq. 3), the keep mask of the step's phase (Eq. 9/10, tau_beta
    over the whole rollout batch of all ranks) and R_hat = max(R, floor) (Eq. 7), by ``core.distillation_shaping``.
    With ``reward_policy="old"`` and stop-gradient these are fixed for every update of the step, like PPO's
    advantages. With ``reward_policy="current"``, or without stop-gradient (vanilla RKL, whose R carries the
    gradient), each update re-grades R under the current policy (``core.reward_logprobs``); the step's threshold
    stays, and an exploration mask (which depends on R) is recomputed before the update so its kept-token count is
    known before any backward pass.
    """

    rollout_source = "student"
    needs_teacher_logprobs = True
    needs_old_logprobs = True  # R = log pi_T - log pi_old, and the ratio's denominator

    def __init__(self, algo, switch_step: int):
        self.algo = algo
        self.switches = algo.switches()
        self.switch_step = switch_step if self.switches["two_phase"] else 0
        self.floor = core.reward_floor(algo.lam)
        self.per_update = algo.reward_policy == "current" or not self.switches["stop_gradient"]

    def needs_entropy(self, step: int) -> bool:
        """The refinement mask keeps the top-beta entropy tokens (Eq. 10); exploration's mask is 1[R >= floor]."""
        return self.switches["entropy_selection"] and core.phase_at(step, self.switch_step) == "refinement"

    def _shaping(self, student_logprobs, micro: ScoredRollout, phase: str, threshold) -> core.Shaping:
        """``student_logprobs`` per unit (``micro.per_unit``): a token, or a span with another teacher tokenizer."""
        return core.distillation_shaping(
            student_logprobs, micro.teacher_logprobs, micro.per_unit(micro.entropy), micro.unit_mask(), phase=phase,
            lam=self.algo.lam, beta=self.algo.beta, threshold=threshold,
            stop_gradient=self.switches["stop_gradient"], reward_floor=self.switches["reward_floor"],
            entropy_selection=self.switches["entropy_selection"] and phase == "refinement",  # exploration: no H
        )  # fmt: skip

    def shape(self, scored: ScoredRollout, *, step: int, gather: Gather) -> Shaped:
        mask = scored.unit_mask()  # valid tokens; the span ends with another teacher tokenizer
        phase = core.phase_at(step, self.switch_step)
        threshold = None
        # Valid entropies of every rank: the threshold and the metrics (None when the scoring pass was skipped).
        all_entropy = None if scored.entropy is None else gather(scored.per_unit(scored.entropy)[mask])
        if phase == "refinement" and self.switches["entropy_selection"]:
            threshold = core.entropy_threshold(all_entropy, torch.ones_like(all_entropy, dtype=torch.bool),
                                               beta=self.algo.beta)
        shaping = self._shaping(scored.per_unit(scored.old_logprobs), scored, phase, threshold)
        all_rewards = gather(shaping.rewards[mask].float())  # valid token rewards of every rank
        metrics = {
            "phase": phase,
            "floor": self.floor,
            "reward_mean": all_rewards.mean(),
            "below_floor_frac": (all_rewards < self.floor).float().mean(),
            "kept_frac": gather(shaping.keep_mask[mask].float()).mean(),
            "threshold": float("nan") if threshold is None else threshold,
            "reverse_kl": -all_rewards.mean(),
            "reward_hist": _reward_histogram(all_rewards),
            **_token_metrics(scored, gather, all_entropy if scored.spans is None else None),
        }
        if scored.spans is not None:
            metrics.update({key: gather(value.reshape(1)).mean()
                            for key, value in span_core.span_metrics(scored.spans).items()})
        if scored.teacher_names is not None:
            metrics.update(_per_teacher_metrics(scored, shaping.rewards, mask, self.floor, gather))
        advantages = None if self.per_update else shaping.advantages
        return Shaped(keep=shaping.keep_mask, advantages=advantages, metrics=metrics, phase=phase, threshold=threshold)

    @torch.no_grad()
    def prepare_update(self, policy, micro_batches: MicroBatches) -> MicroBatches:
        if not (self.per_update and micro_batches and micro_batches[0][1].phase == "exploration"):
            return micro_batches  # the step's mask holds: it depends on the entropy only, or R is pi_old's
        out = []
        for micro, shaped in micro_batches:  # the exploration mask 1[R >= floor] under the current policy
            logprobs = micro.per_unit(policy(micro.rollout, with_entropy=False)[0])
            graded = core.reward_logprobs(logprobs, micro.per_unit(micro.old_logprobs), reward_policy="current",
                                          stop_gradient=self.switches["stop_gradient"])
            out.append((micro, replace(shaped, keep=self._shaping(graded, micro, shaped.phase, None).keep_mask)))
        return out

    def loss(self, policy, teacher, micro: ScoredRollout, shaped: Shaped, num_tokens: torch.Tensor):
        # With spans, a span's log-prob is its tokens' sum: one PPO ratio per span, whose gradient reaches each token.
        logprobs = micro.per_unit(policy(micro.rollout, with_entropy=False)[0])
        old_logprobs = micro.per_unit(micro.old_logprobs)
        advantages = shaped.advantages
        if advantages is None:  # re-graded under the current policy (with R's gradient when there is no sg)
            graded = core.reward_logprobs(logprobs, old_logprobs, reward_policy="current",
                                          stop_gradient=self.switches["stop_gradient"])
            advantages = self._shaping(graded, micro, shaped.phase, shaped.threshold).advantages
        return core.policy_loss(logprobs, old_logprobs, advantages, shaped.keep, clip_eps=self.algo.clip_eps,
                                clip_eps_high=self.algo.clip_eps_high, num_tokens=num_tokens)


class GRPO:
    """Outcome reward from the task's checker, group-normalised per prompt, on every token of the response."""

    rollout_source = "student"
    needs_teacher_logprobs = False
    needs_old_logprobs = True  # the clipped ratio's denominator

    def __init__(self, algo, samples_per_prompt: int):
        self.algo = algo
        self.group_size = samples_per_prompt

    def needs_entropy(self, step: int) -> bool:
        return False

    def shape(self, scored: ScoredRollout, *, step: int, gather: Gather) -> Shaped:
        shaping = core.grpo_shaping(scored.sequence_rewards, scored.rollout.completion_mask,
                                    group_size=self.group_size)
        metrics = {"kept_frac": 1.0, **_token_metrics(scored, gather)}
        metrics["reward_mean"] = metrics["train_accuracy"]  # the outcome reward is the checker's verdict
        return Shaped(keep=shaping.keep_mask, advantages=shaping.advantages, metrics=metrics)

    def prepare_update(self, policy, micro_batches: MicroBatches) -> MicroBatches:
        return micro_batches

    def loss(self, policy, teacher, micro: ScoredRollout, shaped: Shaped, num_tokens: torch.Tensor):
        logprobs, _ = policy(micro.rollout, with_entropy=False)
        return core.policy_loss(logprobs, micro.old_logprobs, shaped.advantages.to(logprobs.dtype), shaped.keep,
                                clip_eps=self.algo.clip_eps, clip_eps_high=self.algo.clip_eps_high,
                                num_tokens=num_tokens)


class SFT:
    """Off-policy sequence-level distillation: maximum likelihood on answers the teacher samples (temperature 1)."""

    rollout_source = "teacher"
    needs_teacher_logprobs = False
    needs_old_logprobs = False  # maximum likelihood: no ratio, no reward; the scoring pass is skipped

    def __init__(self, algo):
        self.algo = algo

    def needs_entropy(self, step: int) -> bool:
        return False

    def shape(self, scored: ScoredRollout, *, step: int, gather: Gather) -> Shaped:
        metrics = {"kept_frac": 1.0, **_token_metrics(scored, gather)}
        metrics["teacher_accuracy"] = metrics.pop("train_accuracy")
        return Shaped(keep=scored.rollout.completion_mask, metrics=metrics)

    def prepare_update(self, policy, micro_batches: MicroBatches) -> MicroBatches:
        return micro_batches

    def loss(self, policy, teacher, micro: ScoredRollout, shaped: Shaped, num_tokens: torch.Tensor):
        logprobs, _ = policy(micro.rollout, with_entropy=False)
        return core.sft_loss(logprobs, shaped.keep, num_tokens=num_tokens)


class GKD:
    """Generalized JSD between the full student and teacher distributions on the student's samples."""

    rollout_source = "student"
    needs_teacher_logprobs = False
    needs_old_logprobs = False  # the loss reads the current full distributions only; the scoring pass is skipped

    def __init__(self, algo, vocab_size: int, temperature: float):
        self.algo = algo
        self.vocab_size = vocab_size
        self.temperature = temperature

    def needs_entropy(self, step: int) -> bool:
        return False  # entropy_mean comes from the update's own logits instead (see ``loss``)

    def shape(self, scored: ScoredRollout, *, step: int, gather: Gather) -> Shaped:
        return Shaped(keep=scored.rollout.completion_mask, metrics={"kept_frac": 1.0, **_token_metrics(scored, gather)})

    def prepare_update(self, policy, micro_batches: MicroBatches) -> MicroBatches:
        return micro_batches

    def loss(self, policy, teacher, micro: ScoredRollout, shaped: Shaped, num_tokens: torch.Tensor):
        student_logits = policy(micro.rollout, return_logits=True)[..., : self.vocab_size]
        teacher_logits = teacher.logits(micro.rollout, self.vocab_size)
        loss, metrics = core.generalized_jsd_loss(student_logits, teacher_logits, shaped.keep,
                                                  beta=self.algo.gkd_beta, temperature=self.temperature,
                                                  top_k=self.algo.gkd_top_k, num_tokens=num_tokens)
        with torch.no_grad():  # the student's entropy from the logits at hand (pi_old's at the step's first update)
            log_p = torch.log_softmax(student_logits.detach().float() / self.temperature, dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1)  # (B, T)
            metrics["entropy_sum"] = entropy[shaped.keep].sum()
            metrics["entropy_tokens"] = shaped.keep.sum()
        return loss, metrics


# Factories ``(config, vocab_size) -> Algorithm``, registered by name in reopold.registry.ALGORITHMS.
def build_distillation(config, vocab_size: int) -> Distillation:
    return Distillation(config.algo, config.switch_step)


def build_grpo(config, vocab_size: int) -> GRPO:
    return GRPO(config.algo, config.rollout.samples_per_prompt)


def build_sft(config, vocab_size: int) -> SFT:
    return SFT(config.algo)


def build_gkd(config, vocab_size: int) -> GKD:
    return GKD(config.algo, vocab_size, config.rollout.temperature)


def build_algorithm(config, vocab_size: int) -> Algorithm:
    """The algorithm registered as ``config.algo.name``."""
    return ALGORITHMS.get(config.algo.name)(config, vocab_size)
