"""Peak memory of the loss path, forward + backward: chunked log-probs from hidden states vs. the full-logits path.

    chunked  reopold.core.logprobs_from_hidden: (chunk, V) logits one chunk at a time, recomputed in the backward pass
    naive    hidden @ W.T -> log_softmax -> gather, + entropy: the whole (N, V) matrix and its gradients at once

Both compute the sampled token's log-prob and the entropy of N positions from (N, D) final hidden states and a (V, D)
output layer, then backpropagate loss = sum(logprobs) + sum(entropy), so both outputs carry gradient (the worst case).

Each configuration runs in a fresh subprocess. Its peak is ``ru_maxrss`` at the end minus the resident set size after
the inputs were allocated (hidden, W, tokens), so it counts everything the loss path itself holds: logits-sized
buffers, the (V, D) and (N, D) gradients, temporaries. With ``--device cuda`` it is the CUDA caching allocator's
peak (``torch.cuda.max_memory_allocated``) above what the inputs hold, and the budget is the GPU's free memory.
Configurations predicted (see ``predicted_bytes``) to need more than ``--headroom`` of the memory available now are not
run: the row says "skipped: needs X GB".

    python benchmarks/memory.py                                   # 150K vocab, hidden 1536, 8K and 32K tokens
    python benchmarks/memory.py --tokens 2048 8192 --dtype bfloat16 --json out.json
    python benchmarks/memory.py --device cuda --dtype bfloat16 --tokens 8192 32768 131072
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from reopold.core import logprobs_from_hidden

GB = 1e9  # decimal gigabytes throughout
PATHS = ("chunked", "naive")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor):
    """(N,) log-prob of ``tokens`` and (N,) entropy, materialising all (N, V) logits (the path being replaced)."""
    log_probs = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # (N, V)
    selected = log_probs.gather(-1, tokens[:, None]).squeeze(-1)  # (N,)
    return selected, -(log_probs.exp() * log_probs).sum(-1)


def loss_path(path: str, hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, chunk_size: int):
    """(logprobs (N,), entropy (N,)) by ``path``; hidden (N, D), weight (V, D), tokens (N,)."""
    if path == "naive":
        return naive_logprobs(hidden, weight, tokens)
    if path == "chunked":
        return logprobs_from_hidden(hidden, weight, tokens, chunk_size=chunk_size)
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")


def make_inputs(tokens: int, vocab: int, hidden: int, dtype: str, seed: int = 0, device: str = "cpu"):
    """hidden (N, D) and weight (V, D) leaves that require grad, tokens (N,); scaled so logits are O(1).

    Drawn on the CPU (the same numbers on every device), then moved to ``device``.
    """
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=generator).to(device, DTYPES[dtype]).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).to(device, DTYPES[dtype]).requires_grad_()
    return h, w, torch.randint(vocab, (tokens,), generator=generator).to(device)


def predicted_bytes(path: str, tokens: int, vocab: int, hidden: int, chunk_size: int, dtype: str) -> int:
    """Peak bytes above the inputs: the larger of two moments of the backward pass, for R logits rows at once
    (R = N naive, R = chunk chunked), U = one (R, V) float32 buffer, G = the (V, D) weight gradient.

    1. Inside the log-softmax backward: 5 U. The log-softmax output and its exp are saved for backward; the
       backward of ``exp(lp) * lp`` makes a gradient for each factor, the exp backward a third, and the gather's
       scattered gradient is added to them. The chunked path also holds the weight gradient summed so far (G).
    2. Forming the weight gradient: U for the logits' gradient plus G; the chunked path adds each chunk's G to the
       running sum out of place, so three G are alive at once.

    Plus the (N, D) hidden gradient, twice in the chunked path (each chunk's slice gradient is scattered into a
    full-size buffer before it is accumulated). Measured peaks at vocab 32,000-64,000 and hidden 256-2,048 fell
    within 2% (naive) and 8% (chunked, at or below the prediction) of this; tests/test_memory_benchmark.py checks
    it again.
    """
    element = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    weight_grad, hidden_grad = vocab * hidden * element, tokens * hidden * element
    if path == "naive":
        logits = tokens * vocab * 4
        return max(5 * logits, logits + weight_grad) + hidden_grad
    logits = min(chunk_size, tokens) * vocab * 4
    return max(5 * logits + weight_grad, logits + 3 * weight_grad) + 2 * hidden_grad


def measure(path: str, tokens: int, vocab: int, hidden: int, chunk_size: int, dtype: str, seed: int = 0,
            device: str = "cpu") -> dict:
    """Run one forward + backward in this process; the peak is only meaningful in a fresh process (run_isolated)."""
    cuda = torch.device(device).type == "cuda"
    for warm_up in PATHS:  # first calls import modules lazily (checkpointing: ~80 MB) and start threads
        small = make_inputs(8, 8, 8, dtype, device=device)
        sum(loss_path(warm_up, *small, chunk_size=4)).sum().backward()
    h, w, ids = make_inputs(tokens, vocab, hidden, dtype, seed, device=device)
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        inputs_bytes_held = torch.cuda.memory_allocated(device)
    else:
        inputs_bytes_held = _current_rss()
        _reset_peak_rss()
    started = time.perf_counter()
    logprobs, entropy = loss_path(path, h, w, ids, chunk_size)
    (logprobs.sum() + entropy.sum()).backward()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _peak_rss()
    return {
        "path": path, "tokens": tokens, "status": "measured", "peak_bytes": peak - inputs_bytes_held,
        "inputs_bytes": sum(t.numel() * t.element_size() for t in (h, w, ids)), "seconds": seconds,
        "logprob_sum": float(logprobs.detach().double().sum()), "entropy_sum": float(entropy.detach().double().sum()),
        "hidden_grad_norm": float(h.grad.double().norm()), "weight_grad_norm": float(w.grad.double().norm()),
    }  # fmt: skip


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux >= 4.0). Without it the peak can be inherited: ru_maxrss and
    VmHWM survive exec, so a subprocess forked from a big process (a test runner that trained a model) starts with
    its parent's resident size as its peak."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """Peak resident set size since _reset_peak_rss (VmHWM), else since the process started (ru_maxrss)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def run_isolated(path: str, tokens: int, vocab: int, hidden: int, chunk_size: int, dtype: str,
                 device: str = "cpu") -> dict:
    """``measure`` in a fresh interpreter, so that ru_maxrss (or the CUDA allocator) starts clean."""
    spec = json.dumps({"path": path, "tokens": tokens, "vocab": vocab, "hidden": hidden, "chunk_size": chunk_size,
                       "dtype": dtype, "device": device})  # fmt: skip
    # glibc serves allocations below its (self-raising, up to 32 MB) mmap threshold from the heap and keeps them
    # mapped after free, so the RSS peak would count dead chunks; a fixed 1 MB threshold maps and unmaps each tensor.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure-one", spec],
                         capture_output=True, text=True, env=env)  # fmt: skip
    if out.returncode != 0:  # e.g. killed by the OOM killer: say so instead of failing the whole table
        return {"path": path, "tokens": tokens, "status": f"failed (exit {out.returncode}): {out.stderr[-300:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def benchmark(tokens: list[int], *, vocab: int, hidden: int, chunk_size: int, dtype: str,
              budget_bytes: float, device: str = "cpu") -> list[dict]:
    """One row per (tokens, path): measured in a subprocess when predicted to fit ``budget_bytes``, else skipped."""
    rows = []
    for n in tokens:
        for path in PATHS:
            need = predicted_bytes(path, n, vocab, hidden, chunk_size, dtype)
            inputs = (n + vocab) * hidden * torch.tensor([], dtype=DTYPES[dtype]).element_size() + 8 * n
            if need + inputs > budget_bytes:
                row = {"path": path, "tokens": n, "status": f"skipped: needs {(need + inputs) / GB:.3g} GB"}
            else:
                row = run_isolated(path, n, vocab, hidden, chunk_size, dtype, device)
            rows.append({**row, "predicted_bytes": need, "logits_bytes": n * vocab * 4})
            print(_row_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _row_line(row: dict) -> str:
    measured = f"{row['peak_bytes'] / GB:.2f}" if "peak_bytes" in row else "-"
    seconds = f"{row['seconds']:.0f}" if "seconds" in row else "-"
    note = "" if row["status"] == "measured" else row["status"]
    return (f"| {row['tokens']:,} | {row['path']} | {row['logits_bytes'] / GB:.1f} | {row['predicted_bytes'] / GB:.2f} "
            f"| {measured} | {seconds} | {note} |")


def markdown(rows: list[dict], *, vocab: int, hidden: int, chunk_size: int, dtype: str, device: str = "cpu") -> str:
    header = [
        f"vocab {vocab:,}, hidden {hidden}, chunk {chunk_size}, {dtype}, {device}; peak above inputs, GB = 1e9 bytes",
        "",
        "| tokens | path | full fp32 logits (GB) | predicted peak (GB) | measured peak (GB) | fwd+bwd (s) | note |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    return "\n".join(header + [_row_line(row) for row in rows])


def machine(device: str = "cpu") -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    gpu = ""
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), "
    return (f"{gpu}{cpu or platform.processor()}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="N, positions in the batch")
    parser.add_argument("--vocab", type=int, default=151_936, help="V (Qwen2.5's padded vocabulary)")
    parser.add_argument("--hidden", type=int, default=1536, help="D (Qwen2.5-1.5B)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk in the chunked path")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of hidden states and W")
    parser.add_argument("--headroom", type=float, default=0.8, help="run only what is predicted to need less than "
                        "this fraction of the memory available now")  # fmt: skip
    parser.add_argument("--max-gb", type=float, default=None, help="memory budget in GB instead of MemAvailable "
                        "(or the GPU's free memory)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu (peak resident set) or cuda / cuda:N (peak allocated)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    parser.add_argument("--measure-one", default=None, help=argparse.SUPPRESS)  # internal: one row, as JSON
    args = parser.parse_args(argv)
    if args.measure_one:
        print(json.dumps(measure(**json.loads(args.measure_one))))
        return
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")
    if args.max_gb is not None:
        budget = args.max_gb * GB
    elif torch.device(args.device).type == "cuda":
        budget = args.headroom * torch.cuda.mem_get_info(args.device)[0]
    else:
        budget = args.headroom * available_bytes()
    config = {"vocab": args.vocab, "hidden": args.hidden, "chunk_size": args.chunk_size, "dtype": args.dtype,
              "device": args.device}  # fmt: skip
    rows = benchmark(args.tokens, budget_bytes=budget, **config)
    print(f"{machine(args.device)}; budget {budget / GB:.1f} GB\n")
    print(markdown(rows, **config))
    if args.json:
        args.json.write_text(json.dumps({"config": config, "machine": machine(args.device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
