#!/usr/bin/env bash
# GPU throughput and MFU of the paper's model at 256 px, batch 16, bf16, and the projected
# GPU-hours for the paper's 400,000 iterations. Run from the repository root on a machine with an
# NVIDIA GPU:
#
#     bash benchmarks/gpu_run.sh                    # H200: dense bf16 peak 990 TFLOP/s
#     PEAK_TFLOPS=312 bash benchmarks/gpu_run.sh    # A100's dense bf16 peak
#     ITERS=20 REPEATS=5 bash benchmarks/gpu_run.sh
#     DDP=1 bash benchmarks/gpu_run.sh              # also DDP scaling over all visible GPUs
#
# Four configurations (channels-last off/on x torch.compile off/on), each through
# benchmarks/train_speed.py (toolkit step against the bare loop, FLOPs counted with
# FlopCounterMode). Prints one table; the raw output of each run is kept in $LOG_DIR.
set -euo pipefail

PEAK_TFLOPS=${PEAK_TFLOPS:-990}     # the GPU's dense bf16 peak, TFLOP/s (H200 SXM: ~990)
ITERATIONS=${ITERATIONS:-400000}    # the paper's schedule
SIZE=${SIZE:-256}
BATCH=${BATCH:-16}
ITERS=${ITERS:-10}
REPEATS=${REPEATS:-5}
WARMUP=${WARMUP:-3}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t a2b-gpu-run-XXXX)}
PYTHON=${PYTHON:-python}

cd "$(dirname "$0")/.."
"$PYTHON" - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_run.sh: no CUDA device visible to torch; run it on a machine with an NVIDIA GPU")
print(f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}")
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)  host: $(hostname)  peak: ${PEAK_TFLOPS} TFLOP/s  logs: ${LOG_DIR}"

MODEL="--width 64 --res-blocks 6 --critic-width 64"   # the paper's (StarGAN) networks
results=()
for cl in "" "--channels-last"; do
  for comp in "" "--compile"; do
    name="cl=${cl:+on}${cl:-off} compile=${comp:+on}${comp:-off}"
    log="${LOG_DIR}/train_speed${cl}${comp}.txt"
    echo "== ${name}"
    "$PYTHON" benchmarks/train_speed.py --device cuda --size "$SIZE" --batch "$BATCH" --precision bf16 \
      $MODEL $cl $comp --iters "$ITERS" --repeats "$REPEATS" --warmup "$WARMUP" \
      --peak-tflops "$PEAK_TFLOPS" | tee "$log"
    results+=("${name}|${log}")
  done
done

echo
echo "Summary: ${SIZE} px, batch ${BATCH} per GPU, bf16, paper model; MFU against ${PEAK_TFLOPS} TFLOP/s;"
echo "GPU-hours for ${ITERATIONS} iterations at the toolkit's measured rate."
printf '%-28s %12s %12s %10s %8s %10s\n' config "toolkit im/s" "bare im/s" ratio MFU "GPU-hours"
for r in "${results[@]}"; do
  name=${r%%|*}; log=${r#*|}
  "$PYTHON" - "$name" "$log" "$PEAK_TFLOPS" "$ITERATIONS" <<'EOF'
import re, sys
name, log, peak, iterations = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
text = open(log).read()
rows = {m[0]: (float(m[1]), float(m[3]), float(m[4])) for m in   # loop: (s/iter, images/s, TFLOP/s)
        re.findall(r"^(toolkit|bare)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", text, re.M)}
sec_tk, ips_tk, tf_tk = rows["toolkit"]
ratio = float(re.search(r"toolkit / bare = ([\d.]+)", text)[1])
print(f"{name:<28} {ips_tk:>12.1f} {rows['bare'][1]:>12.1f} {ratio:>10.3f} {tf_tk / peak:>8.1%} "
      f"{iterations * sec_tk / 3600:>10.2f}")
EOF
done

if [[ "${DDP:-0}" == "1" && $("$PYTHON" -c 'import torch; print(torch.cuda.device_count())') -gt 1 ]]; then
  n=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  procs="1"; k=2; while [[ $k -le $n ]]; do procs="$procs $k"; k=$((k * 2)); done
  "$PYTHON" benchmarks/ddp_scaling.py --device cuda --size "$SIZE" --batch "$BATCH" --precision bf16 \
    $MODEL --channels-last --processes $procs | tee "${LOG_DIR}/ddp_scaling.txt"
fi
