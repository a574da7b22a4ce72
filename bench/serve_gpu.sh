#!/usr/bin/env bash
# Serving on one GPU: our server against `transformers serve --continuous-batching`, the same model (Llama-3-8B's
# shape, random bfloat16 weights, GPT-2's tokenizer with a small chat template) and the same requests, in one
# bench-serve run at three request rates. From the repository root on a GPU machine (no network needed):
#   bash bench/serve_gpu.sh                  # RATES=2,8,inf N=100 IN=256 OUTLEN=128 by default
# With the device tool (10 min a call), two calls on the same warm machine, carrying the tokenizer (made here by
# `python -m pipeline.offline gpt2-tokenizer`); the build lands in checkpoints/ (git-ignored, kept between calls):
#   run(command="PHASE=build bash bench/serve_gpu.sh", carry=["checkpoints/sources/gpt2-tokenizer", ".whl"])
#   run(command="bash bench/serve_gpu.sh", carry=["checkpoints/sources/gpt2-tokenizer", ".whl"])
# or both in one call with smaller settings (N=80 RATES=4,16,inf). The GPU image has no fastapi, uvicorn, pydantic or
# openai: `bash bench/serve_gpu.sh wheels` (here, with network) downloads them into .whl/, which the calls carry.
# Results: $OUT/serve-gpu.json and .md (OUT defaults to $OUT of the device tool, else bench/results), the servers'
# logs beside them. Building the 8B artifact writes about 32 GB under $PIPELINE_HOME (about 3 min on an H100).
set -euo pipefail
if [ "${1:-}" = wheels ]; then  # the servers' packages for the GPU image (Python 3.12), versions as requirements.lock
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
  names='fastapi|starlette|uvicorn|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|openai|jiter'
  names+='|distro|sniffio|httpx2|httpcore2|truststore|opentelemetry[-_]api|typing[-_]extensions|idna'
  pins=$(grep -iE "^($names)==" requirements.lock | cut -d' ' -f1)
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
  ls .whl; exit 0
fi
if ! python3 -c "import fastapi, uvicorn, openai" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then  # carried (`wheels`)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
RECIPE=${RECIPE:-llama-3-8b-random-bf16}
DEVICE=${DEVICE:-cuda:0}
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
# transformers serve lists models by scanning the hub cache; without the folder its /v1/models answers 500
export HF_HUB_CACHE=${HF_HUB_CACHE:-$PIPELINE_HOME/hf-hub-cache}

TOKENIZER=checkpoints/sources/gpt2-tokenizer
[ -f "$TOKENIZER/vocab.json" ] || { echo "no $TOKENIZER: run python -m pipeline.offline gpt2-tokenizer where there is \
network and carry it" >&2; exit 2; }
CHAT_TOK=$PIPELINE_HOME/gpt2-tokenizer-chat
HF_DIR=$PIPELINE_HOME/$RECIPE-hf
mkdir -p "$CHAT_TOK" "$HF_DIR" "$HF_HUB_CACHE"

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
timeout 900 python - "$RECIPE" "$CHAT_TOK" "$HF_DIR" > "$OUT/serve-gpu-build.txt" <<'EOF'
import sys
from pathlib import Path
from pipeline.build import Builder
from pipeline.recipe import load_recipe
recipe, chat_tok, hf_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
result = Builder(load_recipe(recipe, [f"model.tokenizer={chat_tok}"]), show_progress=False).run()
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
  --kv-cache-max-tokens "${KV_TOKENS:-262144}" > "$OUT/serve-gpu-ours.log" 2>&1 &
PIDS+=($!)
theirs() {
  timeout 3600 transformers serve "$HF_DIR" --continuous-batching --device "$DEVICE" --dtype bfloat16 "$@" \
    --port $THEIRS_PORT --host 127.0.0.1 > "$OUT/serve-gpu-transformers.log" 2>&1 &
  PIDS+=($!)
}
theirs --cb-max-memory-percent 0.3
sleep 20
if ! kill -0 "${PIDS[1]}" 2>/dev/null; then  # an older transformers without that option: its default memory share
  tail -5 "$OUT/serve-gpu-transformers.log"; echo "transformers serve ended; again without --cb-max-memory-percent"
  PIDS=("${PIDS[0]}"); theirs
fi
# Up = any HTTP answer (transformers serve has no health route; the model is named below, not looked up).
for url in http://127.0.0.1:$OURS_PORT/health http://127.0.0.1:$THEIRS_PORT/v1/models; do
  for _ in $(seq 150); do  # up to 300 s; a server that ended stops the wait
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$url")" != 000 ] && break
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a server ended" >&2; tail -20 "$OUT"/serve-gpu-*.log; exit 1; }; done
    sleep 2
  done
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$url")" != 000 ] || { echo "no answer from $url after 300 s" >&2; tail -20 "$OUT"/serve-gpu-*.log; exit 1; }
done

timeout 3000 python -m pipeline bench-serve --url http://127.0.0.1:$OURS_PORT \
  --baseline-url http://127.0.0.1:$THEIRS_PORT --baseline-model "$HF_DIR" --num-prompts "$N" --input-len "$IN" --output-len "$OUTLEN" \
  --rates "$RATES" --no-ignore-eos --slo-ttft-ms 2000 --slo-tpot-ms 100 --out "$OUT/serve-gpu"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >> "$OUT/serve-gpu.md" || true
