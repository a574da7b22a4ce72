"""The recipe: one YAML file that says what to fetch, how to convert and build it, and how to run it.

Every setting and its default lives in the dataclasses below (and nowhere else); `python -m pipeline schema`
prints them field by field. Loading a recipe:

1. read recipes/<name>.yaml (or a path), follow `extends:` to its parents and deep-merge them (child wins,
   lists are replaced, not appended);
2. apply command-line overrides `a.b=value` (the value is parsed as YAML: `parallel.tp=2`, `runtime.prompts=[hi]`);
3. build the frozen dataclasses, collecting every problem (unknown key with a did-you-mean, wrong type,
   value not among the choices, cross-field rules) and raising them all at once as one RecipeError.

Checks against the model's own config (heads divisible by tp, layers by pp, sequence limits) are in
`check_against_model`, run as soon as the model's config.json is known (before any weights are read).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import RecipeError
from pipeline.typed_config import build, choices_of, to_plain
from pipeline.typed_config import doc_field as _f

_SOURCE_ROOT = Path(__file__).resolve().parent.parent
# A source checkout (or editable install) keeps checkpoints/ and relative recipe paths beside the code; an installed
# package (site-packages) keeps them in the folder it is run from, and its recipes inside the package.
IS_SOURCE_CHECKOUT = (_SOURCE_ROOT / "pyproject.toml").is_file() and (_SOURCE_ROOT / "recipes").is_dir()
REPO_ROOT = _SOURCE_ROOT if IS_SOURCE_CHECKOUT else Path.cwd()


DTYPES = ("auto", "float32", "float16", "bfloat16")
BACKENDS = ("auto", "torch", "tensorrt-llm", "onnx", "tensorrt")
ONNX_QDQ = ("none", "int8")
PLUGIN_DTYPES = ("auto", "float16", "bfloat16", "float32", "disable")


def _quant_choices() -> tuple[str, ...]:
    from pipeline.quantize.registry import weight_format_names

    return weight_format_names()


def _kv_cache_choices() -> tuple[str, ...]:
    from pipeline.quantize.registry import kv_cache_format_names

    return kv_cache_format_names()


@dataclass(frozen=True)
class ModelSpec:
    """Where the weights come from: exactly one of `hub`, `local` or `random`."""

    hub: str | None = _f(None, "Hugging Face repo id, e.g. openai-community/gpt2 (needs `revision`)")
    revision: str | None = _f(None, "the commit sha (40 hex digits), branch or tag of `hub`; a branch or tag is resolved "
                                   "to its commit at fetch and the build is pinned to it")
    local: str | None = _f(None, "a local folder in Hugging Face layout (config.json + *.safetensors); relative "
                                 "paths are from the repository root")
    random: str | None = _f(None, "random weights of a named shape (see `python -m pipeline shapes`)")
    seed: int = _f(0, "seed of the random weights (model.random only)", minimum=0)
    tokenizer: str | None = _f(None, "a local tokenizer folder, if the model folder has none (e.g. random weights)")


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration data for static activation scales (FP8) and KV-cache scales."""

    dataset: str = _f("pydoc-topics", "built-in offline text set (pydoc-topics) or a local .txt file")
    samples: int = _f(32, "number of calibration sequences", minimum=1)
    seq_len: int = _f(256, "tokens per calibration sequence", minimum=8)
    seed: int = _f(1234, "seed that picks the calibration sequences", minimum=0)


@dataclass(frozen=True)
class QuantizationSpec:
    """Quantization, as TensorRT-LLM 1.2's QuantConfig names it (quant_algo / kv_cache_quant_algo)."""

    quant: str = _f("none", "weight/activation format: none (the model dtype) or a format of "
                            "pipeline/quantize/schemes/ (fp8: W8A8 FP8, per-tensor; int8_weight_only: W8A16; ...)",
                    _quant_choices)
    kv_cache: str = _f("auto", "KV-cache format: auto (model dtype), fp8 or int8", _kv_cache_choices)
    exclude: tuple[str, ...] = _f(("lm_head",), "modules kept in high precision (name patterns, fnmatch)")
    calibration: CalibrationSpec = _f(CalibrationSpec, "calibration data (fp8, int4_awq, w8a8 formats, fp8/int8 KV "
                                                       "cache)")
    group_size: int = _f(128, "int4_awq / int4_groupwise: input channels that share one weight scale (QuantConfig "
                              "group_size; 64 or 128 for TensorRT-LLM's kernels)", minimum=1)
    awq_search: bool = _f(True, "int4_awq: search AWQ's per-channel pre-quant scales (false: plain group-wise "
                                "int4, the comparison point)")
    awq_grid: int = _f(20, "int4_awq: alphas searched per linear group, alpha = i / awq_grid for i < awq_grid",
                       minimum=1)
    smoothing: bool = _f(True, "w8a8_smoothquant: migrate activation outliers into the weights (false: plain "
                               "W8A8, the comparison point)")
    smoothquant_alpha: float = _f(0.5, "w8a8_smoothquant: migration strength alpha in [0, 1] (QuantConfig "
                                       "smoothquant_val)", minimum=0.0)
    per_channel: bool = _f(True, "w8a8 formats: one int8 weight scale per output channel (false: per tensor)")
    per_token: bool = _f(True, "w8a8 formats: dynamic activation scale per token (false: one static calibrated "
                               "scale per tensor)")


@dataclass(frozen=True)
class PrecisionSpec:
    dtype: str = _f("auto", "dtype of weights and activations; auto = the checkpoint's own (float32 -> float16, "
                            "as TensorRT-LLM's converters do)", DTYPES)
    quantization: QuantizationSpec = _f(QuantizationSpec, "lower-precision formats on top of `dtype`")


@dataclass(frozen=True)
class ParallelSpec:
    tp: int = _f(1, "tensor-parallel degree: ranks that split each layer", minimum=1)
    pp: int = _f(1, "pipeline-parallel degree: stages that split the layers", minimum=1)


@dataclass(frozen=True)
class PluginSpec:
    """TensorRT-LLM 1.2 builder plugins and features (trtllm-build flags; the torch backend ignores them)."""

    gpt_attention_plugin: str = _f("auto", "fused attention plugin dtype", PLUGIN_DTYPES)
    gemm_plugin: str = _f("auto", "GEMM plugin dtype (fp8 for FP8 recipes)", PLUGIN_DTYPES + ("fp8",))
    nccl_plugin: str = _f("auto", "NCCL all-reduce plugin dtype (multi-GPU only)", PLUGIN_DTYPES)
    context_fmha: bool = _f(True, "fused multi-head attention for the context phase")
    paged_kv_cache: bool = _f(True, "paged KV cache (kv_cache_type=paged); needed for in-flight batching")
    tokens_per_block: int = _f(32, "tokens per KV-cache block (paged KV cache)", minimum=1)
    remove_input_padding: bool = _f(True, "pack sequences without padding")
    use_fused_mlp: bool = _f(True, "fuse gate and fc GEMMs of gated MLPs")
    use_paged_context_fmha: bool = _f(True, "context FMHA over the paged KV cache (chunked context, reuse)")
    use_fp8_context_fmha: bool = _f(False, "FP8 context FMHA (FP8 recipes on Ada/Hopper only)")
    multiple_profiles: bool = _f(False, "several TensorRT optimization profiles (longer build, faster run)")
    reduce_fusion: bool = _f(False, "fuse all-reduce with the following norm (tp > 1)")


@dataclass(frozen=True)
class BuildSpec:
    backend: str = _f("auto", "auto: tensorrt-llm when importable with a suitable GPU, else torch; onnx: export an "
                              "ONNX graph (run by ONNX Runtime); tensorrt: that graph built into a TensorRT engine "
                              "(TensorRT, or TensorRT for RTX where only it is installed); see the `onnx` section",
                      BACKENDS)
    max_batch_size: int = _f(8, "largest batch the engine accepts", minimum=1)
    max_input_len: int | None = _f(None, "longest prompt in tokens; null = the sequence limit (max_seq_len)",
                                   minimum=1)
    max_seq_len: int | None = _f(None, "longest prompt + output in tokens; null = the model's max positions",
                                 minimum=1)
    max_num_tokens: int = _f(8192, "most tokens in one forward pass of a batch (packed)", minimum=1)
    workers: int = _f(1, "parallel workers for conversion and trtllm-build", minimum=1)
    log_level: str = _f("info", "trtllm-build log level", ("error", "warning", "info", "verbose"))
    plugins: PluginSpec = _f(PluginSpec, "TensorRT-LLM plugins")


@dataclass(frozen=True)
class OnnxSpec:
    """The ONNX export of build.backend onnx and tensorrt (tp = pp = 1; precision.dtype float32 or float16)."""

    opset: int = _f(18, "ONNX opset of the exported graph", minimum=18)
    qdq: str = _f("none", "int8: QuantizeLinear/DequantizeLinear around every linear layer but lm_head (weights "
                          "per channel, inputs per tensor from precision.quantization.calibration)", ONNX_QDQ)


@dataclass(frozen=True)
class RuntimeSpec:
    max_new_tokens: int = _f(32, "tokens to generate per prompt", minimum=1)
    temperature: float = _f(0.0, "sampling temperature; 0 = greedy", minimum=0.0)
    top_k: int = _f(0, "sample among the k most likely tokens; 0 = no limit", minimum=0)
    top_p: float = _f(1.0, "sample within cumulative probability p (nucleus); 1.0 = no limit", minimum=0.0)
    seed: int = _f(0, "seed of sampling", minimum=0)
    prompts: tuple[str, ...] = _f(("The capital of France is",), "prompts used when none is given on the command line")


@dataclass(frozen=True)
class GateSpec:
    """Accuracy the build must keep against the Hugging Face model in float32; null = not checked."""

    max_ppl_increase: float | None = _f(None, "largest relative perplexity increase, e.g. 0.02 for +2%", minimum=0.0)
    min_top1_agreement: float | None = _f(None, "smallest fraction of positions whose argmax token matches", minimum=0.0)
    max_kl: float | None = _f(None, "largest mean KL divergence of next-token distributions (nats)", minimum=0.0)


@dataclass(frozen=True)
class EvalSpec:
    dataset: str = _f("pydoc-topics-heldout", "held-out text: a built-in set (pydoc-topics-heldout, disjoint from the "
                                              "calibration set pydoc-topics) or a local .txt file")
    tokens: int = _f(2048, "number of held-out tokens scored", minimum=16)
    seq_len: int = _f(512, "tokens per scored window", minimum=8)
    gate: GateSpec = _f(GateSpec, "accuracy gate checked by `build` (after conversion) and `eval`")


@dataclass(frozen=True)
class GoldenSpec:
    prompt: str = _f("", "prompt fed greedily")
    tokens: tuple[int, ...] = _f((), "the generated token ids expected for it (runtime.max_new_tokens of them or fewer)")


@dataclass(frozen=True)
class VerifySpec:
    golden: tuple[GoldenSpec, ...] = _f((), "greedy outputs that `verify --run` must reproduce")


@dataclass(frozen=True)
class Recipe:
    """A whole recipe. `name` is the file's stem, not a key."""

    name: str = _f("", "the recipe's name (its file's stem)")
    description: str = _f("", "one line about what this recipe is for")
    model: ModelSpec = _f(ModelSpec, "where the weights come from")
    precision: PrecisionSpec = _f(PrecisionSpec, "dtype and quantization")
    parallel: ParallelSpec = _f(ParallelSpec, "tensor and pipeline parallelism")
    build: BuildSpec = _f(BuildSpec, "backend, limits and plugins")
    onnx: OnnxSpec = _f(OnnxSpec, "ONNX export (build.backend onnx or tensorrt)")
    runtime: RuntimeSpec = _f(RuntimeSpec, "generation settings of `python -m pipeline.run`")
    eval: EvalSpec = _f(EvalSpec, "accuracy evaluation and gate")
    verify: VerifySpec = _f(VerifySpec, "golden outputs")

    @property
    def world_size(self) -> int:
        return self.parallel.tp * self.parallel.pp

    def to_dict(self) -> dict:
        return to_plain(self)


# --------------------------------------------------------------------------------------------- loading


def recipes_dir() -> Path:
    """PIPELINE_RECIPES, else recipes/ of the source checkout, else the recipes installed with the package."""
    default = _SOURCE_ROOT / "recipes" if IS_SOURCE_CHECKOUT else Path(__file__).resolve().parent / "recipes"
    return Path(os.environ.get("PIPELINE_RECIPES", default))


def list_recipes() -> list[Path]:
    return sorted(recipes_dir().glob("*.yaml"))


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    path = recipes_dir() / f"{name_or_path}.yaml"
    if path.is_file():
        return path
    names = [p.stem for p in list_recipes()]
    hint = difflib.get_close_matches(str(name_or_path), names, n=3)
    raise RecipeError(
        [f"no recipe '{name_or_path}' in {recipes_dir()}"
         + (f"; did you mean {', '.join(hint)}?" if hint else "")
         + " (`python -m pipeline ls` lists them)"],
        source=str(name_or_path),
    )


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError([f"not valid YAML: {exc}"], source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError([f"the top level must be a mapping of sections, found {type(data).__name__}"], str(path))
    return data


def _merged_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in seen:
        chain = " -> ".join(p.stem for p in (*seen, path.resolve()))
        raise RecipeError([f"`extends` forms a cycle: {chain}"], source=str(path))
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError([f"extends: expected a recipe name, found {parent!r}"], source=str(path))
    base = _merged_yaml(resolve_recipe_path(parent), (*seen, path.resolve()))
    return deep_merge(base, data)


def deep_merge(base: dict, top: dict) -> dict:
    """Merge `top` into a copy of `base`: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], parsed value). The value is YAML, so 2 is an int and [a, b] a list."""
    if "=" not in text:
        raise RecipeError([f"override '{text}' must look like section.key=value (e.g. parallel.tp=2)"], "overrides")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise RecipeError([f"override key '{key}' must be dotted names like parallel.tp"], "overrides")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = dict(data)
    keys_seen: list[list[str]] = []
    for text in overrides:
        parts, value = parse_override(text)
        for other in keys_seen:
            shorter = min(len(other), len(parts))
            if other[:shorter] == parts[:shorter]:
                raise RecipeError(
                    [f"overrides '{'.'.join(other)}' and '{'.'.join(parts)}' set the same key or a parent and its "
                     f"child; give each key once"], "overrides")
        keys_seen.append(parts)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge, override and validate a recipe; raises RecipeError listing every problem."""
    path = resolve_recipe_path(name_or_path)
    data = apply_overrides(_merged_yaml(path), list(overrides))
    return recipe_from_dict(data, name=path.stem, source=str(path))


def recipe_from_dict(data: dict, name: str = "inline", source: str = "recipe") -> Recipe:
    problems: list[str] = []
    data = dict(data)
    data.pop("extends", None)
    if "name" in data:
        problems.append("name: not a recipe key; a recipe's name is its file name (recipes/<name>.yaml)")
    data["name"] = name
    recipe = build(Recipe, data, "", problems)
    if not problems:
        problems.extend(cross_field_problems(recipe))
    if problems:
        raise RecipeError(problems, source=source)
    return recipe


# --------------------------------------------------------------------------------------------- rules


def cross_field_problems(recipe: Recipe) -> list[str]:
    """Rules between fields that need no model config."""
    problems = []
    m = recipe.model
    sources = [k for k in ("hub", "local", "random") if getattr(m, k)]
    if len(sources) != 1:
        found = ", ".join(f"model.{k}" for k in sources) or "none"
        problems.append(f"model: set exactly one of model.hub, model.local or model.random (found: {found})")
    if m.hub and not m.revision:
        problems.append("model.revision: a Hub model needs a revision: a commit sha, or a branch or tag (main, v1.0) "
                        "that the build resolves to its commit and pins")
    if m.revision and not m.hub:
        problems.append("model.revision: only used with model.hub; remove it or set model.hub")
    if m.random:
        from pipeline.shapes import SHAPES

        if m.random not in SHAPES:
            close = difflib.get_close_matches(m.random, list(SHAPES), n=1)
            problems.append(f"model.random: unknown shape '{m.random}'" + (f"; did you mean '{close[0]}'?" if close else "")
                            + f" (known: {', '.join(SHAPES)})")
    q = recipe.precision.quantization
    from pipeline.quantize import registry

    if q.smoothquant_alpha > 1:
        problems.append(f"precision.quantization.smoothquant_alpha: {q.smoothquant_alpha} is outside [0, 1] "
                        f"(0 leaves activations as they are, 1 moves their whole range into the weights)")
    if registry.reserved(q.quant):
        problems.append(f"precision.quantization.quant: '{q.quant}' is reserved for a later release; "
                        f"use one of {', '.join(registry.weight_format_names(reserved=False))}")
    if q.quant != "none" and recipe.precision.dtype == "float32":
        problems.append(f"precision.dtype: float32 with quant {q.quant} is not a TensorRT-LLM combination (quantized "
                        f"GEMMs take float16/bfloat16 activations); set precision.dtype to float16 or bfloat16")
    b = recipe.build
    if b.max_seq_len is not None and b.max_input_len is not None and b.max_input_len > b.max_seq_len:
        problems.append(f"build.max_input_len: {b.max_input_len} exceeds build.max_seq_len {b.max_seq_len}; "
                        f"lower max_input_len or raise max_seq_len")
    problems.extend(plugin_problems(recipe))
    from pipeline.params import runtime_problems

    problems.extend(runtime_problems(recipe.runtime))
    problems.extend(onnx_problems(recipe))
    g = recipe.eval.gate
    if g.min_top1_agreement is not None and g.min_top1_agreement > 1.0:
        problems.append(f"eval.gate.min_top1_agreement: {g.min_top1_agreement} must be a fraction in [0, 1]")
    return problems


def plugin_problems(recipe: Recipe) -> list[str]:
    """Plugin and KV-cache combinations TensorRT-LLM 1.2 refuses whatever the GPU, each with its reason (quoting
    TensorRT-LLM's own message where it has one) and fix. The TensorRT-LLM adapter adds the rules that depend on the
    GPU and on its runtime."""
    from pipeline.quantize.registry import fp8_qdq_names, kv_cache_format, weight_format_or_none

    p, q = recipe.build.plugins, recipe.precision.quantization
    weights, kv = weight_format_or_none(q.quant), kv_cache_format(q.kv_cache)
    needs_fp8 = f"needs precision.quantization.quant: {' or '.join(fp8_qdq_names())}"
    problems = []
    if p.gpt_attention_plugin == "disable":
        for key, what in (("context_fmha", "fused context attention runs inside the GPT attention plugin"),
                          ("paged_kv_cache", "the paged KV cache is managed by the GPT attention plugin"),
                          ("remove_input_padding", "packed (padding-free) inputs need the GPT attention plugin")):
            if getattr(p, key):
                problems.append(f"build.plugins.{key}: needs gpt_attention_plugin, which is disabled ({what}); "
                                f"set build.plugins.gpt_attention_plugin: auto, or {key}: false")
    if p.paged_kv_cache and p.tokens_per_block & (p.tokens_per_block - 1):
        problems.append(f"build.plugins.tokens_per_block: {p.tokens_per_block} is not a power of 2, which the paged "
                        f"KV cache kernels need (\"tokensPerBlock must be power of 2\"); use 32 or 64")
    if kv.plugin_problems is not None:
        problems.extend(kv.plugin_problems(p, weights))
    if p.use_fp8_context_fmha and not weights.fp8_qdq:
        problems.append(f"build.plugins.use_fp8_context_fmha: {needs_fp8}")
    if p.use_fp8_context_fmha and not p.context_fmha:
        problems.append("build.plugins.use_fp8_context_fmha: needs context_fmha (\"FP8 FMHA cannot be enabled "
                        "because Context FMHA is not supported\"); set context_fmha: true")
    if p.gemm_plugin == "fp8" and not weights.fp8_qdq:
        problems.append(f"build.plugins.gemm_plugin: fp8 {needs_fp8}")
    return problems


_NUMERIC_CONFIG_KEYS = (  # the config.json numbers the weight maps read, in both naming schemes
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon", "hidden_size",
    "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "rms_norm_eps", "rope_theta")


def onnx_problems(recipe: Recipe) -> list[str]:
    """What the ONNX export (build.backend onnx / tensorrt) cannot do, each with its fix."""
    b, o, q = recipe.build, recipe.onnx, recipe.precision.quantization
    if b.backend not in ("onnx", "tensorrt"):
        return [f"onnx.qdq: {o.qdq} needs build.backend onnx or tensorrt"] if o.qdq != "none" else []
    problems = []
    if recipe.world_size != 1:
        problems.append(f"parallel: build.backend {b.backend} exports one graph (tp=1, pp=1), found tp="
                        f"{recipe.parallel.tp} pp={recipe.parallel.pp}; set both to 1")
    if recipe.precision.dtype not in ("float32", "float16"):
        problems.append(f"precision.dtype: build.backend {b.backend} exports float32 or float16 graphs, found "
                        f"'{recipe.precision.dtype}'; set it to float32 or float16")
    if q.quant != "none" or q.kv_cache != "auto":
        problems.append(f"precision.quantization: build.backend {b.backend} quantizes with onnx.qdq (int8 QDQ), "
                        f"not quant/kv_cache; set quant: none and kv_cache: auto")
    return problems


def check_against_model(recipe: Recipe, hf_config: dict) -> list[str]:
    """Rules between the recipe and the model's Hugging Face config.json; empty when all hold."""
    from pipeline.architectures import describe

    problems: list[str] = [f"the model's config.json: {key} is {hf_config[key]!r}, expected a number; correct it in "
                           f"the model folder's config.json (or fetch the model again)"
                           for key in _NUMERIC_CONFIG_KEYS if key in hf_config and hf_config[key] is not None
                           and (isinstance(hf_config[key], bool) or not isinstance(hf_config[key], int | float))]
    if problems:
        return problems
    try:
        arch = describe(hf_config)
    except Exception as exc:  # WeightMapError: unsupported architecture
        return [str(exc)]
    tp, pp = recipe.parallel.tp, recipe.parallel.pp
    nh, nkv, layers = arch.num_heads, arch.num_kv_heads, arch.num_layers
    if nh % tp:
        valid = [d for d in range(1, nh + 1) if nh % d == 0]
        problems.append(f"parallel.tp: {tp} does not divide the model's {nh} attention heads; choose tp from "
                        f"{valid}, or split the model with parallel.pp instead")
    elif not (nkv % tp == 0 or tp % nkv == 0):
        problems.append(f"parallel.tp: {tp} does not fit the model's {nkv} KV heads (tp must divide them or be a "
                        f"multiple of them); choose tp from "
                        f"{[d for d in range(1, nh + 1) if nh % d == 0 and (nkv % d == 0 or d % nkv == 0)]}")
    if layers % pp:
        valid = [d for d in range(1, layers + 1) if layers % d == 0]
        problems.append(f"parallel.pp: {pp} does not divide the model's {layers} layers; choose pp from {valid}")
    max_pos = arch.max_positions
    b = recipe.build
    if b.max_seq_len is not None and max_pos and b.max_seq_len > max_pos:
        problems.append(f"build.max_seq_len: {b.max_seq_len} exceeds the model's {max_pos} positions; "
                        f"set it to at most {max_pos} (or null for the model's limit)")
    seq = b.max_seq_len or max_pos
    if seq and b.max_input_len is not None and b.max_input_len > seq:
        problems.append(f"build.max_input_len: {b.max_input_len} exceeds the sequence limit {seq}; lower it")
    if arch.head_size % 8 and recipe.build.backend == "tensorrt-llm":
        problems.append(f"model: head size {arch.head_size} is not a multiple of 8, which TensorRT-LLM's attention "
                        f"kernels need; use backend: torch")
    from pipeline.quantize.registry import weight_format_or_none

    weights = weight_format_or_none(recipe.precision.quantization.quant)
    if arch.hidden_size % (weights.rank_input_multiple * tp):
        problems.append(f"precision.quantization.quant: {weights.name} {weights.rank_input_reason}")
    return problems


# --------------------------------------------------------------------------------------------- docs


def schema_lines(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every field with its type, default and documentation, for `python -m pipeline schema`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if cls is Recipe and f.name == "name":
            continue
        hint = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(hint):
            lines.append(f"{key}:  # {f.metadata['doc']}")
            lines.extend(schema_lines(hint, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        type_name = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
        choices = choices_of(f.metadata)
        extra = f" [{' | '.join(map(str, choices))}]" if choices else ""
        lines.append(f"  {key} = {to_plain(default)!r}  ({type_name}){extra}\n      {f.metadata['doc']}")
    return lines
