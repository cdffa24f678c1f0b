"""Sample efficiency of REOPOLD against rkl, rkl_sg, grpo, sft, gkd and the ablation ladder; the same as
``reopold benchmark`` (method, fairness rules and outputs: docs/benchmark.md; code: reopold.benchmark).

    python benchmarks/sample_efficiency.py --quick                 # smoke test of the pipeline (< 2 minutes)
    python benchmarks/sample_efficiency.py --dry-run               # the plan, and a time estimate once runs exist
    python benchmarks/sample_efficiency.py --jobs 2                # the sweep on the demo config; rerun to resume
    python benchmarks/sample_efficiency.py --config my.yaml --lrs 1e-5,3e-5,1e-4 --seeds 5 --out results/mine
"""

from __future__ import annotations

import sys

from reopold.cli import main as reopold_main


def main(argv: list[str] | None = None) -> int:
    return reopold_main(["benchmark", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
