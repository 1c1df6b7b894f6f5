"""Adapter versions a replica must refuse, how refusals heal, and what a fresh replica
serves (issue #12 findings 2, 3, 4, 5, 8; DESIGN.md §4).

Real Redis (db 3, and a private one for the startup test), real `rlhf serve` processes,
the tiny model, PEFT adapters. Bad versions are written into the store the way a bug or
an attacker would: files changed after the fact with the manifest's checksums recomputed,
so only the checks beyond checksums can catch them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from rlhf import adapter_store as store
from rlhf.adapter_checks import tensor_problem, weight_problems
from rlhf.adapter_store import AdapterRejected
from rlhf.modeling import load_model
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg
from serving.adapters import AdapterManager
from serving.canary import canary_problem, greedy_probe
from serving.registry import walk_back
from tests.conftest import ROOT, RedisServer, ServerProcess
from tests.test_hot_swap import Maker, _corrupt, _wrong_shapes, greedy, wait_live

POLL = ["--registry-poll-s", "0.3"]


@pytest.fixture(scope="module")
def env(tiny_model_dir, redis_server, tmp_path_factory) -> Iterator[dict]:
    url = redis_server.db_url(3)
    client = redis.Redis.from_url(url)
    client.flushdb()
    store_dir = tmp_path_factory.mktemp("adapter-store")
    maker = Maker(tiny_model_dir, store_dir, client)
    maker.publish(seed=100)  # v1
    extra = ["--redis-url", url, "--adapter-store", str(store_dir), *POLL]
    server = ServerProcess(tiny_model_dir, extra=extra)
    channel = grpc.insecure_channel(server.grpc_target)
    try:
        yield {"url": url, "client": client, "maker": maker, "server": server, "extra": extra,
               "stub": pbg.PolicyStub(channel), "store": store_dir, "model": tiny_model_dir}
    finally:
        channel.close()
        server.stop()
        client.close()


# -- helpers ---------------------------------------------------------------------------


def cli(env: dict, *args: str, store_dir: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlhf.cli", "adapters", "--redis-url", env["url"]]
    if store_dir is not None:
        cmd += ["--store", store_dir]
    environ = {k: v for k, v in os.environ.items() if k != "RLHF_SERVE_ADAPTER_STORE"}
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=environ)


def store_unchecked(env: dict, seed: int, mutate: Callable[[Path], None],
                    tmp_path: Path) -> store.Manifest:
    """A version whose files were changed after training, with checksums that match them
    (what the store's checksum check cannot catch), registered and made current."""
    maker = env["maker"]
    src = tmp_path / f"src-{seed}"
    src.mkdir()
    maker.randomize(seed)
    maker.peft.save_pretrained(src)
    mutate(src)
    version = store.next_version(env["client"])
    folder = env["store"] / version
    folder.mkdir()
    for name in store.ADAPTER_FILES:
        shutil.copyfile(src / name, folder / name)
    manifest = store.Manifest(version=version, parent=store.current(env["client"]),
                              base_model=maker.base, lora={}, created_at=time.time(),
                              files={n: store.sha256_file(folder / n)
                                     for n in store.ADAPTER_FILES})
    (folder / store.MANIFEST_FILE).write_text(manifest.to_json())
    store.register(env["client"], manifest)
    return manifest


def scale_weights(factor: float, value: float | None = None) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        path = folder / store.WEIGHTS_FILE
        tensors = load_file(str(path))
        key = sorted(k for k in tensors if "lora_B" in k)[0]
        tensors[key] = tensors[key] * factor
        if value is not None:
            tensors[key][0, 0] = value
        save_file(tensors, str(path))
    return mutate


def broken_safetensors(folder: Path) -> None:
    path = folder / store.WEIGHTS_FILE
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    # Same length prefix, header JSON cut in half: the file no longer parses.
    path.write_bytes(data[:8] + data[8:8 + header // 2] + b"\x00" * (len(data) - 8 - header // 2))


def metrics(server: ServerProcess) -> str:
    return httpx.get(server.http_base + "/metrics", timeout=10).text


def rejected(server: ServerProcess) -> dict[tuple[str, str], float]:
    pattern = r'^rlhf_serving_adapter_rejected_total\{reason="(\w+)",version="(\w+)"\} (\S+)$'
    return {(v, r): float(n) for r, v, n in re.findall(pattern, metrics(server), re.M)}


def wait_for(check: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"not within {limit} s: {what}"
        time.sleep(0.05)


def log_lines(server: ServerProcess, needle: str) -> list[str]:
    return [line for line in list(server.stderr_lines) if needle in line]


def current(stub: pbg.PolicyStub) -> str:
    return stub.GetInfo(pb.GetInfoRequest(), timeout=10).current_adapter_version


def healthz(server: ServerProcess) -> dict:
    return httpx.get(server.http_base + "/healthz", timeout=10).json()


# -- finding 2: a refused version is retried once repaired, and on promote -------------


def test_a_repaired_version_goes_live_and_a_promote_always_rechecks(env, tmp_path):
    server, stub, maker = env["server"], env["stub"], env["maker"]
    good = current(stub)
    fixed = maker.publish(seed=30, register=False)
    weights = env["store"] / fixed.version / store.WEIGHTS_FILE
    original = weights.read_bytes()
    _corrupt(env["store"] / fixed.version)
    store.register(env["client"], fixed)
    wait_for(lambda: (fixed.version, "checksum") in rejected(server), 10, "checksum refusal")
    time.sleep(1.5)  # five polls: still refused, logged and counted once
    assert current(stub) == good
    assert rejected(server)[(fixed.version, "checksum")] == 1.0
    assert len(log_lines(server, f"adapter {fixed.version} refused (checksum")) == 1

    weights.write_bytes(original)  # the operator repairs the file, then promotes it
    started = time.monotonic()
    out = cli(env, "promote", fixed.version, store_dir=str(env["store"]))
    assert out.returncode == 0, out.stderr
    wait_live([stub], fixed.version, started, limit=15)
    assert greedy(stub, tokens=2)[1] == {fixed.version}
    assert log_lines(server, f"adapter {fixed.version} changed in the store") or \
        log_lines(server, f"adapter {fixed.version} was announced current")

    # A refusal the CLI cannot see (shapes need the model): promoting it again makes the
    # replica check it again and say so; it stays refused, counted once, old one serving.
    shaped = store_unchecked(env, 31, _wrong_shapes, tmp_path)
    wait_for(lambda: (shaped.version, "shape") in rejected(server), 10, "shape refusal")
    out = cli(env, "promote", shaped.version, store_dir=str(env["store"]))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: log_lines(server, f"adapter {shaped.version} is still refused (shape)"),
             10, "a re-check after promote")
    assert log_lines(server, f"adapter {shaped.version} was announced current")
    assert rejected(server)[(shaped.version, "shape")] == 1.0
    assert current(stub) == fixed.version


# -- finding 8: unparseable files with valid checksums --------------------------------


def test_broken_safetensors_with_a_valid_checksum_is_refused_and_logged_once(env, tmp_path):
    server, stub = env["server"], env["stub"]
    good = current(stub)
    broken = store_unchecked(env, 40, broken_safetensors, tmp_path)
    with pytest.raises(AdapterRejected, match="load_error"):  # checksums match: only parsing
        store.verify(env["store"], broken.version, env["maker"].base)  # the file catches it
    wait_for(lambda: (broken.version, "load_error") in rejected(server), 10, "load_error")
    time.sleep(1.5)  # five polls
    assert rejected(server)[(broken.version, "load_error")] == 1.0
    lines = log_lines(server, f"adapter {broken.version} refused (load_error)")
    assert len(lines) == 1, lines
    assert not log_lines(server, "Traceback"), "".join(server.stderr_lines[-30:])
    assert current(stub) == good
    assert greedy(stub, tokens=2)[1] == {good}
    # The CLI refuses to promote it, for the same reason.
    out = cli(env, "promote", broken.version, store_dir=str(env["store"]))
    assert out.returncode == 1 and "load_error" in out.stderr


def test_a_registry_entry_cannot_point_outside_the_store(env):
    """A version name is a directory of the store: "../x" is refused (reason "name",
    counted, no traceback) even when the files it points at would verify."""
    server, stub = env["server"], env["stub"]
    good = current(stub)
    outside = env["store"].parent / "outside"
    shutil.copytree(env["store"] / good, outside)
    manifest = store.Manifest.from_json((outside / store.MANIFEST_FILE).read_text())
    manifest = store.Manifest(**{**manifest.__dict__, "version": "../outside"})
    (outside / store.MANIFEST_FILE).write_text(manifest.to_json())
    store.register(env["client"], manifest)
    wait_for(lambda: ("../outside", "name") in rejected_any(server), 10, "name refusal")
    assert current(stub) == good
    assert not log_lines(server, "Traceback"), "".join(server.stderr_lines[-30:])


def rejected_any(server: ServerProcess) -> set[tuple[str, str]]:
    pattern = r'^rlhf_serving_adapter_rejected_total\{reason="(\w+)",version="([^"]+)"\} '
    return {(v, r) for r, v in re.findall(pattern, metrics(server), re.M)}


# -- finding 4: NaN and exploded weights; the canary -----------------------------------


def test_nan_and_huge_weights_are_never_published_nor_served(env, tmp_path):
    server, stub, maker = env["server"], env["stub"], env["maker"]
    good = current(stub)
    text_before, _ = greedy(stub)
    nan = store_unchecked(env, 50, scale_weights(1.0, float("nan")), tmp_path)
    huge = store_unchecked(env, 51, scale_weights(1e4), tmp_path)
    for version in (nan.version, huge.version):
        wait_for(lambda v=version: (v, "values") in rejected(server), 10, f"{version} refused")
    assert current(stub) == good
    assert greedy(stub) == (text_before, {good}), "the good version still answers the same"
    out = cli(env, "promote", nan.version, store_dir=str(env["store"]))
    assert out.returncode == 1 and "non-finite" in out.stderr

    # The learner's publish path (the shared store) refuses them and leaves nothing.
    for seed, value, factor in ((52, float("inf"), 1.0), (53, None, 1e4)):
        maker.randomize(seed)
        with torch.no_grad():
            p = next(p for n, p in maker.peft.named_parameters() if "lora_B" in n)
            p.mul_(factor)
            if value is not None:
                p[0, 0] = value
        with pytest.raises(AdapterRejected) as caught:
            store.publish(env["store"], f"refused-{seed}", maker.peft, parent=good,
                          base_model=maker.base)
        assert caught.value.reason == "values"
        assert not (env["store"] / f"refused-{seed}").exists()
        assert not [p for p in env["store"].iterdir() if p.name.startswith(".tmp-")]


def test_the_canary_refuses_weights_that_wreck_generation(env, tmp_path):
    """Weights that slip past the static checks (here: skipped) still never go live."""
    maker = env["maker"]
    manager = AdapterManager(load_model(maker.base).model, keep_versions=2)
    base_tokens = greedy_probe(manager.model, manager.canary_prompt_ids)
    src = tmp_path / "nan"
    src.mkdir()
    maker.randomize(60)
    maker.peft.save_pretrained(src)
    scale_weights(1.0, float("nan"))(src)
    with pytest.raises(AdapterRejected) as caught:
        manager.load("nan", src, checked=True)
    assert caught.value.reason == "canary" and "non-finite" in caught.value.detail
    assert manager.loaded() == ["base"]
    assert greedy_probe(manager.model, manager.canary_prompt_ids) == base_tokens, \
        "after a refusal the base model still runs, unchanged"
    with pytest.raises(AdapterRejected, match="values"):
        manager.load("nan", src)  # unchecked: the value check comes first
    manager.load("v1", env["store"] / "v1")  # a good one still loads beside base
    manager.set_current("v1")
    assert manager.loaded() == ["base", "v1"]


def test_value_and_canary_rules_by_hand():
    assert tensor_problem("a", torch.tensor([0.5, -1.0])) is None
    assert "non-finite" in tensor_problem("a", torch.tensor([0.0, float("nan")]))
    assert "non-finite" in tensor_problem("a", torch.tensor([float("-inf")]))
    assert "|value| 17" in tensor_problem("a", torch.tensor([17.0, 0.0]))
    # max-abs 8 passes, root-mean-square 8 > 4 does not
    assert "Frobenius" in tensor_problem("a", torch.full((4, 4), 8.0))
    assert tensor_problem("ids", torch.tensor([10**6])) is None  # not float weights
    assert weight_problems({"b": torch.ones(2), "a": torch.tensor([float("nan")])}) == [
        "a has 1 non-finite value(s) (NaN/inf)"]
    assert canary_problem([3, 4, 5], True, [1, 2, 3]) is None
    assert "non-finite" in canary_problem([3], False, [1, 2, 3])
    assert "degenerate" in canary_problem([9, 9, 9], True, [1, 2, 3])
    assert canary_problem([9, 9, 9], True, [7, 7, 7]) is None  # the base repeats too


# -- finding 3: a fresh replica agrees with the fleet; promote always verifies ----------


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
