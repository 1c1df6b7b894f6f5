"""What a replica serves when it starts (issue #12 findings 3 and 5; docs/design.md §4): the
same version as the rest of the fleet when the registry's current one is bad, said so in
/healthz and /metrics; and nothing before the registry's adapter is loaded. Real Redis
(db 4, and a private one to pause), real `rlhf serve` processes, the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf import adapter_store as store
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg
from serving.registry import walk_back
from tests.adapter_kit import (
    POLL,
    cli,
    current,
    healthz,
    make_env,
    metrics,
    rejected,
    scale_weights,
    store_unchecked,
    wait_for,
)
from tests.conftest import ROOT, RedisServer, ServerProcess
from tests.test_hot_swap import _corrupt, wait_live


@pytest.fixture(scope="module")
def env(tiny_model_dir, redis_server, tmp_path_factory) -> Iterator[dict]:
    yield from make_env(tiny_model_dir, redis_server.db_url(4),
                        tmp_path_factory.mktemp("adapter-store"))


def test_walk_back_order_by_hand():
    assert walk_back("v3", ["v1", "v2", "v3", "v4"]) == ["v3", "v2", "v1", "base"]
    assert walk_back("v9", ["v1", "v2"]) == ["v9", "v2", "v1", "base"]
    assert walk_back("base", ["v1"]) == ["base"]


def test_a_fresh_replica_serves_the_newest_good_version_and_says_degraded(env, tmp_path):
    server, stub, maker = env["server"], env["stub"], env["maker"]
    good = maker.publish(seed=70).version
    wait_live([stub], good, time.monotonic(), limit=15)
    bad = maker.publish(seed=71, register=False)
    _corrupt(env["store"] / bad.version)
    store.register(env["client"], bad)
    later_bad = store_unchecked(env, 72, scale_weights(1.0, float("nan")), tmp_path)
    wait_for(lambda: (later_bad.version, "values") in rejected(server), 10, "refusal")

    fresh = ServerProcess(env["model"], extra=env["extra"])
    try:
        with grpc.insecure_channel(fresh.grpc_target) as channel:
            fresh_stub = pbg.PolicyStub(channel)
            for srv, s in ((fresh, fresh_stub), (server, stub)):
                assert current(s) == good, "fresh and old replicas serve the same version"
                status = healthz(srv)["adapter_status"]
                assert status["degraded"] is True
                assert status["registry_current"] == later_bad.version
                assert status["serving"] == good
                assert f"registry current {later_bad.version} refused (values)" in \
                    status["detail"]
                assert (f'rlhf_serving_adapter_degraded{{registry_current="{later_bad.version}"'
                        f',serving="{good}"}} 1.0') in metrics(srv)
                req = pb.GenerateRequest(prompt="Hi", adapter_version=good,
                                         sampling=pb.SamplingParams(max_new_tokens=2))
                assert {c.adapter_version for c in s.Generate(req, timeout=30)} == {good}
            assert (bad.version, "checksum") in rejected(fresh)
    finally:
        fresh.stop()

    # Promote/rollback without a store cannot verify: refused, the registry unchanged.
    out = cli(env, "promote", bad.version)
    assert out.returncode == 2 and "--store" in out.stderr
    out = cli(env, "rollback", good)
    assert out.returncode == 2 and "--store" in out.stderr
    assert store.current(env["client"]) == later_bad.version
    out = cli(env, "rollback", good, store_dir=str(env["store"]))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: healthz(server)["adapter_status"]["degraded"] is False, 10, "healthy")
    assert (f'rlhf_serving_adapter_degraded{{registry_current="{good}",serving="{good}"}} 0.0'
            in metrics(server))


# -- finding 5: not ready before the registry's adapter is live -------------------------


class StartingServer:
    """`rlhf serve` observed from its first line on (ServerProcess waits for ready)."""

    def __init__(self, model_dir: Path, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "rlhf.cli", "serve", "--model", str(model_dir),
               "--grpc-port", "0", "--http-port", "0", "--threads", "1", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True).start()

    def _read(self, stream, is_stdout: bool) -> None:
        for line in stream:
            (self.events.append(json.loads(line)) if is_stdout else
             self.stderr_lines.append(line))

    def event(self, name: str) -> dict | None:
        return next((e for e in list(self.events) if e["event"] == name), None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_not_ready_until_the_registry_adapter_is_loaded(env, tmp_path):
    """The registry answers late (Redis paused): until the current adapter is loaded,
    /healthz is 503, gRPC health NOT_SERVING, Generate UNAVAILABLE, no "ready" line; and
    no request is ever answered by base."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis_srv = RedisServer(tmp_path / "redis")
    redis_srv.start()
    client = redis.Redis.from_url(redis_srv.url)
    store_dir = tmp_path / "store"
    maker = env["maker"]
    maker.randomize(80)
    manifest = store.publish(store_dir, "v1", maker.peft, parent=None, base_model=maker.base)
    store.register(client, manifest)
    os.kill(redis_srv.proc.pid, signal.SIGSTOP)
    srv = StartingServer(env["model"], ["--redis-url", redis_srv.url, "--adapter-store",
                                        str(store_dir), *POLL])
    answered: list[str] = []
    try:
        wait_for(lambda: srv.event("listening") is not None, 60, "listening")
        listening = srv.event("listening")
        http = f"http://127.0.0.1:{listening['http_port']}"
        channel = grpc.insecure_channel(f"127.0.0.1:{listening['grpc_port']}")
        stub, health = pbg.PolicyStub(channel), health_pb2_grpc.HealthStub(channel)
        req = pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(max_new_tokens=1))

        def probe() -> tuple[int, str]:
            try:
                answered.extend(c.adapter_version for c in stub.Generate(req, timeout=10))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            response = httpx.get(http + "/healthz", timeout=10)
            return response.status_code, response.text

        # Until the model is loaded, and for a while after it while Redis stays paused:
        deadline = time.monotonic() + 120
        while not any("model loaded and engine started" in x for x in srv.stderr_lines):
            code, text = probe()
            assert code == 503, f"ready before the registry's adapter was loaded: {text}"
            assert time.monotonic() < deadline, "".join(srv.stderr_lines[-20:])
            time.sleep(0.05)
        for _ in range(10):
            code, text = probe()
            assert code == 503, f"ready before the registry's adapter was loaded: {text}"
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert srv.event("ready") is None
            time.sleep(0.2)
        assert answered == []

        os.kill(redis_srv.proc.pid, signal.SIGCONT)
        wait_for(lambda: srv.event("ready") is not None, 60, "ready after Redis answered")
        body = httpx.get(http + "/healthz", timeout=10).json()
        assert body["status"] == "ok" and body["adapter_version"] == "v1"
        probe()
        assert answered == ["v1"]
        channel.close()
    finally:
        if redis_srv.running:
            os.kill(redis_srv.proc.pid, signal.SIGCONT)
        srv.stop()
        client.close()
        redis_srv.stop()
