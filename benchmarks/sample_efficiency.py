"""Sample efficiency of REOPOLD against rkl, rkl_sg, grpo, sft, gkd and the ablation ladder; the same as
``reopold benchmark`` (method, fairness rules and outputs: docs/benchmark.md; code: reopold.benchmark).

    python benchmarks/sample_efficiency.py --quick                 # smoke test of the pipeline (< 2 minutes)
    python benchmarks/sample_efficiency.py --dry-run               # the plan, and a time estimate once runs exist
    python benchmarks/sample_efficiency.py --jobs 2                # the sweep on the demo config; rerun to resume
    python benchmarks/sample_efficiency.py --config my.yaml --lrs 1e-5,3e-5,1e-4 --seeds 5 --out results/mine
"""

from __future__ import annotations

import argparse
import sys

from reopold.benchmark import add_arguments, run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sample_efficiency.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
