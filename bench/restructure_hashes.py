"""Build every shipped recipe that builds offline and print the sha256 of its convert stage's files.

    PIPELINE_HOME=/tmp/x PYTHONPATH=$PWD python bench/restructure_hashes.py OUT.json [RECIPE ...]
    python bench/restructure_hashes.py --compare BEFORE.json AFTER.json TABLE.md

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
               f"model.tokenizer={os.environ.get('PIPELINE_HOME', 'checkpoints')}/sources/gpt2-tokenizer"]
LLAMA_SMALL = ["model.random=llama-tiny", "build.max_seq_len=256", "build.max_input_len=128",
               "build.max_num_tokens=256"]
HUB_LLAMA_SMALL = ["model.hub=null", "model.revision=null", "model.random=llama-tiny-tied", "model.seed=0",
                   "build.max_seq_len=256", "build.max_input_len=128", "build.max_num_tokens=256"]
NO_GATE = ["eval.gate=null"]
SMOLLM2 = [f"model.local={os.environ.get('PIPELINE_HOME', 'checkpoints')}/sources/smollm2-135m-instruct"]

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


def compare(before_path: Path, after_path: Path, table_path: Path) -> bool:
    """Write the Markdown table of both runs' digests; True when every file of every recipe is identical."""
    before, after = json.loads(before_path.read_text()), json.loads(after_path.read_text())
    lines = ["| recipe (overrides) | file | sha256 before | sha256 after | same |", "|---|---|---|---|---|"]
    same_all = True
    for name, _ in BUILDS:
        b, a = before.get(name, {}), after.get(name, {})
        files = sorted(set(b.get("files", {})) | set(a.get("files", {})))
        if not files:
            same_all = False
            lines.append(f"| {name} | - | {b.get('error', 'missing')[:60]} | {a.get('error', 'missing')[:60]} | no |")
        for i, f in enumerate(files):
            hb, ha = b.get("files", {}).get(f), a.get("files", {}).get(f)
            same = hb is not None and hb == ha
            same_all &= same
            label = f"{name} ({' '.join(o.split('=')[0] + '=' + o.split('=')[1].split('/')[-1] for o in b.get('overrides', []))})" \
                if i == 0 else ""
            lines.append(f"| {label} | {f} | `{(hb or '-')[:16]}` | `{(ha or '-')[:16]}` | {'yes' if same else 'NO'} |")
    table_path.write_text("\n".join(lines) + "\n")
    return same_all


def main() -> None:
    if sys.argv[1] == "--compare":
        sys.exit(0 if compare(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])) else 1)
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
