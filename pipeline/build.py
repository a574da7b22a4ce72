"""`make build RECIPE=...`: the stages fetch -> convert -> engine, each cached by the content of its inputs.

    fetch    the Hugging Face folder: a Hub snapshot at the pinned revision, a local folder, or random weights
    convert  TensorRT-LLM checkpoint (config.json + rank{r}.safetensors + tokenizer), quantized and calibrated
    engine   TensorRT engines (rank{r}.engine), only for the tensorrt-llm backend
    onnx     one ONNX decoder graph with its KV cache as inputs/outputs (backends onnx and tensorrt)
    tensorrt that graph built by TensorRT's builder (or TensorRT for RTX's) into model.plan (backend tensorrt)

Every stage writes into a temporary folder beside its final place and renames it when complete, with its
manifest.json (pipeline.manifest) inside; a folder with a manifest is finished, anything else is debris that
`gc` removes. The recipe and the model's config are validated before any stage runs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import hub
from pipeline.backends import BackendChoice, select_backend
from pipeline.convert import TOKENIZER_FILES, convert_checkpoint
from pipeline.errors import PipelineError, RecipeError
from pipeline.manifest import (
    atomic_write_text,
    command_line,
    folder_digests,
    host_info,
    library_versions,
    lock_drift,
    read_manifest,
    stage_key,
    write_manifest,
)
from pipeline.random_weights import make_random_checkpoint
from pipeline.recipe import REPO_ROOT, Recipe, check_against_model
from pipeline.shapes import SHAPES
from pipeline.storage import Hold, check_free_space, write_error, write_errors

RANDOM_WEIGHTS_VERSION = 1  # bump when pipeline.random_weights changes the bytes it writes


@dataclass
class StageResult:
    name: str
    key: str
    hit: bool
    path: Path
    seconds: float = 0.0
    detail: str = ""


@dataclass
class BuildResult:
    recipe: Recipe
    backend: BackendChoice
    stages: list[StageResult] = field(default_factory=list)

    @property
    def artifact(self) -> Path:
        return self.stages[-1].path


def builds_dir() -> Path:
    return hub.checkpoints_dir() / "builds"


def stage_dir(stage: str, key: str) -> Path:
    return hub.checkpoints_dir() / stage / key


def is_complete(path: Path) -> bool:
    return (path / "manifest.json").is_file()


class StageOutput:
    """A temporary folder that becomes `final` on success and disappears on failure. While it exists, the process
    holds it (and `final`) against `gc`; with `needed_bytes` it first checks that the disk has that much room."""

    def __init__(self, final: Path, needed_bytes: int | None = None):
        self.final = final
        self.tmp = final.parent / f".tmp-{final.name}-{int(time.time() * 1e6)}"
        self.needed_bytes = needed_bytes
        self.what = f"the {final.parent.name} stage"
        self.hold = Hold(self.tmp, self.final)  # before the folder exists: gc lists folders, then reads locks

    def __enter__(self) -> Path:
        try:
            if self.needed_bytes:
                check_free_space(self.final.parent, self.needed_bytes, self.what)
            with write_errors(self.final.parent, self.needed_bytes, self.what):
                self.tmp.mkdir(parents=True)
        except BaseException:
            self.hold.release()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                error = write_error(exc, self.tmp, self.needed_bytes, self.what)
                if error is not None:
                    raise error from None
                return False
            if self.final.exists():  # another build finished the same key first; keep theirs
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                self.tmp.rename(self.final)
            return False
        finally:
            self.hold.release()


def validate_with_model(recipe: Recipe) -> dict:
    """Check the recipe against the model's config.json (fetched alone for Hub models); returns that config."""
    hf_config = hub.model_config(recipe.model)
    problems = check_against_model(recipe, hf_config)
    if problems:
        raise RecipeError(problems, source=f"recipe '{recipe.name}'")
    return hf_config


def _source_files(folder: Path) -> list[str]:
    names = [p.name for p in sorted(Path(folder).iterdir()) if p.is_file() and
             (p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json", *TOKENIZER_FILES))]
    return names


def _bytes(folder: Path, names: list[str] | None = None) -> int:
    paths = [folder / n for n in names] if names is not None else [p for p in Path(folder).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in paths)


def _tokenizer_files(folder: Path | None) -> list[str]:
    return [n for n in TOKENIZER_FILES if folder is not None and (folder / n).is_file()]


class Builder:
    """Runs the stages of one recipe; `plan()` computes the same keys without doing work."""

    def __init__(self, recipe: Recipe, log: Callable[[str], None] = print, show_progress: bool = True):
        self.recipe = recipe
        self.log = log
        self.show_progress = show_progress
        self.versions = library_versions()
        self.hold: Hold | None = None  # while run() runs: the stage folders it has found or made, kept from gc

    # ----------------------------------------------------------------------------------- fetch

    def fetch_inputs(self) -> dict:
        m = self.recipe.model
        if m.random:
            return {"stage": "fetch", "random": m.random, "seed": m.seed, "shape": SHAPES[m.random],
                    "generator_version": RANDOM_WEIGHTS_VERSION,
                    "versions": {k: self.versions[k] for k in ("torch", "transformers", "safetensors")}}
        if m.hub:
            return {"stage": "fetch", "hub": m.hub, "revision": m.revision, "patterns": hub.HUB_PATTERNS}
        return {"stage": "fetch", "local": str(hub.resolve_local(m.local))}

    def fetch(self) -> tuple[StageResult, Path]:
        m = self.recipe.model
        inputs = self.fetch_inputs()
        key = stage_key(inputs)
        final = stage_dir("fetch", key)
        self._hold(final)
        start = time.perf_counter()
        if m.random:
            if is_complete(final):
                return StageResult("fetch", key, True, final, detail=f"random {m.random} seed {m.seed}"), final
            with StageOutput(final) as tmp:
                make_random_checkpoint(m.random, m.seed, tmp)
                tokenizer = hub.tokenizer_dir(m)
                if tokenizer is not None:
                    for name in _tokenizer_files(tokenizer):
                        shutil.copyfile(tokenizer / name, tmp / name)
                write_manifest(tmp, self._manifest("fetch", key, inputs, {}, tmp, time.perf_counter() - start))
            return StageResult("fetch", key, False, final, time.perf_counter() - start,
                               f"random {m.random} seed {m.seed}"), final
        if m.hub:  # huggingface_hub shows a bar per file it downloads
            self.log(f"fetch    {m.hub}@{m.revision[:12]} from the Hugging Face cache ({hub.hf_cache_dir()}), else the Hub")
        source = hub.fetch_weights(m)
        detail = f"{m.hub}@{m.revision[:12]}" if m.hub else str(source)
        hit = not m.hub or is_complete(final)
        if m.hub and not hit:  # record what the snapshot held; the files stay in the Hugging Face cache
            final.mkdir(parents=True, exist_ok=True)
            write_manifest(final, {"stage": "fetch", "key": key, "inputs": inputs, "snapshot": str(source),
                                   "files": folder_digests(source, _source_files(source), hub.checkpoints_dir())})
        return StageResult("fetch", key, hit, source, time.perf_counter() - start, detail), source

    # ----------------------------------------------------------------------------------- convert

    def convert_inputs(self, source: Path) -> dict:
        r = self.recipe
        tokenizer = hub.tokenizer_source(r.model, source)
        inputs = {
            "stage": "convert",
            "model_files": folder_digests(source, _source_files(source), hub.checkpoints_dir(),
                                          desc="hashing the model's files" if self.show_progress else None),
            "tokenizer_files": folder_digests(tokenizer, _tokenizer_files(tokenizer), hub.checkpoints_dir()),
            "precision": r.to_dict()["precision"],
            "parallel": r.to_dict()["parallel"],
            "versions": {k: self.versions[k] for k in ("pipeline", "torch", "safetensors")},
        }
        from pipeline.quantize.checkpoint import calibration_inputs

        calibration = calibration_inputs(r)
        if calibration:
            inputs["calibration"] = calibration
            inputs["versions"]["transformers"] = self.versions["transformers"]
        return inputs

    def convert(self, source: Path) -> StageResult:
        r = self.recipe
        inputs = self.convert_inputs(source)
        key = stage_key(inputs)
        final = stage_dir("convert", key)
        self._hold(final)
        if is_complete(final):
            return StageResult("convert", key, True, final, detail=self._convert_detail())
        start = time.perf_counter()
        tokenizer = hub.tokenizer_source(r.model, source)
        from pipeline.quantize.checkpoint import make_quantizer

        with StageOutput(final, needed_bytes=_bytes(source, _source_files(source))) as tmp:
            quantizer = make_quantizer(r, source, log=self.log)
            result = convert_checkpoint(source, tmp, dtype=r.precision.dtype, tp=r.parallel.tp, pp=r.parallel.pp,
                                        workers=r.build.workers, tokenizer_dir=tokenizer, quantize=quantizer,
                                        show_progress=self.show_progress)
            extra = {"conversion": {"dtype": result.dtype, "source_bytes": result.source_bytes,
                                    "seconds": round(result.seconds, 3),
                                    "rate_mb_s": round(result.source_bytes / max(result.seconds, 1e-9) / 1e6, 1),
                                    "tokenizer_files": result.tokenizer_files,
                                    "eos_token_id": result.arch.eos_token_id, "bos_token_id": result.arch.bos_token_id}}
            if quantizer is not None and getattr(quantizer, "record", None):
                extra["quantization"] = quantizer.record
            write_manifest(tmp, self._manifest("convert", key, inputs, extra, tmp, time.perf_counter() - start))
        return StageResult("convert", key, False, final, time.perf_counter() - start, self._convert_detail())

    def _convert_detail(self) -> str:
        r = self.recipe
        q = r.precision.quantization.quant
        return f"{r.precision.dtype}{'' if q == 'none' else ' + ' + q} tp={r.parallel.tp} pp={r.parallel.pp}"

    # ----------------------------------------------------------------------------------- engine

    def engine(self, convert: StageResult) -> StageResult:
        from pipeline.backends import tensorrt_llm as trt

        inputs = trt.engine_inputs(self.recipe, convert.key, self.versions)
        key = stage_key(inputs)
        final = stage_dir("engine", key)
        self._hold(final)
        if is_complete(final):
            return StageResult("engine", key, True, final, detail="TensorRT-LLM engines")
        start = time.perf_counter()
        with StageOutput(final, needed_bytes=_bytes(convert.path)) as tmp:
            report = trt.build_engines(self.recipe, convert.path, tmp, log=self.log)
            write_manifest(tmp, self._manifest("engine", key, inputs, {"trtllm_build": report}, tmp,
                                               time.perf_counter() - start))
        return StageResult("engine", key, False, final, time.perf_counter() - start, "TensorRT-LLM engines")

    # ----------------------------------------------------------------------------------- onnx, tensorrt

    def onnx(self, convert: StageResult, source: Path) -> StageResult:
        from pipeline import onnx_export

        inputs = onnx_export.stage_inputs(self.recipe, convert.key, self.versions)
        key = stage_key(inputs)
        final = stage_dir("onnx", key)
        detail = f"ONNX opset {self.recipe.onnx.opset}, {self.recipe.precision.dtype}, qdq {self.recipe.onnx.qdq}"
        if is_complete(final):
            return StageResult("onnx", key, True, final, detail=detail)
        start = time.perf_counter()
        with StageOutput(final) as tmp:
            record = onnx_export.build_onnx(self.recipe, convert.path, source,
                                            hub.tokenizer_source(self.recipe.model, source), tmp, log=self.log)
            for name in _tokenizer_files(convert.path):  # the runner reads the tokenizer beside the graph
                shutil.copyfile(convert.path / name, tmp / name)
            write_manifest(tmp, self._manifest("onnx", key, inputs, {"onnx": record}, tmp,
                                               time.perf_counter() - start))
        return StageResult("onnx", key, False, final, time.perf_counter() - start, detail)

    def tensorrt(self, onnx: StageResult) -> StageResult:
        from pipeline.backends import tensorrt_engine

        inputs = tensorrt_engine.stage_inputs(self.recipe, onnx.key)
        key = stage_key(inputs)
        final = stage_dir("tensorrt", key)
        detail = f"{inputs['library']['module']} {inputs['library']['version']} engine"
        if is_complete(final):
            return StageResult("tensorrt", key, True, final, detail=detail)
        start = time.perf_counter()
        with StageOutput(final) as tmp:
            record = tensorrt_engine.build_engine(self.recipe, onnx.path, tmp, final, log=self.log)
            write_manifest(tmp, self._manifest("tensorrt", key, inputs, {"tensorrt": record}, tmp,
                                               time.perf_counter() - start))
        return StageResult("tensorrt", key, False, final, time.perf_counter() - start, detail)

    # ----------------------------------------------------------------------------------- whole

    def _manifest(self, stage: str, key: str, inputs: dict, extra: dict, folder: Path, seconds: float) -> dict:
        return {
            "stage": stage,
            "key": key,
            "recipe": self.recipe.to_dict(),
            "inputs": inputs,
            **extra,
            "outputs": folder_digests(folder),
            "versions": self.versions,
            "lock_drift": lock_drift(REPO_ROOT / "requirements.lock"),
            "host": host_info(),
            "command": command_line(),
            "seconds": round(seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def run(self, gate: bool = True, record: bool = True) -> BuildResult:
        """All stages; `record`: write the build records that `pipeline.run` and `gc` read (a benchmark's build
        does not, so it never replaces the user's)."""
        self.hold = Hold()
        try:
            return self._run(gate, record)
        finally:
            self.hold.release()
            self.hold = None

    def _hold(self, path: Path) -> None:
        if self.hold is not None:
            self.hold.add(path)

    def _run(self, gate: bool, record: bool) -> BuildResult:
        r = self.recipe = hub.pin_revision(self.recipe, self.log)
        validate_with_model(r)
        from pipeline.quantize.registry import weight_format

        backend = select_backend(r.build.backend,
                                 needs_capability=weight_format(r.precision.quantization.quant).min_capability)
        result = BuildResult(r, backend)
        fetch, source = self.fetch()
        self._report(fetch)
        result.stages.append(fetch)
        self._hold(source)
        convert = self.convert(source)
        self._report(convert)
        result.stages.append(convert)
        if gate:
            from pipeline.quantize.gate import run_gate

            run_gate(r, convert.path, source, log=self.log)
        if backend.name == "tensorrt-llm":
            engine = self.engine(convert)
            self._report(engine)
            result.stages.append(engine)
        if backend.name in ("onnx", "tensorrt"):
            result.stages.append(self.onnx(convert, source))
            self._report(result.stages[-1])
        if backend.name == "tensorrt":
            result.stages.append(self.tensorrt(result.stages[-1]))
            self._report(result.stages[-1])
        if record:
            with write_errors(builds_dir(), None, "the build record"):
                record_build(result)
        self.log(f"backend: {backend.name} ({backend.reason})")
        self.log(f"artifact: {result.artifact}")
        self.log(f"run it: mpirun -n {r.world_size} python -m pipeline.run")
        return result

    def _report(self, stage: StageResult) -> None:
        state = "hit  (cached, nothing to do)" if stage.hit else f"built in {stage.seconds:.1f} s"
        self.log(f"{stage.name:<8} {stage.key}  {state}  [{stage.detail}]")


def record_build(result: BuildResult) -> None:
    """Remember the build for `python -m pipeline.run` without arguments (latest) and --recipe NAME."""
    r = result.recipe
    record = {
        "recipe": r.name,
        "resolved": r.to_dict(),
        "backend": result.backend.name,
        "backend_reason": result.backend.reason,
        "artifact": str(result.artifact),
        "stages": {s.name: {"key": s.key, "path": str(s.path), "hit": s.hit, "seconds": round(s.seconds, 3)}
                   for s in result.stages},
        "world_size": r.world_size,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finished_at_ns": time.time_ns(),
    }
    builds_dir().mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2) + "\n"
    atomic_write_text(builds_dir() / f"{r.name}.json", text)
    atomic_write_text(hub.checkpoints_dir() / "latest.json", text)


def read_build_record(recipe_name: str | None) -> dict:
    path = builds_dir() / f"{recipe_name}.json" if recipe_name else hub.checkpoints_dir() / "latest.json"
    if not path.is_file():
        what = f"recipe '{recipe_name}'" if recipe_name else "any recipe"
        raise PipelineError(f"no successful build of {what} in {hub.checkpoints_dir()}; build one first: "
                            f"make build RECIPE={recipe_name or '<name>'}")
    return json.loads(path.read_text())


def recipe_for(artifact: Path) -> dict:
    """The resolved recipe of the newest build that produced this artifact; else the one in its manifest.

    Runtime settings and golden outputs are not part of any stage key, so a later recipe may reuse an artifact
    with its own; the build records say which recipe used it last.
    """
    records = []
    for path in builds_dir().glob("*.json") if builds_dir().is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if Path(record.get("artifact", "")).resolve() == Path(artifact).resolve():
            records.append(record)
    if records:
        return max(records, key=lambda r: r.get("finished_at_ns", 0))["resolved"]
    return (read_manifest(artifact) or {}).get("recipe", {})
