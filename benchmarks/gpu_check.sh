#!/usr/bin/env bash
# The GPU check: every GPU code path of depthprune once, on a small model, then one table.
#
#   bash benchmarks/gpu_check.sh [MODEL] [OUT]      (default: smollm2-135m, gpu-check/)
#   DEVICE=cpu bash benchmarks/gpu_check.sh          (a rehearsal of every row on the CPU, no GPU needed; slow:
#                                                     its first 10 rows took 88 min on 2 busy cores, heal-lora 30+)
#
# Each row is one command as a user types it, on --device "$DEVICE" unless it tests another placement; a failing
# row is marked and the check goes on. The last rows compare bf16 with fp32 perplexity (target: within 1%)
# and the 25% model's decode speed with the dense one's (target: within 5% of layers-kept ideal), and run
# healing and the layers fit data-parallel when the machine has two GPUs or more. Put the table, dated, in docs/benchmarks.md.
set -u
MODEL=${1:-smollm2-135m}
OUT=${2:-gpu-check}
DP=${DEPTHPRUNE:-depthprune}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
ROWS=()

row() {  # row NAME COMMAND...: run it, keep its exit code, seconds and last output line
  local name=$1; shift
  local start rc last
  start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1; rc=$?
  last=$(grep -v '^\s*$' "$OUT/$name.log" | grep -v '%|' | tail -1 | cut -c1-110)
  ROWS+=("| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED ($rc)") | $((SECONDS - start)) | $last |")
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
PRUNE=(--model "$MODEL" --ratio 0.25 --eval ppl --device "$DEVICE" --overwrite -q)
for method in shortgpt angular sleb slm laco; do
  row "prune-$method" "$DP" prune "${PRUNE[@]}" --method "$method" --out "$OUT/$method"
done
row prune-auto "$DP" prune "${PRUNE[@]}" --method auto --out "$OUT/auto"
row compensate-layers "$DP" prune "${PRUNE[@]}" --method angular --compensate layers --out "$OUT/layers"
row device-auto "$DP" prune --model "$MODEL" --ratio 0.25 --method shortgpt --eval ppl --device auto \
  --overwrite -q --out "$OUT/device-auto"
row stream-cuda "$DP" prune --model "$MODEL" --ratio 0.25 --method shortgpt --eval ppl --device "$DEVICE" --stream \
  --overwrite -q --out "$OUT/stream"
row heal-lora "$DP" heal --model "$OUT/angular" --data general --max-steps 20 --eval ppl --device "$DEVICE" \
  --overwrite -q --out "$OUT/heal-lora"
row heal-distill "$DP" heal --model "$OUT/angular" --distill --teacher "$MODEL" --max-steps 20 --eval ppl,kl \
  --device "$DEVICE" --overwrite -q --out "$OUT/heal-distill"
row speed "$DP" eval-speed --model "$OUT/angular" --baseline "$MODEL" --device "$DEVICE" --json "$OUT/speed.json"
row ppl-fp32 "$DP" eval-ppl --model "$MODEL" --device "$DEVICE" --dtype float32 --json "$OUT/ppl-fp32.json"
row ppl-bf16 "$DP" eval-ppl --model "$MODEL" --device "$DEVICE" --dtype bfloat16 --json "$OUT/ppl-bf16.json"
if [ "$GPUS" -ge 2 ] || [ "$DEVICE" = cpu ]; then  # on the CPU: two gloo processes (accelerate launch --cpu starts one)
  if [ "$DEVICE" = cpu ]; then LAUNCH=(torchrun --standalone --nproc_per_node 2); else
    LAUNCH=(accelerate launch --num_processes 2); fi
  row heal-ddp "${LAUNCH[@]}" -m depthprune heal --model "$OUT/angular" --data general \
    --max-steps 20 --eval none --overwrite -q --out "$OUT/heal-ddp"
  row layers-ddp "${LAUNCH[@]}" -m depthprune prune --model "$MODEL" --ratio 0.25 --method angular \
    --compensate layers --eval none --overwrite -q --out "$OUT/layers-ddp"
fi

echo
echo "depthprune GPU check, $(date -u +%Y-%m-%d), $MODEL, $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo "$DEVICE")"
echo "| command | result | seconds | last line |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
"${PYTHON:-python3}" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    fp32, bf16 = (json.loads((out / f"ppl-{d}.json").read_text()) for d in ("fp32", "bf16"))
    a, b = fp32["perplexity"], bf16["perplexity"]
    print(f"bf16 perplexity {b:.3f} vs fp32 {a:.3f}: {100 * (b / a - 1):+.2f}% (target within 1%)")
except (OSError, KeyError, ValueError) as err:
    print(f"bf16 vs fp32: not measured ({err})")
try:
    speed = json.loads((out / "speed.json").read_text())
    c, r = speed["comparison"], speed["result"]
    print(f"decode speedup {c['decode_speedup']:.2f}x, ideal {c['ideal_speedup']:.2f}x: "
          f"{100 * (c['decode_speedup_vs_ideal'] - 1):+.1f}% (target within 5%); prefill "
          f"{c['prefill_speedup']:.2f}x; peak memory {r['peak_memory_bytes'] / 2**20:.0f} MiB")
except (OSError, KeyError, ValueError, TypeError) as err:
    print(f"speed: not measured ({err})")
EOF
