"""Fakes for unit tests of the loop: a bigram policy (a full next-token distribution from a V x V table), a bigram
teacher, an engine that samples from the policy, a task and a tokenizer. Each implements only its Protocol."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reopold import core
from reopold.rollout import Rollout, build_rollout
from reopold.tasks.arithmetic import Problem
from reopold.teacher import SpanScores

V, PAD, EOS = 7, 0, 1


class BigramPolicy(torch.nn.Module):
    """logits of the next token = W[previous token]: a tiny differentiable policy with a full distribution."""

    def __init__(self, seed: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)))

    def _logits(self, rollout):
        previous = rollout.input_ids[:, rollout.prompt_length - 1 : -1]  # (B, T) token before each response token
        return self.table[previous]  # (B, T, V)

    def forward(self, rollout, *, with_entropy: bool = True, return_logits: bool = False):
        logits = self._logits(rollout)
        if return_logits:
            return logits
        logprobs, entropy = core.logprobs_and_entropy(logits, rollout.completion_ids)
        return logprobs, entropy


class BigramTeacher:
    """The Teacher Protocol over a fixed bigram table."""

    def __init__(self, seed: int, sharpness: float = 1.0):
        self.policy = BigramPolicy(seed)
        with torch.no_grad():
            self.policy.table.mul_(sharpness)

    def score(self, rollout: Rollout) -> SpanScores:
        return SpanScores(self.logprobs(rollout), None)

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        with torch.no_grad():
            return self.policy(rollout, with_entropy=False)[0]

    def logits(self, rollout: Rollout, vocab_size: int | None = None) -> torch.Tensor:
        return self.policy(rollout, return_logits=True).detach()


class BigramEngine:
    """The RolloutEngine Protocol: samples up to ``length`` tokens from a policy's table (EOS ends a response)."""

    def __init__(self, policy: BigramPolicy, length: int = 6):
        self.policy, self.length = policy, length

    @torch.no_grad()
    def generate(self, prompt_ids, problems, *, num_samples: int = 1) -> Rollout:
        prompts = [p for p in prompt_ids for _ in range(num_samples)]
        rows = [q for q in problems for _ in range(num_samples)]
        responses = []
        for prompt in prompts:
            tokens, previous = [], prompt[-1]
            for _ in range(self.length):
                previous = int(torch.multinomial(torch.softmax(self.policy.table[previous], -1), 1))
                tokens.append(previous)
                if previous == EOS:
                    break
            responses.append(tokens)
        rollout = build_rollout(prompts, responses, rows, pad_token_id=PAD, eos_token_id=EOS)
        rollout.texts = [" ".join(map(str, r)) for r in responses]
        return rollout

    def sync_weights(self, model) -> None:
        self.policy = model


class DigitTask:
    """The Task Protocol: prompt "d" (one token id d), the answer is the first response token being d + 1."""

    name = "digits"

    @classmethod
    def from_config(cls, data) -> DigitTask:
        return cls()

    def problems(self, split: str, n: int) -> list[Problem]:
        return [Problem(str(2 + i % 4), str(3 + i % 4)) for i in range(n)]

    def check(self, problem: Problem, completion: str) -> bool:
        return completion.split(" ")[0] == problem.answer


class FakeTokenizer:
    def save_pretrained(self, path) -> None:
        Path(path, "tokenizer.json").write_text(json.dumps({"vocab": V}))


class SavableBigram(BigramPolicy):
    """The student model: what the trainer saves in a checkpoint."""

    def save_pretrained(self, path, state_dict=None) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict() if state_dict is None else state_dict, Path(path) / "weights.pt")
