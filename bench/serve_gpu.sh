#!/usr/bin/env bash
# Serving on one GPU: our server against `transformers serve --continuous-batching`, the same model (Llama-3-8B's
# shape, random bfloat16 weights, GPT-2's tokenizer with a small chat template) and the same requests, in one
# bench-serve run at three request rates. From the repository root on a GPU machine (no network needed):
#   bash bench/serve_gpu.sh                  # RATES=2,8,inf N=100 IN=256 OUTLEN=128 by default
# With the device tool (10 min a call), two calls on the same warm machine, carrying the tokenizer (made here by
# `python -m pipeline.offline gpt2-tokenizer`); the build lands in checkpoints/ (git-ignored, kept between calls):
#   run(command="PHASE=build bash bench/serve_gpu.sh", carry=["checkpoints/sources/gpt2-tokenizer"], timeout_s=600)
#   run(command="bash bench/serve_gpu.sh", carry=["checkpoints/sources/gpt2-tokenizer"], timeout_s=600)
# Results: $OUT/serve-gpu.json and .md (OUT defaults to $OUT of the device tool, else bench/results), the servers'
# logs beside them. Building the 8B artifact writes about 32 GB under $PIPELINE_HOME (about 3 min on an H100).
set -euo pipefail
OUT=${OUT:-bench/results}
RATES=${RATES:-2,8,inf}
N=${N:-100}
PHASE=${PHASE:-all}
IN=${IN:-256}
OUTLEN=${OUTLEN:-128}
OURS_PORT=8000
THEIRS_PORT=8001
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PIPELINE_HOME=${PIPELINE_HOME:-$PWD/checkpoints/serve-gpu-home}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

TOKENIZER=checkpoints/sources/gpt2-tokenizer
[ -f "$TOKENIZER/vocab.json" ] || { echo "no $TOKENIZER: run python -m pipeline.offline gpt2-tokenizer where there is \
network and carry it" >&2; exit 2; }
CHAT_TOK=$PIPELINE_HOME/gpt2-tokenizer-chat
HF_DIR=$PIPELINE_HOME/llama-3-8b-random-hf
mkdir -p "$CHAT_TOK" "$HF_DIR"

# A tokenizer with a chat template (GPT-2's has none); its ids are all inside Llama-3's 128,256-token vocabulary.
timeout 120 python - "$TOKENIZER" "$CHAT_TOK" <<'EOF'
import json, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for f in src.iterdir():
    if f.name != "provenance.json":
        shutil.copyfile(f, dst / f.name)
config = json.loads((dst / "tokenizer_config.json").read_text())
config["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
(dst / "tokenizer_config.json").write_text(json.dumps(config))
EOF

# Build (cached): the fetch stage's Hugging Face folder is what transformers serves, the artifact is what we serve.
timeout 900 python - "$CHAT_TOK" "$HF_DIR" > "$OUT/serve-gpu-build.txt" <<'EOF'
import sys
from pathlib import Path
from pipeline.build import Builder
from pipeline.recipe import load_recipe
chat_tok, hf_dir = sys.argv[1], Path(sys.argv[2])
result = Builder(load_recipe("llama-3-8b-random-bf16", [f"model.tokenizer={chat_tok}"]), show_progress=False).run()
source = Path(result.stages[0].path)
for f in list(source.iterdir()) + list(Path(chat_tok).iterdir()):  # weights linked, tokenizer files copied
    target = hf_dir / f.name
    if not target.exists():
        target.symlink_to(f.resolve())
print(result.artifact)
EOF
ARTIFACT=$(tail -1 "$OUT/serve-gpu-build.txt")
echo "artifact $ARTIFACT, transformers folder $HF_DIR"
[ "$PHASE" = build ] && exit 0

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 5
            for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
# Both on the one GPU at once: the KV caches are capped so that the two fit (8B bf16 is 16 GB each).
timeout 3600 python -m pipeline.serve --engine "$ARTIFACT" --port $OURS_PORT --no-verify --max-batch-size 64 \
  --kv-cache-max-tokens 262144 > "$OUT/serve-gpu-ours.log" 2>&1 &
PIDS+=($!)
timeout 3600 transformers serve "$HF_DIR" --continuous-batching --device cuda:0 --dtype bfloat16 \
  --cb-max-memory-percent 0.3 --port $THEIRS_PORT --host 127.0.0.1 > "$OUT/serve-gpu-transformers.log" 2>&1 &
PIDS+=($!)
for url in http://127.0.0.1:$OURS_PORT/health http://127.0.0.1:$THEIRS_PORT/v1/models; do
  for _ in $(seq 300); do curl -sf "$url" > /dev/null && break; sleep 2; done
  curl -sf "$url" > /dev/null || { echo "no answer from $url after 600 s" >&2; tail -20 "$OUT"/serve-gpu-*.log; exit 1; }
done

timeout 3000 python -m pipeline bench-serve --url http://127.0.0.1:$OURS_PORT \
  --baseline-url http://127.0.0.1:$THEIRS_PORT --num-prompts "$N" --input-len "$IN" --output-len "$OUTLEN" \
  --rates "$RATES" --no-ignore-eos --slo-ttft-ms 2000 --slo-tpot-ms 100 --out "$OUT/serve-gpu"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >> "$OUT/serve-gpu.md"
