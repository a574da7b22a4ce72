"""Conversion at scale: wall time and peak memory of the streaming converter against `cp` and a whole-model baseline.

    python bench/convert_bench.py                       # 1B and 8B shapes, baseline on the largest that fits
    python bench/convert_bench.py --shapes llama-3.2-1b --baseline-shapes llama-3.2-1b   # quick

For each shape it writes a random-weight Hugging Face checkpoint in bfloat16 (2 GB shards), then measures, each in
its own process (wall time, and peak RSS from wait4):
- cp -r of the source folder: the floor for reading and writing the same bytes on this disk;
- this project's converter (python -m pipeline.convert) at tp=1 and tp=2 in bfloat16, and tp=2 with FP8 weights
  (weight scales and E4M3 weights; activation scales come from calibration, which is not part of this benchmark);
- the same tp=2 conversion with 1 and 4 workers, comparing the sha256 of every rank file;
- a baseline that does what TensorRT-LLM's convert_checkpoint.py does: transformers from_pretrained of the whole
  model, then split every tensor per rank in memory and save_file each rank (on the shapes given).
Results: a JSON and a Markdown table under bench/results/, with the machine they ran on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def vm_hwm_kib(pid: int | str = "self") -> int:
    """Peak resident memory of a process's own address space (VmHWM). Unlike ru_maxrss, it does not include the
    memory of the parent that forked it (Linux records the pre-exec address space into ru_maxrss)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str]) -> dict:
    """Run a command; return wall seconds, its peak RSS (GiB), exit code and its last output.

    The peak is the larger of VmHWM sampled every 10 ms and the VmHWM the child prints itself on exit
    (a line `VmHWM_KiB=<n>`, which the children of this script and python -m pipeline.convert print)."""
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, vm_hwm_kib(proc.pid))
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        out.seek(0)
        output = out.read().decode(errors="replace")
    for line in output.splitlines():
        if line.startswith("VmHWM_KiB="):
            peak = max(peak, int(line.split("=")[1]))
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(peak / 1024**2, 3),
            "returncode": proc.returncode, "output": output[-1500:]}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def rank_digests(path: Path) -> dict[str, str]:
    out = {}
    for f in sorted(path.glob("rank*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while block := fh.read(16 << 20):
                h.update(block)
        out[f.name] = h.hexdigest()
    return out


# ------------------------------------------------------------------------------------------------ children


def child_fp8(source: str, output: str, tp: int, workers: int) -> None:
    """Convert with FP8 weights (per-tensor scales of the unsplit tensors, q/k/v shared), no activation scales."""
    import torch

    from pipeline.architectures import describe
    from pipeline.convert import read_hf_config
    from pipeline.convert.streaming import execute_plan, plan_conversion
    from pipeline.quantize.checkpoint import source_amax
    from pipeline.quantize.formats import fp8_scale, quantize_fp8
    from pipeline.safetensors_io import SafetensorsIndex

    start = time.perf_counter()
    index = SafetensorsIndex.from_folder(Path(source))
    plan = plan_conversion(index, describe(read_hf_config(Path(source))), tp, 1, "bfloat16")
    amax: dict[str, float] = {}
    for rank, specs in enumerate(plan.targets):
        for name, spec in list(specs.items()):
            if not spec.gemm:
                continue
            sources = plan.sources_of(rank, name)
            for s in sources:
                if s not in amax:
                    amax[s] = source_amax(index, s)
            scale = fp8_scale(max(amax[s] for s in sources))
            spec.dtype = torch.float8_e4m3fn
            spec.encode = lambda block, s=scale: quantize_fp8(block, s)
            plan.add_literal(rank, name.removesuffix(".weight") + ".weights_scaling_factor", scale)
    out = Path(output)
    out.mkdir(parents=True)
    execute_plan(plan, index, out, workers=workers)
    print(f"fp8 weights: {time.perf_counter() - start:.1f} s")
    print(f"VmHWM_KiB={vm_hwm_kib()}")


def child_baseline(source: str, output: str, tp: int) -> None:
    """What TensorRT-LLM's LLaMA convert_checkpoint.py does: load the HF model whole, split per rank, save."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    cfg = model.config
    sd = model.state_dict()
    nkv, hd = cfg.num_key_value_heads, cfg.head_dim
    out = Path(output)
    out.mkdir(parents=True)
    vocab = cfg.vocab_size
    padded = -(-vocab // tp) * tp
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    for rank in range(tp):
        w = {"transformer.vocab_embedding.weight": sd["model.embed_tokens.weight"].clone(),
             "transformer.ln_f.weight": sd["model.norm.weight"].clone(),
             "lm_head.weight": torch.chunk(torch.nn.functional.pad(head, (0, 0, 0, padded - vocab)), tp)[rank].clone()}
        for layer in range(cfg.num_hidden_layers):
            s, o = f"model.layers.{layer}.", f"transformer.layers.{layer}."
            q = torch.chunk(sd[s + "self_attn.q_proj.weight"], tp)[rank]
            k = torch.chunk(sd[s + "self_attn.k_proj.weight"].reshape(nkv, hd, -1), tp)[rank].reshape(-1, q.shape[1])
            v = torch.chunk(sd[s + "self_attn.v_proj.weight"].reshape(nkv, hd, -1), tp)[rank].reshape(-1, q.shape[1])
            w[o + "attention.qkv.weight"] = torch.cat([q, k, v]).contiguous()
            w[o + "attention.dense.weight"] = torch.chunk(sd[s + "self_attn.o_proj.weight"], tp, 1)[rank].contiguous()
            w[o + "mlp.fc.weight"] = torch.chunk(sd[s + "mlp.gate_proj.weight"], tp)[rank].contiguous()
            w[o + "mlp.gate.weight"] = torch.chunk(sd[s + "mlp.up_proj.weight"], tp)[rank].contiguous()
            w[o + "mlp.proj.weight"] = torch.chunk(sd[s + "mlp.down_proj.weight"], tp, 1)[rank].contiguous()
            w[o + "input_layernorm.weight"] = sd[s + "input_layernorm.weight"].clone()
            w[o + "post_layernorm.weight"] = sd[s + "post_attention_layernorm.weight"].clone()
        save_file(w, out / f"rank{rank}.safetensors")
        del w
    print(f"VmHWM_KiB={vm_hwm_kib()}")


# ------------------------------------------------------------------------------------------------ driver


def measure_shape(shape: str, work: Path, baseline: bool, log) -> dict:
    from pipeline.random_weights import make_random_checkpoint
    from pipeline.safetensors_io import SafetensorsIndex

    src = work / f"src-{shape}"
    result: dict = {"shape": shape}
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        start = time.perf_counter()
        make_random_checkpoint(shape, 0, src, dtype="bfloat16")
        result["generate_seconds"] = round(time.perf_counter() - start, 1)
    index = SafetensorsIndex.from_folder(src)
    largest = max(index.infos.values(), key=lambda i: i.nbytes)
    result.update(source_gb=round(folder_bytes(src) / 1e9, 3), files=len(list(src.glob("*.safetensors"))),
                  largest_tensor=largest.name, largest_tensor_gb=round(largest.nbytes / 1e9, 3))
    log(f"[{shape}] {result['source_gb']} GB in {result['files']} files; largest tensor {largest.name} "
        f"{result['largest_tensor_gb']} GB")

    def fresh(name: str) -> Path:
        path = work / name
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path.parent / f".tmp-{path.name}", ignore_errors=True)
        return path

    runs = {}
    out = fresh("cp-copy")
    runs["cp -r (floor)"] = run_measured(["cp", "-r", str(src), str(out)])
    shutil.rmtree(out)
    again = run_measured(["cp", "-r", str(src), str(out)])
    shutil.rmtree(out)
    if again["seconds"] < runs["cp -r (floor)"]["seconds"]:
        runs["cp -r (floor)"] = again
    convert = [sys.executable, "-m", "pipeline.convert", str(src)]
    for label, extra, workers in (("ours tp=1 bf16", ["--tp", "1"], 2), ("ours tp=2 bf16", ["--tp", "2"], 2)):
        out = fresh("ours")
        cmd = [*convert, str(out), *extra, "--dtype", "bfloat16", "--workers", str(workers)]
        runs[label] = run_measured(cmd)
        shutil.rmtree(out)
        again = run_measured(cmd)
        if again["seconds"] < runs[label]["seconds"]:
            runs[label] = {**again, "peak_rss_gib": max(again["peak_rss_gib"], runs[label]["peak_rss_gib"])}
        runs[label]["workers"] = workers
    shutil.rmtree(work / "ours", ignore_errors=True)
    out = fresh("ours-fp8")
    runs["ours tp=2 fp8 weights"] = run_measured([sys.executable, __file__, "--child", "fp8", str(src), str(out),
                                                  "--tp", "2", "--workers", "2"])
    shutil.rmtree(out)
    digests = {}
    for workers in (1, 4):
        out = fresh(f"ours-w{workers}")
        label = f"ours tp=2 bf16, {workers} worker(s)"
        runs[label] = run_measured([*convert, str(out), "--tp", "2", "--dtype", "bfloat16", "--workers", str(workers)])
        digests[workers] = rank_digests(out)
        if workers == 4:
            shutil.rmtree(work / "ours-w1")
            shutil.rmtree(out)
    result["same_sha256_for_1_and_4_workers"] = digests[1] == digests[4] and bool(digests[1])
    result["rank_sha256"] = digests[1]
    if baseline:
        out = fresh("baseline")
        cmd = [sys.executable, __file__, "--child", "baseline", str(src), str(out), "--tp", "2"]
        first = run_measured(cmd)
        shutil.rmtree(out, ignore_errors=True)
        again = run_measured(cmd)
        shutil.rmtree(out, ignore_errors=True)
        best = again if again["seconds"] < first["seconds"] else first
        runs["baseline tp=2 bf16 (from_pretrained + split + save_file)"] = {
            **best, "peak_rss_gib": max(first["peak_rss_gib"], again["peak_rss_gib"])}
    for label, r in runs.items():
        log(f"[{shape}] {label:<58} {r['seconds']:8.1f} s  peak RSS {r['peak_rss_gib']:6.2f} GiB  rc={r['returncode']}")
        if r["returncode"] != 0:
            log(r["output"])
    result["runs"] = runs
    return result


def machine() -> dict:
    mem = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {"host": platform.node(), "cpus": os.cpu_count(), "memory_gib": round(mem / 1024**2, 1),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "commit": commit.strip()}


def markdown(results: list[dict], info: dict) -> str:
    lines = [f"# Conversion at scale ({info['date']}, {info['host']}: {info['cpus']} CPUs, {info['memory_gib']} GiB, "
             f"commit {info['commit']})", "",
             "Random-weight Hugging Face checkpoints in bfloat16 (2 GB shards). Each row is a separate process; wall "
             "time is the faster of two runs (the page cache makes single runs noisy), peak RSS the larger (VmHWM of "
             "the process). `cp -r` copies the same bytes on the same disk (the floor).", ""]
    for r in results:
        lines += [f"## {r['shape']}: {r['source_gb']} GB, largest tensor {r['largest_tensor']} "
                  f"({r['largest_tensor_gb']} GB)", "",
                  "| run | wall (s) | vs cp | peak RSS (GiB) |", "|---|---|---|---|"]
        floor = max(r["runs"]["cp -r (floor)"]["seconds"], 0.01)
        for label, run in r["runs"].items():
            ok = "" if run["returncode"] == 0 else f" (failed, rc {run['returncode']})"
            lines.append(f"| {label}{ok} | {run['seconds']:.1f} | {run['seconds'] / floor:.2f}x | "
                         f"{run['peak_rss_gib']:.2f} |")
        lines += ["", f"Rank files identical (sha256) with 1 and 4 workers: {r['same_sha256_for_1_and_4_workers']}.",
                  ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b")
    p.add_argument("--baseline-shapes", default="llama-3.2-1b,llama-3.2-3b",
                   help="shapes to run the whole-model baseline on (it needs about 2x the model in RAM)")
    p.add_argument("--work", type=Path, default=REPO / "checkpoints" / "bench-convert")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "convert")
    p.add_argument("--child", choices=("fp8", "baseline"))
    p.add_argument("args", nargs="*")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    if args.child == "fp8":
        child_fp8(*args.args, tp=args.tp, workers=args.workers)
        return 0
    if args.child == "baseline":
        child_baseline(*args.args, tp=args.tp)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    shapes = args.shapes.split(",")
    baseline = set(args.baseline_shapes.split(",")) if args.baseline_shapes else set()
    shapes += [s for s in baseline if s not in shapes]
    results = []
    for shape in shapes:
        results.append(measure_shape(shape, args.work, shape in baseline, lambda m: print(m, flush=True)))
        info = machine()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
        Path(f"{args.out}.md").write_text(markdown(results, info))
    print(Path(f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
