"""The static decode step of the CUDA path (device-side slot, fused gate/fc, grouped attention), run on the CPU:
the same greedy tokens as the plain generation loop, and device-random weights identical for any tp."""

import torch

from pipeline.backends.cuda_decode import CudaDecoder, DecodeOptions, accelerate
from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config
from pipeline.build import Builder
from pipeline.convert import convert_checkpoint
from pipeline.dist import Comm
from pipeline.generate import generate
from pipeline.mapping import Mapping
from pipeline.params import SamplingParams
from pipeline.random_weights import make_random_checkpoint
from pipeline.recipe import recipe_from_dict

CPU = torch.device("cpu")
PROMPTS = [[3, 14, 15, 92, 65], [27, 18]]


def _model(artifact):
    config = read_checkpoint_config(artifact)
    return load_rank_model(artifact, config, Comm(Mapping(1, 1, 0), CPU), CPU)


def test_static_decode_matches_plain_generation(home):
    for shape, quant in (("llama-tiny", "none"), ("gpt2-tiny", "none"), ("llama-tiny", "fp8")):
        recipe = recipe_from_dict({"model": {"random": shape}, "precision": {
            "dtype": "float16" if quant == "fp8" else "float32",
            "quantization": {"quant": quant, "calibration": {"samples": 2, "seq_len": 16}}}},
            name=f"static-{shape}-{quant}")
        artifact = Builder(recipe, log=lambda _: None, show_progress=False).run().artifact
        expected = generate(_model(artifact), PROMPTS, SamplingParams(max_tokens=8), eos_id=None, pad_id=0)
        # FP8 with fused gate/fc requantizes both weights to one scale (as trtllm-build does): other numbers
        fuse = quant == "none"
        options = DecodeOptions(cuda_graph=False, compile=False, fuse_gate_up=fuse)
        model = accelerate(_model(artifact), options)
        if shape == "llama-tiny" and fuse:
            assert "fc_gate" in model.layers[0] and "gate" not in model.layers[0]
        decoder = CudaDecoder(model, len(PROMPTS), 32, options)
        if quant == "fp8" and decoder.attention is not None:
            # float16: Triton's CPU emulator gives the attention kernel's float16 dots 5% off these logits (as with
            # the fused-attn option before); tests/test_gpu.py checks the kernel in float16 on a GPU
            decoder.attention = None
        decoder.warm_up()  # throwaway steps: prefill must reset everything they touched
        assert decoder.generate(PROMPTS, 8) == expected, (shape, quant)


def test_device_random_weights_are_the_same_model_for_any_tp(tmp_path):
    from safetensors.torch import load_file

    from pipeline import random_weights
    from pipeline.architectures import describe
    from pipeline.convert.memory import VirtualIndex, materialize_rank
    from pipeline.convert.streaming import plan_conversion
    from pipeline.random_weights import device_random_model
    from pipeline.shapes import SHAPES

    # one model whatever tp: the tp=2 shards of device-random weights are the halves of the tp=1 ones
    one, _, _ = device_random_model("llama-tiny", 1, Comm(Mapping(1, 1, 0), CPU), CPU, "float32")
    half, config, _ = device_random_model("llama-tiny", 2, Comm(Mapping(2, 1, 1), CPU), CPU, "float32")
    assert torch.equal(one.layers[0]["proj"].weight[:, 80:], half.layers[0]["proj"].weight)

    # and the in-memory conversion equals the file conversion of the same tensors
    shapes = random_weights.hf_tensor_shapes(SHAPES["llama-tiny"])
    source = tmp_path / "src"
    make_random_checkpoint("llama-tiny", 0, source)
    tensors = load_file(source / "model.safetensors")
    index = VirtualIndex(shapes, torch.float32, lambda name: tensors[name])
    out = tmp_path / "out"
    out.mkdir()
    convert_checkpoint(source, out, dtype="float16", tp=4, pp=1)
    plan = plan_conversion(index, describe(SHAPES["llama-tiny"]), 4, 1, "float16")
    for rank in range(4):
        memory = materialize_rank(plan, index, rank, CPU)
        files = load_file(out / f"rank{rank}.safetensors")
        assert memory.keys() == files.keys()
        assert all(torch.equal(memory[k], files[k]) for k in files)
    assert config["num_key_value_heads"] == 2


def test_runner_fast_path_gives_the_plain_paths_tokens(home, tmp_path):
    """`python -m pipeline.run --decode fast` (here on CPU, eager; on CUDA with a graph) under mpirun, tp=2."""
    from tests.conftest import mpirun, run_json

    recipe = recipe_from_dict({"model": {"random": "llama-tiny"}, "precision": {"dtype": "float32"},
                               "parallel": {"tp": 2}}, name="fast-runner")
    artifact = Builder(recipe, log=lambda _: None, show_progress=False).run().artifact
    results = {}
    for mode in ("engine", "fast"):
        result = run_json(home, 2, artifact, PROMPTS, tmp_path / f"{mode}.json", 6, extra=("--decode", mode))
        results[mode] = [r["new_ids"] for r in result["results"]]
    assert results["fast"] == results["engine"] and all(len(r) == 6 for r in results["fast"])
    refused = mpirun(home, 2, "--engine", str(artifact), "--decode", "fast", "--temperature", "0.7",
                     "--prompt-ids", "1,2")
    assert refused.returncode != 0 and "--decode fast runs greedy decoding" in refused.stderr


def test_transformers_baseline_runs_the_same_drawn_requests():
    """The transformers baseline with spreads: the worker's drawn prompts (left-padded, masked) decoded to the
    longest drawn output length, its tokens/s counting each request's own output length."""
    from pipeline.bench import output_lengths, transformers_baseline

    out = transformers_baseline("gpt2-tiny", None, [8], 6, 4, repeats=1, input_spread=0.5, output_spread=0.5)
    lengths = output_lengths(8, 4, seed=8, spread=0.5)
    assert set(out) == {"8/dynamic", "8/static"} and len(set(lengths)) > 1
    for run in out.values():
        assert run["output_tokens_per_s"] == sum(lengths) / run["e2e_s"]


def test_the_decode_warm_up_and_the_measured_rounds_show_progress_on_a_terminal(home, monkeypatch):
    import io
    import re
    import sys

    from pipeline.bench import measure
    from pipeline.progress import stage

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    recipe = recipe_from_dict({"model": {"random": "llama-tiny"}, "precision": {"dtype": "float32"}},
                              name="static-progress")
    artifact = Builder(recipe, log=lambda _: None, show_progress=False).run().artifact
    expected = generate(_model(artifact), PROMPTS[:1], SamplingParams(max_tokens=4), eos_id=None, pad_id=0)
    # the layer-by-layer step in torch ops: Triton's CPU emulator would take minutes
    options = DecodeOptions(cuda_graph=False, compile=False, triton_gemv=False, fused_step=False)
    model = accelerate(_model(artifact), options)
    terminal, lines = Terminal(), []
    monkeypatch.setattr(sys, "stderr", terminal)
    with stage("batch 1 eager: compiling, tuning and capturing", log=lines.append):
        decoder = CudaDecoder(model, 1, 32, options)
        decoder.attention, decoder.fused_argmax = None, False
        decoder.warm_up()
    result = measure(decoder, PROMPTS[:1], 4, repeats=2, desc="batch 1 eager")
    shown = terminal.getvalue()
    assert "warm-up steps:" in shown and "/1 [" in shown and "step/s" in shown  # the bar: count and rate
    assert "compiles" not in shown  # compile=False
    assert "batch 1 eager: warm-up round, then 2 timed" in shown and "/3 [" in shown and "round" in shown
    assert lines[0] == "batch 1 eager: compiling, tuning and capturing ..."
    assert re.fullmatch(r"batch 1 eager: compiling, tuning and capturing: done in \d+\.\d s", lines[1]), lines
    assert result["tokens"] == expected  # the bars wrap the work; they do not change it
