"""Train the visual demo's teacher and student: tiny Qwen2.5-VL models, SFT on gold scratchpads.

Reproduces ``src/reopold/assets/demo-visual/{teacher,student}`` (deterministic given --seed and 1 thread):

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/make_visual_demo.py --which both

The task is ``reopold.tasks.visual.VisualAdditionTask`` (read two 2-digit numbers from a 56x56 image,
add them with a scratchpad). Every training example is a fresh train-split problem with freshly drawn
colours and jitter. The loss covers completion tokens and eos only. AdamW, linear warmup then cosine
decay. Each model stops at the first progress eval whose validation greedy accuracy reaches its
threshold (--teacher-stop, --student-stop) or after its step budget; the smaller student's low threshold
makes it ship well below the teacher, with room to gain from distillation. Prints greedy and
temperature-1.0 exact-answer accuracy on held-out test problems at the end of each model.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_teacher import lr_at  # noqa: E402  (the same schedule as the text models)

from reopold.models.vision import build_processor, build_tiny_vlm, build_vlm_tokenizer, never_sampled_ids, save_vlm
from reopold.tasks.visual import VisualAdditionTask, VisualProblem

SIZES = {  # text hidden/layers/heads/kv heads, vision hidden/depth/heads
    "teacher": {"hidden": 96, "layers": 3, "heads": 4, "kv_heads": 2, "vision_hidden": 64, "vision_depth": 2,
                "vision_heads": 2},
    "student": {"hidden": 48, "layers": 2, "heads": 2, "kv_heads": 1, "vision_hidden": 32, "vision_depth": 1,
                "vision_heads": 2},
}


def prompt_texts(processor, task: VisualAdditionTask, problems: list[VisualProblem]) -> list[str]:
    """The chat-rendered prompt of each problem (image placeholder not yet expanded)."""
    return [processor.apply_chat_template(task.messages(p), add_generation_prompt=True, tokenize=False)
            for p in problems]


def gold_batch(processor, task: VisualAdditionTask, problems: list[VisualProblem]) -> dict[str, torch.Tensor]:
    """Left-padded model inputs for prompt + gold completion + eos, with ``labels`` -100 off the completion."""
    tokenizer = processor.tokenizer
    completions = [task.solution(p) + tokenizer.eos_token for p in problems]
    texts = [t + c for t, c in zip(prompt_texts(processor, task, problems), completions, strict=True)]
    enc = processor(text=texts, images=[p.image for p in problems], return_tensors="pt", padding=True)
    labels = torch.full_like(enc["input_ids"], -100)  # (B, T)
    for row, completion in enumerate(completions):
        n = len(tokenizer(completion)["input_ids"])  # left padding: the completion is the last n tokens
        labels[row, -n:] = enc["input_ids"][row, -n:]
    enc["labels"] = labels
    return dict(enc)


@torch.no_grad()
def accuracy(model, processor, task: VisualAdditionTask, problems: list[VisualProblem], *,
             temperature: float = 0.0, batch_size: int = 200, seed: int = 0) -> float:
    """Exact-answer accuracy of greedy (temperature 0) or sampled completions, vision tokens suppressed."""
    model.eval()
    torch.manual_seed(seed)
    tokenizer = processor.tokenizer
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        enc = processor(text=prompt_texts(processor, task, chunk), images=[p.image for p in chunk],
                        return_tensors="pt", padding=True)
        sample = temperature > 0
        out = model.generate(
            **enc, max_new_tokens=task.max_completion_chars() + 4, do_sample=sample,
            temperature=temperature if sample else None, top_k=0 if sample else None, top_p=1.0 if sample else None,
            suppress_tokens=never_sampled_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(task.check(p, t) for p, t in zip(chunk, texts, strict=True))
    model.train()
    return correct / len(problems)


def train(role: str, args: argparse.Namespace, task: VisualAdditionTask) -> None:
    """Build, SFT, save and test one model (``role`` is "teacher" or "student")."""
    steps = args.teacher_steps if role == "teacher" else args.student_steps
    stop_at = args.teacher_stop if role == "teacher" else args.student_stop
    eval_every = args.eval_every if role == "teacher" else args.student_eval_every
    out = args.out / role
    processor = build_processor(build_vlm_tokenizer())
    model = build_tiny_vlm(processor.tokenizer, seed=args.seed, **SIZES[role])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{role}: {n_params / 1e6:.3f}M params ({SIZES[role]})", flush=True)
    save = lambda: save_vlm(model, processor, out, max_new_tokens=task.max_completion_chars() + 4)  # noqa: E731
    val = task.problems("validation", args.eval_n)
    rng = random.Random(f"{args.seed}-{role}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak=args.lr, warmup=args.warmup, total=steps)
        batch = gold_batch(processor, task, [task.sample_problem(rng, "train") for _ in range(args.batch_size)])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"{role} step {step + 1}/{steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if (step + 1) % eval_every == 0 and step + 1 < steps:
            acc = accuracy(model, processor, task, val)
            print(f"{role} step {step + 1} val greedy acc {acc:.3f} ({time.time() - t0:.0f}s)", flush=True)
            save()
            if acc >= stop_at:
                print(f"{role} stops: val greedy acc {acc:.3f} >= {stop_at}", flush=True)
                break
    print(f"{role} trained in {time.time() - t0:.0f}s", flush=True)
    save()
    test = task.problems("test", args.test_n)
    print(f"{role} test greedy acc {accuracy(model, processor, task, test):.3f} on {len(test)}", flush=True)
    print(f"{role} test T=1.0 acc {accuracy(model, processor, task, test, temperature=1.0):.3f} on {len(test)}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("src/reopold/assets/demo-visual"))
    ap.add_argument("--which", choices=("teacher", "student", "both"), default="both")
    ap.add_argument("--teacher-steps", type=int, default=3000)
    ap.add_argument("--student-steps", type=int, default=3000)
    ap.add_argument("--teacher-stop", type=float, default=0.98,
                    help="the teacher stops at the first progress eval with validation greedy acc >= this")
    ap.add_argument("--student-stop", type=float, default=0.25,
                    help="the student stops at the first progress eval with validation greedy acc >= this")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250, help="teacher steps between progress evals")
    ap.add_argument("--student-eval-every", type=int, default=50,
                    help="student steps between progress evals (often: its accuracy climbs fast past --student-stop)")
    ap.add_argument("--eval-n", type=int, default=200, help="validation problems per progress eval")
    ap.add_argument("--test-n", type=int, default=500, help="held-out test problems for the final eval")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = VisualAdditionTask()
    for role in ("teacher", "student") if args.which == "both" else (args.which,):
        train(role, args, task)


if __name__ == "__main__":
    main()
