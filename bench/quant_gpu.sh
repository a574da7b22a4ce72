#!/usr/bin/env bash
# Issue 24's GPU half in one call of at most 8 minutes on an H100/H200 (tools: device `run`), from the repo root:
#   bash bench/quant_gpu.sh
# The 8B shape with random weights made on the GPU (--device-random; no network there): bfloat16 at batch 1 and 256,
# int4_awq at batch 1 (the fused step; the compiled layer-by-layer step if that fails), w8a8_smoothquant at batch
# 256, FP8 at batch 1; then the ratios against bfloat16
# (bench/quant_gpu.py summary: $OUT/quant_gpu.md/.json). Before them the GPU tests of the kernels (tests-kernels.xml),
# after them those of the quantized decode paths (tests-decode.xml) and each 8B GEMM per format (quant_gemm.json),
# with the time left. Every step has a timeout taken from one deadline
# (QUANT_GPU_BUDGET seconds, default 470), so the call ends in time whatever hangs; results.tgz holds the JSON/MD.
set -uo pipefail
OUT=${OUT:-bench/results/gpu-quant}
mkdir -p "$OUT/results"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PIPELINE_HOME=${PIPELINE_HOME:-/tmp/pipeline-home}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
BUDGET=${QUANT_GPU_BUDGET:-470}
R="$OUT/results"
LOG="$OUT/log.txt"

# run CAP_SECONDS NAME COMMAND...: the command under a timeout of CAP or what the deadline leaves (minus 15 s for the
# summary), skipped when under 20 s are left
run() {
  local cap=$1 name=$2; shift 2
  local left=$((BUDGET - 15 - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then echo "=== $name: skipped, ${left}s left" | tee -a "$LOG"; return; fi
  echo "=== $name (timeout ${limit}s) $(date -u +%T)" | tee -a "$LOG"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -vE "^\[bench rank|^\\$ " | tail -25
  echo "=== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - START ))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %ad' 2>/dev/null || true
  date -u; } | tee "$OUT/gpu.txt"

COMMON=(--device-random --repeats 2 --input-len 128 --output-len 96 --no-baseline --watchdog 150)
F=graph+triton-gemv+fused-mlp+fused-step+pdl  # batch 1, bfloat16, FP8 and int4: the fused step (gpu_run.sh's fp8 phase)
L=graph+compile+triton-gemv+fused-mlp         # batch 1, int4: the compiled layer-by-layer step (the fallback)
B=graph+compile+cublas+fused-mlp              # batch 256: the compiled layer-by-layer step (gpu_run.sh's 8b phase)
run 90 "gpu tests: kernels" python -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_quant_kernels.py \
  -k "on_the_gpu and not decode" --junitxml="$OUT/tests-kernels.xml"
run 130 "bf16 b1,256" python -m pipeline bench llama-3-8b-random-bf16 --batch-sizes 1,256 --variants $F \
  --batched-variants $B --out "$R" "${COMMON[@]}"
run 100 "int4_awq b1 fused step" python -m pipeline bench llama-3-8b-random-int4awq --batch-sizes 1 --variants $F,${F%+pdl} \
  --out "$R/int4-fused-step" "${COMMON[@]}"
run 70 "fp8 b1" python -m pipeline bench llama-3-8b-random-fp8 --batch-sizes 1 --variants $F --out "$R" "${COMMON[@]}"
# run 1 spent 45 s compiling batch 256 and did not finish 3 rounds in the 60 s left: one timed round, a longer cap
run 200 "w8a8 b256" python -m pipeline bench llama-3-8b-random-w8a8sq --batch-sizes 1,256 \
  --variants graph+triton-gemv+fused-mlp --batched-variants $B --out "$R" "${COMMON[@]}" --repeats 1
if ! ls "$R"/int4-fused-step/bench-*.json >/dev/null 2>&1; then  # the fused step failed: the other int4 path
  run 120 "int4_awq b1 layer by layer" python -m pipeline bench llama-3-8b-random-int4awq --batch-sizes 1 \
    --variants $L --out "$R/int4-layer-by-layer" "${COMMON[@]}"
fi
run 20 "summary" python bench/quant_gpu.py summary "$OUT"
run 90 "gpu tests: decode" python -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_quant_kernels.py \
  -k "decode" --junitxml="$OUT/tests-decode.xml"
run 60 "gemms" python bench/quant_gpu.py gemm "$OUT"
tar czf "$OUT/results.tgz" -C "$R" . && rm -rf "$R"
cat "$OUT/quant_gpu.md" 2>/dev/null
echo "=== done after $(( $(date +%s) - START ))s" | tee -a "$LOG"
