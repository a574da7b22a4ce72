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


def pipeline_run(home: Path, artifact: Path, ranks: int, tmp_path: Path, prompt: str, max_tokens: int,
                 chat: bool) -> dict:
    """`python -m pipeline.run --json` on one text prompt (greedy): its result entry."""
    out = tmp_path / f"run-{chat}.json"
    extra = () if chat else ("--no-chat-template",)
    args = ["--engine", str(artifact), "--no-verify", "--json", str(out), "--max-new-tokens", str(max_tokens),
            "--temperature", "0", "--prompt", prompt, *extra]
    cmd = [mpirun_binary(), "-n", str(ranks), "--oversubscribe", PYTHON, "-m", "pipeline.run", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["results"][0]


def stream_text(stream, chat: bool) -> tuple[str, list]:
    text, chunks = "", []
    for chunk in stream:
        chunks.append(chunk)
        for c in chunk.choices:
            text += (c.delta.content or "") if chat else c.text
    return text, chunks


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_openai_client_under_mpirun_answers_as_pipeline_run(home, tiny_source, tmp_path, tp, pp):
    artifact = build_tiny(tiny_source, tp, pp)
    prompt, new = "The capital of France is", 12
    run_plain = pipeline_run(home, artifact, tp * pp, tmp_path, prompt, new, chat=False)
    run_chat = pipeline_run(home, artifact, tp * pp, tmp_path, prompt, new, chat=True)
    with server(home, artifact, tp * pp) as (url, _):
        api = client(url)
        model = api.models.list().data[0].id
        assert model == f"serve-tiny-tp{tp}-pp{pp}"
        done = api.completions.create(model=model, prompt=prompt, max_tokens=new, temperature=0)
        assert done.choices[0].text == run_plain["text"] and done.choices[0].text
        assert done.usage.completion_tokens == len(run_plain["new_ids"])
        assert done.usage.prompt_tokens == len(run_plain["prompt_ids"])
        assert done.choices[0].finish_reason == ("length" if len(run_plain["new_ids"]) == new else "stop")
        text, chunks = stream_text(api.completions.create(model=model, prompt=prompt, max_tokens=new, temperature=0,
                                                          stream=True, stream_options={"include_usage": True}),
                                   chat=False)
        assert text == done.choices[0].text
        assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens and not chunks[-1].choices
        by_ids = api.completions.create(model=model, prompt=run_plain["prompt_ids"], max_tokens=new, temperature=0)
        assert by_ids.choices[0].text == run_plain["text"]

        messages = [{"role": "user", "content": prompt}]
        reply = api.chat.completions.create(model=model, messages=messages, max_tokens=new, temperature=0)
        assert reply.choices[0].message.content == run_chat["text"] and reply.choices[0].message.role == "assistant"
        assert reply.usage.prompt_tokens == len(run_chat["prompt_ids"])
        text, chunks = stream_text(api.chat.completions.create(model=model, messages=messages, max_tokens=new,
                                                               temperature=0, stream=True), chat=True)
        assert text == run_chat["text"] and chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason

        two = api.completions.create(model=model, prompt=[prompt, "Once upon a time"], max_tokens=new,
                                     temperature=1.0, seed=3, n=2)
        assert sorted(c.index for c in two.choices) == [0, 1, 2, 3]
        assert two.choices[0].text != two.choices[1].text  # n samples with seeds seed, seed + 1
        again = api.completions.create(model=model, prompt=prompt, max_tokens=new, temperature=1.0, seed=3)
        assert again.choices[0].text == two.choices[0].text
        stopped = api.completions.create(model=model, prompt=prompt, max_tokens=new, temperature=0,
                                         stop=[run_plain["text"][3:6]])
        assert stopped.choices[0].text == run_plain["text"][:run_plain["text"].index(run_plain["text"][3:6])]
        assert stopped.choices[0].finish_reason == "stop"
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["kv_blocks_used"] == 0 and health["running"] == 0
