#!/usr/bin/env bash
# GPU check of the multi-process launch configs, one CUDA GPU, a few minutes: the bundled demo pair trained through
# `accelerate launch` with configs/accelerate/{fsdp,zero2,zero3}.yaml (one process each: a single GPU cannot hold
# two NCCL ranks) in the configs' precision (bf16), each stopped at STEPS*2/3 and resumed from its checkpoint to
# STEPS; beside them a plain one-GPU bf16-autocast run and a GRPO run. The runs share the GPU and run at the same time
# (tiny models: the GPU is mostly idle), so their step times are not benchmarks.
#
#   OUT=gpu_sharded bash scripts/gpu_sharded.sh      # repository root; needs deepspeed for the zero runs
#
# Each command is stopped after RUN_TIMEOUT seconds (default 240; exit 124).
# Writes $OUT/summary.txt (exit status, time and held-out evaluations of every run) and $OUT/logs.tar.gz (every
# log and metrics.jsonl); the exit status counts the failed runs.
set -u
OUT=${OUT:-gpu_sharded}
STEPS=${STEPS:-30}
WORK=${WORK:-/tmp/gpu_sharded}
mkdir -p "$OUT" "$WORK/logs"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=3
SUMMARY="$OUT/summary.txt"
FIRST=$((STEPS * 2 / 3))
common=(--run.eval_every "$((STEPS / 3))" --run.save_every "$((STEPS / 3))" --data.eval_problems 500
        --run.output_dir "$WORK/runs" --run.progress false --run.report false)

run() {  # run NAME CMD...: log to $WORK/logs/NAME.log, record exit status and seconds (RUN_TIMEOUT each)
    local name=$1; shift
    local t0=$SECONDS
    timeout "${RUN_TIMEOUT:-240}" "$@" >> "$WORK/logs/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc, $((SECONDS - t0)) s: $*" >> "$SUMMARY"
    return $rc
}

launch() {  # launch NAME CONFIG PORT: accelerate launch, stop at FIRST steps, then resume to STEPS
    local name=$1 config=$2 port=$3
    local accel=(python3 -m accelerate.commands.launch --config_file "configs/accelerate/$config.yaml"
                 --num_processes 1 --main_process_port "$port" -m reopold train)
    run "$name" "${accel[@]}" "${common[@]}" --run.name "$name" --run.steps "$FIRST" --run.mixed_precision bf16 &&
        run "$name-resume" "${accel[@]}" --resume "$WORK/runs/$name" --run.steps "$STEPS"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, transformers, accelerate
try:
    import deepspeed; ds = deepspeed.__version__
except Exception as err:
    ds = f'not importable ({err})'
print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| accelerate', accelerate.__version__, '| deepspeed', ds)"
} > "$SUMMARY" 2>&1

pids=()
run bf16 python3 -m reopold train "${common[@]}" --run.name bf16 --run.steps "$STEPS" --run.mixed_precision bf16 & pids+=($!)
run grpo python3 -m reopold train "${common[@]}" --run.name grpo --run.steps "$STEPS" --algo.name grpo --algo.two_phase null & pids+=($!)
launch fsdp fsdp 29511 & pids+=($!)
launch zero3 zero3 29512 & pids+=($!)
launch zero2 zero2 29513 & pids+=($!)
failures=0
for pid in "${pids[@]}"; do wait "$pid" || failures=$((failures + 1)); done

for run_dir in "$WORK"/runs/*/; do  # every evaluation: step, accuracy, reverse KL; then the median step time
    python3 - "$run_dir" >> "$SUMMARY" <<'PY'
import json, statistics, sys
from pathlib import Path
rows = [json.loads(line) for line in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines()]
evals = [f"{r['step']}: {r['accuracy']:.3f} / {r.get('reverse_kl', float('nan')):.1f}" for r in rows if r["kind"] == "eval"]
train = [r for r in rows if r["kind"] == "train"]
times = [r["rollout_seconds"] + r["score_seconds"] + r["update_seconds"] for r in train]
print(f"{Path(sys.argv[1]).name}: eval (step: accuracy / reverse KL) {'; '.join(evals)} | {len(train)} train rows, "
      f"median step {statistics.median(times):.2f} s, skipped {train[-1]['skipped_steps'] if train else '-'}")
PY
    cp "$run_dir/metrics.jsonl" "$WORK/logs/$(basename "$run_dir").metrics.jsonl"
    ls "$run_dir/checkpoints" >> "$WORK/logs/$(basename "$run_dir").checkpoints.txt"
done
grep -h "^reopold: " "$WORK"/logs/*.log >> "$SUMMARY"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
echo "failures: $failures" >> "$SUMMARY"
cat "$SUMMARY"
exit "$failures"
