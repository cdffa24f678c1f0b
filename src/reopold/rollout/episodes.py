"""Multi-turn rollouts: episodes that alternate student turns with an environment's observations (docs/tools.md).

``EpisodeEngine`` is a RolloutEngine, so the trainer, the evaluation and every algorithm use it unchanged. Each
round samples one assistant turn for every unfinished episode at once with a single-turn engine (Hugging Face
``generate`` or vLLM), so an episode that has finished stops using compute. The Rollout it returns lays out
``[prompt | turn 1, observation 1, turn 2, ...]`` per row: ``attention_mask`` is 1 on every real token, so the
teacher (and the student's scoring passes) see the observations as context, while ``completion_mask``, the loss
mask, is 1 only on tokens the student sampled. Rewards, the below-floor fraction, the entropy threshold and the
kept-token count are all computed over ``completion_mask``, so observations never enter them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from reopold.environments import (
    CallTimedOut,
    Environment,
    EpisodeError,
    Message,
    Observation,
    call_with_timeout,
    check_observation,
)
from reopold.rollout.batch import ImageInputs, Rollout, RolloutEngine
from reopold.rollout.turns import Rendered, TemplateRewritesHistory, TurnFormat


@dataclass
class Episode:
    """One episode being rolled out: its token ids with a per-token flag "the student sampled this"."""

    problem: object
    environment: Environment | None
    prompt: list[int]
    messages: list[Message] = field(default_factory=list)
    response: list[int] = field(default_factory=list)  # every id after the prompt: turns and observations
    sampled: list[bool] = field(default_factory=list)  # (len(response),) True on the student's own tokens
    logprobs: list[float] = field(default_factory=list)  # (len(response),) the sampler's log-probs, 0 elsewhere
    reply: str = ""  # the decoded text of the last assistant turn (what the task's checker reads)
    reward: float | None = None
    done: bool = False
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    error: str | None = None  # the environment failed (raised, hung or answered garbage): the episode stopped
    cut: bool = False  # a turn hit the length limit
    images: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (pixel_values, grid_thw) pieces

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.response

    def extend(self, ids: list[int], *, sampled: bool, logprobs: list[float] | None = None) -> None:
        self.response += ids
        self.sampled += [sampled] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def add_images(self, rendered: Rendered) -> None:
        if rendered.pixel_values is not None:
            self.images.append((rendered.pixel_values, rendered.image_grid_thw))


def step_with_timeout(environment: Environment, reply: str, timeout: float) -> Observation:
    """``environment.step(reply)``, checked; EpisodeError if it raises, hangs past ``timeout`` s or answers garbage."""
    try:
        observation = call_with_timeout(environment.step, timeout, reply)
    except CallTimedOut:
        raise EpisodeError(f"the environment's step() did not return within {timeout:g}s") from None
    except Exception as exc:  # noqa: BLE001 - any failure of user code stops this episode only
        raise EpisodeError(f"the environment's step() raised {type(exc).__name__}: {exc}") from exc
    return check_observation(observation)


class EpisodeEngine:
    """Runs up to ``max_turns`` assistant turns per episode; observations come from ``make_environment()``'s
    environments (a fresh one per episode) and are rendered by ``turn_format``.

    ``max_episode_tokens`` (0: no cap) ends an episode once its response (turns and observations) reaches that
    many tokens; ``step_timeout``: seconds an environment step may take before the episode is stopped.
    """

    def __init__(self, turn_engine: RolloutEngine, tokenizer, make_environment: Callable[[], Environment],
                 turn_format: TurnFormat, *, max_turns: int, max_episode_tokens: int = 0, step_timeout: float = 60.0):
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        self.turn_engine, self.tokenizer = turn_engine, tokenizer
        self.make_environment, self.format = make_environment, turn_format
        self.max_turns, self.max_episode_tokens, self.step_timeout = max_turns, max_episode_tokens, step_timeout

    def sync_weights(self, model) -> None:
        self.turn_engine.sync_weights(model)

    def close(self) -> None:
        self.turn_engine.close()

    def generate(self, prompt_ids: list[list[int]], problems: list, *, num_samples: int = 1) -> Rollout:
        """``num_samples`` episodes per problem (rows of a problem consecutive). ``prompt_ids`` are used only for an
        episode whose environment fails at ``reset``; the others start from the environment's first messages."""
        episodes = [self._start(problem, ids) for problem, ids in zip(problems, prompt_ids, strict=True)
                    for _ in range(num_samples)]  # fmt: skip
        reported = True  # every turn's sampler reported its sampled-token log-probs (vLLM does)
        for turn in range(self.max_turns):
            active = [e for e in episodes if not e.done]
            if not active:
                break
            sampled = self._sample_turn(active)
            reported &= sampled.old_logprobs is not None
            for row, episode in enumerate(active):
                self._advance(episode, sampled, row, last_turn=turn == self.max_turns - 1)
        for error in dict.fromkeys(e.error for e in episodes if e.error):
            warnings.warn(f"an episode stopped: {error}", stacklevel=2)
        return self._layout(episodes, with_logprobs=reported)

    def _sample_turn(self, active: list[Episode]) -> Rollout:
        """One assistant turn for each active episode, in one batch (with every row's images, for a vision student)."""
        problems = [e.problem for e in active]
        if not any(e.images for e in active):
            return self.turn_engine.generate([e.ids for e in active], problems, num_samples=1)
        width = max(len(e.ids) for e in active)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(e.ids)) + e.ids for e in active])
        attention = torch.tensor([[0] * (width - len(e.ids)) + [1] * len(e.ids) for e in active])
        images = ImageInputs.of_rows(input_ids, [e.images for e in active], self.format.image_token_id)
        return self.turn_engine.sample(input_ids, attention, images, problems, num_samples=1)

    def _start(self, problem, fallback_ids: list[int]) -> Episode:
        environment = self.make_environment()
        try:
            messages = environment.reset(problem)
            rendered = self.format.prompt(messages)
            episode = Episode(problem, environment, rendered.ids, messages=list(messages))
            episode.add_images(rendered)
            return episode
        except Exception as exc:  # noqa: BLE001 - a broken reset stops this episode, counted, not the run
            episode = Episode(problem, None, list(fallback_ids), done=True)
            episode.error = f"the environment's reset() raised {type(exc).__name__}: {exc}"
            return episode

    def _advance(self, episode: Episode, turn: Rollout, row: int, *, last_turn: bool) -> None:
        """Append the student's turn ``row`` of ``turn`` to ``episode``, then the environment's observation."""
        length = int(turn.completion_mask[row].sum())
        ids = turn.completion_ids[row, :length].tolist()
        logprobs = None if turn.old_logprobs is None else turn.old_logprobs[row, :length].tolist()
        episode.extend(ids, sampled=True, logprobs=logprobs)
        episode.turns += 1
        episode.reply = self.tokenizer.decode(ids, skip_special_tokens=True)
        episode.messages.append({"role": "assistant", "content": episode.reply})
        closed = bool(ids) and ids[-1] == self.format.stop_token_id
        episode.cut |= not closed
        try:
            observation = step_with_timeout(episode.environment, episode.reply, self.step_timeout)
        except EpisodeError as exc:
            episode.error, episode.done = str(exc), True
            return
        episode.tool_calls += observation.tool_calls
        episode.tool_errors += observation.tool_errors
        over_budget = 0 < self.max_episode_tokens <= len(episode.response)
        if observation.done or last_turn or over_budget or not observation.messages:
            episode.done, episode.reward = True, observation.reward if observation.done else None
            return
        if not closed:  # the turn was cut by the length limit: close it (context, not a sampled token)
            episode.extend([self.format.stop_token_id], sampled=False)
        try:
            rendered = self.format.observation(episode.messages, observation.messages)
        except TemplateRewritesHistory:  # the template, not this episode, is wrong: stop the run
            raise
        except ValueError as exc:  # e.g. an image for a student that cannot read one: this episode stops
            episode.error, episode.done = str(exc), True
            return
        episode.extend(rendered.ids, sampled=False)
        episode.add_images(rendered)
        episode.messages += observation.messages

    def _layout(self, episodes: list[Episode], *, with_logprobs: bool) -> Rollout:
        """Rows ``[left-padded prompt | response, right-padded]`` with the loss mask on sampled tokens only."""
        pad = self.tokenizer.pad_token_id
        width = max(len(e.prompt) for e in episodes)
        length = max(1, max(len(e.response) for e in episodes))
        batch = len(episodes)
        input_ids = torch.full((batch, width + length), pad, dtype=torch.long)
        attention = torch.zeros((batch, width + length), dtype=torch.long)
        sampled = torch.zeros((batch, length), dtype=torch.bool)
        logprobs = torch.zeros((batch, length))
        for i, e in enumerate(episodes):
            input_ids[i, width - len(e.prompt) : width + len(e.response)] = torch.tensor(e.prompt + e.response)
            attention[i, width - len(e.prompt) : width + len(e.response)] = 1
            sampled[i, : len(e.response)] = torch.tensor(e.sampled, dtype=torch.bool)
            logprobs[i, : len(e.response)] = torch.tensor(e.logprobs)
        rewards = [e.reward for e in episodes]
        images = None
        if any(e.images for e in episodes):
            images = ImageInputs.of_rows(input_ids, [e.images for e in episodes], self.format.image_token_id)
        return Rollout(
            input_ids=input_ids, attention_mask=attention, completion_mask=sampled, prompt_length=width,
            problems=[e.problem for e in episodes], texts=[e.reply for e in episodes],
            old_logprobs=logprobs if with_logprobs else None,
            rewards=None if all(r is None for r in rewards) else torch.tensor([r or 0.0 for r in rewards]),
            episode_stats=episode_stats(episodes), images=images,
        )  # fmt: skip


@dataclass
class EpisodeSetup:
    """How a run's episodes are built; ``wrap`` turns any single-turn engine (the student's, the teacher's, an
    evaluation's) into the EpisodeEngine that runs them."""

    make_environment: Callable[[], Environment]
    turn_format: TurnFormat
    max_turns: int
    max_episode_tokens: int = 0
    step_timeout: float = 60.0

    def wrap(self, turn_engine: RolloutEngine, tokenizer) -> EpisodeEngine:
        return EpisodeEngine(turn_engine, tokenizer, self.make_environment, self.turn_format, max_turns=self.max_turns,
                             max_episode_tokens=self.max_episode_tokens, step_timeout=self.step_timeout)


def build_episodes(task, tokenizer, *, chat_template: bool, max_turns: int, max_episode_tokens: int = 0,
                   step_timeout: float = 60.0, processor=None) -> EpisodeSetup | None:
    """The episodes of ``task`` (None for a single-turn task, one without ``environment``), rendered with the
    tokenizer's chat template when ``chat_template`` (the template is checked to only append) or as plain text;
    with a vision-language student's ``processor``, by its template with images (VisionChatFormat)."""
    from reopold.environments.tools import call_format_for
    from reopold.rollout.turns import ChatTemplateFormat, PlainFormat, VisionChatFormat
    from reopold.tasks import EpisodicTask

    if not isinstance(task, EpisodicTask):
        return None
    environment = task.environment
    chat_template = chat_template or processor is not None
    call_format = call_format_for(tokenizer) if chat_template else "tag"
    probe = environment(call_format)
    tools = [tool.function for tool in getattr(probe, "tools", {}).values()] if chat_template else None
    if processor is not None:
        turn_format = VisionChatFormat(processor, tools=tools)
    else:
        turn_format = ChatTemplateFormat(tokenizer, tools=tools) if chat_template else PlainFormat(tokenizer)
    return EpisodeSetup(lambda: environment(call_format), turn_format, max_turns, max_episode_tokens, step_timeout)


def episode_stats(episodes: list[Episode]) -> dict[str, float]:
    """Per-batch metrics of the episodes: mean assistant turns and tool calls per episode, the fractions of
    episodes with a failed tool call, a failed environment, and a turn cut by the length limit."""
    n = max(len(episodes), 1)
    return {
        "turns_mean": sum(e.turns for e in episodes) / n,
        "tool_calls_mean": sum(e.tool_calls for e in episodes) / n,
        "tool_error_frac": sum(e.tool_errors > 0 for e in episodes) / n,
        "env_error_frac": sum(e.error is not None for e in episodes) / n,
        "cut_turn_frac": sum(e.cut for e in episodes) / n,
    }
