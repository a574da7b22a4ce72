"""The `tensorrt` stage and runner: the ONNX graph built into a TensorRT engine (the only module that imports
tensorrt or tensorrt_rtx).

The builder API (Builder, OnnxParser, BuilderConfig, optimization profiles, timing cache) is the same in datacenter
TensorRT 10 (`tensorrt`) and TensorRT for RTX (`tensorrt_rtx`). Datacenter TensorRT is used where it is importable;
TensorRT for RTX otherwise, and it builds ahead of time with no GPU, for the compute capabilities it supports.
The network is strongly typed: precision comes from the graph (a float16 export gives a float16 engine), as
`trtexec --stronglyTyped` does.

One optimization profile covers prefill and decode (`profile_shapes`): batch 1..max_batch_size, new tokens
1..max_input_len (opt 1: decode steps dominate), past 0..max_seq_len-1, attention_mask 1..max_seq_len.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.backends.onnx_runtime import GraphDecoder
from pipeline.errors import BuildError, RunError

ENGINE_FILE = "model.plan"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
LIBRARIES = ("tensorrt", "tensorrt_rtx")  # preference order
INSTALL_HINT = ("pip install tensorrt-rtx-cu12==1.7.1.116 (TensorRT for RTX: builds on CPU), or datacenter "
                "TensorRT 10 (pip install tensorrt-cu12) on a GPU machine")


@dataclass(frozen=True)
class Library:
    module: str  # tensorrt | tensorrt_rtx
    version: str


def library() -> Library:
    """The TensorRT flavour this machine builds with: datacenter TensorRT where importable, else TensorRT for RTX."""
    for name in LIBRARIES:
        if importlib.util.find_spec(name) is not None:
            return Library(name, importlib.import_module(name).__version__)
    raise BuildError(f"build.backend: tensorrt needs a TensorRT builder and neither {' nor '.join(LIBRARIES)} is "
                     f"importable.\n  Fix: {INSTALL_HINT}; or set build.backend: onnx to run the graph with ONNX "
                     f"Runtime")


def _trt():
    return importlib.import_module(library().module)


def limits(recipe, graph_record: dict) -> tuple[int, int, int]:
    """(max_batch_size, max_input_len, max_seq_len) with nulls resolved to the model's positions."""
    b = recipe.build
    max_seq = b.max_seq_len or graph_record["max_positions"]
    return b.max_batch_size, b.max_input_len or max_seq, max_seq


def profile_shapes(recipe, graph_record: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Each graph input's (min, opt, max) shape for the one optimization profile, from the recipe's limits."""
    batch, max_input, max_seq = limits(recipe, graph_record)
    opt_past = max_seq // 2
    shapes = {}
    for t in graph_record["inputs"]:
        name = t["name"]
        if name in ("input_ids", "position_ids"):
            shapes[name] = ((1, 1), (batch, 1), (batch, max_input))
        elif name == "attention_mask":
            shapes[name] = ((1, 1), (batch, opt_past + 1), (batch, max_seq))
        else:  # past_key_values.{i}.key/value [batch, kv_heads, past, head_size]
            heads, size = t["shape"][1], t["shape"][3]
            shapes[name] = ((1, heads, 0, size), (batch, heads, opt_past, size), (batch, heads, max_seq - 1, size))
    return shapes


def rtx_targets(trt) -> list[str]:
    """TensorRT for RTX's compute capabilities from Ampere (SM80) on: its Turing target has no float32 GEMM."""
    return [c for c in trt.ComputeCapability.__members__ if c.startswith("SM") and int(c[2:]) >= 80]


def timing_cache_path(lib: Library) -> Path:
    from pipeline import hub

    return hub.checkpoints_dir() / "timing-cache" / f"{lib.module}-{lib.version}.cache"


def stage_inputs(recipe, onnx_key: str) -> dict:
    """What determines the engine (the `tensorrt` stage's key): the graph, the limits, the library, the targets."""
    from pipeline.backends import cuda_capability

    lib = library()
    inputs = {"stage": "tensorrt", "onnx_key": onnx_key,
              "limits": {k: getattr(recipe.build, k) for k in ("max_batch_size", "max_input_len", "max_seq_len")},
              "library": {"module": lib.module, "version": lib.version}}
    if lib.module == "tensorrt":  # a datacenter engine is built for the GPU it is built on
        inputs["gpu_compute_capability"] = cuda_capability()
    return inputs


def _shape_arg(shapes: dict, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, dims[which]))}" for name, dims in shapes.items())


def trtexec_command(onnx_path, engine_path, shapes: dict, cache_path) -> list[str]:
    """The trtexec (TensorRT 10) command that builds the same engine as build_engine."""
    return ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped",
            f"--minShapes={_shape_arg(shapes, 0)}", f"--optShapes={_shape_arg(shapes, 1)}",
            f"--maxShapes={_shape_arg(shapes, 2)}", f"--timingCacheFile={cache_path}", "--skipInference"]


class _Logger:
    """Collects the builder's warnings and errors so a failed build can say why."""

    def __init__(self, trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[str] = []

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.WARNING:
                    self.messages.append(f"{severity.name}: {msg}")

        self.logger = Logger()


def build_engine(recipe, onnx_dir: Path, out_dir: Path, final_dir: Path | None = None, log=print) -> dict:
    """Parse onnx_dir/model.onnx, build it with the recipe's profile, write out_dir/model.plan (out_dir becomes
    final_dir when the stage completes); returns the manifest's `tensorrt` record."""
    from pipeline.manifest import atomic_write_text, read_manifest
    from pipeline.onnx_export import GRAPH_FILE

    lib = library()
    trt = _trt()
    graph = (read_manifest(onnx_dir) or {}).get("onnx")
    if graph is None:
        raise BuildError(f"{onnx_dir}: no `onnx` record in its manifest.json; rebuild the onnx stage")
    shapes = profile_shapes(recipe, graph)
    log(f"building with {lib.module} {lib.version} (strongly typed, one optimization profile)")
    logger = _Logger(trt).logger
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(Path(onnx_dir) / GRAPH_FILE)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"{onnx_dir / GRAPH_FILE}: the {lib.module} ONNX parser refused the graph:\n  "
                         + "\n  ".join(errors))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    targets = []
    if lib.module == "tensorrt_rtx":  # ahead of time, for every GPU generation it supports (no GPU needed)
        targets = rtx_targets(trt)
        config.num_compute_capabilities = len(targets)
        for i, name in enumerate(targets):
            config.set_compute_capability(trt.ComputeCapability.__members__[name], i)
    cache_path = timing_cache_path(lib)
    if lib.module == "tensorrt":  # TensorRT for RTX times nothing ahead of time (its timing cache is a no-op)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        config.set_timing_cache(config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b""),
                                False)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise BuildError(f"{lib.module} {lib.version} could not build {onnx_dir / GRAPH_FILE}:\n  "
                         + "\n  ".join(logger.messages[-10:] or ["(no message from the builder)"]))
    (Path(out_dir) / ENGINE_FILE).write_bytes(bytes(plan))
    if lib.module == "tensorrt":
        tmp = cache_path.with_suffix(f".{time.time_ns()}.tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        tmp.replace(cache_path)
    atomic_write_text(Path(out_dir) / "graph.json", json.dumps(graph, indent=2) + "\n")
    log(f"built {ENGINE_FILE} ({len(bytes(plan)) / 1e6:.1f} MB) in {seconds:.1f} s")
    profile_read = {name: [list(profile.get_shape(name)[i]) for i in range(3)] for name in shapes}
    return {"library": lib.module, "version": lib.version, "compute_capabilities": targets,
            "profile": profile_read, "build_seconds": round(seconds, 2), "engine_bytes": len(bytes(plan)),
            "onnx": str(onnx_dir), "timing_cache": str(cache_path) if lib.module == "tensorrt" else None,
            "trtexec": shlex.join(trtexec_command(Path(onnx_dir) / GRAPH_FILE, Path(final_dir or out_dir) / ENGINE_FILE,
                                                  shapes, cache_path))}


# ----------------------------------------------------------------------------------------------- running


def run_problem(lib_module: str, targets: list[str] | None) -> str | None:
    """Why this machine cannot run an engine built for `targets` (None: it can try; targets None: not checked)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (TensorRT engines run on an NVIDIA GPU)"
    major, minor = torch.cuda.get_device_capability(0)
    name = torch.cuda.get_device_name(0)
    if lib_module == "tensorrt_rtx" and targets is not None and f"SM{major}{minor}" not in targets:
        return (f"the {name} has compute capability {major}.{minor}, which TensorRT for RTX does not target "
                f"(the engine was built for {', '.join(targets)})")
    return None


class TrtDecoder(GraphDecoder):
    """A `tensorrt` stage's engine behind GraphDecoder's generation loop, its tensors on the GPU."""

    device = torch.device("cuda")

    def __init__(self, artifact: Path, manifest: dict, check_target: bool = True):
        record = manifest.get("tensorrt")
        if record is None:
            raise RunError(f"{artifact}: no `tensorrt` record in manifest.json; rebuild it (build.backend: tensorrt)")
        instead = f"Instead run the same graph with ONNX Runtime: python -m pipeline.run --engine {record['onnx']}"
        problem = run_problem(record["library"], record["compute_capabilities"] if check_target else None)
        if problem:
            raise RunError(f"{artifact}: cannot run this {record['library']} engine here: {problem}.\n  {instead}")
        module = importlib.import_module(record["library"])
        self.library = f"{record['library']} {record['version']}"
        self.gpu = torch.cuda.get_device_name(0)
        self.logger = _Logger(module).logger
        self.runtime = module.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((Path(artifact) / ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise RunError(f"{artifact / ENGINE_FILE}: {self.library} could not load the engine on the {self.gpu}:"
                           f"\n  " + "\n  ".join(self.logger.messages[-5:]) + f"\n  {instead}")
        self.context = self.engine.create_execution_context()
        graph = json.loads((Path(artifact) / "graph.json").read_text())
        self.past = [t for t in graph["inputs"] if t["name"].startswith("past_key_values.")]
        self.outputs = [t["name"] for t in graph["outputs"]]
        self.out_dtypes = {t["name"]: TORCH_DTYPES[t["dtype"]] for t in graph["outputs"]}
        self.stream = torch.cuda.Stream()
        self.placeholder = torch.zeros(1, device="cuda")  # an address for zero-size tensors (an empty past)

    def empty_cache(self, batch):
        return [torch.zeros((batch, t["shape"][1], 0, t["shape"][3]), dtype=TORCH_DTYPES[t["dtype"]], device="cuda")
                for t in self.past]

    def _address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self.placeholder.data_ptr()

    def step(self, tokens, positions, mask, past):
        feeds = {"input_ids": tokens, "position_ids": positions, "attention_mask": mask,
                 **{t["name"]: p for t, p in zip(self.past, past)}}
        for name, t in feeds.items():
            feeds[name] = t = t.contiguous()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, self._address(t))
        outs = {}
        for name in self.outputs:
            outs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.out_dtypes[name],
                                     device="cuda")
            self.context.set_tensor_address(name, self._address(outs[name]))
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RunError(f"{self.library}: executing the engine failed: {self.logger.messages[-3:]}")
        torch.cuda.current_stream().wait_stream(self.stream)
        return outs["logits"], [outs[n] for n in self.outputs[1:]]
