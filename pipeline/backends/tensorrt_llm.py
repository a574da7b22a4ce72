"""The TensorRT-LLM 1.2.1 backend: `trtllm-build` orchestration and the ModelRunnerCpp runtime.

This is the only module that imports tensorrt_llm, and it does so inside `run_engine` alone, so everything else
here (the command line, the plugin rules, the build orchestration, the compatibility check) works and is tested
without TensorRT-LLM. It is written against 1.2.1 precisely: 1.3 removed `trtllm-build` and the engine runtime.

    build   trtllm_build_command -> one `trtllm-build` process with every limit and plugin flag explicit (their
            defaults changed between releases), a TensorRT timing cache read and written per GPU model and
            TensorRT version (so kernel tactic choices are reused), output streamed to a log kept on failure
    run     under mpirun, each rank checks the engine against this machine, then loads rank{r}.engine with
            ModelRunnerCpp on GPU (local rank % GPUs); rank 0 prints, as the PyTorch backend does
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline import hub
from pipeline.backends import TRTLLM_EXTRA
from pipeline.errors import BuildError, RunError
from pipeline.manifest import read_manifest, sha256_file
from pipeline.params import seed_of
from pipeline.recipe import Recipe

TRTLLM_VERSION = "1.2.1"
# Bump when trtllm_build_command changes what it emits: engines built by an older adapter get a new cache key.
COMMAND_VERSION = 1
# Log levels of `trtllm-build --log_level` (tensorrt_llm.logger.severity_map keys).
TRTLLM_LOG_LEVELS = ("internal_error", "error", "warning", "info", "verbose", "debug", "trace")
# Compute capabilities whose attention kernels have FP8 context FMHA in 1.2 (the attention pre-check).
FP8_CONTEXT_FMHA_SMS = ((8, 9), (9, 0), (10, 0), (10, 3), (12, 0), (12, 1))


@dataclass(frozen=True)
class MachineInfo:
    """What an engine is tied to: the GPU model and the TensorRT / TensorRT-LLM versions installed."""

    gpu_name: str | None
    compute_capability: tuple[int, int] | None
    tensorrt: str | None
    tensorrt_llm: str | None

    @property
    def sm(self) -> str:
        cc = self.compute_capability
        return f"{cc[0]}.{cc[1]}" if cc else "none"


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: int = 0) -> MachineInfo:
    """This machine as an engine sees it (GPU `device`, versions from the installed package metadata)."""
    name = capability = None
    try:
        import torch

        if torch.cuda.is_available() and device < torch.cuda.device_count():
            name, capability = torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))
    except ImportError:
        pass
    return MachineInfo(name, capability, _installed("tensorrt"), _installed("tensorrt_llm"))


# --------------------------------------------------------------------------------------------- the command


def _max_positions(recipe: Recipe, checkpoint_dir: Path | str | None) -> int | None:
    """The model's max positions: from the converted checkpoint when there is one, else from the recipe's model
    config when that needs no download (random shapes, local folders); None when unknown (a Hub model not fetched)."""
    config = Path(str(checkpoint_dir)) / "config.json" if checkpoint_dir is not None else None
    if config is not None and config.is_file():
        return json.loads(config.read_text()).get("max_position_embeddings")
    m = recipe.model
    if m.random or (m.local and (hub.resolve_local(m.local) / "config.json").is_file()):
        from pipeline.architectures import describe

        return describe(hub.model_config(m)).max_positions
    return None


def build_limits(recipe: Recipe, checkpoint_dir: Path | str | None = None) -> dict[str, int | str]:
    """max_* limits as trtllm-build takes them; nulls resolved the way the recipe documents them."""
    b = recipe.build
    seq = b.max_seq_len or _max_positions(recipe, checkpoint_dir) or "<max_position_embeddings>"
    return {"max_batch_size": b.max_batch_size, "max_input_len": b.max_input_len or seq, "max_seq_len": seq,
            "max_num_tokens": b.max_num_tokens}


def _flag(on: bool) -> str:
    return "enable" if on else "disable"


def trtllm_build_command(recipe: Recipe, checkpoint_dir: Path | str, output_dir: Path | str,
                         timing_cache: Path | str, executable: str = "trtllm-build",
                         input_timing_cache: Path | str | None = None) -> list[str]:
    """The exact `trtllm-build` argv (TensorRT-LLM 1.2.1) for this recipe.

    Every limit and plugin flag is explicit because their defaults changed between releases (tokens_per_block
    64 -> 32, use_paged_context_fmha and use_fp8_context_fmha off -> on, ...). The timing cache is read from
    `input_timing_cache` (default: `timing_cache` itself, when that file exists) and written to `timing_cache`.
    """
    from pipeline.quantize.registry import weight_format

    b, p = recipe.build, recipe.build.plugins
    weights = weight_format(recipe.precision.quantization.quant)
    cache_in = Path(input_timing_cache) if input_timing_cache is not None else Path(timing_cache)
    limits = build_limits(recipe, checkpoint_dir)
    argv = [executable, "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(output_dir)]
    for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens"):
        argv += [f"--{name}", str(limits[name])]
    argv += ["--max_beam_width", "1"]  # the runner decodes greedily or by sampling, one beam
    argv += [
        "--kv_cache_type", "paged" if p.paged_kv_cache else "continuous",
        "--gpt_attention_plugin", p.gpt_attention_plugin,
        "--gemm_plugin", p.gemm_plugin,
        "--nccl_plugin", p.nccl_plugin,
        "--context_fmha", _flag(p.context_fmha),
        "--remove_input_padding", _flag(p.remove_input_padding),
        "--tokens_per_block", str(p.tokens_per_block),
        # trtllm-build turns fused MLP off itself for quantization other than FP8; say so instead of hiding it
        "--use_fused_mlp", _flag(p.use_fused_mlp and weights.fused_mlp),
        "--use_paged_context_fmha", _flag(p.use_paged_context_fmha),
        # 1.2's default is enable, which only takes effect with FP8 quantization; be explicit either way
        "--use_fp8_context_fmha", _flag(p.use_fp8_context_fmha and weights.fp8_qdq),
        "--multiple_profiles", _flag(p.multiple_profiles),
        "--reduce_fusion", _flag(p.reduce_fusion),
        "--workers", str(max(1, min(b.workers, recipe.world_size))),
        "--log_level", b.log_level,
        *weights.build_flags,
    ]
    if cache_in.is_file():
        argv += ["--input_timing_cache", str(cache_in)]
    argv += ["--output_timing_cache", str(timing_cache)]
    return argv


# --------------------------------------------------------------------------------------------- plugin rules


def plugin_problems(recipe: Recipe, compute_capability: tuple[int, int] | None,
                    checkpoint_dtype: str | None = None) -> list[str]:
    """Plugin and precision combinations TensorRT-LLM 1.2 refuses (at build or at load), each with its reason
    and fix. compute_capability None skips the GPU rules; checkpoint_dtype is the converted dtype when known."""
    from pipeline.recipe import plugin_problems as recipe_plugin_problems

    p, q = recipe.build.plugins, recipe.precision.quantization
    problems = recipe_plugin_problems(recipe)
    if not (p.gpt_attention_plugin != "disable" and p.paged_kv_cache and p.remove_input_padding):
        problems.append("build.plugins: ModelRunnerCpp (the TensorRT-LLM 1.2 runtime this pipeline uses) runs only "
                        "in-flight-batching engines: gpt_attention_plugin, paged_kv_cache and remove_input_padding "
                        "all on; turn them on, or use build.backend: torch")
    if compute_capability is None:
        return problems
    cc = tuple(compute_capability)
    sm = f"{cc[0]}.{cc[1]}"
    from pipeline.quantize.registry import kv_cache_format, weight_format_or_none

    weights = weight_format_or_none(q.quant)
    too_new = [(key, f) for key, f in (("quant", weights), ("kv_cache", kv_cache_format(q.kv_cache)))
               if cc < f.min_capability]
    if too_new:
        key, f = too_new[0]
        need = ".".join(map(str, f.min_capability))
        problems.append(f"precision.quantization.{key}: {f.name} needs compute capability >= {need} "
                        f"({f.capability_note}); this GPU has {sm}. {f.capability_fix}")
    elif p.use_fp8_context_fmha and weights.fp8_qdq and cc not in FP8_CONTEXT_FMHA_SMS:
        problems.append(f"build.plugins.use_fp8_context_fmha: FP8 context FMHA exists for compute capability "
                        f"{', '.join(f'{a}.{b}' for a, b in FP8_CONTEXT_FMHA_SMS)}; this GPU has {sm}. Set it to false")
    dtype = checkpoint_dtype or recipe.precision.dtype
    if dtype == "bfloat16" and cc < (8, 0):
        problems.append(f"precision.dtype: bfloat16 needs compute capability >= 8.0 (\"pre SM 80 GPUs do not support "
                        f"bfloat16\"); this GPU has {sm}. Use precision.dtype: float16")
    return problems


# --------------------------------------------------------------------------------------------- the engine stage


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def timing_cache_path(machine: MachineInfo) -> Path:
    """checkpoints/timing-cache/<gpu>-sm<cc>-trt<version>.cache: tactic timings are valid for one GPU model and
    one TensorRT version, so each pair has its own file, shared by every build on it."""
    cc = machine.compute_capability
    name = _slug(machine.gpu_name or "no-gpu") + (f"-sm{cc[0]}{cc[1]}" if cc else "")
    return hub.checkpoints_dir() / "timing-cache" / f"{name}-trt{machine.tensorrt or 'unknown'}.cache"


def engine_inputs(recipe: Recipe, convert_key: str, versions: dict) -> dict:
    """What determines an engine's bytes: the checkpoint, the build slice of the recipe that changes engines
    (limits and plugins; not backend, workers or log level), TensorRT(-LLM) versions and the GPU."""
    machine = machine_info()
    build = {k: v for k, v in recipe.to_dict()["build"].items() if k not in ("backend", "workers", "log_level")}
    return {
        "stage": "engine",
        "convert": convert_key,
        "build": build,
        "command_version": COMMAND_VERSION,
        "versions": {"tensorrt": versions.get("tensorrt"), "tensorrt_llm": versions.get("tensorrt_llm")},
        "gpu": {"name": machine.gpu_name, "compute_capability": machine.sm},
    }


# A line of trtllm-build output -> the stage it starts (tensorrt_llm/builder.py and commands/build.py log these).
_STAGES = (
    (re.compile(r"Total time of building all engines"), "all engines built"),
    (re.compile(r"Total time of building"), "engine built"),
    (re.compile(r"Build TensorRT engine"), "building a TensorRT engine (kernel tactic auto-tuning)"),
    (re.compile(r"Build phase peak memory"), "build phase finished"),
    (re.compile(r"[Ll]oad(ing|ed)? (the )?timing cache|timing cache"), "timing cache"),
)

# Log text -> likely cause of a failed build; matched against the error lines first, most specific cause first.
_CAUSES = (
    ("out of memory", re.compile(r"out of memory|OutOfMemory|CUDA_ERROR_OUT_OF_MEMORY|std::bad_alloc|"
                                 r"Cannot allocate memory|MemoryError|Killed", re.I),
     "lower build.max_batch_size, build.max_num_tokens or build.max_seq_len, set build.workers: 1 (each worker holds "
     "a rank's weights), or build on a GPU with more memory"),
    ("version mismatch", re.compile(r"kSERIALIZATION_VERSION|Serialization assertion|version mismatch|"
                                    r"unrecognized arguments|invalid choice|error: argument|ModuleNotFoundError|"
                                    r"ImportError|undefined symbol|incompatible", re.I),
     f"TensorRT / TensorRT-LLM versions other than the ones this adapter targets (TensorRT-LLM {TRTLLM_VERSION}, the "
     f"last with trtllm-build; 1.3 removed it): {TRTLLM_EXTRA}"),
    ("unsupported plugin or feature", re.compile(r"not supported|unsupported|NotImplementedError|cannot be enabled|"
                                                 r"only works with|requires --", re.I),
     "a plugin or precision this GPU / TensorRT-LLM version does not support: change the build.plugins.* or "
     "precision setting the log names (`python -m pipeline plan RECIPE` shows the flags)"),
)
_ERROR_LINE = re.compile(r"\[E\]|\bERROR\b|error:|Error\b|Exception|Assertion|assert|Traceback|Killed|failed", re.I)


def classify_failure(log_text: str, returncode: int) -> tuple[str, str]:
    """(likely cause, fix) of a failed trtllm-build from its output: the error lines and the last lines decide,
    so that a warning earlier in the log does not."""
    if returncode in (-9, 137):
        return _CAUSES[0][0], _CAUSES[0][2]
    lines = log_text.splitlines()
    decisive = "\n".join([line for line in lines if _ERROR_LINE.search(line)] + lines[-5:])
    for cause, pattern, fix in _CAUSES:
        if pattern.search(decisive):
            return cause, fix
    return "unknown", "read the log; its last error lines usually name the failing layer or plugin"


def _sha(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _world_size(checkpoint_dir: Path) -> int:
    mapping = json.loads((checkpoint_dir / "config.json").read_text())["mapping"]
    return int(mapping.get("world_size", mapping.get("tp_size", 1) * mapping.get("pp_size", 1)))


def build_engines(recipe: Recipe, checkpoint_dir: Path, out_dir: Path, log: Callable[[str], None]) -> dict:
    """Run trtllm-build on a converted checkpoint into the empty folder out_dir; returns the manifest report.

    The builder's output is streamed to `log` with stage progress and kept in checkpoints/logs/, which survives
    a failure. On failure out_dir holds no engine files, the timing cache is untouched, and the BuildError names
    the likely cause. The timing cache is replaced atomically only by a successful build.

    Long because it is one transaction (check, run, watch, commit or roll back) read top to bottom; its steps share
    the temporary folder and the log that a failure must clean up.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    checkpoint = json.loads((checkpoint_dir / "config.json").read_text())
    machine = machine_info()
    problems = plugin_problems(recipe, machine.compute_capability, checkpoint.get("dtype"))
    if problems:
        raise BuildError(f"recipe '{recipe.name}': TensorRT-LLM {TRTLLM_VERSION} would refuse this build:\n"
                         + "\n".join(f"  - {p}" for p in problems))
    executable = shutil.which("trtllm-build")
    if executable is None:
        raise BuildError(f"trtllm-build is not on PATH, so TensorRT engines cannot be built.\n  Fix: {TRTLLM_EXTRA}; "
                         f"or set build.backend: torch (ARGS=\"build.backend=torch\")")
    world = _world_size(checkpoint_dir)
    cache = timing_cache_path(machine)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache_out = cache.parent / f".{cache.name}.{os.getpid()}.{time.time_ns()}.tmp"
    sha_before = _sha(cache)
    argv = trtllm_build_command(recipe, checkpoint_dir, out_dir, cache_out, executable=executable,
                                input_timing_cache=cache)
    logs = hub.checkpoints_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"engine-{_slug(recipe.name) or 'recipe'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log(f"engine   trtllm-build for {world} rank(s), log {log_path}")
    log(f"engine   $ {shlex.join(argv)}")
    start = time.perf_counter()
    built = 0
    with open(log_path, "w") as log_file, tempfile.TemporaryDirectory(prefix="trtllm-build-") as scratch:
        log_file.write(f"$ {shlex.join(argv)}\n")
        log_file.flush()
        # cwd is a scratch folder: anything trtllm-build writes beside itself (model.cache, *.dot) lands nowhere
        proc = subprocess.Popen(argv, cwd=scratch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        tail: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                line = line.rstrip("\n")
                tail = (tail + [line])[-200:]
                log(f"  | {line}")
                for pattern, stage in _STAGES:
                    if pattern.search(line):
                        if stage == "engine built":
                            built += 1
                            stage = f"engine built ({built}/{world})"
                        log(f"engine   [{time.perf_counter() - start:6.1f} s] {stage}")
                        break
            returncode = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            cache_out.unlink(missing_ok=True)
            raise
    seconds = time.perf_counter() - start
    if returncode != 0:
        cache_out.unlink(missing_ok=True)
        _clear_engine_files(out_dir)
        cause, fix = classify_failure(log_path.read_text(errors="replace"), returncode)
        last = [t for t in tail if re.search(r"error|exception|assert|fail|killed", t, re.I)][-3:] or tail[-3:]
        raise BuildError(f"trtllm-build failed (exit {returncode}) after {seconds:.1f} s; likely cause: {cause}.\n"
                         + "".join(f"  | {t}\n" for t in last)
                         + f"  Fix: {fix}\n  Full log: {log_path}")
    missing = [n for n in ["config.json", *(f"rank{r}.engine" for r in range(world))] if not (out_dir / n).is_file()]
    if missing:
        cache_out.unlink(missing_ok=True)
        _clear_engine_files(out_dir)
        raise BuildError(f"trtllm-build exited 0 but did not write {', '.join(missing)} in {out_dir} (the checkpoint "
                         f"has {world} rank(s)); the build is incomplete and was discarded. Full log: {log_path}")
    if cache_out.is_file() and cache_out.stat().st_size > 0:
        os.replace(cache_out, cache)  # atomic: a reader sees the old cache or the new one, never half of it
    else:
        cache_out.unlink(missing_ok=True)
        log(f"engine   note: trtllm-build wrote no timing cache; {cache} is unchanged")
    from pipeline.convert import copy_tokenizer

    tokenizer_files = copy_tokenizer(checkpoint_dir, out_dir)  # so the engine folder runs on its own
    engine_config = json.loads((out_dir / "config.json").read_text())
    conversion = (read_manifest(checkpoint_dir) or {}).get("conversion", {})
    return {
        "command": argv,
        "command_line": shlex.join(argv),
        "executable": executable,
        "returncode": returncode,
        "seconds": round(seconds, 3),
        "log": str(log_path),
        "world_size": world,
        "engine_version": engine_config.get("version"),
        "timing_cache": {"path": str(cache), "read": "--input_timing_cache" in argv,
                         "sha256_before": sha_before, "sha256_after": _sha(cache)},
        "machine": {"gpu": machine.gpu_name, "compute_capability": machine.sm, "tensorrt": machine.tensorrt,
                    "tensorrt_llm": machine.tensorrt_llm},
        "tokenizer_files": tokenizer_files,
        "eos_token_id": conversion.get("eos_token_id"),
        "bos_token_id": conversion.get("bos_token_id"),
    }


def _clear_engine_files(out_dir: Path) -> None:
    """A failed build leaves nothing that could pass for engines (build.py also removes the whole folder)."""
    for path in Path(out_dir).glob("rank*.engine"):
        path.unlink()
    (Path(out_dir) / "config.json").unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- compatibility


def read_engine_config(engine_dir: Path) -> dict:
    path = Path(engine_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: cannot read the engine config ({exc}); rebuild the engine (make build)") from None
    if not all(k in config for k in ("version", "pretrained_config", "build_config")):
        raise RunError(f"{path}: not a TensorRT-LLM 1.x engine config (needs version, pretrained_config and "
                       f"build_config); rebuild the engine (make build)")
    return config


def rebuild_command(engine_dir: Path) -> str:
    """The command that rebuilds this engine on this machine, from its manifest (recipe and overrides)."""
    manifest = read_manifest(engine_dir) or {}
    words = shlex.split(manifest.get("command", ""))
    if "pipeline" in words and "build" in words[words.index("pipeline"):]:
        args = [w for w in words[words.index("build", words.index("pipeline")) + 1:] if not w.startswith("--")]
        if args:
            make = f"make build RECIPE={args[0]}" + (f" ARGS=\"{' '.join(args[1:])}\"" if args[1:] else "")
            return f"{make}   (or: python -m pipeline build {shlex.join(args)})"
    name = manifest.get("recipe", {}).get("name") or "<recipe>"
    return f"make build RECIPE={name}   (or: python -m pipeline build {name})"


def check_engine_compatibility(engine_dir: Path, world_size: int, machine: MachineInfo | None = None,
                               rank: int = 0) -> list[str]:
    """Why this engine folder cannot run here (empty: it can): rank files, world size, GPU compute capability,
    TensorRT and TensorRT-LLM versions, compared with what its config.json and manifest recorded at build time."""
    engine_dir = Path(engine_dir)
    machine = machine or machine_info()
    config = read_engine_config(engine_dir)
    mapping = config["pretrained_config"].get("mapping", {})
    tp, pp = mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    problems = []
    if world_size != tp * pp:
        problems.append(f"the engine was built for {tp * pp} rank(s) (tp={tp}, pp={pp}) but {world_size} "
                        f"{'was' if world_size == 1 else 'were'} started; run: mpirun -n {tp * pp} python -m pipeline.run")
    if not (engine_dir / f"rank{rank}.engine").is_file():
        problems.append(f"{engine_dir / f'rank{rank}.engine'} is missing")
    built = (read_manifest(engine_dir) or {}).get("inputs", {})
    built_cc = built.get("gpu", {}).get("compute_capability")
    if machine.compute_capability is None:
        problems.append("no CUDA GPU is visible to this rank; TensorRT engines run only on the GPU model they were "
                        "built for")
    elif built_cc and built_cc != machine.sm:
        problems.append(f"the engine was built for GPU compute capability {built_cc} "
                        f"({built.get('gpu', {}).get('name')}); this rank's GPU is {machine.gpu_name}, compute "
                        f"capability {machine.sm}")
    engine_version = config.get("version")
    if machine.tensorrt_llm is None:
        problems.append(f"tensorrt_llm is not installed (the engine was built with TensorRT-LLM {engine_version}); "
                        f"install it: {TRTLLM_EXTRA}")
    elif engine_version != machine.tensorrt_llm:
        problems.append(f"the engine was built with TensorRT-LLM {engine_version}; this machine has "
                        f"{machine.tensorrt_llm}")
    built_trt = built.get("versions", {}).get("tensorrt")
    if built_trt and machine.tensorrt and built_trt != machine.tensorrt:
        problems.append(f"the engine was built with TensorRT {built_trt}; this machine has {machine.tensorrt} "
                        f"(TensorRT plans are not portable across versions)")
    return problems


# --------------------------------------------------------------------------------------------- the runtime


def _sampling_kwargs(sampling) -> dict:
    """pipeline.params.SamplingParams -> ModelRunnerCpp.generate keyword arguments (TensorRT-LLM's greedy is top_k=1)."""
    if sampling.temperature == 0:
        return {"temperature": 1.0, "top_k": 1, "top_p": 0.0, "random_seed": seed_of(sampling)}
    return {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            "random_seed": seed_of(sampling)}


def _verify_problem(engine_dir: Path, rank: int) -> str | None:
    manifest = read_manifest(engine_dir)
    if manifest is None or "outputs" not in manifest:
        return f"{engine_dir} has no manifest.json, so it cannot be verified; rebuild it, or pass --no-verify"
    for name in [f"rank{rank}.engine"] + (["config.json"] if rank == 0 else []):
        expected = manifest["outputs"].get(name)
        if expected is None or sha256_file(engine_dir / name) != expected:
            return (f"{engine_dir / name} does not match the sha256 in its manifest (modified after the build); "
                    f"rebuild it or pass --no-verify")
    return None


def run_engine(args, artifact: Path, runtime: dict, rank: int, world: int, mpi_comm) -> int:
    """`python -m pipeline.run` for an engine folder: check, load rank{rank}.engine with ModelRunnerCpp, generate
    with the recipe's sampling settings; rank 0 prints exactly what the PyTorch backend prints. Long because it
    follows TensorRT-LLM 1.2.1's run.py step by step, which keeps the contract easy to check against it."""
    from pipeline.dist import all_ok, local_rank
    from pipeline.recipe import RuntimeSpec
    from pipeline.run_outputs import load_tokenizer, sampling_from

    artifact = Path(artifact)
    if args.device == "cpu":
        raise RunError(f"{artifact} holds TensorRT engines, which run on a GPU only; run the converted checkpoint "
                       f"with the PyTorch backend instead (build.backend: torch)")
    if args.logits_out is not None:
        raise RunError("--logits-out needs the PyTorch backend (these engines were not built to gather logits); "
                       "rebuild with build.backend: torch")
    device = 0
    try:
        import torch

        if torch.cuda.is_available():
            device = local_rank(mpi_comm) % torch.cuda.device_count()
    except ImportError:
        pass
    machine = machine_info(device)
    problems = check_engine_compatibility(artifact, world, machine, rank)
    if not problems and not args.no_verify:
        problem = _verify_problem(artifact, rank)
        problems = [problem] if problem else []
    failed = all_ok(mpi_comm, "; ".join(problems) if problems else None)
    if failed:
        raise RunError(f"the engine {artifact} cannot run here:\n"
                       + "\n".join(f"  rank {r}: {p}" for r, p in failed)
                       + f"\n  Rebuild it on this machine: {rebuild_command(artifact)}")

    config = read_engine_config(artifact)
    limits = config["build_config"]
    tokenizer = load_tokenizer(artifact)
    if getattr(args, "prompt_ids_file", None):
        prompts = json.loads(Path(args.prompt_ids_file).read_text())
    elif args.prompt_ids:
        prompts = [[int(t) for t in s.split(",")] for s in args.prompt_ids]
    else:
        if tokenizer is None:
            raise RunError(f"{artifact} has no tokenizer files; give --prompt-ids 1,2,3")
        prompts = [tokenizer(t).input_ids for t in (args.prompt or list(runtime.get("prompts", RuntimeSpec().prompts)))]
    sampling = sampling_from(runtime, args)
    longest = max(len(p) for p in prompts)
    if len(prompts) > limits["max_batch_size"] or longest > limits["max_input_len"] or \
            longest + sampling.max_tokens > limits["max_seq_len"]:
        raise RunError(f"{len(prompts)} prompt(s) of up to {longest} tokens + {sampling.max_tokens} new tokens "
                       f"exceed the engine's limits (max_batch_size {limits['max_batch_size']}, max_input_len "
                       f"{limits['max_input_len']}, max_seq_len {limits['max_seq_len']}); fewer/shorter prompts, "
                       f"or rebuild with larger build.* limits")
    build_report = (read_manifest(artifact) or {}).get("trtllm_build", {})
    eos_id = tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None \
        else build_report.get("eos_token_id")
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else None
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)

    import torch
    from tensorrt_llm.runtime import ModelRunnerCpp

    torch.cuda.set_device(device)
    window = config["pretrained_config"].get("sliding_window")  # Mistral's, which the engine does not hold
    start = time.perf_counter()
    runner = ModelRunnerCpp.from_dir(engine_dir=str(artifact), rank=rank, max_batch_size=len(prompts),
                                     max_input_len=longest, max_output_len=sampling.max_tokens,
                                     max_beam_width=1, kv_cache_free_gpu_memory_fraction=0.9,
                                     max_attention_window_size=[window] if window else None)
    load_s = time.perf_counter() - start
    if rank == 0:
        tp, pp = config["pretrained_config"]["mapping"]["tp_size"], config["pretrained_config"]["mapping"]["pp_size"]
        print(f"[pipeline.run] backend tensorrt-llm (TensorRT-LLM {machine.tensorrt_llm}, ModelRunnerCpp) on "
              f"cuda:{device}, {world} rank(s) tp={tp} pp={pp}, {artifact} (loaded in {load_s:.1f} s)",
              file=sys.stderr)
    start = time.perf_counter()
    # Leader mode: every rank constructs the executor; only rank 0 enqueues and gets outputs, the others serve.
    result = runner.generate([torch.tensor(p, dtype=torch.int32) for p in prompts],
                             max_new_tokens=sampling.max_tokens, end_id=eos_id if eos_id is not None else -1,
                             pad_id=pad_id, num_beams=1, return_dict=True, output_sequence_lengths=True,
                             **_sampling_kwargs(sampling))
    seconds = time.perf_counter() - start
    if rank == 0:
        outputs = []
        for i, prompt in enumerate(prompts):
            length = int(result["sequence_lengths"][i][0])
            new = [int(t) for t in result["output_ids"][i][0][len(prompt):length].tolist()]
            if eos_id is not None and eos_id in new:  # as the PyTorch backend: up to and including EOS
                new = new[:new.index(eos_id) + 1]
            outputs.append(new)
        from pipeline.run_outputs import report_outputs

        report_outputs(args, artifact, "tensorrt-llm", world, prompts, outputs, tokenizer, seconds)
    if mpi_comm is not None and world > 1:
        mpi_comm.Barrier()  # the serving ranks stay until rank 0 has its outputs
    del runner
    return 0

