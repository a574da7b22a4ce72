"""Issue 20's check of what a user runs: the wall time of `mpirun -n 1 python -m pipeline.run` (a fresh process:
start-up, load, graphs, 16 new tokens, exit) against transformers' `from_pretrained` + `generate` of the same
tokens in a fresh process, on the same model and prompt, caches warm (one untimed run of each first).

    python bench/run_wall.py ARTIFACT HF_FOLDER [--new-tokens 16] [--repeats 3] [--device cuda] --out DIR

ARTIFACT is a built artifact (`pipeline.run --engine`), HF_FOLDER the same weights as a Hugging Face folder (the
build's fetch stage). Prints Markdown and writes DIR/run-wall.json: each side's wall seconds per run, and ours'
own tok/s line (`[pipeline.run] N new tokens in S s (R tok/s)`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = list(range(1000, 1032))  # 32 token ids, inside every vocabulary used here
OURS_LINE = re.compile(r"\[pipeline\.run\] (\d+) new tokens in ([\d.]+) s \(([\d.]+) tok/s\)")
STARTUP_LINE = re.compile(r"\[pipeline\.run\] start-up: .*")

THEIRS = """
import json, sys, time
start = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
folder, device, new_tokens, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                             device_map=device)
loaded = time.perf_counter()
ids = torch.tensor([prompt], device=device)
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                     do_sample=False, pad_token_id=0)
if device == "cuda":
    torch.cuda.synchronize()
done = time.perf_counter()
print(json.dumps({"new_ids": out[0, len(prompt):].tolist(), "load_s": loaded - start, "generate_s": done - loaded}))
"""


def timed(cmd: list[str], timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("hf_folder", type=Path)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--timeout-s", type=float, default=300)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    mpirun = shutil.which("mpirun") or "mpirun"
    ours = [mpirun, "-n", "1", sys.executable, "-m", "pipeline.run", "--engine", str(args.artifact), "--prompt-ids",
            ",".join(map(str, PROMPT)), "--max-new-tokens", str(args.new_tokens), "--device", args.device,
            "--no-chat-template"]
    theirs = [sys.executable, "-c", THEIRS, str(args.hf_folder), args.device, str(args.new_tokens),
              json.dumps(PROMPT)]
    rows = {"pipeline.run": [], "transformers": []}
    lines, inner, startups = [], [], []
    for i in range(args.repeats + 1):  # the first of each warms the caches (pages, Triton, cuBLAS) and is not kept
        wall_ours, proc = timed(ours, args.timeout_s)
        match = OURS_LINE.search(proc.stderr)
        wall_theirs, proc_t = timed(theirs, args.timeout_s)
        if i:
            rows["pipeline.run"].append(wall_ours)
            rows["transformers"].append(wall_theirs)
            lines.append(match.group(0) if match else "(no tok/s line)")
            startup = STARTUP_LINE.search(proc.stderr)
            startups.append(startup.group(0) if startup else "(no start-up line)")
            inner.append(json.loads(proc_t.stdout.strip().splitlines()[-1]))
    ours_tok_s = [float(m.group(3)) for m in map(OURS_LINE.search, lines) if m]
    result = {"artifact": str(args.artifact), "hf_folder": str(args.hf_folder), "device": args.device,
              "new_tokens": args.new_tokens, "prompt_tokens": len(PROMPT), "wall_s": rows,
              "pipeline_run_lines": lines, "pipeline_run_startup": startups, "transformers_inner": inner,
              "median_wall_s": {k: statistics.median(v) for k, v in rows.items()},
              "pipeline_run_tok_s_median": statistics.median(ours_tok_s) if ours_tok_s else None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "run-wall.json").write_text(json.dumps(result, indent=2))
    med = result["median_wall_s"]
    print(f"# pipeline.run against transformers, {args.new_tokens} new tokens, {args.device}\n")
    print(f"| process | wall s (median of {args.repeats}) | runs |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {med[name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    print(f"\npipeline.run / transformers wall: {med['pipeline.run'] / med['transformers']:.2f}x; pipeline.run's own "
          f"line: {lines[-1] if lines else '-'}; transformers inside its process: load "
          f"{statistics.median(r['load_s'] for r in inner):.2f} s, generate "
          f"{statistics.median(r['generate_s'] for r in inner):.2f} s")
    print(f"\npipeline.run's start-up (last run): {startups[-1] if startups else '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
