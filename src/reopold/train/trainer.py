"""The on-policy distillation loop. Each rollout step reads top to bottom:

    rollout  the student samples n answers per prompt (the teacher does, for SFT)
    score    pi_old log-probs and entropies (a no-grad student pass, skipped where the algorithm needs neither or
             the sampler reported the log-probs), teacher log-probs of the same tokens, the task's verdicts
    shape    rewards, keep masks and the entropy threshold, fixed for the whole step (reopold.core)
    update   mini-batch policy-gradient steps, gradient accumulation over micro-batches

Backends are injected: a rollout engine (HF generate), a teacher (a local HF model) and a task (prompts and an
answer checker). accelerate handles devices, mixed precision and multi-process launch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reopold.core.spans import token_credit
from reopold.errors import TeacherUnavailable, TrainingStopped
from reopold.evaluation.heldout import evaluate
from reopold.rollout import Rollout
from reopold.rollout.batch import RolloutEngine
from reopold.tasks import Task
from reopold.teacher import Teacher
from reopold.train.algorithms import Algorithm, ScoredRollout, Shaped
from reopold.train.checkpoint import save_checkpoint
from reopold.train.distributed import (
    deepspeed_stage,
    end_of_update,
    full_model_state,
    optimizer_format,
    optimizer_state,
    sharding,
)


@dataclass
class TrainState:
    step: int = 0  # rollout steps completed
    samples: int = 0  # responses trained on so far
    elapsed: float = 0.0  # seconds of training, carried across resumes
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient
    bad_in_a_row: int = 0


@dataclass
class Student:
    """The student in the forms the loop needs."""

    policy: torch.nn.Module  # TokenScorer around the model, prepared (DDP, FSDP, DeepSpeed) by accelerate
    model: torch.nn.Module  # the plain HF (or PEFT) model inside it: train/eval mode, save_pretrained
    generator: Any  # what generates rollouts and evaluations: the model, or a ShardedLM gathering its shards
    tokenizer: Any
    encode: Callable[[str], list[int]]  # prompt text -> ids (chat template applied when configured)


@dataclass
class Backends:
    """The injected stages: who samples, who grades, what is asked."""

    engine: RolloutEngine  # the student's sampler
    teacher: Teacher
    task: Task
    teacher_engine: RolloutEngine | None = None  # the teacher's sampler (SFT on teacher samples)
    episodes: Any = None  # EpisodeSetup of a task with an environment: evaluation runs episodes too


@dataclass
class Prompts:
    sampler: Any  # PromptSampler: the step's prompts, a function of (seed, step) only
    eval_problems: list


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch LR scheduler, stepped once per update


class Trainer:
    def __init__(self, config, run_dir: Path, *, accelerator, student: Student, backends: Backends, prompts: Prompts,
                 optimization: Optimization, algorithm: Algorithm, logger):
        self.config = config
        self.run_dir = run_dir
        self.accelerator = accelerator
        self.policy, self.student, self.generator = student.policy, student.model, student.generator
        self.tokenizer, self.encode = student.tokenizer, student.encode
        # FSDP2, ZeRO-3: no rank holds the full student; generation, evaluation and saving gather it on every rank.
        self.sharded = sharding(accelerator) is not None
        self.deepspeed = deepspeed_stage(accelerator) is not None  # the engine steps inside backward
        self.engine, self.teacher, self.task = backends.engine, backends.teacher, backends.task
        self.teacher_engine, self.episodes = backends.teacher_engine, backends.episodes
        self.sampler, self.eval_problems = prompts.sampler, prompts.eval_problems
        self.optimizer, self.scheduler = optimization.optimizer, optimization.scheduler
        self.algorithm = algorithm
        self.logger = logger
        self.state = TrainState()
        self.last_eval: dict = {}

    # ---- one rollout step ----------------------------------------------------------------------------------
    def rollout(self, problems: list) -> Rollout:
        engine = self.teacher_engine if self.algorithm.rollout_source == "teacher" else self.engine
        rollout = engine.generate([self.encode(p.prompt) for p in problems], problems,
                                  num_samples=self.config.rollout.samples_per_prompt)
        return rollout.to(self.accelerator.device)  # an engine may sample elsewhere (vLLM, a CPU copy)

    @torch.no_grad()
    def score(self, rollout: Rollout, pi_old: str = "pass") -> ScoredRollout:
        """pi_old's log-probs and entropies (``pi_old``: see ``_pi_old_source``), the teacher's log-probs of the same
        tokens and the task's verdicts."""
        with self.accelerator.autocast():
            old_logprobs, entropy = self._old_pass(rollout, pi_old)
        verdicts = [self.task.check(p, text) for p, text in zip(rollout.problems, rollout.texts, strict=True)]
        # A teacher with another tokenizer (or several teachers) also says how its tokens group with the student's.
        with self.accelerator.autocast():
            teacher = self.teacher.score(rollout) if self.algorithm.needs_teacher_logprobs else None
        verdicts = torch.tensor(verdicts, dtype=torch.float32, device=rollout.completion_mask.device)  # (B,)
        if rollout.rewards is not None:  # an environment that grades its episodes: its reward is the outcome
            verdicts = rollout.rewards.to(verdicts)
        if teacher is None:
            return ScoredRollout(rollout, old_logprobs, entropy, verdicts)
        return ScoredRollout(rollout, old_logprobs, entropy, verdicts, teacher.logprobs, teacher.spans, teacher.names)

    def _pi_old_source(self, rollout: Rollout, step: int) -> str:
        """Where this step's pi_old log-probs and entropies come from, decided once per step: "pass" (a separate
        no-grad student pass), "update" (the update's own forward: ``pi_old_from_update``) or "none" (neither is
        needed, or the sampler reported its sampled-token log-probs at the sampling temperature, as a colocated vLLM
        engine does, and no entropies are needed)."""
        algorithm = self.algorithm
        supplied = rollout.old_logprobs if algorithm.rollout_source == "student" else None
        if not (algorithm.needs_entropy(step) or (algorithm.needs_old_logprobs and supplied is None)):
            return "none"
        return "update" if self._reuses_update_forward(len(rollout)) else "pass"

    def _old_pass(self, rollout: Rollout, pi_old: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(old_logprobs, entropy) of the sampled tokens: from a no-grad student pass when ``pi_old`` is "pass";
        otherwise (the sampler's log-probs or None, None), filled later by the update's forward for "update"."""
        if pi_old != "pass":
            supplied = rollout.old_logprobs if self.algorithm.rollout_source == "student" else None
            return (supplied if self.algorithm.needs_old_logprobs else None), None
        parts = [self.policy(rollout.select(rows)) for rows in self._chunks(range(len(rollout)))]
        width = rollout.completion_mask.shape[1]
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))
        return torch.cat([pad(lp) for lp, _ in parts]), torch.cat([pad(h) for _, h in parts])  # (B, T) each

    def _reuses_update_forward(self, rows: int) -> bool:
        """One update of one micro-batch per rollout (one epoch, every prompt, every row in one micro-batch) on a
        student without dropout: that update's forward, before the weights change, is pi_old's, so its detached
        log-probs and entropies stand in for the separate pass (``pi_old_from_update``)."""
        optim, processes = self.config.optim, self.accelerator.num_processes
        prompts = rows // self.config.rollout.samples_per_prompt
        return (self.reuse_update_forward and optim.epochs == 1 and prompts <= optim.mini_batch_prompts // processes
                and rows <= optim.micro_batch_size and not _has_dropout(self.student))  # fmt: skip

    reuse_update_forward = True  # False: always the separate no-grad pass (tests compare the two)

    def pi_old_from_update(self, scored: ScoredRollout, step: int) -> tuple[list[int], tuple]:
        """The update's forward (train mode, with gradients) on its one micro-batch: fills ``scored``'s pi_old
        log-probs and entropies with its detached outputs; returns the rows and the outputs for the update."""
        rows = self._update_rows(len(scored.rollout), step)[0]
        self.student.train()
        try:
            with self.accelerator.autocast():
                logprobs, entropy = self.policy(scored.rollout.select(rows))
        finally:
            self.student.eval()
        batch, width = scored.rollout.completion_mask.shape
        index = torch.as_tensor(rows, device=logprobs.device)
        fill = lambda t: torch.zeros(batch, width, dtype=t.dtype, device=t.device).index_copy_(
            0, index, torch.nn.functional.pad(t.detach(), (0, width - t.shape[1])))  # fmt: skip
        scored.old_logprobs, scored.entropy = fill(logprobs), fill(entropy)
        return rows, (logprobs, entropy)

    def _update_rows(self, rows: int, step: int) -> list[list[int]]:
        """The rows of each update of the step, in order (epochs, then mini-batches of prompts)."""
        config, accelerator = self.config, self.accelerator
        n = config.rollout.samples_per_prompt
        prompts = rows // n
        per_update = config.optim.mini_batch_prompts // accelerator.num_processes
        # The step seed without the rank: every rank orders its own prompts the same way.
        order_rng = torch.Generator().manual_seed(self._step_seed(step) - accelerator.process_index)
        updates = []
        for _ in range(config.optim.epochs):
            order = torch.randperm(prompts, generator=order_rng)
            for start in range(0, prompts, per_update):
                updates.append((order[start : start + per_update, None] * n + torch.arange(n)).flatten().tolist())
        return updates

    def update(self, scored: ScoredRollout, shaped: Shaped, step: int, reused=None) -> dict:
        """Policy updates over mini-batches of prompts; the loss of each is normalised by its global token count.
        ``reused``: (rows, outputs) of ``pi_old_from_update``, the first micro-batch's forward already run."""
        self.student.train()  # dropout and activation checkpointing apply to updates only
        try:
            return self._update(scored, shaped, step, reused)
        finally:
            self.student.eval()

    def _update(self, scored: ScoredRollout, shaped: Shaped, step: int, reused=None) -> dict:
        accelerator = self.accelerator
        losses, norms, clip_fracs, skipped = [], [], [], False
        entropy_sums = []  # (sum, count) of the student's entropy over kept tokens, from the losses that report it
        for update_index, rows in enumerate(self._update_rows(len(scored.rollout), step)):
            policy = self.policy
            if reused is not None and update_index == 0 and reused[0] == rows:
                policy = _ReusedForward(self.policy, *reused[1])
            micro_batches = []
            for micro_rows in self._chunks(rows):
                micro = scored.select(micro_rows)
                micro_batches.append((micro, shaped.select(micro_rows, micro.rollout.completion_mask.shape[1])))
            with accelerator.autocast():
                micro_batches = self.algorithm.prepare_update(policy, micro_batches)
            kept = sum(part.keep.sum() for _, part in micro_batches)
            num_tokens = accelerator.reduce(torch.as_tensor(kept, device=accelerator.device).float(), "sum")
            # Detached sums, read once per update: no device sync per micro-batch.
            total = torch.zeros((), device=accelerator.device)
            clip = torch.zeros((), device=accelerator.device)
            for i, (micro, micro_shaped) in enumerate(micro_batches):
                with accelerator.autocast():
                    loss, metrics = self.algorithm.loss(policy, self.teacher, micro, micro_shaped, num_tokens)
                if self.deepspeed:
                    end_of_update(accelerator, i == len(micro_batches) - 1)
                # Losses are normalised by the global token count: undo DDP's (and DeepSpeed's) average over
                # ranks, and the division by accumulation steps that accelerate (or the engine) applies.
                accelerator.backward(loss * accelerator.num_processes * accelerator.gradient_accumulation_steps)
                total = total + loss.detach().float()
                clip = clip + metrics.get("clip_frac", torch.zeros(())).detach().float().to(clip.device)
                if "entropy_sum" in metrics:  # an algorithm without the scoring pass (gkd) reports its own
                    entropy_sums.append(torch.stack([metrics["entropy_sum"].float(),
                                                     metrics["entropy_tokens"].float()]))
            grad_norm = self._clip_gradients()  # DeepSpeed: the norm of the step its engine just took
            if accelerator.num_processes > 1:  # each rank holds its share of the globally normalised loss
                total = accelerator.reduce(total, "sum")
            total = float(total)
            if self.deepspeed and not (math.isfinite(total) and math.isfinite(grad_norm)):
                raise TrainingStopped(
                    f"a NaN/inf loss or gradient at step {step + 1}: DeepSpeed applies the update inside "
                    "backward, so it cannot be skipped, and the weights are no longer trusted (nothing was "
                    f"saved). Lower optim.lr or check the teacher's scores, then resume from the last "
                    f"checkpoint: reopold train --resume {self.run_dir}"
                )
            if not (math.isfinite(total) and math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)  # skip this update, keep the weights
                skipped = True
                continue
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            norms.append(grad_norm)
            clip_fracs.append(float(clip) / len(micro_batches))
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
        record = {"loss": mean(losses), "grad_norm": mean(norms), "clip_frac": mean(clip_fracs), "skipped": skipped}
        if entropy_sums:  # token-weighted over the step's updates and every rank
            entropy_sum, tokens = accelerator.reduce(torch.stack(entropy_sums).sum(0), "sum").tolist()
            record["entropy_mean"] = entropy_sum / max(tokens, 1.0)
        return record

    # ---- the run ---------------------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        config, state = self.config, self.state
        is_main = self.accelerator.is_main_process
        if state.step == 0 and config.run.eval_every:
            self.evaluate_and_log()
        from tqdm.auto import tqdm

        bar = tqdm(total=config.run.steps, initial=state.step, disable=not (config.run.progress and is_main),
                   desc=f"{config.algo.name}", dynamic_ncols=True)
        try:
            self._fit(bar)
        finally:  # Ctrl-C or a stop: the bar's line ends before the message that follows it
            bar.close()
        return state

    def _fit(self, bar) -> None:
        config, state = self.config, self.state
        is_main = self.accelerator.is_main_process
        while state.step < config.run.steps:
            record = self.train_step(state.step)
            if is_main:
                self.logger.log(record)
            bar.update(1)
            bar.set_postfix(self._postfix(record), refresh=False)
            if state.bad_in_a_row >= config.run.max_bad_steps:
                self.save()
                raise TrainingStopped(
                    f"{state.bad_in_a_row} steps in a row had a NaN/inf loss or gradient (step {state.step}); "
                    f"stopped with a checkpoint in {self.run_dir}. Lower optim.lr or check the teacher's scores; "
                    f"resume with: reopold train --resume {self.run_dir}"
                )
            last = state.step == config.run.steps
            if config.run.eval_every and (state.step % config.run.eval_every == 0 or last):
                self.evaluate_and_log()
            if state.step % config.run.save_every == 0 or last:
                self.save()

    def train_step(self, step: int) -> dict:
        """One rollout step: rollout -> score -> shape -> update -> weight sync; returns its metrics record."""
        state = self.state
        started = time.perf_counter()
        torch.manual_seed(self._step_seed(step))
        rollout = self.rollout(self._local(self.sampler.batch(step)))
        rollout_done = time.perf_counter()
        pi_old = self._pi_old_source(rollout, step)
        try:
            scored, failure = self.score(rollout, pi_old), None
        except TeacherUnavailable as err:
            scored, failure = None, err
        if not self._all_ranks(failure is None):  # every rank stops together, after one checkpoint
            self.save()
            raise TrainingStopped(f"{failure or 'the teacher failed on another rank'} Stopped with a checkpoint "
                                  f"of step {state.step} in {self.run_dir}; resume with: "
                                  f"reopold train --resume {self.run_dir}")
        # The pass skipped in score, from the update's forward.
        reused = self.pi_old_from_update(scored, step) if pi_old == "update" else None
        if scored.spans is not None and self.config.algo.span_credit == "token":
            # Another teacher tokenizer, graded per token: each span's teacher log-prob split over its tokens.
            teacher_logprobs = token_credit(scored.teacher_logprobs, scored.old_logprobs, scored.spans)
            scored = dataclasses.replace(scored, teacher_logprobs=teacher_logprobs, spans=None)
        score_done = time.perf_counter()
        shaped = self.algorithm.shape(scored, step=step, gather=self._gather)
        if self._all_ranks(scored.is_finite()):
            update = self.update(scored, shaped, step, reused)
        else:  # NaN/inf log-probs (student or teacher): no update from this step
            update = {"loss": float("nan"), "grad_norm": float("nan"), "clip_frac": float("nan"), "skipped": True}
        self.engine.sync_weights(self.generator)  # the next rollout samples from the updated student
        finished = time.perf_counter()

        state.step += 1
        state.samples += len(rollout) * self.accelerator.num_processes
        state.elapsed += finished - started
        state.skipped_steps += update["skipped"]
        state.bad_in_a_row = state.bad_in_a_row + 1 if update["skipped"] else 0
        return {
            "kind": "train", "step": state.step, "samples": state.samples, "time": state.elapsed,
            "lr": self.scheduler.get_last_lr()[0], **shaped.metrics, **update, **rollout.episode_stats,
            "skipped_steps": state.skipped_steps, "rollout_seconds": rollout_done - started,
            "score_seconds": score_done - rollout_done, "update_seconds": finished - score_done,
        }  # fmt: skip

    def evaluate_and_log(self) -> dict:
        """Greedy accuracy and the reverse KL on the held-out problems, logged by the main rank. A sharded student
        is evaluated on every rank (the same problems: generation gathers weights collectively)."""
        if not (self.sharded or self.accelerator.is_main_process):
            return {}
        data = self.config.data
        metrics = evaluate(self.generator, self.tokenizer, self.task, self.eval_problems, self.encode,
                           teacher=self.teacher, max_new_tokens=self.config.rollout.max_new_tokens,
                           temperature=self.config.rollout.temperature, kl_problems=min(256, data.eval_problems),
                           seed=self.config.run.seed, scorer=self.policy if self.sharded else None,
                           episodes=self.episodes)
        if not self.accelerator.is_main_process:
            return metrics
        self.last_eval = metrics
        self.logger.log({"kind": "eval", "step": self.state.step, "samples": self.state.samples,
                         "time": self.state.elapsed, **metrics})
        return metrics

    def save(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        # Collectives first, on every rank: shards are sent to the main rank, which writes.
        weights = full_model_state(self.accelerator, self.policy) if self.sharded else None
        optimizer = optimizer_state(self.accelerator, self.policy, self.optimizer)
        if not self.accelerator.is_main_process:
            return None
        state = {
            "optimizer": optimizer,
            "optimizer_format": optimizer_format(self.accelerator),
            "scheduler": self.scheduler.state_dict(),
            "train_state": vars(self.state).copy(),
        }
        # A vision-language student's checkpoint gets its whole processor (image processor, chat template).
        saver = getattr(self.encode, "processor", self.tokenizer)
        return save_checkpoint(self.run_dir, self.state.step, self.student, saver, state,
                               keep=self.config.run.keep_checkpoints, weights=weights)

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _step_seed(self, step: int) -> int:
        # Sampling and mini-batch order depend only on (seed, step, rank): a resumed run replays them exactly.
        return (self.config.run.seed * 1_000_003 + step) * 64 + self.accelerator.process_index

    def _chunks(self, rows):
        rows = list(rows)
        size = self.config.optim.micro_batch_size
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    def _local(self, problems: list) -> list:
        """This rank's share of the step's prompts."""
        return problems[self.accelerator.process_index :: self.accelerator.num_processes]

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        """1-D values of every rank, concatenated in rank order (the global entropy threshold, the step's metrics).

        Ranks hold different counts: each pads to the longest, and the padding is cut off by the gathered counts
        (so NaN values, e.g. from a broken teacher, arrive as they are).
        """
        if self.accelerator.num_processes == 1:
            return values
        counts = self.accelerator.gather(torch.tensor([len(values)], device=values.device)).tolist()
        padded = self.accelerator.pad_across_processes(values, dim=0)
        rows = self.accelerator.gather(padded).reshape(len(counts), -1)  # (ranks, longest)
        return torch.cat([row[:n] for row, n in zip(rows, counts, strict=True)])

    def _all_ranks(self, flag: bool) -> bool:
        """True only when ``flag`` holds on every rank (ranks must agree on whether to update)."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor(float(not flag), device=self.accelerator.device), "sum") == 0)

    def _clip_gradients(self) -> float:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else float("inf")
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def _postfix(self, record: dict) -> dict:
        keys = {"reward_mean": "R", "kept_frac": "kept", "entropy_mean": "H", "loss": "loss"}
        postfix = {short: f"{float(record[k]):.3g}" for k, short in keys.items() if k in record}
        if "accuracy" in self.last_eval:
            postfix["acc"] = f"{self.last_eval['accuracy']:.3f}"
        return postfix


def _has_dropout(model: torch.nn.Module) -> bool:
    """Whether training-mode forwards are random (dropout modules, or a config's attention/hidden dropout)."""
    config = getattr(model, "config", None)
    rates = [getattr(config, key, 0.0) for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop",
                                                   "attn_pdrop", "embd_pdrop", "hidden_dropout_prob")]  # fmt: skip
    modules = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    return any(isinstance(r, (int, float)) and r > 0 for r in rates + modules)


class _ReusedForward:
    """Stands in for the policy on the micro-batch whose forward already ran (``Trainer.pi_old_from_update``):
    returns that forward's log-probs (with their graph) instead of running it again. Logits (GKD) are recomputed."""

    def __init__(self, policy, logprobs: torch.Tensor, entropy: torch.Tensor):
        self.policy, self.logprobs, self.entropy = policy, logprobs, entropy

    def __call__(self, rollout: Rollout, with_entropy: bool = True, return_logits: bool = False):
        if return_logits:
            return self.policy(rollout, return_logits=True)
        return self.logprobs, (self.entropy if with_entropy else None)
