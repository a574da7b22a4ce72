#!/usr/bin/env bash
# The whole GPU check and benchmark matrix, one call on a lent H100/H200 machine (tools: device `run`):
#   bash bench/gpu_run.sh tests gpt2 8b fp8 tp2       # any subset of phases, in order
# Everything lands in $OUT (default bench/results/gpu): gpu.txt, log.txt and results.tgz (the JSON/Markdown of each
# `python -m pipeline bench`). Weights are random, made on the GPU (no network there, no room to carry 16 GB).
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT/results"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PIPELINE_HOME=${PIPELINE_HOME:-/tmp/pipeline-home}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv
  python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %ad' 2>/dev/null || true; date -u; } | tee "$OUT/gpu.txt"
R="$OUT/results"
for phase in "${@:-tests gpt2 8b}"; do
  echo "=== phase $phase $(date -u +%T)" | tee -a "$OUT/log.txt"
  case $phase in
    tests) python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25 ;;
    gpt2)  python -m pipeline bench gpt2-random --device-random --batch-sizes 1,8,32 --repeats 3 --out "$R" ;;
    testfp8) python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "fp8 or scaled" 2>&1 | tail -5 ;;
    8b)    python -m pipeline bench llama-3-8b-random-bf16 --device-random --batch-sizes 1,8,32 --repeats 2 --out "$R" \
             --variants eager+cublas+fused-mlp,graph+triton-gemv+fused-mlp,graph+compile+cublas+fused-mlp,graph+compile+triton-gemv+fused-mlp ;;
    fp8)   python -m pipeline bench llama-3-8b-random-fp8 --device-random --batch-sizes 1,32 --repeats 2 --out "$R" \
             --no-baseline --variants graph+compile+triton-gemv+fused-mlp,graph+compile+cublas+fused-mlp ;;
    tp2)   # tp=1 and tp=2 of one model (device-random weights are the same for any tp), same decode path
           python -m pipeline bench llama-3-8b-random-bf16 --device-random --batch-sizes 1 --repeats 2 \
             --no-baseline --out "$R" --variants graph+compile+cublas+fused-mlp
           python -m pipeline bench llama-3-8b-random-bf16 parallel.tp=2 --device-random --batch-sizes 1,32 --repeats 2 \
             --no-baseline --out "$R" --variants graph+compile+cublas+fused-mlp,graph+triton-gemv+fused-mlp
           python bench/compare_tokens.py "$R/bench-llama-3-8b-random-bf16-tp1.json" "$R/bench-llama-3-8b-random-bf16-tp2.json" ;;
    *) echo "unknown phase $phase" ;;
  esac 2>&1 | tee -a "$OUT/log.txt"
done
tar czf "$OUT/results.tgz" -C "$R" . && rm -rf "$R"
echo "=== done $(date -u +%T)" | tee -a "$OUT/log.txt"
