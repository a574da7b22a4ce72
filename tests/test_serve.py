"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP, started as a subprocess.

The model is a tiny random llama with GPT-2's vocabulary and tokenizer (and a chat template), built at tp=2 and
pp=2 and served under mpirun; answers are checked against `python -m pipeline.run --json` on the same prompt.
Every server runs on a free loopback port with timeouts and is killed in a finally.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pipeline.build import Builder
from pipeline.recipe import recipe_from_dict
from tests.conftest import PYTHON, REPO, child_env, mpirun_binary, run_json

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_source(home, tmp_path_factory) -> Path:
    """A 2-layer llama of GPT-2's vocabulary (random weights, seeded) with GPT-2's tokenizer and a chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.offline import prepare_gpt2_tokenizer

    saved = os.environ.pop("PIPELINE_HOME")
    try:
        tokenizer = prepare_gpt2_tokenizer()
    finally:
        os.environ["PIPELINE_HOME"] = saved
    folder = tmp_path_factory.mktemp("tiny-gpt2vocab")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # larger logits than the default init: greedy answers are not all one token
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    for f in tokenizer.iterdir():
        if f.name != "provenance.json":
            shutil.copyfile(f, folder / f.name)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config | {"chat_template": CHAT_TEMPLATE}))
    return folder


def build_tiny(source: Path, tp: int, pp: int, **build) -> Path:
    recipe = recipe_from_dict({"model": {"local": str(source)}, "precision": {"dtype": "float32"},
                               "parallel": {"tp": tp, "pp": pp}, "build": {"max_seq_len": 256, **build}},
                              name=f"serve-tiny-tp{tp}-pp{pp}")
    return Builder(recipe, log=lambda _: None, show_progress=False).run().artifact


@contextmanager
def server(home: Path, artifact: Path, ranks: int, *extra: str, timeout_s: float = START_TIMEOUT_S):
    """A server on a free loopback port; yields (base url, process). Killed (the whole process group) at the end."""
    port = free_port()
    args = ["-m", "pipeline.serve", "--engine", str(artifact), "--port", str(port), "--no-verify", *extra]
    cmd = ([mpirun_binary(), "-n", str(ranks), "--oversubscribe", PYTHON, *args] if ranks > 1 else [PYTHON, *args])
    log = open(home / f"serve-{port}.log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(home), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not start in {timeout_s} s")
            time.sleep(0.3)
        proc.log = log
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


def log_text(proc) -> str:
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
