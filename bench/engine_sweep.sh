#!/usr/bin/env bash
# The engine's 1,000 x 128/128 throughput at several max_batch_size values, bfloat16 and FP8, in one call
# (in-flight runs only: no static run, no baseline; bench/engine_gpu.sh uniform has those):
#   bash bench/engine_sweep.sh "256 512 1024" "none fp8"
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUTDIR=${OUT:-bench/results/throughput}
for quant in ${2:-none fp8}; do
  for mb in ${1:-256 512 1024}; do
    echo "=== max_batch_size $mb, quant $quant $(date -u +%T)"
    timeout 200 python -m pipeline.throughput --random-shape "${SHAPE:-llama-3-8b}" --dtype bfloat16 --quant "$quant" \
      --requests 1000 --input-len 128 --output-len 128 --max-batch-size "$mb" --out "$OUTDIR" ${EXTRA:-} 2>&1 \
      | grep -E "^\[throughput\]|^engine, rate|^\| engine|Error|error" || echo "failed ($?)"
  done
done
