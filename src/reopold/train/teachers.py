"""The run's teachers from its config: the mode of each (the student's vocabulary: exact token rewards; another
tokenizer: span alignment), the refusals that must come before any weights load, and the Teacher the trainer
scores with (one, or several routed by a key of each prompt). docs/cross_tokenizer.md, docs/teachers.md."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from reopold.config.loader import ConfigError
from reopold.config.schema import TeacherConfig, TrainConfig
from reopold.models.loading import check_output_size, load_model, load_tokenizer
from reopold.rollout import HFRolloutEngine
from reopold.rollout.hf import vision_options
from reopold.tasks.prompts import PromptEncoder
from reopold.teacher.cross import (
    EXACT,
    SPANS,
    CrossTokenizerTeacher,
    check_offsets,
    check_token_bytes,
    probe_text,
    same_vocabulary,
    token_bytes,
)
from reopold.teacher.local import LocalTeacher
from reopold.teacher.remote import TOP_K_COVER, RemoteTeacher
from reopold.teacher.routed import RoutedTeacher, check_routes
from reopold.train.distributed import whole_models
from reopold.train.preflight import check_teacher_sees_images, preflight_teacher, teacher_api_key

SINGLE = "teacher"  # the name of the one teacher of a run without a teachers list


@dataclass
class TeacherPlan:
    """One teacher, decided before any weights load."""

    name: str
    key: str  # its config key: teacher, or teachers[i]
    spec: TeacherConfig
    tokenizer: Any  # the teacher's own tokenizer (the student's for a served teacher checked against it)
    mode: str  # EXACT (the student's vocabulary) or SPANS (another tokenizer: span alignment)
    remote: RemoteTeacher | None = None  # a served teacher, checked and ready
    marginal: bool = False  # SPANS: span log-probs of the text (core.marginal), not of the teacher's own cut


def plan_teachers(config: TrainConfig, student_tokenizer, student_name: str) -> list[TeacherPlan]:
    """Each teacher's tokenizer and mode; served teachers are reached and checked here. Raises ValueError where a
    run cannot work: gkd or sft with another tokenizer, a teacher tokenizer without offsets, a student whose token
    bytes cannot be recovered."""
    plans = []
    for key, spec in config.teacher_specs().items():
        name = getattr(spec, "name", "") or SINGLE
        tokenizer_name = spec.tokenizer or (spec.model if spec.url is None else None)
        remote = _remote(spec) if spec.url is not None else None
        if tokenizer_name is None:  # a served teacher without a local tokenizer: it must tokenise as the student
            remote.check_tokenizer(student_tokenizer)
            plans.append(TeacherPlan(name, key, spec, student_tokenizer, EXACT, remote))
            continue
        tokenizer = load_tokenizer(tokenizer_name)
        mode = EXACT if same_vocabulary(student_tokenizer, tokenizer) else SPANS
        if mode == SPANS:
            _check_spans(config, key, student_tokenizer, tokenizer, student_name, tokenizer_name)
        if remote is not None:
            remote.check_tokenizer(tokenizer)  # the local copy tokenises as the server does
        marginal = mode == SPANS and spec.span_logprob == "marginal"  # served: covers or top-k (RemoteTeacher)
        plans.append(TeacherPlan(name, key, spec, tokenizer, mode, remote, marginal))
    return plans


def describe(plan: TeacherPlan, student_tokenizer) -> str:
    """The pre-flight line that says which mode a teacher is in."""
    where = f"{plan.key} ({plan.spec.model}{' at ' + plan.spec.url if plan.spec.url else ''})"
    if plan.mode == EXACT:
        return f"{where}: the student's vocabulary: exact token rewards (Eq. 3)"
    reading = ("the probability of each span's text (marginal)" if plan.marginal else
               "the teacher's own cut (canonical)")
    if plan.marginal and plan.remote is not None and not plan.remote.supports_cover():
        reading += f", its covers from the server's top-{TOP_K_COVER} log-probs (a lower bound)"
    return (f"{where}: another tokenizer ({len(plan.tokenizer)} vs the student's {len(student_tokenizer)} tokens): "
            f"span alignment, rewards per span of the same bytes, teacher log-probs read as {reading} "
            "(docs/cross_tokenizer.md)")


def _check_spans(config: TrainConfig, key: str, student_tokenizer, teacher_tokenizer, student_name: str,
                 teacher_name: str) -> None:
    algo = config.algo.name
    if algo == "gkd":
        raise ValueError(
            f"algo.name=gkd compares full next-token distributions over one vocabulary, but {key} "
            f"({teacher_name!r}, {len(teacher_tokenizer)} tokens) has another tokenizer than the student "
            f"({student_name!r}, {len(student_tokenizer)} tokens). Use a sampled-token objective (reopold, rkl, "
            "rkl_sg: span rewards, docs/cross_tokenizer.md) or a teacher with the student's vocabulary."
        )
    if algo == "sft":
        raise ValueError(
            f"algo.name=sft trains the student on the teacher's sampled token ids, but {key} ({teacher_name!r}) has "
            "another tokenizer: its answers would have to be re-tokenised into the student's vocabulary, which "
            "reopold does not do (the student would learn a tokenisation it never samples). Use reopold, rkl or "
            "rkl_sg (on-policy span rewards), or a teacher with the student's vocabulary."
        )
    table = token_bytes(student_tokenizer)
    check_token_bytes(student_tokenizer, table, student_name)
    check_offsets(teacher_tokenizer, teacher_name, probe_text(table))


def _remote(spec: TeacherConfig) -> RemoteTeacher:
    api_key = teacher_api_key(spec)
    return RemoteTeacher(spec.url, spec.model, timeout=spec.timeout, retries=spec.retries, backoff=spec.backoff,
                         batch_size=spec.micro_batch_size, api_key=api_key)


def route_of(config: TrainConfig):
    """problem -> the name of its teacher: its data.teacher_key column, else the task's name."""
    if config.data.teacher_key is not None:
        return lambda problem: problem.key
    return lambda problem: config.data.task


def check_teacher_routes(config: TrainConfig, problems: list) -> None:
    """Pre-flight: with several teachers, every training and held-out prompt is routed to one of them."""
    if not config.teachers:
        return
    route = route_of(config)
    check_routes([route(p) for p in problems], [t.name for t in config.teachers])


def build_teachers(config: TrainConfig, plans: list[TeacherPlan], student_tokenizer, task, problems: list,
                   accelerator, *, preflight: bool, student_encode=None, episodes=None):
    """(the Teacher to score with, the teacher's sampler for SFT or None). Local teachers load here and answer a
    few of their prompts greedily first (``preflight_teacher``); with image prompts a teacher must first show that
    it sees the images (``check_teacher_sees_images``). A teacher with the student's vocabulary reads the prompts as
    the student does (``student_encode``: the image-rendering encoder for image prompts). ``episodes``: a task with
    an environment (reopold.rollout.episodes): the teacher answers in episodes too, and must share the student's
    tokenizer."""
    route = route_of(config)
    built, engine = {}, None
    for plan in plans:
        spec = plan.spec
        encode = PromptEncoder(plan.tokenizer, config.data.chat_template)
        if plan.mode == EXACT and student_encode is not None:
            encode = student_encode
        if episodes is not None and plan.mode != EXACT:
            raise ConfigError(f"teacher {plan.name!r} has another tokenizer than the student: multi-turn episodes "
                              f"(a task with an environment) need a teacher of the student's vocabulary")
        if plan.remote is not None:
            inner = plan.remote
        else:
            with whole_models(accelerator):
                lm = load_model(spec.model, dtype=spec.dtype, device=accelerator.device, trainable=False)
            check_output_size(lm, plan.tokenizer, spec.model)
            mine = [p for p in problems if not config.teachers or route(p) == plan.name]
            probe = mine[: config.data.preflight_problems]
            inner = LocalTeacher(lm, temperature=spec.temperature, micro_batch_size=spec.micro_batch_size)
            if preflight and probe and getattr(encode, "multimodal", False):  # a teacher that cannot see stops here
                check_teacher_sees_images(inner, lm, plan.tokenizer, probe[:8], encode, config.rollout.max_new_tokens)
            if preflight and probe and all(p.answer is not None for p in probe):
                preflight_teacher(lm, plan.tokenizer, task, probe, encode, config.rollout.max_new_tokens,
                                  episodes=episodes)
            if plan.mode == EXACT and not config.teachers:
                engine = HFRolloutEngine(lm, student_tokenizer, max_new_tokens=config.rollout.max_new_tokens,
                                         temperature=config.rollout.temperature, **vision_options(encode))
                engine = engine if episodes is None else episodes.wrap(engine, student_tokenizer)
        built[plan.name] = inner if plan.mode == EXACT else CrossTokenizerTeacher(
            inner, plan.tokenizer, student_tokenizer, encode, marginal=plan.marginal)
    if not config.teachers:
        return built[SINGLE], engine
    return RoutedTeacher(built, route), None


@torch.no_grad()
def report_spans(teacher, plans: list[TeacherPlan], model, tokenizer, encode, problems: list, config: TrainConfig,
                 accelerator) -> dict | None:
    """Pre-flight with a teacher of another tokenizer: the student samples a probe batch, the teacher scores it,
    and the share of student tokens in multi-token spans is printed (and returned). The RNG is left untouched."""
    from reopold.core.spans import span_metrics

    if all(plan.mode == EXACT for plan in plans) or not problems:
        return None
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.run.seed)
        engine = HFRolloutEngine(model, tokenizer, max_new_tokens=config.rollout.max_new_tokens,
                                 temperature=config.rollout.temperature)
        rollout = engine.generate([encode(p.prompt) for p in problems], problems).to(accelerator.device)
    scores = teacher.score(rollout)
    if scores.spans is None:  # no probe prompt went to a teacher of another tokenizer
        return None
    metrics = {key: float(value) for key, value in span_metrics(scores.spans).items()}
    print(f"span alignment on a probe of {len(problems)} student samples: {metrics['multi_token_span_frac']:.1%} of "
          f"the student's tokens fall in multi-token spans; {metrics['student_tokens_per_span']:.2f} student and "
          f"{metrics['teacher_tokens_per_span']:.2f} teacher tokens per span", file=sys.stderr)
    return metrics


__all__ = ["TeacherPlan", "build_teachers", "check_teacher_routes", "describe", "plan_teachers",
           "report_spans", "route_of"]
