"""Convert a Hugging Face checkpoint folder into a TensorRT-LLM 1.2 checkpoint folder.

Output: config.json + rank{r}.safetensors (+ the tokenizer files), the hand-off format between TensorRT-LLM's
converters and `trtllm-build`, and what the PyTorch backend runs directly.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.architectures import ArchInfo, describe, quantization_block, resolve_dtype, trtllm_config
from pipeline.convert.streaming import ConversionPlan, execute_plan, plan_conversion
from pipeline.errors import CheckpointError
from pipeline.mapping import Mapping
from pipeline.safetensors_io import SafetensorsIndex

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


def read_hf_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; a model folder needs the Hugging Face config.json beside "
                              f"its *.safetensors")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


@dataclass
class ConversionResult:
    arch: ArchInfo
    dtype: str
    files: list[Path]
    tokenizer_files: list[str]
    seconds: float
    source_bytes: int


def convert_checkpoint(src_dir: Path, out_dir: Path, *, dtype: str, tp: int, pp: int, workers: int = 1,
                       tokenizer_dir: Path | None = None, quantize=None, show_progress: bool = False
                       ) -> ConversionResult:
    """Convert `src_dir` (HF layout) into `out_dir` (must exist and be empty).

    `quantize`, if given, is called with the plan before anything is written and returns the checkpoint's
    `quantization` block; it may change target dtypes and encoders and add scale tensors (pipeline.quantize).
    """
    start = time.perf_counter()
    hf_config = read_hf_config(src_dir)
    arch = describe(hf_config)
    resolved = resolve_dtype(dtype, arch)
    index = SafetensorsIndex.from_folder(src_dir)
    plan: ConversionPlan = plan_conversion(index, arch, tp, pp, resolved)
    quant_block = quantize(plan, index) if quantize is not None else quantization_block()
    files = execute_plan(plan, index, out_dir, workers=workers, show_progress=show_progress)
    config = trtllm_config(arch, resolved, Mapping(tp, pp), quant_block)
    with open(Path(out_dir) / "config.json", "w") as f:
        json.dump(config, f, indent=4)
    tokenizer_files = copy_tokenizer(tokenizer_dir or src_dir, out_dir)
    return ConversionResult(arch, resolved, files, tokenizer_files, time.perf_counter() - start, plan.source_bytes())
