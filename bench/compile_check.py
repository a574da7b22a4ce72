"""Compile the decode kernels (pipeline/kernels/) for a GPU without one: Triton's compiler and the ptxas of its wheel turn each
kernel into a cubin for the target (default sm_90, Hopper), so a kernel that would not compile is found on the CPU
before a GPU call is spent on it. Triton's CPU emulator runs the same kernels but never compiles them, and some
paths run only compiled (programmatic dependent launch with its early weight load, the tensor-core forms at FP8,
autotuned configs). Some checks read the PTX: griddepcontrol only with PDL, the first weight tile loaded before its wait,
FP8 wgmma in the swap-AB form.

    python bench/compile_check.py [--arch 90]

Prints one line per compiled kernel and exits 1 if any failed.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton loads: the real compiler, not the emulator
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pipeline.kernels import (  # noqa: E402, E501
    activation,
    attention,
    batched_gemm,
    gemv,
    int4_gemm,
    int8_gemm,
    paged_attention,
    sampling,
)
from pipeline.kernels import fp8 as fp8_kernels  # noqa: E402
from pipeline.kernels import norm as norm_kernels  # noqa: E402
from pipeline.kernels.common import ACT_GELU, ACT_NONE, ACT_SILU_GATE, NORM_LAYER, NORM_NONE, NORM_RMS  # noqa: E402

SHARED_LIMIT = 227 * 1024  # the shared memory one block may use on an H100/H200
GEMV_POINTERS = ("x_ptr", "r_ptr", "h_out_ptr", "nw_ptr", "nb_ptr", "w_ptr", "b_ptr", "y_ptr", "a_scale_ptr",
                 "w_scale_ptr")


def gemv_signature(dtype: str, weight: str, out: str) -> dict:
    types = {name: f"*{dtype}" for name in GEMV_POINTERS}
    types.update(w_ptr=f"*{weight}", y_ptr=f"*{out}", a_scale_ptr="*fp32", w_scale_ptr="*fp32")
    scalars = {"N": "i32", "K": "i32", "eps": "fp32"}
    split = {"part_ptr": "*fp32", "counter_ptr": "*i32"}  # split-K's sums and counters
    return {**types, **split, **scalars}


def cases():
    """(name, kernel, signature, constexprs, options): the forms the fused step runs, each dtype once."""
    common = dict(ADD_RESIDUAL=True, HAS_BIAS=False, EVEN_K=True)
    for dtype, weight, fp8 in (("bf16", "bf16", False), ("fp16", "fp8e4nv", True), ("fp32", "fp32", False)):
        for dot in (0, 1, 2):
            for pdl in (False, True):
                if dtype == "fp32" and dot:
                    continue  # float32 weights run the FMA form whatever USE_DOT says
                constexprs = dict(common, NORM=NORM_RMS, FP8=fp8, ACT=ACT_SILU_GATE, BLOCK_N=64 if dot == 2
                                  else 16 if dot == 1 else 4, BLOCK_K=256, W_F32=dtype == "fp32", USE_DOT=dot, PDL=pdl)
                yield (f"fused_gemv {weight} USE_DOT={dot} pdl={pdl}", gemv._fused_gemv,
                       gemv_signature(dtype, weight, dtype), constexprs, dict(launch_pdl=pdl))
    for dtype, weight, fp8 in (("bf16", "bf16", False), ("bf16", "fp8e4nv", True)):  # the grouped accumulator
        constexprs = dict(common, NORM=NORM_RMS, FP8=fp8, ACT=ACT_SILU_GATE, BLOCK_N=4, BLOCK_K=2048,
                          W_F32=False, USE_DOT=0, PDL=True, ACC_R=8)
        yield (f"fused_gemv {weight} USE_DOT=0 ACC_R=8", gemv._fused_gemv, gemv_signature(dtype, weight, dtype),
               constexprs, dict(launch_pdl=True))
    layer = dict(common, NORM=NORM_LAYER, FP8=False, ACT=ACT_GELU, HAS_BIAS=True, BLOCK_N=4, BLOCK_K=256,
                 W_F32=False, USE_DOT=0, EVEN_K=False, PDL=False)
    yield "fused_gemv fp16 LayerNorm+GELU+bias", gemv._fused_gemv, gemv_signature("fp16", "fp16", "fp16"), layer, {}
    # every autotuning config, at the 8B shape's dtypes (a config that does not compile would stop autotuning)
    for config in gemv.CONFIGS:
        for dtype, weight in (("bf16", "bf16"), ("bf16", "fp8e4nv")):
            if config.kwargs.get("SPLIT_K", 1) > 1 and weight != "fp8e4nv":
                continue  # autotuning times split-K for FP8 only (the one-pass RMSNorm cannot split K)
            constexprs = dict(common, NORM=NORM_RMS, FP8=weight == "fp8e4nv", ACT=ACT_SILU_GATE, W_F32=False,
                              PDL=False, **config.kwargs)
            yield (f"fused_gemv {weight} config {config}", gemv._fused_gemv, gemv_signature(dtype, weight, dtype),
                   constexprs, dict(num_warps=config.num_warps, num_stages=config.num_stages))
    # split-K at FP8 (what the autotuning configs with SPLIT_K cover), and with LayerNorm (its statistics pass)
    for norm, act, split in ((NORM_RMS, ACT_SILU_GATE, 4), (NORM_NONE, ACT_NONE, 2)):
        constexprs = dict(common, NORM=norm, FP8=True, ACT=act, W_F32=False, PDL=True, BLOCK_N=64, BLOCK_K=128,
                          USE_DOT=2, SPLIT_K=split)
        yield (f"fused_gemv fp8e4nv split-K={split} norm={norm} pdl", gemv._fused_gemv,
               gemv_signature("bf16", "fp8e4nv", "bf16"), constexprs, dict(launch_pdl=True))
    # the batched GEMM's split-K swap-AB kernel (pipeline.kernels.batched_gemm), every config, at 32 rows
    for config in batched_gemm.CONFIGS:
        for dtype, bias, act in (("bf16", False, ACT_NONE), ("bf16", True, ACT_SILU_GATE)):
            signature = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
                         "part_ptr": "*fp32", "counter_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32"}
            constexprs = dict(HAS_BIAS=bias, M_P=32, EVEN_K=True, ACT=act, F32_DOT=False, **config.kwargs)
            yield (f"skinny_gemm {dtype} bias={bias} act={act} config {config}",
                   batched_gemm._skinny_gemm,
                   signature, constexprs, dict(num_warps=config.num_warps, num_stages=config.num_stages))
    # splits > 1: flash-decoding (6 is what batch 1 of the 8B shape gets at 384 slots)
    # preload: the split's first cache block loaded before griddepcontrol.wait (checked in main)
    for dtype, rope, pdl, splits, preload in (("bf16", True, True, 1, False), ("fp16", False, False, 1, False),
                                              ("fp32", True, False, 1, False), ("bf16", True, True, 6, False),
                                              ("fp32", True, False, 3, False), ("bf16", True, True, 6, True),
                                              ("bf16", True, True, 1, True)):
        signature = {name: f"*{dtype}" for name in ("qkv_ptr", "k_ptr", "v_ptr", "out_ptr")}
        signature.update(valid_ptr="*u8", pos_ptr="*i64", slot_ptr="*i64", inv_freq_ptr="*fp32", part_ptr="*fp32",
                         counter_ptr="*i32", max_len="i32", scale="fp32")
        constexprs = dict(HEADS=32, KV_HEADS=8, D=128, GROUP_P=16, D_P=128, ROPE=rope, IEEE=dtype == "fp32",
                          BLOCK_S=attention.attention_block(splits), SPLITS=splits, PDL=pdl, PRELOAD=preload)
        stages = attention.attention_stages(splits)
        yield (f"decode_attention {dtype} rope={rope} pdl={pdl} splits={splits} preload={preload}",
               attention._decode_attention_kernel, signature, constexprs,
               dict(launch_pdl=pdl, **({"num_stages": stages} if stages else {})))


def int4_cases():
    """The W4A16_AWQ kernels (pipeline.kernels.int4_gemm): every autotuning config of the GEMM of any rows, and of
    the fused step's GEMV (RMSNorm prologue, silu-gate epilogue), with programmatic dependent launch once."""
    pointers = {"x_ptr": "*bf16", "pq_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*bf16", "b_ptr": "*bf16",
                "y_ptr": "*bf16"}
    sizes = {"M": "i32", "N": "i32", "K": "i32", "KP": "i32", "GROUPS": "i32", "M_BUCKET": "i32"}
    for config in int4_gemm.CONFIGS:
        constexprs = dict(HAS_PQ=True, HAS_BIAS=False, GROUP=128, EVEN_K=True, F32_DOT=False, **config.kwargs)
        yield (f"int4_mm bf16 config {config}", int4_gemm._int4_mm, {**pointers, **sizes}, constexprs,
               dict(num_warps=config.num_warps, num_stages=config.num_stages))
    fused = {**pointers, "r_ptr": "*bf16", "h_out_ptr": "*bf16", "nw_ptr": "*bf16", "N": "i32", "K": "i32",
             "KP": "i32", "GROUPS": "i32", "eps": "fp32"}
    for config in int4_gemm.FUSED_CONFIGS:
        constexprs = dict(ADD_RESIDUAL=True, NORM=NORM_RMS, HAS_PQ=True, HAS_BIAS=False, ACT=ACT_SILU_GATE, GROUP=128,
                          EVEN_K=True, PDL=False, **config.kwargs)
        yield (f"int4_fused_gemv bf16 config {config}", int4_gemm._int4_fused_gemv, fused, constexprs,
               dict(num_warps=config.num_warps, num_stages=config.num_stages))
    constexprs = dict(ADD_RESIDUAL=False, NORM=NORM_NONE, HAS_PQ=True, HAS_BIAS=True, ACT=ACT_NONE, GROUP=128,
                      EVEN_K=False, PDL=True, BLOCK_H=16, BLOCK_K=128, BLOCK_M=1, DOT=0)
    yield "int4_fused_gemv bf16 ragged K, bias, pdl", int4_gemm._int4_fused_gemv, fused, constexprs, \
        dict(launch_pdl=True)


def int8_cases():
    """The W8A8 kernels (pipeline.kernels.int8_gemm): the per-token quantization with a smoother, and every
    config of the int8 GEMM (checked to reach an int8 tensor-core instruction)."""
    signature = {"x_ptr": "*bf16", "smoother_ptr": "*fp32", "static_ptr": "*fp32", "q_ptr": "*i8", "s_ptr": "*fp32",
                 "x_stride": "i32"}
    yield ("quantize_rows bf16 smoother", int8_gemm._quantize_rows_kernel, signature,
           dict(K=14336, BLOCK=16384, SMOOTH=True, STATIC=False), dict(num_warps=16))
    signature = {"a_ptr": "*i8", "as_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32", "b_ptr": "*bf16",
                 "y_ptr": "*bf16", "M": "i32", "N": "i32"}
    for config in int8_gemm.CONFIGS:
        constexprs = dict(K=4096, HAS_BIAS=False, EVEN_K=True, **config.kwargs)
        yield (f"int8_gemm config {config}", int8_gemm._int8_gemm_kernel, signature, constexprs,
               dict(num_warps=config.num_warps, num_stages=config.num_stages))


def argmax_cases():
    """The greedy pick over Llama-3's vocabulary (sampling.greedy_argmax), float32 and bfloat16 logits."""
    blocks = -(-128256 // sampling.ARGMAX_BLOCK)
    for dtype in ("fp32", "bf16"):
        signature = {"x_ptr": f"*{dtype}", "part_ptr": "*fp32", "counter_ptr": "*i32", "out_ptr": "*i64", "V": "i32",
                     "row_stride": "i32"}
        constexprs = dict(BLOCK=sampling.ARGMAX_BLOCK, BLOCKS_P=1 << (blocks - 1).bit_length())
        yield f"greedy_argmax {dtype}", sampling._greedy_argmax_kernel, signature, constexprs, {}


def engine_cases():
    """The engine's kernels: the gated activation (bfloat16 out, FP8 out), paged attention and the rotary cache
    write (with and without programmatic dependent launch), the RMS norm, the FP8 cast."""
    for out in ("bf16", "fp8e4nv"):
        signature = {"y_ptr": "*bf16", "scale_ptr": "*fp32", "out_ptr": f"*{out}", "y_stride": "i64", "inter": "i32"}
        yield (f"silu_mul bf16 -> {out}", activation._silu_mul_kernel, signature,
               dict(BLOCK=activation.BLOCK, FP8=out != "bf16", LIBDEVICE=True), {})
    for pdl in (False, True):  # the batch-1 fused step's chain runs them with programmatic dependent launch
        signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "table_ptr": "*i32", "pos_ptr": "*i32",
                     "tiles_ptr": "*i32", "out_ptr": "*bf16", "kv_scale_ptr": "*bf16", "scale": "fp32",
                     "window": "i32", "table_stride": "i32"}
        constexprs = dict(KV_HEADS=8, GROUP=4, HEAD_SIZE=128, BLOCK_SIZE=32, BLOCK_M=16, BLOCK_D=128, BLOCK_N=64,
                          KV_QUANT=False, PRECISION="tf32", EMULATED=False, MAX_LEN=0, PDL=pdl)
        yield (f"paged_attention bf16 pdl={pdl}", paged_attention._paged_attention_kernel, signature, constexprs,
               dict(num_stages=2, launch_pdl=pdl))
        signature = {"qkv_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "slots_ptr": "*i64", "k_ptr": "*bf16",
                     "v_ptr": "*bf16", "q_out_ptr": "*bf16", "kv_scale_ptr": "*bf16", "qkv_stride": "i32"}
        constexprs = dict(HEADS=32, KV_HEADS=8, HEAD_SIZE=128, HALF=64, BLOCK_H=32, BLOCK_HALF=64, ROPE=True,
                          KV_QUANT=0, PDL=pdl)
        yield f"write_rope_kv bf16 pdl={pdl}", paged_attention._rope_write_kernel, signature, constexprs, \
            dict(launch_pdl=pdl)
    signature = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "eps": "fp32", "x_stride": "i64"}
    yield "rms_norm bf16 4096", norm_kernels._rms_norm_kernel, signature, dict(N=4096, BLOCK=4096), dict(num_warps=8)
    signature = {"h_ptr": "*bf16", "d_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "eps": "fp32",
                 "h_stride": "i64", "d_stride": "i64"}
    yield "add_rms_norm bf16 4096", norm_kernels._add_rms_norm_kernel, signature, dict(N=4096, BLOCK=4096), \
        dict(num_warps=8)
    signature = {"x_ptr": "*bf16", "scale_ptr": "*fp32", "out_ptr": "*fp8e4nv", "n": "i64"}
    yield "quantize_fp8 bf16", fp8_kernels._quantize_fp8_kernel, signature, dict(BLOCK=fp8_kernels.BLOCK), {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="the CUDA compute capability to compile for (90: Hopper)")
    p.add_argument("--only", default="", help="compile only the kernels whose line contains this text")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for name, kernel, signature, constexprs, options in (*cases(), *int4_cases(), *int8_cases(), *argmax_cases(), *engine_cases()):
        if args.only not in name:
            continue
        if "STATS_K" in kernel.arg_names:  # the JIT's defaults and heuristics, which the AST source does not apply
            constexprs = {"SPLIT_K": 1, "STATS_K": gemv.STATS_K_MAX, "ACC_R": 1, **constexprs}
        ordered = {arg: signature.get(arg, "constexpr") for arg in kernel.arg_names}
        # as the JIT specializes arguments at the 8B shape: pointers 16-byte aligned, N and K multiples of 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
                 if ordered[arg].startswith("*") or arg in ("N", "K", "KP")}
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(kernel, ordered, constexprs, attrs),
                                      target=target, options={"num_warps": 4, "num_stages": 3, **options})
            if compiled.metadata.shared > SHARED_LIMIT:  # not a failure: autotuning skips a config that does not fit
                name += f" (needs {compiled.metadata.shared} bytes of shared memory: skipped when autotuning)"
            ptx = compiled.asm["ptx"]
            if constexprs.get("FP8") and constexprs.get("USE_DOT") == 2 and constexprs["BLOCK_N"] >= 64 \
                    and "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3" not in ptx:
                raise AssertionError("the swap-AB FP8 form does not reach wgmma with FP8 operands")
            if name.startswith("skinny_gemm"):  # tuning leaves out what does not fit by this count
                config = next(c for c in batched_gemm.CONFIGS if c.kwargs.items() <= constexprs.items()
                              and (c.num_warps, c.num_stages) == (options["num_warps"], options["num_stages"]))
                want = batched_gemm.shared_bytes(config, constexprs["ACT"], constexprs["M_P"])
                if compiled.metadata.shared != want:
                    raise AssertionError(f"shared memory {compiled.metadata.shared}, batched_gemm.shared_bytes {want}")
            if name.startswith("int8_gemm") and ".s8.s8" not in ptx:
                raise AssertionError("the int8 GEMM does not reach an int8 tensor-core instruction")
            if name.startswith("skinny_gemm") and "wgmma.mma_async" not in ptx:
                raise AssertionError("the batched GEMM's weight tile does not reach wgmma")
            # the int4 group scales: a small tile per row block (a vector load and a broadcast), not a load per
            # weight element in every thread (they were 32 to 64 scalar loads an iteration, next to one 16-byte
            # weight load)
            if name.startswith("int4") and ptx.count("ld.global.b16") > 16:
                raise AssertionError(f"{ptx.count('ld.global.b16')} scalar 16-bit loads: the scales are gathered")
            gdc = "griddepcontrol.wait" in ptx
            if gdc != constexprs.get("PDL", False):
                raise AssertionError(f"PDL={constexprs.get('PDL')} but griddepcontrol in the PTX: {gdc}")
            # the split attention's counter: one acq_rel atomic at gpu scope after a barrier; none without splits
            counted = "bar.sync" in ptx and "atom.global.gpu.acq_rel.add" in ptx
            if "SPLITS" in constexprs and counted != (constexprs["SPLITS"] > 1):
                raise AssertionError(f"SPLITS={constexprs['SPLITS']} but an acq_rel counter in the PTX: {counted}")
            if "w_ptr" in signature and counted != (constexprs.get("SPLIT_K", 1) > 1):
                raise AssertionError(f"SPLIT_K={constexprs.get('SPLIT_K', 1)} but an acq_rel counter: {counted}")
            if gdc and "SPLITS" in constexprs:  # before the wait: the slot index alone, or the first cache block too
                early = ptx[:ptx.find("griddepcontrol.wait")].count("ld.global")
                if (early > 1) != constexprs["PRELOAD"]:
                    raise AssertionError(f"PRELOAD={constexprs['PRELOAD']} but {early} loads before the wait")
            first_load = ptx.find("ld.global.L1::evict_first")  # a weight tile (the only evict-first loads)
            if gdc and "w_ptr" in signature and not 0 <= first_load < ptx.find("griddepcontrol.wait"):
                raise AssertionError("with PDL the first weight tile must be loaded before griddepcontrol.wait")
            print(f"ok    sm_{args.arch} {name}: {len(compiled.asm['cubin'])} bytes of cubin"
                  f"{', griddepcontrol' if gdc else ''}, {time.perf_counter() - start:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - every failure is listed, then the exit code says it
            failures += 1
            print(f"FAIL  sm_{args.arch} {name}: {type(exc).__name__}: {str(exc)[:800]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
