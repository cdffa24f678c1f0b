"""Prompts: from a bundled task or from a JSONL file / dataset on disk, encoded with the chat template when the
tokenizer has one, and served in a fixed order that depends only on (seed, step), so a resumed run sees the same
prompts as an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from reopold.tasks.arithmetic import Problem

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


class PromptTask:
    """Prompts with optional reference answers read from a file; answers are compared after normalisation.

    The final answer of a completion is the last ``\\boxed{...}`` if any, else the last number.
    """

    name = "prompts"

    def __init__(self, path: str, *, prompt_key: str = "prompt", answer_key: str = "answer", held_out: int = 1000,
                 checker: str = "exact", teacher_key: str | None = None):
        if checker == "math":
            from reopold.tasks.checkers import MathChecker

            self._math = MathChecker()  # fails here, before any model loads, when math-verify is missing
        else:
            self._math = None
        records = load_records(path, prompt_key=prompt_key)
        key = lambda r: None if teacher_key is None or r.get(teacher_key) is None else str(r[teacher_key])
        problems = [Problem(str(r[prompt_key]), None if r.get(answer_key) is None else str(r[answer_key]), key(r))
                    for r in records]
        order = list(range(len(problems)))
        random.Random(0).shuffle(order)  # a fixed held-out set, independent of the run's seed
        held = min(held_out, len(problems) // 10)
        self._splits = {
            "test": [problems[i] for i in order[:held]],
            "validation": [problems[i] for i in order[:held]],
            "train": [problems[i] for i in order[held:]],
        }

    @classmethod
    def from_config(cls, data) -> PromptTask:
        return cls(data.prompts, prompt_key=data.prompt_key, answer_key=data.answer_key, held_out=data.eval_problems,
                   checker=data.checker, teacher_key=getattr(data, "teacher_key", None))

    def problems(self, split: str, n: int) -> list[Problem]:
        return self._splits[split][:n]

    def parse_answer(self, completion: str) -> str | None:
        boxed = _BOXED.findall(completion)
        if boxed:
            return boxed[-1].strip()
        numbers = _NUMBER.findall(completion)
        return numbers[-1] if numbers else None

    def check(self, problem: Problem, completion: str) -> bool:
        if problem.answer is None:
            return False
        if self._math is not None:
            return self._math.grade(problem, completion)[1]
        answer = self.parse_answer(completion)
        return answer is not None and _normalise(answer) == _normalise(problem.answer)

    @property
    def has_answers(self) -> bool:
        return any(p.answer is not None for p in self._splits["train"])


def _normalise(answer: str) -> str:
    return answer.replace(" ", "").replace("$", "").rstrip(".").lower()


def load_records(path: str, *, prompt_key: str) -> list[dict]:
    """Rows of a JSONL file or of a dataset saved with ``save_to_disk``; every row must have ``prompt_key``."""
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    if source.is_dir():
        import datasets

        data = datasets.load_from_disk(str(source))
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                raise ValueError(f"dataset {path!r} has splits {list(data)}; it needs a 'train' split")
            data = data["train"]
        records = list(data)
    else:
        records = []
        for number, line in enumerate(source.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                message = f"{path}:{number} is not valid JSON ({err.msg}); each line must be one object"
                raise ValueError(message) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number} must be a JSON object with a {prompt_key!r} field")
            records.append(record)
    if not records:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    for number, record in enumerate(records, start=1):
        if not isinstance(record.get(prompt_key), str) or not record[prompt_key].strip():
            raise ValueError(f"{path}: row {number} has no text under {prompt_key!r} (set data.prompt_key)")
    return records


class PromptEncoder:
    """Prompt text -> token ids, through the chat template when asked ("on") or available ("auto")."""

    def __init__(self, tokenizer, chat_template: str = "auto"):
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if chat_template == "on" and not has_template:
            raise ValueError("data.chat_template=on but the student's tokenizer has no chat template; use auto or off")
        self.tokenizer = tokenizer
        self.use_template = chat_template == "on" or (chat_template == "auto" and has_template)

    def __call__(self, prompt: str) -> list[int]:
        if self.use_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]


class PromptSampler:
    """Batches of training problems: epoch e is a permutation seeded by (seed, e); step k takes the next slice.

    The data position is therefore a function of the step alone; resuming at step k needs no other state.
    """

    def __init__(self, problems: list[Problem], prompts_per_step: int, seed: int):
        if not problems:
            raise ValueError("the training split holds no problems")
        self.problems = problems
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.problems)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time is all a step needs
        return self._orders[epoch]

    def batch(self, step: int) -> list[Problem]:
        size = len(self.problems)
        positions = range(step * self.prompts_per_step, (step + 1) * self.prompts_per_step)
        return [self.problems[self._order(p // size)[p % size]] for p in positions]
