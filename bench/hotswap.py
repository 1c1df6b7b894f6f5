"""`rlhf bench hotswap`: publish-to-live latency of adapter hot-swaps and the throughput dip.

Starts a private redis-server and a real `rlhf serve --redis-url --adapter-store` on the
starter model (v1 published first), keeps C gRPC streams busy (greedy, fixed length), then
  (a) steady state: tokens/s over a window with no swaps;
  (b) swaps: publishes N new LoRA versions (publish + register, as the learner does) one
      per interval; for each, seconds from register until GetInfo reports it current;
      tokens/s over the whole swap window.
Targets (the issue): publish-to-live p95 < 1 s; tokens/s dip during swaps < 10 %.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import grpc
import redis
import torch

from bench.kit.children import resolve_model, serve_child
from bench.kit.report import run_and_report, server_flags
from bench.kit.stats import check_target, percentiles
from rlhf import adapter_store as store
from rlhf.local_redis import private_redis
from rlhf.modeling import load_model
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg


class _Publisher:
    """LoRA versions over the base model, each with its own random weights."""

    def __init__(self, model_dir: str, store_dir: Path, client: redis.Redis) -> None:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        self.base, self.store_dir, self.client = model_dir, store_dir, client
        self.peft = get_peft_model(load_model(model_dir).model, LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
            init_lora_weights=False))
        self.parent: str | None = None

    def publish(self) -> str:
        with torch.no_grad():
            for name, p in self.peft.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.05)
        version = store.next_version(self.client)
        manifest = store.publish(self.store_dir, version, self.peft, parent=self.parent,
                                 base_model=self.base)
        store.register(self.client, manifest)
        self.parent = version
        return version


class _Load:
    """Streams back to back; (time, new tokens) per chunk; versions per stream."""

    def __init__(self, target: str, concurrency: int, max_new: int) -> None:
        self.target, self.max_new = target, max_new
        self.stop = threading.Event()
        self.ticks: list[tuple[float, int]] = []
        self.errors = self.mixed = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(concurrency)]

    def _run(self, i: int) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pbg.PolicyStub(channel)
            req = pb.GenerateRequest(
                messages=[pb.ChatMessage(role="user", content=f"Count to {i + 3}.")],
                sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=self.max_new,
                                           min_new_tokens=self.max_new))
            while not self.stop.is_set():
                done, versions = 0, set()
                try:
                    for c in stub.Generate(req, timeout=120):
                        self.ticks.append((time.monotonic(), c.completion_tokens - done))
                        done = c.completion_tokens
                        versions.add(c.adapter_version)
                except grpc.RpcError:
                    self.errors += 1
                self.mixed += len(versions) > 1

    def rate(self, start: float, end: float) -> float:
        return sum(n for t, n in list(self.ticks) if start <= t < end) / (end - start)


def _wait_live(stub: pbg.PolicyStub, version: str, since: float, limit: float = 30.0) -> float:
    while stub.GetInfo(pb.GetInfoRequest()).current_adapter_version != version:
        if time.monotonic() - since > limit:
            raise RuntimeError(f"{version} was not live after {limit} s")
        time.sleep(0.005)
    return time.monotonic() - since


def run(args: argparse.Namespace) -> dict:
    model_dir = resolve_model(args.model)
    with (private_redis("rlhf-bench-redis-") as url,
          tempfile.TemporaryDirectory(prefix="rlhf-bench-store-") as tmp):
        client = redis.Redis.from_url(url)
        publisher = _Publisher(model_dir, Path(tmp), client)
        publisher.publish()
        extra = ["--redis-url", url, "--adapter-store", tmp,
                 "--registry-poll-s", str(args.poll_s)]
        with serve_child(model_dir, extra, args.threads) as target, \
                grpc.insecure_channel(target) as channel:
            stub = pbg.PolicyStub(channel)
            load = _Load(target, args.concurrency, args.max_new_tokens)
            for t in load.threads:
                t.start()
            time.sleep(args.warmup_s)
            steady_start = time.monotonic()
            time.sleep(args.steady_s)
            swap_start = steady = time.monotonic()
            latencies = []
            for _ in range(args.publishes):
                began = time.monotonic()
                version = publisher.publish()
                latencies.append(_wait_live(stub, version, began))
                time.sleep(max(0.0, args.interval_s - (time.monotonic() - began)))
            swap_end = time.monotonic()
            load.stop.set()
            for t in load.threads:
                t.join(120)
        client.close()
    steady_tps, swap_tps = load.rate(steady_start, steady), load.rate(swap_start, swap_end)
    live = percentiles(latencies, ("p50", "p95"))  # milliseconds
    dip = 1.0 - swap_tps / steady_tps if steady_tps else None
    return {"benchmark": "hotswap", "model": model_dir, "config": vars(args),
            "publish_to_live_ms": {**live, "all": [round(x * 1000, 1) for x in latencies]},
            "tokens_per_s": {"steady": round(steady_tps, 1), "during_swaps": round(swap_tps, 1),
                             "dip": None if dip is None else round(dip, 4)},
            "failed_requests": load.errors, "mixed_version_streams": load.mixed,
            "targets": {"publish_to_live_p95_ms": check_target(live["p95"], 1000, "<"),
                        "tokens_per_s_dip": check_target(dip, 0.10, "<")}}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf bench hotswap", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--publishes", type=int, default=10)
    p.add_argument("--interval-s", type=float, default=1.0, help="seconds between publishes")
    p.add_argument("--steady-s", type=float, default=8.0)
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--poll-s", type=float, default=0.5, help="server's --registry-poll-s")
    return server_flags(p).parse_args(argv)


def main(argv: list[str]) -> int:
    return run_and_report(run, _parse(argv))
