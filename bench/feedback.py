"""`rlhf bench feedback`: how many rankings a second the Feedback service stores durably.

Starts a private redis-server (AOF on, appendfsync everysec, as deploy/redis.conf) and a real
`rlhf serve --redis-url` on free ports, then
  (a) C concurrent gRPC clients (grpc.aio, one channel each) submit valid K = 4 comparisons
      back to back for a fixed time: accepted/s, latency, errors, and a check that the
      stream grew by exactly the number accepted (and the id index with it);
  (b) simulated labelers (``bench.simulate``, threads of this process) drive the UI's
      backend (ui.client + ui.logic, as the Gradio handlers do): generate a K = 4 turn, rank
      it, submit; turns done, errors, records stored, checked against the stream.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from collections import Counter

import grpc
import redis

from bench import simulate
from bench.kit.children import resolve_model, serve_child
from bench.kit.records import wire_comparison
from bench.kit.report import machine, run_and_report, server_flags
from bench.kit.stats import check_target, percentiles
from rlhf.comparisons import ID_INDEX, STREAM
from rlhf.local_redis import private_redis
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fbg

log = logging.getLogger(__name__)
TARGET_PER_S = 2000.0


async def _submit_load(target: str, concurrency: int, seconds: float, k: int) -> dict:
    template, latencies, codes = wire_comparison(k), [], Counter()
    accepted = duplicates = 0
    channels = [grpc.aio.insecure_channel(target) for _ in range(concurrency)]

    async def client(channel: grpc.aio.Channel, deadline: float) -> None:
        nonlocal accepted, duplicates
        stub = fbg.FeedbackStub(channel)
        while time.perf_counter() < deadline:
            request = fb.SubmitRequest(comparison=template)
            request.comparison.id = uuid.uuid4().hex
            t0 = time.perf_counter()
            try:
                reply = await stub.Submit(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                continue
            latencies.append(time.perf_counter() - t0)
            accepted += not reply.duplicate
            duplicates += reply.duplicate

    try:
        await asyncio.gather(*(client(ch, time.perf_counter() + 1.0) for ch in channels))
        latencies.clear()  # warm-up second: connections, script load; not recorded
        warm, accepted, duplicates, codes = accepted, 0, 0, Counter()
        start = time.perf_counter()
        await asyncio.gather(*(client(ch, start + seconds) for ch in channels))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return {"concurrency": concurrency, "k": k, "wall_s": round(wall, 3),
            "accepted": accepted, "duplicates": duplicates, "warmup_accepted": warm,
            "errors": sum(codes.values()), "error_codes": dict(codes),
            "comparisons_per_s": round(accepted / wall, 1),
            "latency_ms": percentiles(latencies, ("p50", "p95", "p99"))}


def _stream_check(r: redis.Redis, before: tuple[int, int], expected: int) -> dict:
    grew = (r.xlen(STREAM) - before[0], r.hlen(ID_INDEX) - before[1])
    return {"stream_grew_by": grew[0], "id_index_grew_by": grew[1], "expected": expected,
            "ok": grew == (expected, expected)}


def _labelers(target: str, args: argparse.Namespace) -> dict:
    """Simulated labelers (`rlhf simulate`) against the server, in this process (threads)."""
    report = simulate.run(simulate.parse_args(
        ["--target", target, "--labelers", str(args.labelers), "--seconds",
         str(args.labeler_seconds), "--k", str(args.k), "--max-new-tokens",
         str(args.max_new_tokens), "--preference", "length"], "rlhf simulate"))
    if not report["stored"]:
        raise RuntimeError(f"the simulated labelers stored nothing: {report['error_examples']}")
    return report


def run(args: argparse.Namespace) -> dict:
    model = resolve_model(args.model)
    load_start = os.getloadavg()
    with (private_redis("rlhf-bench-redis-") as url,
          serve_child(model, ["--redis-url", url], args.threads) as target):
        r = redis.Redis.from_url(url, decode_responses=True)
        durability = r.config_get("appendonly") | r.config_get("appendfsync")
        before = (r.xlen(STREAM), r.hlen(ID_INDEX))
        submit = asyncio.run(_submit_load(target, args.concurrency, args.seconds, args.k))
        before = (before[0] + submit["warmup_accepted"], before[1] + submit["warmup_accepted"])
        submit["stream_check"] = _stream_check(r, before, submit["accepted"])
        log.info("submit: %s comparisons/s", submit["comparisons_per_s"])
        before = (r.xlen(STREAM), r.hlen(ID_INDEX))
        labelers = _labelers(target, args) if args.labelers else {}
        if labelers:
            labelers["stream_check"] = _stream_check(r, before, labelers["stored"])
        r.close()
    got = submit["comparisons_per_s"]
    return {"benchmark": "feedback", "config": {k: v for k, v in vars(args).items()
                                                if k not in ("out",)},
            "machine": machine("grpcio", loadavg_start=[round(x, 2) for x in load_start],
                               loadavg_end=[round(x, 2) for x in os.getloadavg()]),
            "model": model, "redis": durability, "submit": submit, "labelers": labelers,
            "targets": {"comparisons_per_s": check_target(got, TARGET_PER_S, ">="),
                        "labeler_errors": check_target(labelers.get("errors"), 0, "==")}}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf bench feedback", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=16, help="gRPC clients in (a)")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of (a)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--labelers", type=int, default=16, help="simulated labelers in (b); 0 = skip")
    p.add_argument("--labeler-seconds", type=float, default=15.0, help="duration of (b)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="per alternative in (b)")
    return server_flags(p).parse_args(argv)


def main(argv: list[str]) -> int:
    return run_and_report(run, _parse(argv))
