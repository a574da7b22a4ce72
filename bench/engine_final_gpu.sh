#!/usr/bin/env bash
# Issue 20's throughput check in one call: 1,000 x 128/128 at an infinite rate through the engine (outputs at the
# end, as trtllm-bench and vLLM's throughput benchmark), FP8 and bfloat16 at max_batch 512 and 1024, then FP8 at
# 512 with every request streaming; JSON and Markdown in $OUT:
#   run(command="bash bench/engine_final_gpu.sh")
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUTDIR=${OUT:-bench/results/throughput}
nvidia-smi --query-gpu=name --format=csv,noheader || true
for run in "fp8 512" "none 512" "fp8 1024" "none 1024" "fp8 512 --stream"; do
  set -- $run
  echo "=== quant $1, max_batch_size $2 ${3:-} $(date -u +%T)"
  timeout 120 python -m pipeline.throughput --random-shape llama-3-8b --dtype bfloat16 --quant "$1" --requests 1000 \
    --input-len 128 --output-len 128 --max-batch-size "$2" ${3:-} --out "$OUTDIR" 2>&1 \
    | grep -E "^\[throughput\]|^\| engine|^engine, rate|Error|error" || echo "failed ($?)"
done
