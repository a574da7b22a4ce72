"""The TensorRT-LLM 1.2.1 adapter, proven by contract on a machine without TensorRT-LLM.

* Every flag the adapter emits is parsed by a parser built from trtllm-build 1.2.1's own flags and choices
  (kept below as data, read from its source).
* A stand-in `trtllm-build` (tests/fake_trtllm/) on PATH records its argv and writes rank{r}.engine files, so the
  orchestration runs for real: timing cache in and out, workers, failure handling, atomic output, per-rank
  engines, the engine stage's cache, and the compatibility check before loading.
* The converter's checkpoint passes the consistency checks of TensorRT-LLM 1.2's PretrainedConfig / Mapping /
  QuantConfig, restated below from their source.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
from pathlib import Path

import pytest

import pipeline.backends as backends
import pipeline.backends.tensorrt_llm as trt
import pipeline.build as build
from pipeline.backends import TRTLLM_EXTRA, BackendChoice
from pipeline.backends.tensorrt_llm import MachineInfo
from pipeline.build import Builder
from pipeline.errors import BuildError
from pipeline.recipe import recipe_from_dict
from tests.conftest import mpirun, run_cli

FAKE_BIN = Path(__file__).resolve().parent / "fake_trtllm"
H100 = MachineInfo("NVIDIA H100 80GB HBM3", (9, 0), "10.13.3", "1.2.1")

# --------------------------------------------------------------------------------------------- 1.2.1's flags
# trtllm-build's command line in TensorRT-LLM 1.2, from NVIDIA/TensorRT-LLM
#   tensorrt_llm/commands/build.py  @ 65f1d1536e18aea3380e6e270e00895a709333eb  (parse_arguments)
#   tensorrt_llm/plugin/plugin.py   @ c20322ffd3dc0740ca530c9fad989b22e64f6e06  (PluginConfig fields listed in
#                                     cli_plugin_args, exposed by add_plugin_argument)
#   log levels: tensorrt_llm/logger.py severity_map keys (also in the 1.x trtllm-build usage text)
#   --kv_cache_type: KVCacheType.from_string (cpp ModelConfig::KVCacheTypeFromString, case-insensitive)
# Values: int, str (any), a tuple of choices, "flag" (store_true), "list" (nargs="+").
PLUGIN_DTYPES = ("auto", "float16", "float32", "bfloat16", "int32", "disable")  # DefaultPluginDtype + None
ENABLE = ("enable", "disable")  # bool PluginConfig fields
TRTLLM_BUILD_1_2_1 = {
    "--checkpoint_dir": str, "--model_config": str, "--build_config": str, "--model_cls_file": str,
    "--model_cls_name": str, "--output_dir": str,
    "--max_batch_size": int, "--max_input_len": int, "--max_seq_len": int, "--max_beam_width": int,
    "--max_num_tokens": int, "--opt_num_tokens": int, "--max_encoder_input_len": int,
    "--max_prompt_embedding_table_size": int,
    "--kv_cache_type": "kv_cache_type", "--paged_kv_cache": str,
    "--input_timing_cache": str, "--output_timing_cache": str,
    "--profiling_verbosity": ("layer_names_only", "detailed", "none"),
    "--strip_plan": "flag", "--weight_sparsity": "flag", "--weight_streaming": "flag", "--fast_build": "flag",
    "--workers": int,
    "--log_level": ("internal_error", "error", "warning", "info", "verbose", "debug", "trace"),
    "--enable_debug_output": "flag", "--visualize_network": str, "--dry_run": "flag", "--monitor_memory": "flag",
    "--logits_dtype": ("float16", "float32"),
    "--gather_context_logits": "flag", "--gather_generation_logits": "flag", "--gather_all_token_logits": "flag",
    "--lora_dir": "list", "--lora_ckpt_source": ("hf", "nemo"), "--lora_target_modules": "list",
    "--max_lora_rank": int,
    "--speculative_decoding_mode": ("draft_tokens_external", "lookahead_decoding", "medusa",
                                    "explicit_draft_tokens", "eagle"),
    "--max_draft_len": int,
    # plugins
    "--bert_attention_plugin": PLUGIN_DTYPES, "--gpt_attention_plugin": PLUGIN_DTYPES,
    "--gemm_plugin": ("auto", "float16", "float32", "bfloat16", "int32", "fp8", "nvfp4", "disable"),
    "--gemm_swiglu_plugin": ("fp8", "disable"), "--fp8_rowwise_gemm_plugin": PLUGIN_DTYPES,
    "--lora_plugin": PLUGIN_DTYPES, "--dora_plugin": ENABLE, "--moe_plugin": PLUGIN_DTYPES,
    "--mamba_conv1d_plugin": PLUGIN_DTYPES, "--nccl_plugin": PLUGIN_DTYPES,
    "--low_latency_gemm_plugin": ("fp8", "disable"), "--low_latency_gemm_swiglu_plugin": ("fp8", "disable"),
    "--gemm_allreduce_plugin": ("float16", "bfloat16", "disable"),
    # features
    "--context_fmha": ENABLE, "--bert_context_fmha_fp32_acc": ENABLE, "--remove_input_padding": ENABLE,
    "--tokens_per_block": int, "--use_paged_context_fmha": ENABLE, "--use_fp8_context_fmha": ENABLE,
    "--fuse_fp4_quant": ENABLE, "--multiple_profiles": ENABLE, "--paged_state": ENABLE, "--streamingllm": ENABLE,
    "--norm_quant_fusion": ENABLE, "--reduce_fusion": ENABLE, "--user_buffer": ENABLE, "--use_fused_mlp": ENABLE,
    "--pp_reduce_scatter": ENABLE,
}
ALIASES = {"--max_seq_len": "--max_decoder_seq_len", "--max_prompt_embedding_table_size": "--max_multimodal_len"}


def _kv_cache_type(value: str) -> str:
    if value.upper() not in ("CONTINUOUS", "PAGED", "DISABLED"):
        raise argparse.ArgumentTypeError(f"invalid KVCacheType {value!r}")
    return value


def trtllm_build_1_2_1_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trtllm-build", allow_abbrev=False, exit_on_error=False)
    for flag, spec in TRTLLM_BUILD_1_2_1.items():
        names = [flag] + ([ALIASES[flag]] if flag in ALIASES else [])
        if spec == "flag":
            parser.add_argument(*names, action="store_true")
        elif spec == "list":
            parser.add_argument(*names, nargs="+")
        elif spec == "kv_cache_type":
            parser.add_argument(*names, type=_kv_cache_type)
        elif isinstance(spec, tuple):
            parser.add_argument(*names, type=str, choices=spec)
        else:
            parser.add_argument(*names, type=spec)
    return parser


def assert_valid_for_1_2_1(argv: list[str]) -> argparse.Namespace:
    """argv (without the executable) parses with 1.2.1's flags and choices; each flag is given once."""
    flags = [a for a in argv if a.startswith("--")]
    assert len(flags) == len(set(flags)), f"a flag is repeated: {flags}"
    try:
        namespace, unknown = trtllm_build_1_2_1_parser().parse_known_args(argv)
    except argparse.ArgumentError as exc:
        pytest.fail(f"trtllm-build 1.2.1 rejects {exc}")
    assert unknown == [], f"not trtllm-build 1.2.1 flags: {unknown}"
    return namespace


def flag_values(argv: list[str]) -> dict[str, str]:
    assert all(a.startswith("--") for a in argv[1::2]) and len(argv[1:]) % 2 == 0, argv
    return {k: v for k, v in zip(argv[1::2], argv[2::2])}


# --------------------------------------------------------------------------------------------- recipes


def recipe(name: str = "trt-tiny", shape: str = "gpt2-tiny", **sections):
    data = {"model": {"random": shape}}
    data.update(sections)
    return recipe_from_dict(data, name=name)


def with_plugins(r, **plugins):
    """A recipe with plugin settings that recipe validation would refuse (to test the adapter's own rules)."""
    build_spec = dataclasses.replace(r.build, plugins=dataclasses.replace(r.build.plugins, **plugins))
    return dataclasses.replace(r, build=build_spec)


COMMAND_RECIPES = {
    "defaults": {},
    "fp8": {"precision": {"dtype": "bfloat16", "quantization": {"quant": "fp8", "kv_cache": "fp8"}},
            "build": {"plugins": {"gemm_plugin": "fp8", "use_fp8_context_fmha": True}}},
    "int4-int8kv": {"precision": {"quantization": {"quant": "int4_weight_only", "kv_cache": "int8"}},
                    "build": {"plugins": {"use_paged_context_fmha": False}}},
    "tp2-tuned": {"parallel": {"tp": 2}, "build": {"workers": 4, "log_level": "verbose", "max_batch_size": 64,
                                                   "max_input_len": 100, "max_seq_len": 120, "max_num_tokens": 4096,
                                                   "plugins": {"multiple_profiles": True, "reduce_fusion": True,
                                                               "nccl_plugin": "float16", "tokens_per_block": 64}}},
    "no-plugins": {"build": {"plugins": {"gpt_attention_plugin": "float32", "gemm_plugin": "disable",
                                         "paged_kv_cache": False, "context_fmha": False,
                                         "use_paged_context_fmha": False, "use_fused_mlp": False}}},
}


@pytest.mark.parametrize("case", sorted(COMMAND_RECIPES))
def test_every_emitted_flag_exists_in_trtllm_build_1_2_1(case, tmp_path):
    shape = "llama-tiny" if case in ("fp8", "int4-int8kv") else "gpt2-tiny"
    argv = trt.trtllm_build_command(recipe(shape=shape, **COMMAND_RECIPES[case]), tmp_path / "ckpt",
                                    tmp_path / "out", tmp_path / "cache")
    assert argv[0] == "trtllm-build"
    namespace = assert_valid_for_1_2_1(argv[1:])
    explicit = {"checkpoint_dir", "output_dir", "max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens",
                "gpt_attention_plugin", "gemm_plugin", "context_fmha", "kv_cache_type", "tokens_per_block",
                "remove_input_padding", "use_fused_mlp", "use_paged_context_fmha", "use_fp8_context_fmha",
                "multiple_profiles", "workers", "log_level", "output_timing_cache"}
    assert all(getattr(namespace, name) is not None for name in explicit), vars(namespace)


def test_command_carries_the_recipes_limits_and_plugins(tmp_path):
    flags = flag_values(trt.trtllm_build_command(recipe(**COMMAND_RECIPES["tp2-tuned"]), "/c", "/o", tmp_path / "c"))
    assert flags == {
        "--checkpoint_dir": "/c", "--output_dir": "/o", "--max_batch_size": "64", "--max_input_len": "100",
        "--max_seq_len": "120", "--max_num_tokens": "4096", "--max_beam_width": "1", "--kv_cache_type": "paged",
        "--gpt_attention_plugin": "auto", "--gemm_plugin": "auto", "--nccl_plugin": "float16",
        "--context_fmha": "enable", "--remove_input_padding": "enable", "--tokens_per_block": "64",
        "--use_fused_mlp": "enable", "--use_paged_context_fmha": "enable", "--use_fp8_context_fmha": "disable",
        "--multiple_profiles": "enable", "--reduce_fusion": "enable", "--workers": "2", "--log_level": "verbose",
        "--output_timing_cache": str(tmp_path / "c"),  # no --input_timing_cache: the file does not exist yet
    }
    # null limits: max_seq_len = the model's positions (gpt2-tiny: 128), max_input_len = max_seq_len
    defaults = flag_values(trt.trtllm_build_command(recipe(), "/c", "/o", tmp_path / "c"))
    assert (defaults["--max_seq_len"], defaults["--max_input_len"], defaults["--tokens_per_block"]) == ("128", "128", "32")
    assert defaults["--workers"] == "1"  # workers never exceed the ranks there are to build
    fp8 = flag_values(trt.trtllm_build_command(recipe(shape="llama-tiny", **COMMAND_RECIPES["fp8"]), "/c", "/o", "/t"))
    assert (fp8["--gemm_plugin"], fp8["--use_fp8_context_fmha"], fp8["--use_fused_mlp"]) == ("fp8", "enable", "enable")
    int4 = flag_values(trt.trtllm_build_command(recipe(shape="llama-tiny", **COMMAND_RECIPES["int4-int8kv"]),
                                                "/c", "/o", "/t"))
    assert int4["--use_fused_mlp"] == "disable"  # what trtllm-build 1.2 does for weight-only quantization
    flat = flag_values(trt.trtllm_build_command(recipe(**COMMAND_RECIPES["no-plugins"]), "/c", "/o", "/t"))
    assert (flat["--kv_cache_type"], flat["--gemm_plugin"], flat["--context_fmha"]) == ("continuous", "disable",
                                                                                       "disable")
    (tmp_path / "c").write_bytes(b"cache")
    again = flag_values(trt.trtllm_build_command(recipe(), "/c", "/o", tmp_path / "c"))
    assert again["--input_timing_cache"] == again["--output_timing_cache"] == str(tmp_path / "c")


# --------------------------------------------------------------------------------------------- refusals

REFUSALS = [
    ({"gpt_attention_plugin": "disable"}, None, {},
     ["build.plugins.context_fmha: needs gpt_attention_plugin, which is disabled (fused context attention runs inside "
      "the GPT attention plugin); set build.plugins.gpt_attention_plugin: auto, or context_fmha: false",
      "build.plugins.paged_kv_cache: needs gpt_attention_plugin, which is disabled",
      "build.plugins.remove_input_padding: needs gpt_attention_plugin, which is disabled",
      "build.plugins: ModelRunnerCpp (the TensorRT-LLM 1.2 runtime this pipeline uses) runs only in-flight-batching "
      "engines"]),
    ({}, (8, 0), {"precision": {"dtype": "bfloat16", "quantization": {"quant": "fp8"}}},
     ["precision.quantization.quant: fp8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell); this GPU has 8.0. "
      "Use int8_weight_only / kv_cache: int8, or build on an FP8-capable GPU"]),
    ({}, (8, 6), {"precision": {"dtype": "float16", "quantization": {"quant": "fp8", "kv_cache": "fp8"}}},
     ["precision.quantization.quant: fp8 needs compute capability >= 8.9"]),
    ({"use_paged_context_fmha": True}, (9, 0), {"precision": {"quantization": {"kv_cache": "int8"}},
                                                "build": {"plugins": {"use_paged_context_fmha": False}}},
     ["build.plugins.use_paged_context_fmha: TensorRT-LLM 1.2 refuses paged context FMHA with an INT8 KV cache "
      "(\"Paged Context FMHA doesn't work with int8 kv cache\")"]),
    ({"use_paged_context_fmha": True}, (9, 0), {"precision": {"quantization": {"kv_cache": "fp8"}},
                                                "build": {"plugins": {"use_paged_context_fmha": False}}},
     ["an FP8 KV cache with paged context FMHA needs the FP8 quantization workflow (\"FP8 Paged Context FMHA only "
      "works with fp8 quantization workflow\")"]),
    ({"context_fmha": False, "use_fp8_context_fmha": True}, (9, 0),
     {"precision": {"dtype": "float16", "quantization": {"quant": "fp8"}}},
     ["build.plugins.use_fp8_context_fmha: needs context_fmha (\"FP8 FMHA cannot be enabled because Context FMHA is "
      "not supported\")"]),
    ({}, (7, 5), {"precision": {"dtype": "bfloat16"}},
     ["precision.dtype: bfloat16 needs compute capability >= 8.0 (\"pre SM 80 GPUs do not support bfloat16\"); this "
      "GPU has 7.5. Use precision.dtype: float16"]),
    ({"tokens_per_block": 48}, None, {},
     ["build.plugins.tokens_per_block: 48 is not a power of 2, which the paged KV cache kernels need"]),
    ({"paged_kv_cache": False}, None, {}, ["ModelRunnerCpp (the TensorRT-LLM 1.2 runtime this pipeline uses)"]),
]


@pytest.mark.parametrize("plugins,cc,sections,expected", REFUSALS)
def test_refused_plugin_combinations_say_why(plugins, cc, sections, expected):
    r = with_plugins(recipe(shape="llama-tiny", **sections), **plugins)
    problems = trt.plugin_problems(r, cc)
    assert len(problems) == len(expected), problems
    for want, got in zip(expected, problems):
        assert want in got


@pytest.mark.parametrize("sections,cc", [
    ({}, (7, 0)), ({"precision": {"dtype": "bfloat16"}}, (8, 0)),
    ({"precision": {"dtype": "bfloat16", "quantization": {"quant": "fp8", "kv_cache": "fp8"}},
      "build": {"plugins": {"gemm_plugin": "fp8", "use_fp8_context_fmha": True}}}, (9, 0)),
    ({"precision": {"quantization": {"quant": "int8_weight_only", "kv_cache": "int8"}},
      "build": {"plugins": {"use_paged_context_fmha": False}}}, (8, 6)),
])
def test_supported_combinations_pass(sections, cc):
    assert trt.plugin_problems(recipe(shape="llama-tiny", **sections), cc) == []


# --------------------------------------------------------------------------------------------- the stand-in builder


@pytest.fixture(scope="module")
def checkpoint(home):
    """A real converted checkpoint: gpt2-tiny, tp=2 (two rank files)."""
    r = recipe("trt-ckpt-tp2", parallel={"tp": 2})
    return Builder(r, log=lambda _: None, show_progress=False).run().artifact


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """The stand-in trtllm-build on PATH, an H100 as this machine, and a fresh checkpoints/ for caches and logs."""
    record = tmp_path / "trtllm-build-calls.jsonl"
    monkeypatch.setenv("PATH", f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TRTLLM_RECORD", str(record))
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(trt, "machine_info", lambda device=0: H100)

    def calls():
        return [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    return calls


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_writes_every_rank_and_reuses_the_timing_cache(checkpoint, stand_in, tmp_path):
    r = recipe("trt-ckpt-tp2", parallel={"tp": 2}, build={"workers": 4})
    lines: list[str] = []
    out1 = tmp_path / "out1"
    out1.mkdir()
    report1 = trt.build_engines(r, checkpoint, out1, log=lines.append)

    (call,) = stand_in()
    assert_valid_for_1_2_1(call["argv"])
    flags = flag_values(["trtllm-build", *call["argv"]])
    cache = tmp_path / "home" / "timing-cache" / "NVIDIA-H100-80GB-HBM3-sm90-trt10.13.3.cache"
    assert flags["--checkpoint_dir"] == str(checkpoint) and flags["--output_dir"] == str(out1)
    assert flags["--workers"] == "2"
    assert "--input_timing_cache" not in flags  # no cache yet
    assert Path(flags["--output_timing_cache"]).parent == cache.parent  # written beside it, then renamed
    assert Path(call["cwd"]) not in (Path.cwd(), out1)  # stray files of trtllm-build land in a scratch folder
    assert sorted(p.name for p in out1.iterdir()) == ["config.json", "rank0.engine", "rank1.engine"]
    for rank in (0, 1):  # rank r's engine was built from rank r's weights
        engine = json.loads((out1 / f"rank{rank}.engine").read_bytes().split(b"\n", 1)[1])
        assert engine["weights_sha256"] == _sha(checkpoint / f"rank{rank}.safetensors")
    assert json.loads((out1 / "config.json").read_text())["version"] == "1.2.1"
    assert cache.read_text() == "tactics for GPT2LMHeadModel float16 world 2\n"
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary cache left behind
    assert report1["timing_cache"] == {"path": str(cache), "read": False, "sha256_before": None,
                                       "sha256_after": _sha(cache)}
    assert report1["world_size"] == 2 and report1["engine_version"] == "1.2.1" and report1["returncode"] == 0
    progress = [line for line in lines if line.startswith("engine   [")]
    assert [p.split("] ", 1)[1] for p in progress] == [
        "building a TensorRT engine (kernel tactic auto-tuning)", "build phase finished", "engine built (1/2)",
        "building a TensorRT engine (kernel tactic auto-tuning)", "build phase finished", "engine built (2/2)",
        "all engines built"]
    assert "  | [TRT-LLM] [I] Total time of building all engines: 00:00:00" in lines
    log_text = Path(report1["log"]).read_text()
    assert log_text.startswith("$ ") and "Total time of building all engines" in log_text

    out2 = tmp_path / "out2"
    out2.mkdir()
    report2 = trt.build_engines(r, checkpoint, out2, log=lambda _: None)
    flags2 = flag_values(["trtllm-build", *stand_in()[1]["argv"]])
    assert flags2["--input_timing_cache"] == str(cache)  # the tactic choices of the first build are read back
    engine = json.loads((out2 / "rank0.engine").read_bytes().split(b"\n", 1)[1])
    assert engine["timing_cache_bytes_in"] == len("tactics for GPT2LMHeadModel float16 world 2\n")
    assert cache.read_text().count("tactics for") == 2
    assert report2["timing_cache"]["read"] is True
    assert report2["timing_cache"]["sha256_before"] == report1["timing_cache"]["sha256_after"] != \
        report2["timing_cache"]["sha256_after"] == _sha(cache)


@pytest.mark.parametrize("failure,cause,evidence,fix", [
    ("oom", "out of memory", "Error Code 2: OutOfMemory", "lower build.max_batch_size"),
    ("plugin", "unsupported plugin or feature", "gemm_swiglu_plugin=fp8 is not supported on SM 100",
     "change the build.plugins.*"),
    ("version", "version mismatch", "kSERIALIZATION_VERSION", "pip install -e '.[tensorrt-llm]'"),
])
def test_failed_build_keeps_its_log_and_names_the_likely_cause(checkpoint, stand_in, monkeypatch, tmp_path,
                                                              failure, cause, evidence, fix):
    monkeypatch.setenv("FAKE_TRTLLM_FAIL", failure)
    cache = trt.timing_cache_path(H100)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"tactics of earlier builds\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BuildError) as info:
        trt.build_engines(recipe("trt-ckpt-tp2", parallel={"tp": 2}), checkpoint, out, log=lambda _: None)
    message = str(info.value)
    assert message.startswith("trtllm-build failed (exit 1) after ")
    assert f"; likely cause: {cause}.\n" in message and evidence in message and fix in message
    log_path = Path(message.split("Full log: ")[1].strip())
    assert log_path.parent == tmp_path / "home" / "logs" and evidence in log_path.read_text()
    assert list(out.iterdir()) == []  # nothing that could pass for engines (oom had written rank0.engine)
    assert cache.read_bytes() == b"tactics of earlier builds\n"  # only a successful build replaces the cache
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]


def test_builder_that_skips_a_rank_is_an_error(checkpoint, stand_in, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_TRTLLM_RANKS", "0")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BuildError, match=r"trtllm-build exited 0 but did not write rank1.engine in .* \(the "
                                         r"checkpoint has 2 rank\(s\)\); the build is incomplete and was discarded"):
        trt.build_engines(recipe("trt-ckpt-tp2", parallel={"tp": 2}), checkpoint, out, log=lambda _: None)
    assert list(out.iterdir()) == []
    assert not trt.timing_cache_path(H100).exists()


def test_without_trtllm_build_the_error_names_the_extra(checkpoint, stand_in, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BuildError) as info:
        trt.build_engines(recipe("trt-ckpt-tp2", parallel={"tp": 2}), checkpoint, tmp_path, log=lambda _: None)
    assert str(info.value).startswith("trtllm-build is not on PATH, so TensorRT engines cannot be built.\n  Fix: "
                                      + TRTLLM_EXTRA)


def test_refused_combination_never_launches_the_builder(checkpoint, stand_in, tmp_path):
    r = with_plugins(recipe("trt-ckpt-tp2", parallel={"tp": 2}, precision={"quantization": {"kv_cache": "int8"}},
                            build={"plugins": {"use_paged_context_fmha": False}}), use_paged_context_fmha=True)
    with pytest.raises(BuildError, match=r"TensorRT-LLM 1.2.1 would refuse this build:\n  - build.plugins."
                                         r"use_paged_context_fmha: TensorRT-LLM 1.2 refuses paged context FMHA"):
        trt.build_engines(r, checkpoint, tmp_path, log=lambda _: None)
    assert stand_in() == []


def test_the_plan_prints_the_exact_command_a_build_runs(checkpoint, stand_in, tmp_path, capsys):
    """plan's trtllm-build line is the build's argv, placeholders aside."""
    from pipeline.plan import plan_rows

    r = recipe("trt-ckpt-tp2", parallel={"tp": 2})
    (engine_row,) = [row for row in plan_rows(r) if row.stage == "engine"]
    out = tmp_path / "out"
    out.mkdir()
    trt.build_engines(r, checkpoint, out, log=lambda _: None)
    planned = shlex.split(engine_row.command)
    ran = ["trtllm-build", *stand_in()[0]["argv"]]
    skip = {"--checkpoint_dir", "--output_dir", "--output_timing_cache"}
    assert [a for i, a in enumerate(planned) if not (i and planned[i - 1] in skip)] == \
        [a for i, a in enumerate(ran) if not (i and ran[i - 1] in skip)]


# --------------------------------------------------------------------------------------------- the engine stage


@pytest.fixture(scope="module")
def engine_build(home, tmp_path_factory):
    """The whole `make build` with backend tensorrt-llm and the stand-in builder: fetch, convert, engine."""
    record = tmp_path_factory.mktemp("calls") / "calls.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}")
        # as if the tensorrt-llm extra were installed: the versions recorded in the engine stage's key
        installed = {**build.library_versions(), "tensorrt": H100.tensorrt, "tensorrt_llm": H100.tensorrt_llm}
        mp.setattr(build, "library_versions", lambda: installed)
        mp.setenv("FAKE_TRTLLM_RECORD", str(record))
        mp.setattr(trt, "machine_info", lambda device=0: H100)
        mp.setattr(build, "select_backend", lambda *a, **k: BackendChoice("tensorrt-llm", "test: stand-in builder"))
        lines: list[str] = []
        result = Builder(recipe("trt-engine-tp2", parallel={"tp": 2}), log=lines.append, show_progress=False).run()
    return result, record, lines


def test_engine_stage_is_cached_by_what_changes_engines(home, engine_build, monkeypatch):
    result, record, lines = engine_build
    engine = result.stages[-1]
    assert (engine.name, engine.hit, engine.path) == ("engine", False, home / "engine" / engine.key)
    assert result.artifact == engine.path
    manifest = json.loads((engine.path / "manifest.json").read_text())
    assert sorted(manifest["outputs"]) == ["config.json", "rank0.engine", "rank1.engine"]
    assert manifest["inputs"]["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert manifest["inputs"]["convert"] == result.stages[1].key
    assert manifest["trtllm_build"]["command"][1:3] == ["--checkpoint_dir", str(result.stages[1].path)]
    assert "backend: tensorrt-llm (test: stand-in builder)" in lines
    assert json.loads((home / "latest.json").read_text())["artifact"] == str(engine.path)

    monkeypatch.setenv("PATH", f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TRTLLM_RECORD", str(record))
    monkeypatch.setattr(trt, "machine_info", lambda device=0: H100)
    installed = {**build.library_versions(), "tensorrt": H100.tensorrt, "tensorrt_llm": H100.tensorrt_llm}
    monkeypatch.setattr(build, "library_versions", lambda: installed)
    monkeypatch.setattr(build, "select_backend", lambda *a, **k: BackendChoice("tensorrt-llm", "test"))

    def rebuild(**build_section):
        return Builder(recipe("trt-engine-tp2", parallel={"tp": 2}, build=build_section), log=lambda _: None,
                       show_progress=False).run().stages[-1]

    calls = len(record.read_text().splitlines())
    same = rebuild(log_level="verbose", workers=2)  # neither changes an engine's bytes
    assert (same.hit, same.key) == (True, engine.key)
    assert len(record.read_text().splitlines()) == calls  # a hit runs no builder
    other = rebuild(plugins={"tokens_per_block": 64})
    assert other.hit is False and other.key != engine.key
    assert (home / "engine" / other.key / "rank1.engine").is_file()

    monkeypatch.setenv("FAKE_TRTLLM_FAIL", "oom")
    with pytest.raises(BuildError, match="likely cause: out of memory"):
        rebuild(max_batch_size=4)
    names = sorted(p.name for p in (home / "engine").iterdir())
    assert not [n for n in names if n.startswith(".tmp-")]  # the failed build left no folder behind
    assert sorted(names) == sorted([engine.key, other.key])


def test_compatible_engine_passes_the_check(engine_build):
    result, _, _ = engine_build
    assert trt.check_engine_compatibility(result.artifact, 2, H100) == []


@pytest.mark.parametrize("machine,world,expected", [
    (MachineInfo("NVIDIA A100-SXM4-80GB", (8, 0), "10.13.3", "1.2.1"), 2,
     "the engine was built for GPU compute capability 9.0 (NVIDIA H100 80GB HBM3); this rank's GPU is NVIDIA "
     "A100-SXM4-80GB, compute capability 8.0"),
    (dataclasses.replace(H100, tensorrt_llm="1.3.0"), 2,
     "the engine was built with TensorRT-LLM 1.2.1; this machine has 1.3.0"),
    (dataclasses.replace(H100, tensorrt="10.14.1"), 2,
     "the engine was built with TensorRT 10.13.3; this machine has 10.14.1 (TensorRT plans are not portable"),
    (dataclasses.replace(H100, tensorrt_llm=None), 2,
     f"tensorrt_llm is not installed (the engine was built with TensorRT-LLM 1.2.1); install it: {TRTLLM_EXTRA}"),
    (H100, 1, "the engine was built for 2 rank(s) (tp=2, pp=1) but 1 was started; run: mpirun -n 2 python -m "
              "pipeline.run"),
    (MachineInfo(None, None, None, None), 2, "no CUDA GPU is visible to this rank"),
])
def test_incompatible_engine_is_named(engine_build, machine, world, expected):
    result, _, _ = engine_build
    problems = trt.check_engine_compatibility(result.artifact, world, machine)
    assert any(expected in p for p in problems), problems


def test_run_refuses_an_engine_this_machine_cannot_load(home, engine_build):
    """Real mpirun, real run.py dispatch: every rank checks before loading and all print the rebuild command."""
    result, _, _ = engine_build
    proc = mpirun(home, 2, "--engine", str(result.artifact), "--prompt-ids", "1,2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: the engine {result.artifact} cannot run here:" in proc.stderr
    assert "rank 0: no CUDA GPU is visible to this rank" in proc.stderr and "\n  rank 1: " in proc.stderr
    assert "tensorrt_llm is not installed (the engine was built with TensorRT-LLM 1.2.1)" in proc.stderr
    assert "Rebuild it on this machine: make build RECIPE=trt-engine-tp2   (or: python -m pipeline build " \
           "trt-engine-tp2)" in proc.stderr
    one = mpirun(home, 1, "--engine", str(result.artifact), "--prompt-ids", "1,2")
    assert one.returncode == 2 and "but 1 was started; run: mpirun -n 2 python -m pipeline.run" in one.stderr


def test_rebuild_command_repeats_the_overrides(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"command": "python -m pipeline build gpt2-tp2 parallel.tp=4 build.max_batch_size=16 --quiet",
         "recipe": {"name": "gpt2-tp2"}}))
    assert trt.rebuild_command(tmp_path) == ('make build RECIPE=gpt2-tp2 ARGS="parallel.tp=4 build.max_batch_size=16"'
                                             "   (or: python -m pipeline build gpt2-tp2 parallel.tp=4 "
                                             "build.max_batch_size=16)")


# --------------------------------------------------------------------------------------------- backend choice


def test_backend_choice_says_which_and_why(monkeypatch):
    monkeypatch.setattr(backends, "tensorrt_llm_importable", lambda: False)
    monkeypatch.setattr(backends, "cuda_capability", lambda: (9, 0))
    assert backends.select_backend("auto") == BackendChoice("torch", "auto: tensorrt_llm is not installed")
    with pytest.raises(BuildError) as info:
        backends.select_backend("tensorrt-llm")
    assert "tensorrt_llm package is not installed" in str(info.value) and TRTLLM_EXTRA in str(info.value)
    monkeypatch.setattr(backends, "tensorrt_llm_importable", lambda: True)
    choice = backends.select_backend("auto")
    assert choice == BackendChoice("tensorrt-llm", "auto: tensorrt_llm is installed and a GPU of compute "
                                                   "capability 9.0 is present")
    monkeypatch.setattr(backends, "cuda_capability", lambda: None)
    assert backends.select_backend("auto").name == "torch"


# --------------------------------------------------------------------------------------------- the checkpoint
# The consistency checks TensorRT-LLM 1.2 applies when trtllm-build reads a checkpoint config.json, restated from
# NVIDIA/TensorRT-LLM @ b35ac1b64368513d215c57d2ed01d62d910df8da (tensorrt_llm/version.py: 1.2.0rc2):
#   tensorrt_llm/mapping.py                 MappingBase.__init__ (keyword arguments, the -1 defaults, ValueErrors)
#   tensorrt_llm/models/modeling_utils.py   PretrainedConfig.__init__ (required keyword-only fields),
#                                           QuantConfig (dataclass fields: from_dict(**config))
#   tensorrt_llm/quantization/mode.py       QuantAlgo names (1.x, with the MXFP4 members), KV_CACHE_QUANT_ALGO_LIST
MAPPING_1_2_ARGS = {"world_size", "rank", "gpus_per_node", "cp_size", "cp_config", "tp_size", "pp_size",
                    "moe_cluster_size", "moe_tp_size", "moe_ep_size", "attn_tp_size", "attn_cp_size",
                    "enable_attention_dp", "enable_lm_head_tp_in_adp"}
QUANT_CONFIG_1_2_FIELDS = {"quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val", "clamp_val",
                           "use_meta_recipe", "has_zero_point", "pre_quant_scale", "exclude_modules",
                           "mamba_ssm_cache_dtype"}
PRETRAINED_1_2_REQUIRED = ("architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads")
QUANT_ALGO_1_2 = {"W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
                  "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
                  "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
                  "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8", "FP8_PER_CHANNEL_PER_TOKEN",
                  "FP8_BLOCK_SCALES", "INT8", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8", "W4A8_MXFP4_FP8",
                  "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT"}
KV_CACHE_QUANT_ALGO_1_2 = {"FP8", "INT8", "NVFP4"}
# MODEL_MAP keys for the two families this pipeline converts, and PositionEmbeddingType names they use.
MODEL_MAP_1_2_SUBSET = {"GPT2LMHeadModel", "GPTForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"}
POSITION_EMBEDDING_1_2_SUBSET = {"learned_absolute", "rope_gptj", "rope_gpt_neox"}


def trtllm_1_2_config_errors(config: dict) -> list[str]:
    """What PretrainedConfig(**config) / Mapping(**mapping) / QuantConfig(**quantization) of 1.2 would raise."""
    errors = [f"PretrainedConfig: missing required argument '{k}'" for k in PRETRAINED_1_2_REQUIRED if k not in config]
    if config.get("architecture") not in MODEL_MAP_1_2_SUBSET:
        errors.append(f"MODEL_MAP has no '{config.get('architecture')}'")
    if config.get("position_embedding_type", "learned_absolute") not in POSITION_EMBEDDING_1_2_SUBSET:
        errors.append(f"PositionEmbeddingType.from_string('{config['position_embedding_type']}') fails")
    m = dict(config.get("mapping", {}))
    if set(m) - MAPPING_1_2_ARGS:
        errors.append(f"Mapping got unexpected keyword arguments {sorted(set(m) - MAPPING_1_2_ARGS)}")
    tp, pp, cp = m.get("tp_size", 1), m.get("pp_size", 1), m.get("cp_size", 1)
    world = m.get("world_size", 1)
    cluster = m.get("moe_cluster_size", -1)
    cluster = 1 if cluster == -1 else cluster
    moe_tp, moe_ep = m.get("moe_tp_size", -1), m.get("moe_ep_size", -1)
    if moe_tp == -1 and moe_ep == -1:
        moe_tp, moe_ep = tp // cluster, 1
    elif moe_tp == -1:
        moe_tp = tp // (moe_ep * cluster)
    elif moe_ep == -1:
        moe_ep = tp // (moe_tp * cluster)
    attn_tp, attn_cp = m.get("attn_tp_size", -1), m.get("attn_cp_size", -1)
    if attn_tp == -1 and attn_cp == -1:
        attn_tp, attn_cp = tp * cp, 1
    if attn_cp != 1:
        errors.append("Mapping: attn_cp_size must be 1 for ulysses")
    if tp * pp * cp != world:
        errors.append(f"Mapping: world_size must equal to tp_size * pp_size * cp_size, but got {world} != {tp} * "
                      f"{pp} * {cp}")
    if moe_tp * moe_ep * cluster != tp:
        errors.append("Mapping: moe_tp_size * moe_ep_size * moe_cluster_size must equal to moe_world_size")
    if attn_tp * attn_cp != tp * cp:
        errors.append("Mapping: tp_size * cp_size must equal to attn_tp_size * attn_cp_size")
    q = config.get("quantization", {})
    if set(q) - QUANT_CONFIG_1_2_FIELDS:
        errors.append(f"QuantConfig got unexpected keyword arguments {sorted(set(q) - QUANT_CONFIG_1_2_FIELDS)}")
    if q.get("quant_algo") is not None and q["quant_algo"] not in QUANT_ALGO_1_2:
        errors.append(f"'{q['quant_algo']}' is not a QuantAlgo")
    if q.get("kv_cache_quant_algo") is not None and q["kv_cache_quant_algo"] not in KV_CACHE_QUANT_ALGO_1_2:
        errors.append(f"'{q['kv_cache_quant_algo']}' is not a KV-cache QuantAlgo")
    return errors


@pytest.mark.parametrize("shape,parallel,quant,algo", [
    ("gpt2-tiny", {"tp": 2}, "none", None),
    ("gpt2-tiny", {"tp": 2, "pp": 2}, "int8_weight_only", "W8A16"),
    ("llama-tiny", {"pp": 2}, "int8_weight_only", "W8A16"),
    ("llama-tiny", {"tp": 2}, "int4_weight_only", "W4A16"),
])
def test_converted_checkpoint_passes_trtllm_1_2_config_checks(home, shape, parallel, quant, algo):
    r = recipe(f"trt-config-{shape}", shape=shape, parallel=parallel, precision={"quantization": {"quant": quant}})
    artifact = Builder(r, log=lambda _: None, show_progress=False).run().artifact
    config = json.loads((artifact / "config.json").read_text())
    assert trtllm_1_2_config_errors(config) == []
    world = parallel.get("tp", 1) * parallel.get("pp", 1)
    assert config["mapping"]["world_size"] == world and "rank" not in config["mapping"]
    assert config["quantization"]["quant_algo"] == algo
    assert sorted(p.name for p in artifact.glob("rank*.safetensors")) == [f"rank{i}.safetensors" for i in range(world)]


def test_the_config_checks_catch_what_trtllm_1_2_rejects():
    good = {"architecture": "LlamaForCausalLM", "dtype": "float16", "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 8, "position_embedding_type": "rope_gpt_neox",
            "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1}, "quantization": {"quant_algo": None}}
    assert trtllm_1_2_config_errors(good) == []
    assert trtllm_1_2_config_errors({**good, "mapping": {"world_size": 3, "tp_size": 2}}) == [
        "Mapping: world_size must equal to tp_size * pp_size * cp_size, but got 3 != 2 * 1 * 1"]
    assert trtllm_1_2_config_errors({**good, "mapping": {"world_size": 2, "tp_size": 2, "moe_tp_size": 1,
                                                         "moe_ep_size": 1}}) == [
        "Mapping: moe_tp_size * moe_ep_size * moe_cluster_size must equal to moe_world_size"]
    assert trtllm_1_2_config_errors({**good, "mapping": {"world_size": 1, "tp": 1}}) == [
        "Mapping got unexpected keyword arguments ['tp']"]
    assert trtllm_1_2_config_errors({**good, "quantization": {"quant_algo": "int8_weight_only"}}) == [
        "'int8_weight_only' is not a QuantAlgo"]
    assert trtllm_1_2_config_errors({**good, "quantization": {"kv_cache_quant_algo": "W8A16"}}) == [
        "'W8A16' is not a KV-cache QuantAlgo"]
    broken = {k: v for k, v in good.items() if k != "dtype"}
    assert trtllm_1_2_config_errors(broken) == ["PretrainedConfig: missing required argument 'dtype'"]


# --------------------------------------------------------------------------------------------- plan


def test_plan_prints_the_trtllm_build_command_offline(home):
    proc = run_cli(home, "plan", "gpt2-fp16")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "recipe gpt2-fp16: world size 1 (tp=1 pp=1)"
    engine = lines[lines.index(next(line for line in lines if line.startswith("engine "))) + 1]
    assert engine.startswith("         $ trtllm-build --checkpoint_dir '<checkpoint-dir>' --output_dir '<engine-dir>' "
                             "--max_batch_size 8 --max_input_len 512 --max_seq_len 1024 --max_num_tokens 8192 ")
    assert_valid_for_1_2_1(shlex.split(engine.split("$ ", 1)[1])[1:])
    assert "not applicable: backend torch (auto: tensorrt_llm is not installed)" in proc.stdout
    assert lines[-1] == "run      $ mpirun -n 1 python -m pipeline.run"


def test_dry_run_builds_nothing(home):
    before = sorted(p.name for p in home.iterdir())
    proc = run_cli(home, "build", "gpt2-random", "build.backend=tensorrt-llm", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "refused: build.backend is tensorrt-llm, but the tensorrt_llm package is not installed." in proc.stdout
    assert "$ trtllm-build --checkpoint_dir '<checkpoint-dir>'" in proc.stdout
    assert sorted(p.name for p in home.iterdir()) == before
