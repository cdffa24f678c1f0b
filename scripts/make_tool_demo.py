"""Make the tool-use demo's teacher and student: tiny Llamas trained from scratch on gold trajectories of the
chained-products task (``reopold.tasks.chained``), with the calculator tool's results in the sequence.

Reproduces ``src/reopold/assets/demo-tools/{teacher,student}`` (deterministic given --seed and the thread count):

    python scripts/make_tool_demo.py teacher
    python scripts/make_tool_demo.py student

A training sequence is a whole episode as token ids: the prompt, then each assistant turn followed by its eos,
then (after a tool call) the tool's result rendered as ``{4042}``. The loss covers the assistant turns and their
eos only, never the prompt or an observation (the model does not have to predict what the tool says).

- teacher: every example is the tool trajectory ``[calc(47*86)]`` ``{4042}`` ``[calc(4042*29)]`` ``{117218}``
  ``:117218``; it learns to call the tool twice and copy.
- student: a smaller model, a short SFT on a mix: mostly the "mental" trajectory
  ``47*86=4042;4042*29=117218:117218`` (one turn, no tool; far beyond a 0.2M-parameter model) and a minority
  (30%) of tool trajectories, more often the larger the first factor (``uses_tool``), so greedy decoding calls
  the tool on the problems with the largest first factors and fails on most of the others.

At the end the model is evaluated on held-out test problems as the demo runs it: greedy, multi-turn, with the
tool actually executed (``episodes`` below), reporting accuracy and how often the first turn is a tool call.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_teacher import build_model, sft_loop  # noqa: E402

from reopold.rollout import HFRolloutEngine  # noqa: E402
from reopold.rollout.episodes import EpisodeEngine  # noqa: E402
from reopold.rollout.turns import PlainFormat  # noqa: E402
from reopold.tasks import build_tokenizer  # noqa: E402
from reopold.tasks.arithmetic import Problem  # noqa: E402
from reopold.tasks.chained import (  # noqa: E402
    HIGH,
    LOW,
    ChainedProductsTask,
    factors,
    observation_text,
    parse_tool_call,
)

ROLES = {  # each model's defaults
    "teacher": dict(out="src/reopold/assets/demo-tools/teacher", hidden=128, layers=4, heads=4, steps=1500,
                    lr=2e-3, warmup=100, tool_share=1.0, tool_rule="random"),
    "student": dict(out="src/reopold/assets/demo-tools/student", hidden=64, layers=3, heads=2, steps=300,
                    lr=2e-3, warmup=50, tool_share=0.3, tool_rule="ramp"),
}


# ---- training data ------------------------------------------------------------------------------------
def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def tool_example(task: ChainedProductsTask, tokenizer: PreTrainedTokenizerFast,
                 problem: Problem) -> tuple[list[int], list[int]]:
    """The gold tool trajectory as (token ids, loss mask): 1 on assistant tokens and their eos, 0 elsewhere."""
    ids, mask = encode(tokenizer, problem.prompt), []
    mask += [0] * len(ids)
    for text, result in task.gold_turns(problem):
        turn = encode(tokenizer, text) + [tokenizer.eos_token_id]
        ids += turn
        mask += [1] * len(turn)
        if result is not None:
            observation = encode(tokenizer, observation_text(result))
            ids += observation
            mask += [0] * len(observation)
    return ids, mask


def mental_example(task: ChainedProductsTask, tokenizer: PreTrainedTokenizerFast,
                   problem: Problem) -> tuple[list[int], list[int]]:
    """The one-turn mental trajectory as (token ids, loss mask)."""
    prompt = encode(tokenizer, problem.prompt)
    turn = encode(tokenizer, task.gold_mental(problem)) + [tokenizer.eos_token_id]
    return prompt + turn, [0] * len(prompt) + [1] * len(turn)


def uses_tool(problem: Problem, rng: random.Random, tool_share: float, rule: str) -> bool:
    """Whether a training example of ``problem`` is its tool trajectory.

    ``random``: with probability ``tool_share``, independently of the problem (a model learns the probability, so
    greedy decoding never picks the tool below a share of 0.5). ``large-first``: when the first factor is among the
    largest ``tool_share`` of 10..99 (e.g. 0.2: 82..99), a cue the model can learn, so a greedy student calls the
    tool on those problems and multiplies in its head on the others. ``ramp``: with a probability rising linearly
    in the first factor, ``tool_share`` on average and twice that at 99, so greedy decoding calls the tool where
    it passes 0.5 and sampling calls it now and then on every problem.
    """
    if rule == "random":
        return rng.random() < tool_share
    first = factors(problem)[0]
    if rule == "ramp":
        return rng.random() < 2 * tool_share * (first - LOW + 0.5) / (HIGH - LOW + 1)
    return first > HIGH - round((HIGH - LOW + 1) * tool_share)


def gold_batch(task: ChainedProductsTask, tokenizer: PreTrainedTokenizerFast, rng: random.Random,
               batch_size: int, tool_share: float, rule: str = "random"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each (B, T); labels are -100 where the loss mask is 0.

    Each row is a fresh train problem, as its tool trajectory or its mental one (``uses_tool``).
    """
    rows, label_rows = [], []
    for _ in range(batch_size):
        problem = task.sample_problem(rng, "train")
        make = tool_example if uses_tool(problem, rng, tool_share, rule) else mental_example
        ids, mask = make(task, tokenizer, problem)
        rows.append(ids)
        label_rows.append([t if m else -100 for t, m in zip(ids, mask, strict=True)])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (B, T)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (B, T)
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])  # (B, T)
    return input_ids, attention_mask, labels


# ---- multi-turn episodes with the tool executed (reopold's episode engine) --------------------------------
@dataclass
class EpisodeStats:
    accuracy: float  # last turn's final answer right
    first_turn_tool: float  # share of episodes whose first turn is a tool call
    tool_calls: float  # mean tool calls per episode
    tool_errors: float  # share of episodes with a call calc refused (answered "{}")
    cut: float  # share of episodes with a turn cut by the per-turn token limit

    def __str__(self) -> str:
        return (f"acc {self.accuracy:.3f} first-turn tool {self.first_turn_tool:.3f} tool calls/episode "
                f"{self.tool_calls:.2f} tool errors {self.tool_errors:.3f} cut turns {self.cut:.3f}")


@torch.no_grad()
def episodes(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, task: ChainedProductsTask,
             problems: list[Problem], *, max_turns: int = 3, max_new_tokens: int | None = None,
             temperature: float = 0.0, seed: int = 0) -> EpisodeStats:
    """Greedy (or sampled, at ``temperature`` > 0) episodes through ``reopold.rollout.episodes``, as training and
    ``reopold eval`` run them: the task's environment executes ``task.tool`` and appends ``{result}``; a turn
    without a call ends the episode, which is graded on its last turn."""
    engine = EpisodeEngine(
        HFRolloutEngine(model, tokenizer, max_new_tokens=max_new_tokens or task.max_completion_chars() + 8,
                        temperature=temperature or 1.0, do_sample=temperature > 0),
        tokenizer, task.environment, PlainFormat(tokenizer), max_turns=max_turns,
    )  # fmt: skip
    torch.manual_seed(seed)
    rollout = engine.generate([encode(tokenizer, p.prompt) for p in problems], problems)
    sampled = rollout.completion_mask
    first_turn = sampled.long().cumprod(-1).bool()  # (B, T) the tokens before the first observation
    first_texts = tokenizer.batch_decode(rollout.completion_ids * first_turn, skip_special_tokens=True)
    n, stats = len(problems), rollout.episode_stats
    correct = sum(task.check(p, t) for p, t in zip(problems, rollout.texts, strict=True))
    return EpisodeStats(accuracy=correct / n, first_turn_tool=sum(parse_tool_call(t) is not None for t in
                                                                  first_texts) / n,
                        tool_calls=stats["tool_calls_mean"], tool_errors=stats["tool_error_frac"],
                        cut=stats["cut_turn_frac"])


# ---- training -----------------------------------------------------------------------------------------
def train(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, task: ChainedProductsTask,
          args: argparse.Namespace, log=print) -> None:
    """SFT on gold trajectories (tool ones with probability ``args.tool_share``), logging validation episodes."""
    val = task.problems("validation", args.eval_n)
    sft_loop(model, lambda rng: gold_batch(task, tokenizer, rng, args.batch_size, args.tool_share, args.tool_rule),
             steps=args.steps, lr=args.lr, warmup=args.warmup, final_frac=args.final_frac, seed=args.seed,
             eval_every=args.eval_every, evaluate=lambda: str(episodes(model, tokenizer, task, val)), log=log)


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, task: ChainedProductsTask, out: Path) -> None:
    """save_pretrained of the model (float32), tokenizer and a greedy per-turn generation config."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=task.max_completion_chars() + 8,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", choices=sorted(ROLES), help="which model to make (sets the defaults below)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--tool-share", type=float, default=None,
                    help="share of training examples that are tool trajectories (the rest are mental ones)")
    ap.add_argument("--tool-rule", choices=("random", "large-first", "ramp"), default=None,
                    help="which examples are tool trajectories: random ones, those with a large first factor, or "
                    "random ones more often the larger the first factor (see uses_tool)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--final-frac", type=float, default=0.1, help="final lr as a fraction of --lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (runs are bit-identical only at the same "
                    "count)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=200, help="validation problems per progress eval")
    ap.add_argument("--test-n", type=int, default=500, help="held-out test problems for the final eval")
    args = ap.parse_args()
    for key, value in ROLES[args.role].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = Path(args.out)
    if not 0.0 <= args.tool_share <= 1.0:
        ap.error(f"--tool-share must be in [0, 1], got {args.tool_share}")

    torch.set_num_threads(args.threads)
    task = ChainedProductsTask()
    tokenizer = build_tokenizer(task.alphabet)
    model = build_model(tokenizer, hidden=args.hidden, layers=args.layers, heads=args.heads, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.role}: {n_params / 1e6:.3f}M params, vocab {len(tokenizer)}, tool share {args.tool_share} "
          f"({args.tool_rule})",
          flush=True)
    t0 = time.time()
    train(model, tokenizer, task, args, log=lambda s: print(s, flush=True))
    print(f"trained in {time.time() - t0:.0f}s", flush=True)
    save(model, tokenizer, task, args.out)
    test = task.problems("test", args.test_n)
    print(f"test greedy episodes on {len(test)}: {episodes(model, tokenizer, task, test)}", flush=True)


if __name__ == "__main__":
    main()
