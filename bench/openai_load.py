"""An OpenAI-style streaming load generator: C concurrent chat streams against one server.

The same client drives every server a side-by-side benchmark compares (``rlhf serve`` and
vLLM's OpenAI server), so both are measured the same way: client-side times of the SSE
chunks, token counts from the final ``usage`` chunk (``stream_options.include_usage``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from bench.kit.stats import Sample, level_summary, percentiles

DEFINITIONS = {
    "tokens_per_s": "sum of usage.completion_tokens of all finished requests (all n choices) "
                    "/ level wall time (first request sent to last stream finished)",
    "ttft_ms": "per request: from sending it to the first chunk carrying content",
    "itl_ms": "gaps between successive content chunks of one choice (both servers send "
              "about one token per chunk)",
    "tpot_ms": "per request: (last content chunk - first content chunk) / (completion "
               "tokens per choice - 1)",
    "latency_ms": "per request: from sending it to its last chunk",
    "ratio": "ours / vllm, for every figure (tokens_per_s: higher is better; times: lower)",
}


@dataclass(frozen=True)
class Shape:
    """What every request of a level asks for."""

    name: str
    n: int
    max_tokens: int
    fixed: bool  # ignore EOS until max_tokens (min_tokens, and vLLM's ignore_eos)


def request_body(model: str, prompt: str, shape: Shape, seed: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": shape.max_tokens, "temperature": 1.0, "top_p": 1.0, "seed": seed,
            "n": shape.n, "stream": True, "stream_options": {"include_usage": True}}
    if shape.fixed:  # both names: each server ignores the extension it does not know
        body |= {"min_tokens": shape.max_tokens, "ignore_eos": True}
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    s, start = Sample(), time.perf_counter()
    arrivals: dict[int, list[float]] = {}
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now, chunk = time.perf_counter(), json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"])[:200])
                for choice in chunk.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        arrivals.setdefault(choice["index"], []).append(now)
                if chunk.get("usage"):
                    s.tokens = int(chunk["usage"]["completion_tokens"])
                s.latency = now - start
        firsts = [t[0] for t in arrivals.values()]
        s.ttft = min(firsts) - start if firsts else math.nan
        for times in arrivals.values():
            s.itl.extend(b - a for a, b in itertools.pairwise(times))
        per_choice = s.tokens / body["n"]
        spans = [t[-1] - t[0] for t in arrivals.values()]
        if spans and per_choice > 1:
            s.tpot = sum(spans) / len(spans) / (per_choice - 1)
    except Exception as exc:  # a failed request is counted, not fatal
        s.error = f"{type(exc).__name__}: {exc}"[:200]
    return s


async def run_level(base_url: str, model: str, prompts: list[str], shape: Shape,
                    concurrency: int, seconds: float, min_per_stream: int = 1) -> dict:
    """C streams, each sending requests back to back until ``seconds`` pass (at least
    ``min_per_stream`` each); returns the level's summary."""
    url = f"{base_url}/v1/chat/completions"
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency + 4,
                          max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()

        async def stream(sid: int) -> None:
            i = 0
            while i < min_per_stream or time.perf_counter() - start < seconds:
                k = sid * 10_000 + i
                body = request_body(model, prompts[k % len(prompts)], shape, seed=k)
                samples.append(await one_request(client, url, body))
                i += 1

        await asyncio.gather(*(stream(s) for s in range(concurrency)))
        wall = time.perf_counter() - start
    return summarize(samples, wall, concurrency, shape)


def summarize(samples: list[Sample], wall: float, concurrency: int, shape: Shape) -> dict:
    ok = [s for s in samples if s.error is None]
    return {"shape": shape.name, "n": shape.n,
            **level_summary(samples, wall, concurrency, choices=shape.n),
            "tpot_ms": percentiles([s.tpot for s in ok])}


def ratios(ours: dict, theirs: dict) -> dict:
    """ours / theirs for tokens/s and every percentile both have (None where undefined)."""
    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    out: dict = {"tokens_per_s": div(ours["tokens_per_s"], theirs["tokens_per_s"])}
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "latency_ms"):
        out[key] = {q: div(ours[key][q], theirs[key][q]) for q in ours[key]}
    return out


async def wait_ready(base_url: str, timeout: float, alive: Callable[[], bool]) -> str:
    """Poll ``/v1/models`` until it answers; returns the first model id it serves."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError(f"the server at {base_url} exited while starting")
            try:
                r = await client.get(f"{base_url}/v1/models")
                if r.status_code == 200:
                    return r.json()["data"][0]["id"]
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1.0)
    raise TimeoutError(f"{base_url} did not answer /v1/models within {timeout:.0f} s")
