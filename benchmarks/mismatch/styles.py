"""Which style does a model answer in after distillation? Counted on the greedy answers of ``reopold eval``.

The mismatched pair forks at the first completion token: the teacher keeps the first factor (paths 0-1,
``347*6=...``), the student the second (paths 2-3, ``26*7=...``). Each answer is classified by the factor it starts
with: ``teacher`` (the first factor), ``student`` (the second), ``other`` (neither: a number that is no factor,
e.g. a factor with a digit added). Counted with its accuracy, per ``samples.jsonl`` given (or per run folder, whose
final checkpoint is evaluated first):

    OMP_NUM_THREADS=1 python benchmarks/mismatch/styles.py RUN_OR_SAMPLES ... [--num-problems 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

STYLES = ("teacher", "student", "other")


def style_of(prompt: str, completion: str) -> str:
    """``teacher`` when the completion starts with the prompt's first factor, ``student`` with its second."""
    first, second = prompt.rstrip("=").split("*")
    head = completion.split("*", 1)[0]
    if head == first:
        return "teacher"
    return "student" if head == second else "other"


def samples_of(path: Path, num_problems: int) -> Path:
    """``path`` if it is a samples.jsonl; else a run folder, evaluated greedily at its latest checkpoint."""
    if path.is_file():
        return path
    out = path / "styles"
    if not (out / "samples.jsonl").exists():  # reopold eval takes a run folder at its latest checkpoint
        subprocess.run([sys.executable, "-m", "reopold", "eval", str(path), "--temperature", "0", "--n", "1",
                        "--num-problems", str(num_problems), "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return out / "samples.jsonl"


def count(samples: Path) -> dict:
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    styles = Counter(style_of(r["prompt"], r["completion"]) for r in rows)
    correct = Counter(style_of(r["prompt"], r["completion"]) for r in rows if r["correct"])
    return {"answers": len(rows), "accuracy": sum(r["correct"] for r in rows) / max(1, len(rows)),
            **{s: styles[s] / max(1, len(rows)) for s in STYLES},
            **{f"{s}_correct": correct[s] / max(1, styles[s]) for s in STYLES if styles[s]}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or samples.jsonl files")
    parser.add_argument("--num-problems", type=int, default=200, help="test problems per greedy evaluation")
    parser.add_argument("--json", type=Path, help="also write the counts here")
    args = parser.parse_args(argv)
    results = {}
    for path in args.paths:
        results[str(path)] = result = count(samples_of(path, args.num_problems))
        print(f"{path}: {result['answers']} answers, accuracy {result['accuracy']:.3f}; styles "
              + ", ".join(f"{s} {result[s]:.1%}" for s in STYLES))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
