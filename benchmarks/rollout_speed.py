"""Rollout engines side by side: Hugging Face ``generate`` (HFRolloutEngine) against vLLM (VLLMRolloutEngine) on the
same model, prompts and sampling settings, in sampled tokens per CPU-second.

Both engines are built once in this process (vLLM in process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so its work
counts in this process's CPU time) and then alternate, ``--rounds`` times: each call samples ``--samples`` answers
for each of ``--prompts`` arithmetic prompts, ``--max-new-tokens`` at most, at ``--temperature`` from the full
distribution (no top-k/top-p), fp32. Measured per call: ``time.process_time`` (every thread of the process) and the
response tokens sampled (up to and including EOS). CPU time, not wall time: on a loaded machine wall time says
little, and vLLM's CPU backend may use several threads.

The default model is the bundled demo teacher (head_dim 32); ``--model demo-student`` runs the demo student (2 heads
of 32 since 2026-11-30; vLLM's CPU attention does not support the earlier student's head_dim 16). Needs vLLM
(``scripts/install_vllm.sh`` on CPU).

    python benchmarks/rollout_speed.py --rounds 5 --out rollout_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-teacher", help="a local HF causal LM or a demo alias")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two engines (the first is warm-up)")
    parser.add_argument("--kv-cache-mb", type=int, default=256, help="vLLM's KV cache on CPU")
    parser.add_argument("--out", help="write every call and the summary here (JSON)")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reopold.cli import DEMO_CONFIG
    from reopold.config.loader import load_config
    from reopold.config.schema import TrainConfig
    from reopold.models.loading import resolve_model
    from reopold.registry import TASKS
    from reopold.rollout import HFRolloutEngine
    from reopold.rollout.vllm import VLLMRolloutEngine
    from reopold.tasks.prompts import PromptEncoder

    torch.set_num_threads(1)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_config(TrainConfig, DEMO_CONFIG, []).data  # the demo's arithmetic task
    problems = TASKS.get(data.task).from_config(data).problems("train", args.prompts * args.rounds)
    encode = PromptEncoder(tokenizer, data.chat_template)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf = HFRolloutEngine(model, tokenizer, **settings)
    vllm = VLLMRolloutEngine.offline(path, tokenizer, **settings, dtype="float32", skip_tokenizer_init=True,
                                     kv_cache_memory_bytes=args.kv_cache_mb << 20, enforce_eager=True, seed=0)
    calls = []
    try:
        for round_ in range(args.rounds):
            batch = problems[round_ * args.prompts : (round_ + 1) * args.prompts]
            prompt_ids = [encode(p.prompt) for p in batch]
            order = (("hf", hf), ("vllm", vllm)) if round_ % 2 == 0 else (("vllm", vllm), ("hf", hf))
            for name, engine in order:  # the same prompts for both, neither always first
                torch.manual_seed(round_)
                start = time.process_time()
                rollout = engine.generate(prompt_ids, batch, num_samples=args.samples)
                seconds = time.process_time() - start
                tokens = int(rollout.completion_mask.sum())
                calls.append({"round": round_, "engine": name, "cpu_seconds": seconds, "tokens": tokens,
                              "tokens_per_cpu_second": tokens / seconds})
                print(json.dumps(calls[-1]), flush=True)
    finally:
        vllm.close()

    measured = [c for c in calls if c["round"] > 0]  # round 0 warms both up
    rate = lambda name: [c["tokens_per_cpu_second"] for c in measured if c["engine"] == name]
    ratios = [v / h for v, h in zip(rate("vllm"), rate("hf"), strict=True)]
    stats = lambda xs: {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}
    summary = {"hf_tokens_per_cpu_second": stats(rate("hf")), "vllm_tokens_per_cpu_second": stats(rate("vllm")),
               "vllm_over_hf": stats(ratios), "settings": vars(args)}  # fmt: skip
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"calls": calls, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
