"""`rlhf bench feedback`: how many rankings a second the Feedback service stores durably.

Starts a private redis-server (AOF on, appendfsync everysec, as deploy/redis.conf) and a real
`rlhf serve --redis-url` on free ports, then
  (a) C concurrent gRPC clients (grpc.aio, one channel each) submit valid K = 4 comparisons
      back to back for a fixed time: accepted/s, latency, errors, and a check that the
      stream grew by exactly the number accepted (and the id index with it);
  (b) simulated labelers drive the UI's backend in their own process (``bench.simulate``:
      ui.client + ui.logic, as the Gradio handlers do): generate a K = 4 turn, rank it,
      submit; turns done, errors, records stored, checked against the stream.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import time
import uuid
from collections import Counter

import grpc
import redis

from rlhf.comparisons import ID_INDEX, STREAM
from rlhf.local_redis import private_redis
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fbg
from rlhf.v1 import policy_pb2 as pb
from bench.kit.children import serve_child, write_report

log = logging.getLogger(__name__)
TARGET_PER_S = 2000.0


def comparison(k: int = 4) -> fb.Comparison:
    """A valid, realistically sized K-way record (ids are set per request)."""
    rec = fb.Comparison(labeler_id="bench", rank_time_ms=12_500, messages=[
        pb.ChatMessage(role="user", content="Explain in two sentences why the sky is blue.")])
    sampling = pb.SamplingParams(max_new_tokens=128, temperature=0.9, seed=7)
    for i in range(k):
        rec.candidates.add(text=f"Answer {i}: " + "Rayleigh scattering of sunlight. " * 8,
                           adapter_version="base", sampling=sampling, seed=7 + i,
                           position=(i + 1) % k, rank=1 + i // 2, request_id="bench-req")
    rec.created_at.FromMilliseconds(int(time.time() * 1000))
    return rec


def _pct(values: list[float], q: float) -> float | None:
    v = sorted(values)
    return round(1000 * v[min(len(v) - 1, int(q * len(v)))], 2) if v else None


async def _submit_load(target: str, concurrency: int, seconds: float, k: int) -> dict:
    template, latencies, codes = comparison(k), [], Counter()
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
            "latency_ms": {q: _pct(latencies, x) for q, x in
                           (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}}


def _stream_check(r: redis.Redis, before: tuple[int, int], expected: int) -> dict:
    grew = (r.xlen(STREAM) - before[0], r.hlen(ID_INDEX) - before[1])
    return {"stream_grew_by": grew[0], "id_index_grew_by": grew[1], "expected": expected,
            "ok": grew == (expected, expected)}


def _labelers(target: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "bench.simulate", "--target", target, "--labelers",
           str(args.labelers), "--seconds", str(args.labeler_seconds), "--k", str(args.k),
           "--max-new-tokens", str(args.max_new_tokens), "--preference", "length"]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True,
                          timeout=args.labeler_seconds + 300)
    return json.loads(done.stdout)


def _resolve_model(name: str) -> str:
    """``--model`` as every command reads it (rlhf.modeling); "tiny" = ``starter-tiny``."""
    from rlhf.modeling import resolve_model_name

    return resolve_model_name("starter-tiny" if name == "tiny" else name)


def run(args: argparse.Namespace) -> dict:
    model = _resolve_model(args.model)
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
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "grpcio": grpc.__version__,
                        "loadavg_start": [round(x, 2) for x in load_start],
                        "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
            "model": model, "redis": durability, "submit": submit, "labelers": labelers,
            "targets": {"comparisons_per_s": {"target": TARGET_PER_S, "got": got,
                                              "met": got >= TARGET_PER_S},
                        "labeler_errors": {"target": 0, "got": labelers.get("errors"),
                                           "met": labelers.get("errors") == 0}}}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf bench feedback", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="a name of `rlhf models list` (tiny = "
                   "starter-tiny), a directory or a hub id; default: the starter")
    p.add_argument("--concurrency", type=int, default=16, help="gRPC clients in (a)")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of (a)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--labelers", type=int, default=16, help="simulated labelers in (b); 0 = skip")
    p.add_argument("--labeler-seconds", type=float, default=15.0, help="duration of (b)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="per alternative in (b)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    write_report(run(args), args.out)
    return 0
