"""Does a teacher-student pair have a heavy negative-reward tail? Measured before any sweep.

The student samples ``--samples`` answers at T = 1 to each of the first ``--prompts`` train problems (the trainer's
rollout engine and scorer, so the numbers are what the first training step sees); every sampled completion token
(EOS included) gets R = log pi_teacher - log pi_student. Printed per pair:

- ``below``: the fraction of tokens with R below the reward floor log(lam) / (1 - lam) (-1.72 at lam = 0.3, Eq. 7);
- ``share``: the gradient weight those tokens carry, sum |R| over them / sum |R| over all tokens (the weight each
  token's log-prob gradient gets in the sampled-token RKL update);
- ``below_floor_weight_per_answer``: sum |R| over below-floor tokens per answer, and their mean R;
- the mean R per token and per answer, the mean R and below-floor fraction at the first completion token (where
  the paths fork), and the student's sampled accuracy.

    OMP_NUM_THREADS=1 python benchmarks/mismatch/regime.py \\
        --pair demo=demo-teacher,demo-student \\
        --pair mismatch=benchmarks/mismatch/teacher,benchmarks/mismatch/student --json regime.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from reopold.core.rewards import reward_floor
from reopold.models.loading import load_model, load_tokenizer
from reopold.rollout import HFRolloutEngine
from reopold.tasks import ArithmeticTask
from reopold.teacher.local import LocalTeacher


def tail_stats(rewards: torch.Tensor, mask: torch.Tensor, floor: float) -> dict[str, float]:
    """Below-floor fraction and |R| share over the tokens where ``mask`` (B, T) is True, plus means.

    rewards: (B, T) R per token; mask: (B, T) bool, the completion tokens.
    """
    r = rewards[mask]  # (N,)
    below = r < floor
    weight = r.abs()
    first = rewards[:, 0][mask[:, 0]]  # (B,) R at the first completion token
    return {
        "tokens": int(r.numel()),
        "below_floor_frac": float(below.float().mean()),
        "below_floor_weight_share": float(weight[below].sum() / weight.sum()),
        "below_floor_weight_per_answer": float(weight[below].sum() / rewards.shape[0]),
        "below_floor_reward_mean": float(r[below].mean()) if bool(below.any()) else 0.0,
        "reward_mean": float(r.mean()),
        "reward_per_answer": float((rewards * mask).sum(1).mean()),
        "first_token_reward_mean": float(first.mean()),
        "first_token_below_floor_frac": float((first < floor).float().mean()),
        "tokens_per_answer": float(mask.sum(1).float().mean()),
    }


@torch.no_grad()
def measure(teacher: str, student: str, *, prompts: int, samples: int, max_new_tokens: int, lam: float,
            seed: int, digits: tuple[int, int] = (3, 2)) -> dict[str, float]:
    """Sample from ``student``, score with ``teacher``, return ``tail_stats`` and the sampled accuracy."""
    task = ArithmeticTask(digits)
    tokenizer = load_tokenizer(student)
    student_lm = load_model(student, trainable=False)
    teacher_lm = load_model(teacher, trainable=False)
    problems = task.problems("train", prompts)
    prompt_ids = [tokenizer(p.prompt)["input_ids"] for p in problems]
    torch.manual_seed(seed)
    engine = HFRolloutEngine(student_lm, tokenizer, max_new_tokens=max_new_tokens, temperature=1.0)
    rollout = engine.generate(prompt_ids, problems, num_samples=samples)
    student_lp = LocalTeacher(student_lm).logprobs(rollout)  # (B, T)
    teacher_lp = LocalTeacher(teacher_lm).logprobs(rollout)  # (B, T)
    mask = rollout.completion_mask
    stats = tail_stats(teacher_lp - student_lp, mask, reward_floor(lam))
    stats["student_sampled_accuracy"] = sum(task.check(p, t) for p, t in zip(rollout.problems, rollout.texts,
                                                                                 strict=True)) / len(rollout)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", action="append", required=True, help="NAME=TEACHER,STUDENT (repeatable)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--lam", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    for spec in args.pair:
        name, models = spec.split("=", 1)
        teacher, student = models.split(",")
        t0 = time.time()
        out[name] = measure(teacher, student, prompts=args.prompts, samples=args.samples,
                            max_new_tokens=args.max_new_tokens, lam=args.lam, seed=args.seed)
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in out[name].items())
              + f" ({time.time() - t0:.0f}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"floor": reward_floor(args.lam), "prompts": args.prompts, "samples": args.samples,
                       "pairs": out}, f, indent=1)


if __name__ == "__main__":
    main()
