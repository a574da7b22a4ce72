#!/usr/bin/env bash
# The engine on one GPU, in one call (random weights of a real shape made on the device; no artifact travels):
#   bash bench/engine_gpu.sh [tests] [step] [uniform] [wide] [mixed] [single] [tp2]  (default: uniform mixed single)
# tests: the engine's GPU tests; step: where a step's GPU time goes (bench/engine_step.py); the in-flight run alone
#        at several max_batch_size values: bench/engine_sweep.sh;
# wide: 2,000 requests 128/128 with max_batch_size 1024;
# (MB sets max_batch_size for uniform and mixed, default 256)
# uniform: 1,000 requests 128/128 at an infinite rate, our static batching and transformers' generate_batch on the
#          same requests; mixed: 1,000 requests, lengths drawn from 32-1024 / 16-512 (several static batches),
#          in-flight against padded static batches and against the same batches unpadded (--static-groups);
#          single: one request at a time (batch 1 through the engine); tp2: 128/128 at tp=1 and tp=2 (two GPUs).
#          JSON and Markdown land in $OUT (or bench/results/throughput).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUTDIR=${OUT:-bench/results/throughput}
SHAPE=${SHAPE:-llama-3-8b}
DTYPE=${DTYPE:-bfloat16}
phases=${*:-uniform mixed single}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for phase in $phases; do
  echo "=== $phase ($SHAPE, $DTYPE)"
  case $phase in
    tests)   timeout 300 python -m pytest -m gpu -q -p no:cacheprovider --tb=short tests/test_engine_gpu.py || true ;;
    step)    timeout 240 python bench/engine_step.py "$SHAPE" --dtype "$DTYPE" --batch 256 --context 192 || true ;;
    uniform) timeout 330 python -m pipeline.throughput --random-shape "$SHAPE" --dtype "$DTYPE" --requests 1000 \
               --input-len 128 --output-len 128 --max-batch-size "${MB:-256}" --static --baseline transformers --out "$OUTDIR" ;;
    wide)    timeout 200 python -m pipeline.throughput --random-shape "$SHAPE" --dtype "$DTYPE" --requests 2000 \
               --input-len 128 --output-len 128 --max-batch-size 1024 --out "$OUTDIR" ;;
    mixed)   timeout 300 python -m pipeline.throughput --random-shape "$SHAPE" --dtype "$DTYPE" --requests 1000 \
               --input-range 32,1024 --output-range 16,512 --max-batch-size "${MB:-256}" --static --static-groups \
               --out "$OUTDIR" ;;
    single)  timeout 150 python -m pipeline.throughput --random-shape "$SHAPE" --dtype "$DTYPE" --requests 3 \
               --input-len 128 --output-len 256 --max-batch-size 1 --out "$OUTDIR" ;;
    tp2)     # two GPUs (nvidia-h200-x2): the same 1,000 x 128/128 at tp=1, then at tp=2 over NCCL
             for n in 1 2; do timeout 280 mpirun -n $n --allow-run-as-root -x NCCL_NVLS_ENABLE -x PYTHONUNBUFFERED \
               python -m pipeline.throughput --random-shape "$SHAPE" --dtype "$DTYPE" --requests 1000 --input-len 128 \
               --output-len 128 --max-batch-size "${MB:-256}" --out "$OUTDIR/tp$n"; done ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
