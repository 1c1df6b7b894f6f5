"""`rlhf bench serving`: streaming throughput and latency of the server vs plain `generate`.

Starts a real `rlhf serve` child (or, with ``--in-process``, drives the Engine directly), runs
C concurrent client streams per level, each issuing chat requests back to back, and compares
the aggregate token rate with sequential Hugging Face ``model.generate`` on the same model,
prompts and thread count, measured first while nothing else runs. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from bench.kit.children import serve_child
from bench.kit.report import machine, write_report
from bench.kit.stats import Sample, check_target, level_summary, percentiles
from rlhf.modeling import LoadedModel, load_model, resolve_model_name
from rlhf.starter_data import make_tasks

log = logging.getLogger(__name__)

Messages = list[tuple[str, str]]
GenFn = Callable[[Messages, int], AsyncIterator[tuple[str, int]]]
"""(messages, seed) -> stream of (text delta, completion tokens so far) per chunk."""

PROMPT_SEED = 4242
DEFINITIONS = {
    "tokens_per_s": "sum of completion_tokens of all finished requests / level wall time "
                    "(first request sent to last stream finished); EOS is not counted",
    "ttft_ms": "client side, per request: time from issuing the request to receiving its first "
               "chunk (the first chunk carries the first generated token's text)",
    "itl_ms": "client side, per generated token: for successive chunks of one stream, "
              "(arrival gap) / (completion_tokens added by the later chunk), counted once "
              "per token added; chunks adding no tokens (e.g. the final EOS chunk) are skipped",
    "latency_ms": "time from issuing a request to its last chunk",
    "speedup_vs_sequential": "level tokens_per_s / baseline_sequential tokens_per_s",
    "baseline_sequential": "HF model.generate, batch 1, one request at a time, do_sample, "
                           "temperature 1, top_k 0, top_p 1, same prompts and max_new_tokens",
}


def _messages(i: int, tasks: list) -> Messages:
    return [("user", tasks[i % len(tasks)].prompt)]


def _encode(tokenizer: Any, messages: Messages) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                         add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


async def _one(gen: GenFn, messages: Messages, seed: int) -> Sample:
    s, start = Sample(), time.perf_counter()
    last, done = start, 0
    try:
        async for _text, tokens in gen(messages, seed):
            now = time.perf_counter()
            if math.isnan(s.ttft):
                s.ttft = now - start
            elif tokens > done:
                s.itl.extend([(now - last) / (tokens - done)] * (tokens - done))
            last, done = now, max(done, tokens)
        s.latency, s.tokens = last - start, done
    except Exception as exc:  # a failed request is counted, not fatal
        s.error = f"{type(exc).__name__}: {exc}"[:200]
    return s


async def _level(gen: GenFn, tasks: list, concurrency: int, per_stream: int | None,
                 seconds: float) -> tuple[list[Sample], float]:
    """C streams back to back: ``per_stream`` requests each, or until ``seconds`` pass."""
    samples: list[Sample] = []
    start = time.perf_counter()

    async def stream(sid: int) -> None:
        i = 0
        while (i < per_stream) if per_stream else (i == 0 or time.perf_counter() - start < seconds):
            k = sid * 10_000 + i
            samples.append(await _one(gen, _messages(k, tasks), seed=k))
            i += 1

    await asyncio.gather(*(stream(s) for s in range(concurrency)))
    return samples, time.perf_counter() - start


def _baseline(loaded: LoadedModel, tasks: list, max_new: int, min_new: int,
              count: int | None, seconds: float) -> dict:
    """Sequential HF generate, one request at a time (after one untimed warm-up)."""
    tok, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    eos = set(loaded.eos_token_ids)
    latencies, tokens, start, i = [], 0, 0.0, -1
    with torch.inference_mode():
        while i < 0 or (i < count if count else time.perf_counter() - start < seconds):
            ids = torch.tensor([_encode(tok, _messages(max(i, 0), tasks))], device=device)
            torch.manual_seed(max(i, 0))
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new, min_new_tokens=min_new,
                                 do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id,
                                 eos_token_id=sorted(eos))
            if i >= 0:
                latencies.append(time.perf_counter() - t0)
                tokens += sum(1 for t in out[0, ids.shape[1]:].tolist() if t not in eos)
            else:
                start = time.perf_counter()
            i += 1
    wall = time.perf_counter() - start
    return {"requests": len(latencies), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1),
            "mean_completion_tokens": round(tokens / len(latencies), 1),
            "latency_ms": percentiles(latencies)}


async def _run_levels(gen: GenFn, tasks: list, args: argparse.Namespace) -> list[dict]:
    await _level(gen, tasks, 2, 2, 0)  # warm-up, not recorded
    levels = []
    for c in args.concurrency:
        per_stream = math.ceil(args.requests_per_level / c) if args.requests_per_level else None
        samples, wall = await _level(gen, tasks, c, per_stream, args.seconds_per_level)
        levels.append(level_summary(samples, wall, c))
        log.info("level %d: %s tok/s", c, levels[-1]["tokens_per_s"])
    return levels


async def _grpc_levels(target: str, tasks: list, args: argparse.Namespace) -> list[dict]:
    import grpc

    from rlhf.v1 import policy_pb2 as pb
    from rlhf.v1 import policy_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyStub(channel)

        async def gen(messages: Messages, seed: int) -> AsyncIterator[tuple[str, int]]:
            req = pb.GenerateRequest(
                messages=[pb.ChatMessage(role=r, content=c) for r, c in messages], n=1,
                sampling=pb.SamplingParams(max_new_tokens=args.max_new_tokens,
                                           min_new_tokens=_min_new(args),
                                           temperature=1.0, seed=seed))
            async for chunk in stub.Generate(req):
                yield chunk.text, chunk.completion_tokens

        return await _run_levels(gen, tasks, args)


async def _engine_levels(loaded: LoadedModel, tasks: list, args: argparse.Namespace
                         ) -> list[dict]:
    from serving.adapters import AdapterManager
    from serving.engine import Engine, Sampling

    engine = Engine(loaded.tokenizer, adapters=AdapterManager(loaded.model),
                    eos_token_ids=loaded.eos_token_ids, context_length=loaded.context_length,
                    max_batch_size=64, max_queue=256, threads=args.threads)
    engine.start()

    async def gen(messages: Messages, seed: int) -> AsyncIterator[tuple[str, int]]:
        handle = engine.submit(uuid.uuid4().hex, _encode(loaded.tokenizer, messages), 1,
                               Sampling(args.max_new_tokens, 1.0, seed=seed,
                                        min_new_tokens=_min_new(args)))
        async for events in handle:
            for e in events:
                yield e.text, e.completion_tokens

    try:
        return await _run_levels(gen, tasks, args)
    finally:
        await asyncio.to_thread(engine.stop)


def _info(loaded: LoadedModel, model_dir: str, threads: int) -> dict:
    p = next(loaded.model.parameters())
    return {"machine": machine("torch", "transformers", "grpcio", torch_threads=threads,
                               device=str(p.device)),
            "model": {"name": loaded.name, "path": model_dir, "dtype": str(p.dtype),
                      "parameters": sum(x.numel() for x in loaded.model.parameters()),
                      "context_length": loaded.context_length}}


def _targets(levels: list[dict]) -> dict:
    by_c = {lv["concurrency"]: lv for lv in levels}
    speed = by_c.get(32, {}).get("speedup_vs_sequential")
    ttft = by_c.get(8, {}).get("ttft_ms", {}).get("p95")
    return {"tokens_per_s_32_vs_sequential": check_target(speed, 5.0, ">="),
            "ttft_p95_ms_at_8": check_target(ttft, 250, "<=")}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf bench serving", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="model directory or hub id (default: starter)")
    p.add_argument("--concurrency", default="1,8,32",
                   type=lambda s: [int(x) for x in s.split(",") if x])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--requests-per-level", type=int, default=0,
                   help="requests per level (and for the baseline), split over the streams; "
                        "0 = time-boxed by --seconds-per-level")
    p.add_argument("--seconds-per-level", type=float, default=12.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (server and baseline)")
    p.add_argument("--in-process", action="store_true", help="drive the Engine, no gRPC")
    p.add_argument("--natural-length", action="store_true",
                   help="let EOS end answers (default: fixed length max_new_tokens)")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def _min_new(args: argparse.Namespace) -> int:
    """Fixed-length outputs (EOS ignored until max_new_tokens, as vLLM's serving benchmark
    does) unless --natural-length: both sides then generate the same number of tokens."""
    return 0 if args.natural_length else args.max_new_tokens


def main(argv: list[str]) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_name(args.model)
    tasks = make_tasks(512, seed=PROMPT_SEED)
    loaded = load_model(args.model)  # same directory; keeps the display name
    log.info("baseline: sequential model.generate")
    baseline = _baseline(loaded, tasks, args.max_new_tokens, _min_new(args),
                         args.requests_per_level, args.seconds_per_level)
    if args.in_process:
        levels = asyncio.run(_engine_levels(loaded, tasks, args))
    else:
        with serve_child(model_dir, [], args.threads) as target:
            levels = asyncio.run(_grpc_levels(target, tasks, args))
    for lv in levels:
        lv["speedup_vs_sequential"] = round(lv["tokens_per_s"] / baseline["tokens_per_s"], 2)
    report = {"benchmark": "serving", "mode": "in-process" if args.in_process else "grpc",
              "config": {k: v for k, v in vars(args).items() if k != "out"},
              **_info(loaded, model_dir, args.threads), "definitions": DEFINITIONS,
              "baseline_sequential": baseline, "levels": levels, "targets": _targets(levels)}
    write_report(report, args.out)
    return 0
