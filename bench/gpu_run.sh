#!/usr/bin/env bash
# The whole GPU check and benchmark matrix, one call on a lent H100/H200 machine (tools: device `run`):
#   bash bench/gpu_run.sh tests tests-batched tests-gemm profile profile32 attention grouped prefill quick 8b fp8 \
#     fp8ab gpt2 nccl tp2  # any subset
# The A/B phases of settled experiments (preload, block, forms, tune, b32) went with the switches they set; their
# figures are in bench/results/. bench/profile_step.py --attention and --sweep still time alternatives by argument.
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
  git log -1 --format='commit %h %ad' 2>/dev/null || true  # the copy's HEAD may lag its working tree:
  echo "source sha256 $(git ls-files -co --exclude-standard pipeline bench | grep -v "^bench/results/" | sort | xargs cat | sha256sum | cut -c1-16)"
  date -u; } | tee "$OUT/gpu.txt"
R="$OUT/results"
for phase in "${@:-tests gpt2 8b}"; do
  echo "=== phase $phase $(date -u +%T)" | tee -a "$OUT/log.txt"
  case $phase in
    tests) # the whole output in tests.txt, its end in the log; more than 9 min on an H100 (run 50 hit its 530 s limit
           # in the last few tests): give it a call of its own, or run tests-gemm and the fused-decode tests apart
           python -m pytest -m "gpu or not gpu" -q -p no:cacheprovider --tb=short tests/test_gpu.py \
             tests/test_batched_gemm.py tests/test_fused_decode.py > "$OUT/tests.txt" 2>&1
           grep -E "^(FAILED|ERROR)" "$OUT/tests.txt"; tail -3 "$OUT/tests.txt" ;;
    tests-batched) # the GPU tests of the batched GEMMs and what runs them (about 7 min on an H100)
           python -m pytest -m "gpu or not gpu" -q -p no:cacheprovider --tb=short tests/test_gpu.py \
             tests/test_batched_gemm.py tests/test_fused_decode.py -k "not compile_for_hopper and (batched or rows or \
             tuned or decode_path or layer_by_layer or gpu_logits or fp8_on_the_gpu or prefill)" > "$OUT/tests.txt" 2>&1
           grep -E "^(FAILED|ERROR)" "$OUT/tests.txt"; tail -3 "$OUT/tests.txt" ;;
    profile) # where a batch-1 step's time goes: GEMV bandwidth per shape, kernels per step (bench/profile_step.py)
           python bench/profile_step.py llama-3-8b
           python bench/profile_step.py llama-3-8b --quant fp8 --variants graph+triton-gemv+fused-mlp+fused-step
           python bench/profile_step.py gpt2 --no-gemv --variants graph+triton-gemv+fused-mlp+fused-step ;;
    attention) # the decode attention's configs (splits/block/warps/stages), every layer in a graph, at batch 1 and 32
           python bench/profile_step.py llama-3-8b --no-gemv --variants "" --attention 3,6,12/16,32,64/4/0,1,2
           python bench/profile_step.py llama-3-8b --batch 32 --no-gemv --variants "" \
             --attention 1,2/32,64,128/4,8/0,1,2 ;;
    grouped) # the CUDA-core GEMV with a grouped accumulator (configs with ACC_R; H100 run 48 adopted them): every
           # config of each GEMM at batch 1 (--sweep, the 8 fastest each), FP8 and bf16, and the step with what
           # tuning picks; with --prefill, the 128-token prefill (TTFT's GPU part) and its kernels, plain and
           # compiled, and each GEMM at 128 rows (about 8 min on an H100)
           F=graph+triton-gemv+fused-mlp+fused-step+pdl
           for q in fp8 none; do
             python bench/profile_step.py llama-3-8b --quant $q --max-len 384 --no-gemv --sweep qkv,dense,fc_gate,proj \
               --prefill --variants $F,graph+compile+triton-gemv+fused-mlp+fused-step+pdl
           done ;;
    prefill) # batch 1, bf16 and FP8: the fused step with the prefill compiled (label part compile: the norms,
           # rotary embedding and FP8 input quantization of the 128 prompt tokens fused; TTFT is part of tok/s; the
           # fused step itself is not compiled, which kept run 47's set-up going past 218 s). About 5 min
           F=graph+triton-gemv+fused-mlp+fused-step+pdl
           for r in llama-3-8b-random-bf16 llama-3-8b-random-fp8; do
             python -m pipeline bench $r --device-random --batch-sizes 1 --repeats 2 --out "$R" --no-baseline \
               --variants $F,graph+compile+triton-gemv+fused-mlp+fused-step+pdl
           done ;;
    profile32) # where a batch-32 step's time goes (the compiled layer-by-layer step that batches > 1 run)
           python bench/profile_step.py llama-3-8b --batch 32 --max-len 384 --no-gemv \
             --variants graph+compile+cublas+fused-mlp ;;
    gpt2)  # batch 1: the default path (the fused step, its prefill compiled, PDL) and the fused step alone
           F=graph+triton-gemv+fused-mlp+fused-step+pdl
           python -m pipeline bench gpt2-random --device-random --batch-sizes 1 --repeats 2 --out "$R" --no-baseline \
             --variants graph+compile+triton-gemv+fused-mlp+fused-step+pdl,$F ;;
    8b)    # batch 1: the fused step (its prefill compiled: run 48), with PDL (the default) and without; batch 32: the
           # compiled layer-by-layer step, which always takes the fused attention kernel and, per GEMM shape, cuBLAS or
           # the split-K kernel, whichever timed faster at warm-up (the runs' tuned-gemm label part; against cuBLAS
           # alone: H100 runs 35-36). About 6 min on an H100: run fp8 in the same call for the FP8 / bf16 ratio
           B=graph+compile+cublas+fused-mlp F=graph+compile+triton-gemv+fused-mlp+fused-step
           python -m pipeline bench llama-3-8b-random-bf16 --device-random --batch-sizes 1,32 --repeats 2 --out "$R" \
             --variants $F+pdl,$F --batched-variants $B ;;
    tests-gemm) # the GPU tests of the batched GEMMs, their tuning (and its cache) and the logits against the CPU
                # (about 3 min)
           python -m pytest -m "gpu or not gpu" -q -p no:cacheprovider --tb=short tests/test_gpu.py \
             tests/test_batched_gemm.py -k "batched_gemm or tuned_gemm or rows or gpu_logits or fp8_on_the_gpu or pdl or tuning" \
             > "$OUT/tests.txt" 2>&1
           grep -E "^(FAILED|ERROR)" "$OUT/tests.txt"; tail -3 "$OUT/tests.txt" ;;
    quick) # batch 1 with the fused step only (no baseline): the 8B shape in bf16, and GPT-2
           python -m pipeline bench llama-3-8b-random-bf16 --device-random --batch-sizes 1 --repeats 2 --out "$R" \
             --no-baseline --variants graph+triton-gemv+fused-mlp+fused-step
           python -m pipeline bench gpt2-random --device-random --batch-sizes 1 --repeats 2 --out "$R" --no-baseline \
             --variants graph+triton-gemv+fused-mlp+fused-step ;;
    fp8)   # batch 1 (the 1.6x target is against the 8b phase's bf16 figure, same card, same call), as 8b runs it
           F=graph+compile+triton-gemv+fused-mlp+fused-step
           python -m pipeline bench llama-3-8b-random-fp8 --device-random --batch-sizes 1 --repeats 2 --out "$R" \
             --no-baseline --variants $F+pdl,$F ;;
    fp8ab) # FP8 against bf16 at batch 1, the fused step without and with PDL (a label without "pdl" turns it
           # off: runs 27-31 measured that way), and the FP8 step's kernels with PDL
           F=graph+triton-gemv+fused-mlp+fused-step
           for r in llama-3-8b-random-bf16 llama-3-8b-random-fp8; do
             python -m pipeline bench $r --device-random --batch-sizes 1 --repeats 2 --out "$R" --no-baseline \
               --variants $F,$F+pdl
           done
           python bench/profile_step.py llama-3-8b --quant fp8 --no-gemv --variants $F+pdl ;;
    nccl)  mpirun -n 2 python bench/nccl_check.py ;;  # collectives stage by stage (NCCL, CUDA graph), 60 s watchdog
    tp2)   # tp=1 and tp=2 of one model (device-random weights are the same for any tp), the same decode path;
           # greedy tokens compared in float32 (bfloat16 tokens of a random 8B model flip on rounding: see README)
           for dtype in bfloat16 float32; do for tp in 1 2; do
             python -m pipeline bench llama-3-8b-random-bf16 parallel.tp=$tp precision.dtype=$dtype --device-random \
               --batch-sizes 1 --repeats 2 --no-baseline --out "$R/$dtype" --watchdog 180 \
               --variants graph+triton-gemv+fused-mlp+fused-step,graph+triton-gemv+fused-mlp+fused-step+pdl
           done
           python bench/compare_tokens.py "$R/$dtype/bench-llama-3-8b-random-bf16-tp1.json" \
             "$R/$dtype/bench-llama-3-8b-random-bf16-tp2.json"; done ;;
    *) echo "unknown phase $phase" ;;
  esac 2>&1 | tee -a "$OUT/log.txt"
done
tar czf "$OUT/results.tgz" -C "$R" . && rm -rf "$R"
echo "=== done $(date -u +%T)" | tee -a "$OUT/log.txt"
