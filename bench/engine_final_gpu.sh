#!/usr/bin/env bash
# Issue 20's throughput check in one call: 1,000 x 128/128 at an infinite rate through the engine (outputs at the
# end, as trtllm-bench and vLLM's throughput benchmark), FP8 and bfloat16 at max_batch 512 and 1024, then FP8 at
# 512 with every request streaming; JSON and Markdown in $OUT. RUNS replaces the list ("quant max_batch [flags]"
# a run, ";" between runs):
#   run(command="bash bench/engine_final_gpu.sh")
#   run(command="RUNS='none 1024 --max-num-tokens 16384; fp8 512' bash bench/engine_final_gpu.sh")
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUTDIR=${OUT:-bench/results/throughput}
nvidia-smi --query-gpu=name --format=csv,noheader || true
RUNS=${RUNS:-fp8 512; none 512; fp8 1024; none 1024; fp8 512 --stream}
IFS=';' read -ra runs <<< "$RUNS"
for run in "${runs[@]}"; do
  set -- $run
  quant=$1 batch=$2; shift 2
  echo "=== quant $quant, max_batch_size $batch $* $(date -u +%T)"
  # the card's clock, power and temperature before each run: machines of one kind differ by about 1% (run 15)
  nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv,noheader || true
  timeout 120 python -m pipeline.throughput --random-shape llama-3-8b --dtype bfloat16 --quant "$quant" \
    --requests 1000 --input-len 128 --output-len 128 --max-batch-size "$batch" "$@" --out "$OUTDIR" 2>&1 \
    | grep -E "^\[throughput\]|^\| engine|^engine, rate|Error|error" || echo "failed ($?)"
done
