"""`python -m pipeline plan RECIPE` (and `build --dry-run`): the stages a build would run, their cache keys,
hit or miss, and their commands.

Needs no network and no GPU and does no work: keys are computed from what is on disk (a fetch key from the recipe;
a convert key once the source files are at hand to hash; an engine key from the convert key), and the
trtllm-build command line comes from the recipe alone, with <placeholders> where a path is not known yet.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import BuildError
from pipeline.quantize.registry import weight_format
from pipeline.recipe import Recipe


@dataclass(frozen=True)
class PlanRow:
    stage: str
    key: str | None  # the stage's cache key, None where it needs inputs not yet at hand
    status: str
    command: str


def _fetch_command(recipe: Recipe) -> str:
    m = recipe.model
    if m.random:
        return f"random weights of shape '{m.random}', seed {m.seed} (pipeline.random_weights.make_random_checkpoint)"
    if m.hub:
        return f"hf download {m.hub} --revision {m.revision}  (config, *.safetensors, tokenizer)"
    return f"use the local folder {m.local}"


def _convert_command(recipe: Recipe, source: Path | None) -> str:
    """A command that runs this conversion as written: the convert stage alone where it needs nothing from the
    recipe beyond shape and dtype, else the build (which fetches, calibrates and quantizes first)."""
    q = recipe.precision.quantization
    if source is None or q.quant != "none" or q.kv_cache != "auto":
        why = "fetch first" if source is None else f"quant {q.quant}, kv_cache {q.kv_cache}: calibrated in the build"
        return f"python -m pipeline build {recipe.name}  ({why})"
    return (f"python -m pipeline.convert {source} converted-{recipe.name} --tp {recipe.parallel.tp} "
            f"--pp {recipe.parallel.pp} --dtype {recipe.precision.dtype} --workers {recipe.build.workers}")


def _source_on_disk(recipe: Recipe, fetch_key: str) -> Path | None:
    """The fetched Hugging Face folder if it is already here (no download, no generation)."""
    from pipeline import hub
    from pipeline.build import is_complete, stage_dir

    m = recipe.model
    if m.random:
        folder = stage_dir("fetch", fetch_key)
        return folder if is_complete(folder) else None
    if m.local:
        folder = hub.resolve_local(m.local)
        return folder if (folder / "config.json").is_file() else None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(m.hub, revision=m.revision, allow_patterns=hub.HUB_PATTERNS,
                                        cache_dir=hub.hf_cache_dir(), local_files_only=True))
    except Exception:  # not in the local cache (LocalEntryNotFoundError and friends): the key waits for fetch
        return None
    return folder if (folder / "config.json").is_file() else None


def _status(hit: bool) -> str:
    return "hit  (cached: nothing to do)" if hit else "miss (will run)"


def plan_rows(recipe: Recipe) -> list[PlanRow]:
    """One row per stage: fetch, convert, and engine (marked not applicable when the backend resolves to torch)."""
    from pipeline.backends import select_backend
    from pipeline.backends import tensorrt_llm as trt
    from pipeline.build import Builder, is_complete, stage_dir
    from pipeline.manifest import stage_key

    r = recipe
    q = r.precision.quantization
    builder = Builder(r, log=lambda _: None, show_progress=False)
    fetch_key = stage_key(builder.fetch_inputs())
    source = _source_on_disk(r, fetch_key)
    fetch_status = _status(source is not None) if not r.model.local else (
        "local folder (hashed, never copied)" if source is not None else "missing: the local folder has no config.json")
    convert_key = stage_key(builder.convert_inputs(source)) if source is not None else None
    convert_status = _status(is_complete(stage_dir("convert", convert_key))) if convert_key else \
        "miss (key known after fetch)"
    rows = [
        PlanRow("fetch", fetch_key, fetch_status, _fetch_command(r)),
        PlanRow("convert", convert_key, convert_status, _convert_command(r, source)),
    ]
    try:
        backend = select_backend(r.build.backend, needs_capability=weight_format(q.quant).min_capability)
        status = "planned" if backend.name == "tensorrt-llm" else \
            f"not applicable: backend {backend.name} ({backend.reason})"
    except BuildError as exc:
        status = "refused: " + " ".join(line.strip() for line in str(exc).splitlines())
    machine = trt.machine_info()
    problems = trt.plugin_problems(r, machine.compute_capability)
    if problems:
        status = "refused: " + "; ".join(problems)
    cache = trt.timing_cache_path(machine) if machine.compute_capability else \
        "checkpoints/timing-cache/<gpu>-sm<cc>-trt<version>.cache"
    checkpoint = stage_dir("convert", convert_key) if convert_key else "<checkpoint-dir>"
    engine_key = stage_key(trt.engine_inputs(r, convert_key, builder.versions)) if convert_key else None
    if engine_key and status == "planned":
        status = _status(is_complete(stage_dir("engine", engine_key)))
    command = trt.trtllm_build_command(r, checkpoint, "<engine-dir>", cache)
    rows.append(PlanRow("engine", engine_key, status, shlex.join(command)))
    if r.build.backend in ("onnx", "tensorrt"):
        rows.extend(graph_rows(r, builder, convert_key, source))
    return rows


def graph_rows(recipe: Recipe, builder, convert_key: str | None, source: Path | None) -> list[PlanRow]:
    """The onnx stage, and for build.backend tensorrt the engine stage with its equivalent trtexec command."""
    from pipeline import onnx_export
    from pipeline.build import is_complete, stage_dir
    from pipeline.manifest import stage_key

    r = recipe
    onnx_key = stage_key(onnx_export.stage_inputs(r, convert_key, builder.versions)) if convert_key else None
    onnx_dir = stage_dir("onnx", onnx_key) if onnx_key else None
    rows = [PlanRow("onnx", onnx_key, _status(is_complete(onnx_dir)) if onnx_dir else "miss (key known after fetch)",
                    f"torch.onnx.export(dynamo=True, opset {r.onnx.opset}) of the checkpoint -> model.onnx "
                    f"(dtype {r.precision.dtype}, qdq {r.onnx.qdq}); onnx.checker")]
    if r.build.backend != "tensorrt":
        return rows
    from pipeline.backends import tensorrt_engine as trt

    try:
        lib = trt.library()
    except BuildError as exc:
        return [*rows, PlanRow("tensorrt", None, "refused: " + " ".join(str(exc).split()), "-")]
    graph = _planned_graph(r, source)
    shapes = trt.profile_shapes(r, graph) if graph else None
    key = stage_key(trt.stage_inputs(r, onnx_key)) if onnx_key else None
    engine_dir = stage_dir("tensorrt", key) if key else "<engine-dir>"
    onnx_path = f"{onnx_dir or '<onnx-dir>'}/{onnx_export.GRAPH_FILE}"
    command = shlex.join(trt.trtexec_command(onnx_path, f"{engine_dir}/{trt.ENGINE_FILE}", shapes,
                                             trt.timing_cache_path(lib))) if shapes else \
        "trtexec (shapes known once the model's config.json is at hand)"
    status = _status(is_complete(stage_dir("tensorrt", key))) if key else "miss (key known after fetch)"
    return [*rows, PlanRow("tensorrt", key, f"{status}; builder {lib.module} {lib.version}", command)]


def _planned_graph(recipe: Recipe, source: Path | None) -> dict | None:
    """The graph's inputs from the model's config (config.json of the fetched folder or of a random shape)."""
    import json

    from pipeline.architectures import describe
    from pipeline.onnx_export import planned_graph
    from pipeline.shapes import SHAPES

    if recipe.model.random:
        hf = SHAPES[recipe.model.random]
    elif source is not None:
        hf = json.loads((source / "config.json").read_text())
    else:
        return None
    arch = describe(hf)
    return planned_graph(arch.num_layers, arch.num_kv_heads, arch.head_size, recipe.precision.dtype,
                         arch.max_positions)


def print_rows(rows: list[PlanRow]) -> None:
    for row in rows:
        print(f"{row.stage:<8} {row.key or '-':<20}  {row.status}\n         $ {row.command}")


def print_plan(recipe: Recipe) -> None:
    """Print what `make build` would do for this recipe, stage by stage, and how to run the result."""
    print(f"recipe {recipe.name}: world size {recipe.world_size} (tp={recipe.parallel.tp} pp={recipe.parallel.pp})")
    print_rows(plan_rows(recipe))
    if recipe.build.backend in ("onnx", "tensorrt"):
        print(f"run      $ python -m pipeline.run --recipe {recipe.name}")
    else:
        print(f"run      $ mpirun -n {recipe.world_size} python -m pipeline.run")

