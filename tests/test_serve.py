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
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pipeline.build import Builder
from pipeline.recipe import recipe_from_dict
from tests.conftest import PYTHON, REPO, child_env, mpirun_binary

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
        kill_tree(proc)
        log.close()


def kill_tree(proc) -> None:
    """SIGKILL a launcher and every process under it (Open MPI puts each rank in a process group of its own)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in [proc, *tree]:
        try:
            p.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


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


@pytest.mark.parametrize("tp, pp", [pytest.param(2, 1, marks=pytest.mark.slow), (1, 2)])
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


@pytest.fixture(scope="module")
def small_server(home, tiny_source):
    """One rank, a batch of 1 and at most 1 waiting request: the queue fills with 3 requests."""
    artifact = build_tiny(tiny_source, 1, 1, max_seq_len=512, max_input_len=64)
    with server(home, artifact, 1, "--max-batch-size", "1", "--max-waiting", "1") as (url, proc):
        yield url, proc


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=60,
                      **kwargs)


def wait_idle(url: str, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(url + "/health", timeout=10).json()
        if (health["kv_blocks_used"] == 0 and health["running"] == 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


ERROR_CASES = [
    ("/v1/completions", b'{"prompt": "Hi", ', None, "the request body is not valid JSON"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "Hi"}, "model", "the model 'gpt-4' does not exist; this server "
                                                                     "serves 'serve-tiny-tp1-pp1'"),
    ("/v1/completions", {"prompt": "Hi", "temperature": -0.5}, "temperature", "temperature must be a finite number >= 0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_p": 0}, "top_p",
     "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 1.5}, "top_p", "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 600}, "max_tokens",
     "the prompt (1 tokens) plus max_tokens (600) is past the context of 512 tokens; ask for at most 511"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 999},
     "max_tokens", "is past the context of 512 tokens"),
    ("/v1/completions", {"prompt": list(range(1, 80)), "max_tokens": 4}, "prompt",
     "the prompt has 79 tokens, more than the build's max_input_len 64"),
    ("/v1/completions", {"prompt": [5, 50257, 70000]}, "prompt",
     "prompt token ids [50257, 70000] are outside the vocabulary [0, 50257)"),
    ("/v1/completions", {"prompt": []}, "prompt", "prompt must be a string, a list of strings"),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, "n", "n must be a whole number of at least 1"),
    ("/v1/chat/completions", {"messages": "Hi"}, "messages", "messages must be a non-empty list"),
    ("/v1/completions", [1, 2], None, "the request body must be a JSON object"),
]


@pytest.mark.parametrize("path, body, param, message", ERROR_CASES, ids=[c[3][:30] for c in ERROR_CASES])
def test_bad_requests_get_openai_shaped_400s(small_server, path, body, param, message):
    url, _ = small_server
    response = post(url, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_the_openai_client_raises_bad_request_with_the_message(small_server):
    import openai

    url, _ = small_server
    with pytest.raises(openai.BadRequestError, match="temperature must be a finite number >= 0"):
        client(url).completions.create(model="serve-tiny-tp1-pp1", prompt="Hi", temperature=-1)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_full_queue_gets_503_with_retry_after(small_server):
    url, _ = small_server

    async def burst() -> list[httpx.Response]:  # 12 at once against room for 2 (a batch of 1, 1 waiting)
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
            return await asyncio.gather(*[http.post(url + "/v1/completions", json=body) for _ in range(12)])

    responses = asyncio.run(burst())
    refused = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert len(refused) + len(served) == 12 and refused and 1 <= len(served) <= 11
    for r in refused:
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
        assert "the queue is full" in r.json()["error"]["message"]
        assert "at most 2 = max_batch_size 1 + --max-waiting 1); retry later" in r.json()["error"]["message"]
    assert {r.json()["usage"]["completion_tokens"] for r in served} == {400}
    assert len({r.json()["choices"][0]["text"] for r in served}) == 1  # greedy: one answer
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert f'pipeline_requests_total{{endpoint="/v1/completions",status="503"}} {float(len(refused))}' in metrics
    assert "pipeline_kv_blocks_used 0.0" in metrics and "pipeline_requests_pending 0.0" in metrics


def test_a_streaming_client_that_disconnects_frees_its_blocks(small_server):
    url, _ = small_server
    steps, tokens = metric(url, "pipeline_engine_steps"), metric(url, "pipeline_generation_tokens_total")
    body = {"prompt": "Hi", "max_tokens": 500, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        assert next(line for line in response.iter_lines() if line.startswith("data:"))
    health = wait_idle(url)
    assert health["kv_blocks_used"] == 0 and health["running"] == 0
    assert health["steps"] - steps < 500  # aborted, not run to its 500 tokens
    assert metric(url, "pipeline_generation_tokens_total") == tokens  # and never counted as finished


def test_a_non_streaming_client_that_disconnects_frees_its_blocks(small_server):
    url, _ = small_server
    steps, tokens = metric(url, "pipeline_engine_steps"), metric(url, "pipeline_generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s, before 500 tokens (5 ms each)
        httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 500, "ignore_eos": True,
                                                  "temperature": 0}, timeout=0.5)
    health = wait_idle(url)
    assert health["kv_blocks_used"] == 0 and health["running"] == 0
    assert health["steps"] - steps < 500  # aborted, not run to its 500 tokens
    assert metric(url, "pipeline_generation_tokens_total") == tokens  # and never counted as finished


def test_metrics_count_requests_latencies_and_tokens(small_server):
    url, _ = small_server
    before = httpx.get(url + "/metrics", timeout=10).text
    assert post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "ignore_eos": True}).status_code == 200
    after = httpx.get(url + "/metrics", timeout=10).text

    def value(text: str, name: str) -> float:
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    assert value(after, "pipeline_generation_tokens_total") - value(before, "pipeline_generation_tokens_total") == 5
    for name in ("pipeline_time_to_first_token_seconds_count", "pipeline_time_per_output_token_seconds_count",
                 "pipeline_e2e_request_latency_seconds_count"):
        assert value(after, name) == value(before, name) + 1
    assert value(after, "pipeline_kv_blocks_total") == 16  # max_seq_len 512 / 32-token blocks, batch 1


def wait_exit(proc, timeout_s: float) -> tuple[int, float]:
    start = time.monotonic()
    code = proc.wait(timeout=timeout_s)
    return code, time.monotonic() - start


def test_sigterm_stops_admitting_drains_and_exits_0(home, tiny_source, tmp_path):
    """Through `python -m pipeline serve RECIPE` at tp=2: it builds, starts mpirun and forwards SIGTERM to rank 0."""
    recipe = tmp_path / "serve-tiny-cli.yaml"
    recipe.write_text(f"model: {{local: {tiny_source}}}\nprecision: {{dtype: float32}}\nparallel: {{tp: 2}}\n"
                      f"build: {{max_seq_len: 512}}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([PYTHON, "-m", "pipeline", "serve", str(recipe), "--port", str(port)], cwd=REPO,
                            env=child_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert client(url).models.list().data[0].id == "serve-tiny-cli"
        body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            refused = post(url, "/v1/completions", {"prompt": "Hi"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "shutting_down"
            assert httpx.get(url + "/health", timeout=5).status_code == 503
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]  # the in-flight one finished
        code, _ = wait_exit(proc, 60)
        log.seek(0)
        text = log.read()
        assert code == 0, text[-3000:]
        assert "SIGTERM: admitting no new requests, draining 1" in text and "drained and stopped" in text
    finally:
        kill_tree(proc)
        log.close()


def rank_pids(proc) -> list[int]:
    """The serve processes under an mpirun, rank 0 first (its OMPI_COMM_WORLD_RANK)."""
    import psutil

    ranks = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if "OMPI_COMM_WORLD_RANK" in env and "pipeline.serve" in " ".join(child.cmdline()):
            ranks[int(env["OMPI_COMM_WORLD_RANK"])] = child.pid
    return [ranks[r] for r in sorted(ranks)]


def test_a_killed_rank_ends_the_server_non_zero_within_the_bound(home, tiny_source):
    artifact = build_tiny(tiny_source, 1, 2)
    with server(home, artifact, 2) as (url, proc):
        pids = rank_pids(proc)
        assert len(pids) == 2
        os.kill(pids[1], signal.SIGKILL)
        code, seconds = wait_exit(proc, 30)
        assert code != 0 and seconds < 30  # the bound for a dead rank: mpirun ends the job (README: Serving)


def test_a_killed_mpirun_leaves_no_rank_serving(home, tiny_source):
    import psutil

    artifact = build_tiny(tiny_source, 1, 2)
    with server(home, artifact, 2) as (url, proc):
        ranks = [psutil.Process(pid) for pid in rank_pids(proc)]
        proc.kill()  # SIGKILL: mpirun can pass nothing on
        gone, alive = psutil.wait_procs(ranks, timeout=15)  # the watchdog's bound is 1.5 s after the loss
        assert not alive, [p.cmdline() for p in alive]


def test_a_hung_rank_fails_health_and_ends_the_server_within_step_timeout(home, tiny_source):
    artifact = build_tiny(tiny_source, 2, 1)
    with server(home, artifact, 2, "--step-timeout-s", "5") as (url, proc):
        pids = rank_pids(proc)
        os.kill(pids[1], signal.SIGSTOP)  # alive but stuck: rank 0 waits in the step's collective
        def never_answered() -> None:
            with pytest.raises(httpx.HTTPError):
                httpx.post(url + "/v1/completions", json={"prompt": "Hi"}, timeout=30)

        stuck = threading.Thread(target=never_answered)
        try:
            stuck.start()  # a request that never completes: the engine's step waits on the stopped rank
            start = time.monotonic()
            health = None
            while time.monotonic() - start < 15:
                try:
                    health = httpx.get(url + "/health", timeout=2)
                except httpx.HTTPError:
                    break
                if health.status_code == 503:
                    break
                time.sleep(0.2)
            assert health is not None and health.status_code == 503 and "a rank hangs" in health.json()["reason"]
            code, seconds = wait_exit(proc, 30)
            assert code != 0 and time.monotonic() - start < 5 + 10  # --step-timeout-s + the watchdog's period
            assert "exiting with code 3" in log_text(proc)
        finally:
            try:
                os.kill(pids[1], signal.SIGKILL)
            except ProcessLookupError:
                pass
            stuck.join(timeout=60)


RSS_TOLERANCE_MIB = 64  # allocator high-water marks and caches may stay; a leak per request would not fit in this


@pytest.mark.slow
def test_load_200_concurrent_streams_then_2000_sequential_requests(home, tiny_source):
    artifact = build_tiny(tiny_source, 1, 1)
    prompts = [f"Request {i}: tell me about the number {i * 7}" for i in range(20)]
    with server(home, artifact, 1) as (url, proc):
        import psutil

        def alone(max_tokens: int) -> list[str]:
            return [post(url, "/v1/completions", {"prompt": p, "max_tokens": max_tokens, "temperature": 0,
                                                  "ignore_eos": True}).json()["choices"][0]["text"] for p in prompts]

        expected8, expected3 = alone(8), alone(3)
        assert len(set(expected8)) > 10  # the prompts get different answers: a mix-up would show

        async def one_stream(http, i: int) -> tuple[int, str, str | None]:
            body = {"prompt": prompts[i % 20], "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
            text, reason = "", None
            async with http.stream("POST", url + "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        text += choice["text"]
                        reason = choice["finish_reason"] or reason
            return i, text, reason

        async def burst(count: int) -> list:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            async with httpx.AsyncClient(timeout=120, limits=limits) as http:
                return await asyncio.gather(*[one_stream(http, i) for i in range(count)])

        asyncio.run(burst(20))  # warm-up: the RSS baseline is taken after the first concurrent requests
        rss_start = psutil.Process(proc.pid).memory_info().rss
        results = asyncio.run(burst(200))
        assert len(results) == 200
        assert all(text == expected8[i % 20] and reason == "length" for i, text, reason in results)
        with httpx.Client(timeout=30) as http:
            for i in range(2000):
                got = http.post(url + "/v1/completions", json={"prompt": prompts[i % 20], "max_tokens": 3,
                                                               "temperature": 0, "ignore_eos": True}).json()
                assert got["choices"][0]["text"] == expected3[i % 20], i
                assert got["usage"]["completion_tokens"] == 3
        health = wait_idle(url)
        assert health["kv_blocks_used"] == 0 and health["running"] == 0 and health["waiting"] == 0
        grown_mib = (psutil.Process(proc.pid).memory_info().rss - rss_start) / 2**20
        assert grown_mib < RSS_TOLERANCE_MIB, f"RSS grew by {grown_mib:.0f} MiB over 2,200 requests"
        assert metric(url, "pipeline_requests_pending") == 0


@pytest.mark.slow
def test_smollm2_pp2_answers_as_pipeline_run(home, smollm2_dir, tmp_path):
    """Real weights (SmolLM2-135M-Instruct, float32, two pipeline stages): its chat template, streamed and not."""
    recipe = recipe_from_dict({"model": {"local": str(smollm2_dir)}, "precision": {"dtype": "float32"},
                               "parallel": {"pp": 2}}, name="smollm2-fp32-pp2-serve")
    artifact = Builder(recipe, log=lambda _: None, show_progress=False).run().artifact
    question, new = "What is the capital of France?", 16
    run_chat = pipeline_run(home, artifact, 2, tmp_path, question, new, chat=True)
    run_plain = pipeline_run(home, artifact, 2, tmp_path, "The capital of France is", new, chat=False)
    assert "Paris" in run_chat["text"]
    with server(home, artifact, 2) as (url, _):
        api = client(url)
        messages = [{"role": "user", "content": question}]
        reply = api.chat.completions.create(model="smollm2-fp32-pp2-serve", messages=messages, max_tokens=new,
                                            temperature=0)
        assert reply.choices[0].message.content == run_chat["text"]
        text, _ = stream_text(api.chat.completions.create(model="smollm2-fp32-pp2-serve", messages=messages,
                                                          max_tokens=new, temperature=0, stream=True), chat=True)
        assert text == run_chat["text"]
        done = api.completions.create(model="smollm2-fp32-pp2-serve", prompt="The capital of France is",
                                      max_tokens=new, temperature=0)
        assert done.choices[0].text == run_plain["text"]
        text, _ = stream_text(api.completions.create(model="smollm2-fp32-pp2-serve", prompt="The capital of France is",
                                                     max_tokens=new, temperature=0, stream=True), chat=False)
        assert text == run_plain["text"]
