"""The engine's bfloat16 GEMMs alone on a GPU, at a decoding step's rows and a prefill chunk's: time and TFLOP/s of
each Llama-3-8B projection (x [M, K] @ W[N, K]^T through F.linear, as the engine runs them) under torch's cuBLAS
and cuBLASLt backends, to see which shapes fall short of the card's GEMM rate (e.g. from wave quantization); with
--int8 / --w8a8 the int8 forms beside them. Times are of calls replayed from a CUDA graph (GPU time only):

    python bench/gemm_shapes.py --rows 1000,1024,16384
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (6144, 4096), "dense": (4096, 4096), "fc_gate": (28672, 4096), "proj": (4096, 14336),
          "lm_head": (128256, 4096)}


def time_ms(fn, iters: int = 50) -> float:
    """Mean GPU time of fn over `iters` calls captured in one CUDA graph (no host launch cost in the figure)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compiles and loads kernels outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1000,1024,16384")
    p.add_argument("--backends", default="cublas,cublaslt")
    p.add_argument("--int8", action="store_true", help="also torch._int_mm (cuBLASLt's int8 x int8 -> int32)")
    p.add_argument("--w8a8", action="store_true", help="also pipeline.kernels.int8_gemm: the GEMM at each config "
                   "and at the one it chooses, and the whole W8A8 linear (quantization + GEMM)")
    p.add_argument("--out")
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for backend in args.backends.split(","):
        torch.backends.cuda.preferred_blas_library(backend)
        for m in rows:
            for name, (n, k) in SHAPES.items():
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                ms = time_ms(lambda: F.linear(x, w))
                tflops = 2 * m * n * k / ms / 1e9
                results.append({"backend": backend, "rows": m, "gemm": name, "ms": round(ms, 4),
                                "tflop_s": round(tflops, 1)})
                print(f"{backend:9s} M={m:6d} {name:8s} {ms:8.4f} ms {tflops:7.1f} TFLOP/s", flush=True)
                if args.int8:
                    from pipeline.quantize.formats import int8_weight_quantize

                    xq = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
                    wt = int8_weight_quantize(w, per_channel=True)[0].t()
                    t = time_ms(lambda: torch._int_mm(xq, wt))
                    results.append({"backend": backend, "rows": m, "gemm": name, "form": "int_mm", "ms": round(t, 4),
                                    "vs_bf16": round(ms / t, 2)})
                    print(f"{'':9s} int_mm  {name:8s} {t:8.4f} ms {ms / t:5.2f}x bf16", flush=True)
                if args.w8a8:
                    from pipeline.kernels import int8_gemm
                    from pipeline.quantize.formats import int8_weight_quantize

                    wq, ws = int8_weight_quantize(w, per_channel=True)
                    xq, xs = int8_gemm.quantize_rows(x)
                    best = None
                    for c in int8_gemm.CONFIGS:
                        config = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                        try:
                            t = time_ms(lambda: int8_gemm.int8_mm(xq, xs, wq, ws, None, torch.bfloat16, config))
                        except Exception as exc:  # noqa: BLE001 - a config that does not fit is skipped
                            print(f"{'':9s} {str(config):60s} failed: {type(exc).__name__}", flush=True)
                            continue
                        best = t if best is None else min(best, t)
                        print(f"{'':9s} {str(config):60s} {t:8.4f} ms {ms / t:5.2f}x bf16", flush=True)
                    forms = (("quantize", lambda: int8_gemm.quantize_rows(x)),
                             ("chosen", lambda: int8_gemm.int8_mm(xq, xs, wq, ws, None, torch.bfloat16)),
                             ("linear", lambda: int8_gemm.w8a8_linear(x, wq, ws, None, None, None)))
                    for label, fn in forms:
                        t = time_ms(fn)
                        results.append({"rows": m, "gemm": name, "form": f"triton-{label}", "ms": round(t, 4),
                                        "vs_bf16": round(ms / t, 2)})
                        print(f"{'':9s} triton {label:8s} {name:8s} {t:8.4f} ms {ms / t:5.2f}x bf16", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
