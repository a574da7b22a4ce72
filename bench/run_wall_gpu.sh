#!/usr/bin/env bash
# Issue 20's check of `pipeline.run` on a GPU, in one call (about 6 min on an H200 with the build; 3 without):
#   run(command="bash bench/run_wall_gpu.sh", carry=["checkpoints/sources/gpt2-tokenizer", ".whl"])
# The 8B random artifact and its Hugging Face folder as bench/serve_gpu.sh builds them (PHASE=build; cached under
# its PIPELINE_HOME, so a serve call on the same warm machine reuses them), then bench/run_wall.py (fresh processes:
# `mpirun -n 1 python -m pipeline.run`, 16 new tokens, against transformers' from_pretrained + generate), then the
# bench's batch-1 figure in the same call on the same request (32 prompt tokens, 16 new: its tok/s counts the
# prompt step as ours does; `python -m pipeline bench`, device-random weights of the same shape).
set -euo pipefail
OUT=${OUT:-bench/results}
export PIPELINE_HOME=${PIPELINE_HOME:-$PWD/checkpoints/serve-gpu-home} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The GPU image sets PYTHONDONTWRITEBYTECODE: every process compiled torch's, transformers' and sklearn's modules
# from source (7-12 s, both sides; run-wall2/run-profile.txt). Writing bytecode to a cache folder gives both sides
# what an installed Python has.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-$PIPELINE_HOME/pycache}
RECIPE=${RECIPE:-llama-3-8b-random-bf16}
PHASE=build RECIPE=$RECIPE bash bench/serve_gpu.sh
ARTIFACT=$(tail -1 "$OUT/serve-gpu-build.txt")
timeout 420 python bench/run_wall.py "$ARTIFACT" "$PIPELINE_HOME/$RECIPE-hf" --repeats 2 --out "$OUT" \
  | tee "$OUT/run-wall.md"
# one more run under cProfile (the main thread: imports, check, load, graphs, warm-up, generate, shutdown), for
# where the start-up time goes
PROMPT=$(python -c "print(','.join(map(str, range(1000, 1032))))")
timeout 200 python -m cProfile -o "$OUT/run.prof" -m pipeline.run --engine "$ARTIFACT" --prompt-ids "$PROMPT" \
  --max-new-tokens 16 --no-chat-template > /dev/null 2> "$OUT/run-profiled-stderr.txt" || true
timeout 60 python -c "import pstats, sys; s = pstats.Stats(sys.argv[1]); s.sort_stats('cumulative').print_stats(60); \
s.sort_stats('tottime').print_stats(30)" "$OUT/run.prof" > "$OUT/run-profile.txt" 2>&1 || true
timeout 150 python -m pipeline bench "$RECIPE" --device-random --batch-sizes 1 --no-baseline --repeats 2 \
  --variants graph+triton-gemv+fused-mlp+fused-step+pdl --input-len 32 --output-len 16 --out "$OUT/bench" \
  | grep -E "^\||roofline" | tee -a "$OUT/run-wall.md"
