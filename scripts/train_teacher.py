"""Train the demo teacher: a small Llama trained from scratch on gold scratchpads of randomly chosen paths.

Reproduces ``src/reopold/assets/demo/teacher`` (deterministic given --seed and the thread count):

    python scripts/train_teacher.py --out src/reopold/assets/demo/teacher

Every training example is a fresh problem of the train split with one of its valid solution paths drawn
at random, so the teacher learns the whole mixture of paths. The loss covers completion tokens and eos
only (the prompt digits are random). AdamW, linear warmup then cosine decay to a tenth of the peak.
Prints progress and, at the end, greedy and temperature-1.0 exact-answer accuracy on held-out problems.
``scripts/make_student.py`` reuses the helpers below.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from reopold.tasks import ArithmeticTask, build_tokenizer
from reopold.tasks.arithmetic import check_paths


def build_model(tokenizer: PreTrainedTokenizerFast, *, hidden: int, layers: int, heads: int,
                intermediate: int | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for the char-level task (tied embeddings, short context)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def gold_batch(task: ArithmeticTask, tokenizer: PreTrainedTokenizerFast, rng: random.Random, batch_size: int,
               paths: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each (B, T); labels are -100 on prompt and pad.

    ``paths``: the solution paths to draw from (indices into ``reopold.tasks.arithmetic.PATHS``); None: all.
    """
    rows, label_rows = [], []
    for _ in range(batch_size):
        problem = task.sample_problem(rng, "train")
        prompt_ids = tokenizer(problem.prompt)["input_ids"]
        completion_ids = tokenizer(task.solution(problem, rng, paths=paths))["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + completion_ids)
        label_rows.append([-100] * len(prompt_ids) + completion_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (B, T)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (B, T)
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])  # (B, T)
    return input_ids, attention_mask, labels


@torch.no_grad()
def accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, task: ArithmeticTask,
             problems: list, *, temperature: float = 0.0, batch_size: int = 500, seed: int = 0) -> float:
    """Exact-answer accuracy of greedy (temperature 0) or sampled completions."""
    model.eval()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        enc = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True).to(device)
        sample = temperature > 0
        out = model.generate(
            **enc, max_new_tokens=task.max_completion_chars() + 8, do_sample=sample,
            temperature=temperature if sample else None, top_k=0 if sample else None, top_p=1.0 if sample else None,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(task.check(p, t) for p, t in zip(chunk, texts, strict=True))
    model.train()
    return correct / len(problems)


def lr_at(step: int, *, peak: float, warmup: int, total: int, final_frac: float = 0.1) -> float:
    """Linear warmup to ``peak``, then cosine decay to ``final_frac * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_gold_sft(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, task: ArithmeticTask, *,
                   steps: int, batch_size: int, lr: float, warmup: int, final_frac: float, seed: int,
                   bf16: bool, eval_every: int, eval_problems: list, log=print, on_eval=None,
                   paths: tuple[int, ...] | None = None) -> None:
    """SFT on gold scratchpads (random valid paths, or random ones of ``paths``), logging greedy validation
    accuracy as it goes.

    ``on_eval()`` (e.g. an interim save) is called after each progress eval.
    """
    sft_loop(model, lambda rng: gold_batch(task, tokenizer, rng, batch_size, paths), steps=steps, lr=lr,
             warmup=warmup, final_frac=final_frac, seed=seed, bf16=bf16, eval_every=eval_every,
             evaluate=lambda: f"greedy acc {accuracy(model, tokenizer, task, eval_problems):.3f}", log=log,
             on_eval=on_eval)


def sft_loop(model: LlamaForCausalLM, next_batch, *, steps: int, lr: float, warmup: int, final_frac: float,
             seed: int, bf16: bool = False, eval_every: int = 0, evaluate=None, log=print, on_eval=None) -> None:
    """The demo models' SFT: AdamW (betas 0.9/0.98, weight decay 0.01), ``lr_at``'s schedule, gradients clipped
    at 1. ``next_batch(rng)`` -> (input_ids, attention_mask, labels) from one seeded ``random.Random``;
    ``evaluate()`` -> the text logged as "step N val <text>" every ``eval_every`` steps, then ``on_eval()``."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    t0, tokens = time.time(), 0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak=lr, warmup=warmup, total=steps, final_frac=final_frac)
        input_ids, attention_mask, labels = (t.to(device) for t in next_batch(rng))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int(attention_mask.sum())
        if (step + 1) % 50 == 0:
            el = time.time() - t0
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{el:.0f}s {tokens / el:.0f} tok/s")
        if eval_every and evaluate is not None and (step + 1) % eval_every == 0 and step + 1 < steps:
            log(f"step {step + 1} val {evaluate()} ({time.time() - t0:.0f}s)")
            if on_eval is not None:
                on_eval()


def save_checkpoint(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path,
                    task: ArithmeticTask, dtype: torch.dtype = torch.float32) -> None:
    """save_pretrained of model (in ``dtype``), tokenizer and a greedy generation config."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=task.max_completion_chars() + 8,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model.to(dtype).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)


def model_parser(doc: str | None, *, out: str, hidden: int, layers: int, steps: int, lr: float, warmup: int,
                 final_frac: float, eval_every: int, heads: int = 4) -> argparse.ArgumentParser:
    """The arguments both demo-model scripts take, with each script's defaults."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--digits", type=int, nargs=2, default=(3, 2))
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--final-frac", type=float, default=final_frac,
                    help="final lr as a fraction of --lr (1.0: constant after warmup)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (runs are bit-identical only at the same count)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (runs are bit-identical only on the same "
                    "kind of device)")
    ap.add_argument("--eval-every", type=int, default=eval_every)
    ap.add_argument("--eval-n", type=int, default=200, help="validation problems per progress eval")
    ap.add_argument("--test-n", type=int, default=1000, help="held-out test problems for the final eval")
    ap.add_argument("--paths", type=parse_paths, default=None,
                    help="train only on these solution paths, e.g. 0,1 (0/1: decompose the second factor low/high "
                         "digit first, 2/3: the first factor; default: all four at random)")
    ap.add_argument("--init", default=None,
                    help="start from this saved model (a folder or demo-teacher/demo-student) instead of a random "
                         "init; --hidden/--layers/--heads are then ignored")
    return ap


def parse_paths(text: str) -> tuple[int, ...]:
    """``"0,1"`` -> ``(0, 1)``, checked against the task's paths."""
    try:
        return check_paths([int(t) for t in text.split(",") if t.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def initial_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """``--init``'s model in float32 (its vocabulary checked against ``tokenizer``), else a fresh one."""
    if args.init is None:
        return build_model(tokenizer, hidden=args.hidden, layers=args.layers, heads=args.heads, seed=seed)
    from reopold.models.loading import resolve_model

    path = resolve_model(args.init)
    saved = PreTrainedTokenizerFast.from_pretrained(path)
    if saved.get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"--init {args.init}: its tokenizer differs from the task's")
    torch.manual_seed(seed)
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def finish(model, tokenizer, task, args, *, started: float) -> None:
    """Save the trained model to args.out and print its greedy and T=1 accuracy on args.test_n test problems."""
    print(f"trained in {time.time() - started:.0f}s", flush=True)
    save_checkpoint(model, tokenizer, args.out, task)
    test = task.problems("test", args.test_n)
    print(f"test greedy acc {accuracy(model, tokenizer, task, test):.3f} on {len(test)}", flush=True)
    print(f"test T=1.0 acc {accuracy(model, tokenizer, task, test, temperature=1.0):.3f} on {len(test)}", flush=True)


def main() -> None:
    ap = model_parser(__doc__, out="src/reopold/assets/demo/teacher", hidden=128, layers=4, steps=4000, lr=2e-3,
                      warmup=200, final_frac=0.1, eval_every=500)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (faster above ~1M params on AMX CPUs)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    task = ArithmeticTask(digits=tuple(args.digits))
    tokenizer = build_tokenizer(task.alphabet)
    model = initial_model(args, tokenizer, args.seed)
    model.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{task!r}: {n_params / 1e6:.3f}M params, vocab {len(tokenizer)}", flush=True)
    t0 = time.time()
    train_gold_sft(model, tokenizer, task, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   warmup=args.warmup, final_frac=args.final_frac, seed=args.seed, bf16=args.bf16,
                   eval_every=args.eval_every, eval_problems=task.problems("validation", args.eval_n),
                   log=lambda s: print(s, flush=True), paths=args.paths,
                   on_eval=lambda: save_checkpoint(model, tokenizer, args.out, task))
    finish(model, tokenizer, task, args, started=t0)


if __name__ == "__main__":
    main()
