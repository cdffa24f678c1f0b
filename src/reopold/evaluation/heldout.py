"""Sampling and grading answers to held-out problems, shared by the trainer's periodic evaluation and
``reopold eval``: greedy exact-answer accuracy, response length, and the reverse KL from the student to the teacher
on the student's own samples (what on-policy distillation minimises).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reopold.models.scorer import TokenScorer
from reopold.rollout import HFRolloutEngine, vision_options
from reopold.tasks.checkers import Checker, TaskChecker
from reopold.teacher import TeacherUnavailable


@dataclass(frozen=True)
class GradedSample:
    """One sampled answer to one problem and its verdict."""

    problem: int  # index into the problems list
    sample: int  # 0..n-1, in draw order
    completion: str  # decoded response, special tokens removed (an episode: all its turns and observations)
    answer: str | None  # final answer parsed by the checker (None: none found)
    correct: bool
    length: int  # response tokens, EOS included


@torch.no_grad()
def sample_and_grade(
    model,
    tokenizer,
    problems: list,
    encode,
    checker: Checker,
    *,
    num_samples: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 256,
    episodes=None,
) -> list[GradedSample]:
    """``num_samples`` answers per problem (greedy, or sampled at ``temperature`` with top-k/top-p off), each
    graded by ``checker``; problem-major order, a problem's samples consecutive in draw order.

    ``batch_size`` bounds the sequences per ``generate`` call (at least one problem's ``num_samples``). Sampling uses
    the global torch RNG: seed it (or fork it) around the call for reproducible samples. ``episodes``: an
    EpisodeSetup (a task with an environment): each answer is an episode, graded on its last turn.
    """
    engine = HFRolloutEngine(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                             do_sample=not greedy, **vision_options(encode))
    engine = engine if episodes is None else episodes.wrap(engine, tokenizer)
    per_call = max(1, batch_size // num_samples)
    graded = []
    for start in range(0, len(problems), per_call):
        chunk = problems[start : start + per_call]
        rollout = engine.generate([encode(p.prompt) for p in chunk], chunk, num_samples=num_samples)
        lengths = rollout.completion_mask.sum(-1).tolist()  # (B * n,)
        shown = rollout.texts if episodes is None else transcripts(rollout, tokenizer)
        for row, (problem, text) in enumerate(zip(rollout.problems, rollout.texts, strict=True)):
            answer, correct = checker.grade(problem, text)
            index, sample = divmod(row, num_samples)
            graded.append(GradedSample(start + index, sample, shown[row], answer, correct, int(lengths[row])))
    return graded


def transcripts(rollout, tokenizer) -> list[str]:
    """Each row's whole response decoded, observations included (an episode's turns and tool results)."""
    response, real = rollout.completion_ids, rollout.attention_mask[:, rollout.prompt_length :].bool()
    return [tokenizer.decode(ids[keep], skip_special_tokens=True) for ids, keep in zip(response, real, strict=True)]


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    task,
    problems: list,
    encode,
    *,
    max_new_tokens: int,
    teacher=None,
    temperature: float = 1.0,
    batch_size: int = 256,
    kl_problems: int = 256,
    seed: int = 0,
    scorer=None,
    episodes=None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``problems``.

    accuracy: fraction answered exactly right with greedy decoding (1,000 problems give about +-1.5 points of
        standard error near 50%).
    reverse_kl: mean over sampled responses (temperature ``temperature``, the first ``kl_problems`` problems) of
        sum_t log pi_S(o_t) - log pi_T(o_t): the sampled estimate of the sequence-level KL(student || teacher).

    The training RNG is left untouched: sampling uses a forked RNG seeded with ``seed``. ``scorer`` scores the
    student's samples (default ``TokenScorer(model)``; the trainer passes its prepared one, which a sharded student
    needs).
    """
    graded = sample_and_grade(model, tokenizer, problems, encode, TaskChecker(task), max_new_tokens=max_new_tokens,
                              greedy=True, batch_size=batch_size, episodes=episodes)
    answered = max(len(graded), 1)
    metrics = {
        "accuracy": sum(g.correct for g in graded) / answered,
        "response_length": sum(g.length for g in graded) / answered,
    }
    if teacher is None or kl_problems <= 0:
        return metrics

    sampler = HFRolloutEngine(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                              **vision_options(encode))
    sampler = sampler if episodes is None else episodes.wrap(sampler, tokenizer)
    scorer = scorer if scorer is not None else TokenScorer(model, temperature=temperature)
    devices = [next(model.parameters()).device] if next(model.parameters()).is_cuda else []
    kl_sum, count = 0.0, 0
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            subset = problems[:kl_problems]
            for start in range(0, len(subset), batch_size):
                chunk = subset[start : start + batch_size]
                rollout = sampler.generate([encode(p.prompt) for p in chunk], chunk)
                student_logprobs, _ = scorer(rollout, with_entropy=False)
                teacher_logprobs = teacher.logprobs(rollout)
                per_token = torch.where(rollout.completion_mask, student_logprobs - teacher_logprobs, 0.0)
                kl_sum += per_token.sum().item()
                count += len(chunk)
    except TeacherUnavailable:  # a served teacher went down: keep the accuracy (training stops at its next score)
        return metrics
    metrics["reverse_kl"] = kl_sum / max(count, 1)
    return metrics
