"""`python -m pipeline bench-serve --url URL [--baseline-url URL]`: a serving benchmark, as vLLM's
benchmark_serving does it, against any OpenAI-compatible server.

One request set (seeded: prompt and output lengths drawn within +-spread of --input-len and --output-len) is sent at
each request rate of --rates: arrivals of a Poisson process (exponential gaps, seeded), or all at once for `inf`.
Every request streams; the client times the first content chunk (TTFT), the gaps between chunks (ITL), and the
mean gap per output token after the first (TPOT). With --baseline-url the same requests at the same rates go to a
second server (e.g. `transformers serve --continuous-batching`) in the same run. Results: JSON and a Markdown table.
Goodput counts the requests per second that met both --slo-ttft-ms and --slo-tpot-ms.
"""

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Common English words: almost each one is one token in GPT-2's, LLaMA's and SmolLM2's vocabularies.
WORDS = ("the of and to in is was for on that with as by at from his her they this which have had not are but "
         "were one all we their been has there who more when will would an no if out so said what up its about into "
         "than them can only other new some time could these two may then first any like now my such make over our "
         "even most me state after also made many did must before back see through way where get much go well your "
         "know should down work year because come people just say each those take day good how long little use").split()


@dataclass
class RequestResult:
    ok: bool
    prompt_words: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the server to measure, e.g. http://127.0.0.1:8000")
    p.add_argument("--baseline-url", help="a second OpenAI-compatible server given the same requests in the same run")
    p.add_argument("--model", help="model id for --url (default: the first of its /v1/models)")
    p.add_argument("--baseline-model", help="model id for --baseline-url (default: the first of its /v1/models)")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words (about one token each)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--spread", type=float, default=0.25, help="lengths drawn uniformly within +-this fraction")
    p.add_argument("--rates", default="1,4,inf", help="comma-separated requests/s; inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=0, help="at most this many requests in flight (0: no cap)")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos (for servers that reject it; outputs may then end early)")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    p.add_argument("--out", type=Path, help="write NAME.json and NAME.md (default: print the Markdown only)")


def request_set(args) -> list[tuple[str, int]]:
    """(prompt text, max_tokens) of each request, the same for every rate and server."""
    rng = random.Random(args.seed)

    def draw(n: int) -> int:
        return max(1, round(n * rng.uniform(1 - args.spread, 1 + args.spread)))

    return [(" ".join(rng.choice(WORDS) for _ in range(draw(args.input_len))), draw(args.output_len))
            for _ in range(args.num_prompts)]


async def first_model(client, url: str) -> str:
    response = await client.get(url.rstrip("/") + "/v1/models", timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def one_request(client, url: str, model: str, endpoint: str, prompt: str, max_tokens: int, ignore_eos: bool,
                      timeout_s: float) -> RequestResult:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    result = RequestResult(ok=False, prompt_words=len(prompt.split()))
    start = last = time.perf_counter()
    chunks, usage_tokens = 0, None
    try:
        async with client.stream("POST", url.rstrip("/") + path, json=body, timeout=timeout_s) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    text = choice.get("text") if endpoint != "chat" else (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if chunks == 0:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        chunks += 1
    except Exception as exc:  # a benchmark records every failure and goes on  # noqa: BLE001
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e_s = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens else chunks
    result.ok = chunks > 0
    if not result.ok:
        result.error = "no content"
    return result


async def run_rate(url: str, model: str, requests: list[tuple[str, int]], rate: float, args) -> dict:
    import httpx

    rng = random.Random(args.seed + 1)
    limit = asyncio.Semaphore(args.max_concurrency or len(requests))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)

    async with httpx.AsyncClient(limits=limits) as client:
        async def paced(prompt: str, max_tokens: int) -> RequestResult:
            async with limit:
                return await one_request(client, url, model, args.endpoint, prompt, max_tokens,
                                         not args.no_ignore_eos, args.timeout_s)

        tasks = []
        start = time.perf_counter()
        for prompt, max_tokens in requests:
            tasks.append(asyncio.create_task(paced(prompt, max_tokens)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, rate, args)


def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * scale

    return {"mean": statistics.fmean(ordered) * scale, "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarize(results: list[RequestResult], duration_s: float, rate: float, args) -> dict:
    done = [r for r in results if r.ok]
    tpots = [r.tpot_s for r in done if r.tpot_s is not None]
    good = [r for r in done if r.ttft_s * 1000 <= args.slo_ttft_ms
            and (r.tpot_s is None or r.tpot_s * 1000 <= args.slo_tpot_ms)]
    output = sum(r.output_tokens for r in done)
    return {"rate": "inf" if not math.isfinite(rate) else rate, "completed": len(done),
            "failed": len(results) - len(done), "errors": sorted({r.error for r in results if not r.ok})[:5],
            "duration_s": duration_s, "request_throughput": len(done) / duration_s,
            "output_throughput": output / duration_s, "output_tokens": output, "goodput": len(good) / duration_s,
            "ttft_ms": percentiles([r.ttft_s for r in done]), "tpot_ms": percentiles(tpots),
            "itl_ms": percentiles([g for r in done for g in r.itl_s]), "e2e_ms": percentiles([r.e2e_s for r in done])}


def markdown(report: dict) -> str:
    def f(v) -> str:
        return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = [f"{report['num_prompts']} requests, {report['input_len']} +-{report['spread']:.0%} words in, "
             f"{report['output_len']} +-{report['spread']:.0%} tokens out, endpoint {report['endpoint']}, seed "
             f"{report['seed']}; goodput SLO: TTFT <= {report['slo_ttft_ms']:g} ms and TPOT <= "
             f"{report['slo_tpot_ms']:g} ms", "",
             "| server | rate (req/s) | done | failed | req/s | out tok/s | goodput | TTFT p50 / p99 (ms) | "
             "TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) | e2e p50 (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for server in report["servers"]:
        for r in server["rates"]:
            lines.append(f"| {server['name']} | {r['rate']} | {r['completed']} | {r['failed']} | "
                         f"{f(r['request_throughput'])} | {f(r['output_throughput'])} | {f(r['goodput'])} | "
                         f"{f(r['ttft_ms']['p50'])} / {f(r['ttft_ms']['p99'])} | "
                         f"{f(r['tpot_ms']['p50'])} / {f(r['tpot_ms']['p99'])} | "
                         f"{f(r['itl_ms']['p50'])} / {f(r['itl_ms']['p99'])} | {f(r['e2e_ms']['p50'])} |")
    return "\n".join(lines) + "\n"


async def bench(args) -> dict:
    import httpx

    requests = request_set(args)
    rates = [math.inf if r.strip() in ("inf", "max") else float(r) for r in args.rates.split(",")]
    servers = [("server", args.url, args.model)]
    if args.baseline_url:
        servers.append(("baseline", args.baseline_url, args.baseline_model))
    report = {k: getattr(args, k) for k in ("num_prompts", "input_len", "output_len", "spread", "endpoint", "seed",
                                             "slo_ttft_ms", "slo_tpot_ms")} | {"servers": []}
    for role, url, model in servers:
        async with httpx.AsyncClient() as client:
            model = model or await first_model(client, url)
        entry = {"name": f"{role} ({model})", "url": url, "model": model, "rates": []}
        for rate in rates:
            print(f"[bench-serve] {role} {url} at {rate} req/s: {len(requests)} requests", file=sys.stderr)
            entry["rates"].append(await run_rate(url, model, requests, rate, args))
        report["servers"].append(entry)
    return report


def bench_serve_command(args) -> int:
    report = asyncio.run(bench(args))
    table = markdown(report)
    print(table, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        args.out.with_suffix(".md").write_text(table)
        print(f"[bench-serve] wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}",
              file=sys.stderr)
    failed = sum(r["failed"] for s in report["servers"] for r in s["rates"])
    return 1 if failed and not any(r["completed"] for s in report["servers"] for r in s["rates"]) else 0


