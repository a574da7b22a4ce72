"""Build every shipped recipe that builds offline and print the sha256 of its convert stage's files.

    PIPELINE_HOME=/tmp/x PYTHONPATH=$PWD python bench/restructure_hashes.py OUT.json

The offline models are the ones `python -m pipeline.offline smollm2-135m-instruct` and `... gpt2-tokenizer`
put under PIPELINE_HOME. Hub recipes are pointed at random weights of a small shape through overrides that keep their converter path
(precision, quantization, parallelism); the fetch and convert stages are removed first so both really run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PY = sys.executable
GPT2_RANDOM = ["model.hub=null", "model.revision=null", "model.random=gpt2", "model.seed=0",
               f"model.tokenizer={os.environ['PIPELINE_HOME']}/sources/gpt2-tokenizer"]
LLAMA_SMALL = ["model.random=llama-tiny", "build.max_seq_len=256", "build.max_input_len=128",
               "build.max_num_tokens=256"]
HUB_LLAMA_SMALL = ["model.hub=null", "model.revision=null", "model.random=llama-tiny-tied", "model.seed=0",
                   "build.max_seq_len=256", "build.max_input_len=128", "build.max_num_tokens=256"]
NO_GATE = ["eval.gate=null"]
SMOLLM2 = [f"model.local={os.environ['PIPELINE_HOME']}/sources/smollm2-135m-instruct"]

BUILDS: list[tuple[str, list[str]]] = [
    ("gpt2-random", GPT2_RANDOM[-1:]),
    ("gpt2-fp16", GPT2_RANDOM),
    ("gpt2-tp2", GPT2_RANDOM),
    ("gpt2-int8wo", GPT2_RANDOM),
    ("gpt2-fp8", GPT2_RANDOM + NO_GATE),
    ("smollm2-135m-bf16-pp2", SMOLLM2),
    ("smollm2-135m-fp16-tp3", SMOLLM2),
    ("smollm2-135m-int8wo", SMOLLM2),
    ("smollm2-135m-int4wo", SMOLLM2),
    ("smollm2-135m-fp8-pp2", SMOLLM2),
    ("llama-3-8b-random-bf16", LLAMA_SMALL),
    ("llama-3-8b-random-fp8", LLAMA_SMALL),
    ("llama-3.1-8b-bf16-tp2", HUB_LLAMA_SMALL),
    ("llama-3.1-8b-fp8-tp2", HUB_LLAMA_SMALL + NO_GATE),
]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    out = Path(sys.argv[1])
    only = set(sys.argv[2:])
    home = Path(os.environ["PIPELINE_HOME"])
    results = json.loads(out.read_text()) if out.exists() else {}
    for name, overrides in BUILDS:
        if only and name not in only:
            continue
        for stage in ("fetch", "convert"):
            shutil.rmtree(home / stage, ignore_errors=True)
        proc = subprocess.run([PY, "-m", "pipeline", "build", name, *overrides, "--quiet"],
                              capture_output=True, text=True, timeout=3000)
        if proc.returncode != 0:
            results[name] = {"overrides": overrides, "error": (proc.stdout + proc.stderr)[-1500:]}
            print(f"{name}: FAILED\n{results[name]['error']}", flush=True)
        else:
            record = json.loads((home / "builds" / f"{name}.json").read_text())
            artifact = Path(record["artifact"])
            files = sorted(p for p in artifact.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
            results[name] = {"overrides": overrides, "files": {p.name: sha256(p) for p in files}}
            print(f"{name}: {len(files)} files", flush=True)
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
