#!/usr/bin/env bash
# GPU smoke test: the checks docs/gpu.md records, in one run of a few minutes on one CUDA GPU.
#
#   OUT=gpu_smoke bash scripts/gpu_smoke.sh          # from the repository root, reopold importable or in src/
#
# 1. `reopold train` on the GPU: the bundled demo pair, STEPS steps each: fp32; bf16 autocast over fp32 weights;
#    bf16 autocast over bf16 student weights; a LoRA student under bf16 autocast; a teacher served by
#    `reopold serve-teacher` on the GPU over loopback HTTP.
# 2. benchmarks/memory.py on the GPU: peak allocated memory of the chunked loss path vs the full-logits path at a
#    150K vocabulary.
# 3. The test suite with a GPU present (tests are written for CPU; this shows which paths change when CUDA exists).
# 4. In the background meanwhile, TEACHERS (e.g. "192x6:1.5e-3 128x4:2e-3") trains one harder-task teacher per
#    entry (3x3-digit multiplication, scripts/train_teacher.py --device cuda); empty: none.
# Every step logs to $OUT/logs/ and the script goes on after a failure; the exit status counts the failures
# (a teacher stopped by TEACHER_TIMEOUT counts too; its last 1000-step checkpoint is kept).
set -u
OUT=${OUT:-gpu_smoke}
STEPS=${STEPS:-30}
TEACHER_STEPS=${TEACHER_STEPS:-6000}
TEACHERS=${TEACHERS:-}
mkdir -p "$OUT/logs" "$OUT/runs" "$OUT/models"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOGS="$OUT/logs"

step() {  # step NAME CMD...: run, log, time, never stop the script
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*" | tee -a "$LOGS/summary.txt"
    "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "   $name: exit $rc, $((SECONDS - t0)) s" | tee -a "$LOGS/summary.txt"
    [ $rc -eq 0 ] || tail -n 25 "$LOGS/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, transformers, accelerate, peft
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)
print('gpu', torch.cuda.get_device_name(0), '| bf16 supported', torch.cuda.is_bf16_supported())"
} > "$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"

pids=()
for spec in $TEACHERS; do  # background: harder-task teachers on the GPU
    shape=${spec%%:*}; lr=${spec##*:}
    timeout "${TEACHER_TIMEOUT:-420}" python3 scripts/train_teacher.py --device cuda --digits 3 3 \
        --hidden "${shape%%x*}" --layers "${shape##*x}" \
        --steps "$TEACHER_STEPS" --batch-size 128 --lr "$lr" --warmup 300 --eval-every 1000 \
        --out "$OUT/models/teacher-3x3-$shape" > "$LOGS/teacher-3x3-$shape.log" 2>&1 &
    pids+=($!)
done

# background, CPU-heavy or short on the GPU: the test suite; the memory benchmark (peaks are per process)
( step pytest timeout 300 python3 -m pytest -p no:cacheprovider -n 8 -q -m "not slow" ) &
pids+=($!)
(
    step memory_bf16 python3 benchmarks/memory.py --device cuda --dtype bfloat16 --tokens 8192 32768 131072 \
        --json "$OUT/memory_cuda_bf16.json"
    step memory_fp32 python3 benchmarks/memory.py --device cuda --dtype float32 --tokens 8192 32768 \
        --json "$OUT/memory_cuda_fp32.json"
) &
pids+=($!)

common=(--run.steps "$STEPS" --run.eval_every "$((STEPS / 2))" --run.save_every "$((STEPS / 2))"
        --data.eval_problems 500 --run.output_dir "$OUT/runs" --run.progress false --run.report false)
step train_fp32 python3 -m reopold train "${common[@]}" --run.name fp32
step train_bf16_autocast python3 -m reopold train "${common[@]}" --run.name bf16-autocast \
    --run.mixed_precision bf16 --teacher.dtype bfloat16
step train_bf16_weights python3 -m reopold train "${common[@]}" --run.name bf16-weights \
    --run.mixed_precision bf16 --student.dtype bfloat16 --teacher.dtype bfloat16
step train_lora_bf16 python3 -m reopold train "${common[@]}" --run.name lora-bf16 --run.mixed_precision bf16 \
    --lora.r 16 --lora.alpha 32 --optim.lr 1e-3

python3 -m reopold serve-teacher demo-teacher --port 8765 --device cuda --dtype bfloat16 > "$LOGS/serve_teacher.log" 2>&1 &
server=$!
for _ in $(seq 60); do  # until /health answers
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/health', timeout=2)" \
        2> /dev/null && break
    sleep 1
done
step train_remote_teacher python3 -m reopold train "${common[@]}" --run.name remote-teacher \
    --teacher.url http://127.0.0.1:8765
kill "$server"

failures=0
for pid in "${pids[@]}"; do wait "$pid" || failures=$((failures + 1)); done
failures=$((failures + $(grep -c ': exit [1-9]' "$LOGS/summary.txt")))  # steps that failed in subshells too
for spec in $TEACHERS; do tail -n 4 "$LOGS/teacher-3x3-${spec%%:*}.log"; done
for run in "$OUT"/runs/*/; do  # the evals of each run: step, accuracy, reverse KL
    echo "$run"; grep '"kind": "eval"' "$run/metrics.jsonl" | cut -c1-160
done
echo "failures: $failures"
exit "$failures"
