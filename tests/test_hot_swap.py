"""Adapter hot-swap: publish to the registry, every replica follows within a second, no
request fails or mixes versions, bad adapters are refused, rollback works (docs/design.md §4).

Real Redis (db 2), real `rlhf serve` processes, the tiny model, LoRA adapters made with
PEFT (each version with its own random weights, so each says something different).
"""

from __future__ import annotations

import json
import re
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
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from rlhf import adapter_store as store
from rlhf.adapter_store import AdapterRejected
from rlhf.modeling import load_model
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg
from serving.adapters import AdapterManager
from tests.conftest import ROOT, ServerProcess

TOKENS = 12
LIVE_TIMEOUT_S = 30.0  # liveness only: a version that never goes live fails; how fast it goes
# live is measured by `rlhf bench hotswap` (no timing thresholds in tests: CI machines are noisy)


class Maker:
    """Publishes versions as the learner will: publish (files) + register (Redis)."""

    def __init__(self, model_dir: Path, store_dir: Path, client: redis.Redis) -> None:
        torch.manual_seed(0)
        self.base = str(model_dir)
        self.peft = get_peft_model(load_model(self.base).model, LoraConfig(
            r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "up_proj"],
            init_lora_weights=False))
        self.store, self.client = store_dir, client
        self.parent: str | None = None

    def randomize(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.peft.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def publish(self, seed: int, register: bool = True, base_model: str | None = None
                ) -> store.Manifest:
        self.randomize(seed)
        version = store.next_version(self.client)
        manifest = store.publish(self.store, version, self.peft, parent=self.parent,
                                 base_model=base_model or self.base, metrics={"seed": seed},
                                 config={"r": 8})
        if register:
            store.register(self.client, manifest)
        self.parent = version
        return manifest


@pytest.fixture(scope="module")
def env(tiny_model_dir, redis_server, tmp_path_factory) -> Iterator[dict]:
    url = redis_server.db_url(2)
    client = redis.Redis.from_url(url)
    client.flushdb()
    store_dir = tmp_path_factory.mktemp("adapter-store")
    maker = Maker(tiny_model_dir, store_dir, client)
    maker.publish(seed=100)  # v1: what replicas start on
    extra = ["--redis-url", url, "--adapter-store", str(store_dir), "--registry-poll-s", "0.5",
             "--keep-versions", "3"]
    servers = [ServerProcess(tiny_model_dir, extra=extra) for _ in range(2)]
    channels = [grpc.insecure_channel(s.grpc_target) for s in servers]
    try:
        yield {"url": url, "client": client, "maker": maker, "servers": servers,
               "stubs": [pbg.PolicyStub(c) for c in channels], "store": store_dir}
    finally:
        for c in channels:
            c.close()
        for s in servers:
            s.stop()
        client.close()


def greedy(stub: pbg.PolicyStub, tokens: int = TOKENS) -> tuple[str, set[str]]:
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="What is 3 + 4?")],
                             sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=tokens,
                                                        min_new_tokens=tokens))
    chunks = list(stub.Generate(req, timeout=30))
    return "".join(c.text for c in chunks), {c.adapter_version for c in chunks}


def wait_live(stubs: list[pbg.PolicyStub], version: str, since: float,
              limit: float = LIVE_TIMEOUT_S) -> list[float]:
    """Seconds from ``since`` until each replica's GetInfo reports ``version`` current."""
    out = []
    for stub in stubs:
        while stub.GetInfo(pb.GetInfoRequest()).current_adapter_version != version:
            assert time.monotonic() - since < limit, f"{version} not live after {limit} s"
            time.sleep(0.01)
        out.append(time.monotonic() - since)
    return out


class Load:
    """Client threads streaming greedy requests back to back, recording what they saw."""

    def __init__(self, stub: pbg.PolicyStub, threads: int = 3) -> None:
        self.stub, self.stop = stub, threading.Event()
        self.seen: list[list[tuple[str, set[str]]]] = [[] for _ in range(threads)]
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        while not self.stop.is_set():
            try:
                self.seen[i].append(greedy(self.stub))
            except Exception as exc:  # counted: the test demands none
                self.errors.append(exc)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def order(version: str) -> int:
    return 0 if version == "base" else int(version[1:])


def test_ten_publishes_under_load_swap_cleanly_on_both_replicas(env):
    stubs, maker = env["stubs"], env["maker"]
    wait_live(stubs, "v1", time.monotonic())
    latencies: list[float] = []
    with Load(stubs[0]) as load:
        time.sleep(0.5)
        for seed in range(1, 11):
            started = time.monotonic()
            version = maker.publish(seed=seed).version
            latencies += wait_live(stubs, version, started)
            _, versions = greedy(stubs[1], tokens=1)
            assert versions == {version}, "a new request after the switch gets the new version"
            time.sleep(0.3)
    assert not load.errors, f"failed requests: {load.errors[:3]}"
    texts: dict[str, set[str]] = {}
    for thread in load.seen:
        assert len(thread) > 5
        for text, versions in thread:
            assert len(versions) == 1, f"one stream saw {versions}"
            texts.setdefault(next(iter(versions)), set()).add(text)
        seq = [order(next(iter(v))) for _, v in thread]
        assert seq == sorted(seq), f"versions went backwards: {seq}"
    assert len(texts) >= 8, f"load saw too few versions: {sorted(texts)}"
    assert all(len(t) == 1 for t in texts.values()), "a version said two different things"
    assert len({next(iter(t)) for t in texts.values()}) > 1, "versions say different things"
    latencies.sort()
    print(json.dumps({"publish_to_live_s": {"p50": latencies[len(latencies) // 2],
                                            "max": latencies[-1]}}))
    time.sleep(1.2)  # unused old versions are unloaded within a poll
    for stub in stubs:
        info = stub.GetInfo(pb.GetInfoRequest())
        assert info.current_adapter_version == "v11"
        assert "v11" in info.loaded_adapter_versions
        assert len(info.loaded_adapter_versions) <= 1 + 3  # base + keep_versions


def test_a_missed_notification_is_caught_by_the_poll(env):
    version = env["maker"].publish(seed=11, register=False)
    store.register(env["client"], version, make_current=False)
    started = time.monotonic()
    env["client"].set(store.CURRENT, version.version)  # no PUBLISH
    wait_live(env["stubs"], version.version, started)  # caught by the poll, no PUBLISH


def rejected(server: ServerProcess) -> dict[str, str]:
    text = httpx.get(server.http_base + "/metrics").text
    pattern = r'^rlhf_serving_adapter_rejected_total\{reason="(\w+)",version="(\w+)"\} 1\.0$'
    return {v: r for r, v in re.findall(pattern, text, re.M)}


def _corrupt(folder: Path) -> None:
    path = folder / store.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    path.write_bytes(bytes(data))


def _wrong_shapes(folder: Path) -> None:
    path = folder / store.WEIGHTS_FILE
    tensors = load_file(str(path))
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, str(path))


def test_bad_adapters_are_refused_and_the_old_one_keeps_serving(env, tmp_path):
    maker, client = env["maker"], env["client"]
    good = store.current(client)
    bad = maker.publish(seed=20, register=False)
    _corrupt(env["store"] / bad.version)
    with pytest.raises(AdapterRejected, match="checksum"):
        store.verify(env["store"], bad.version, maker.base)
    # A shape mismatch with a valid checksum: re-hashed into a fresh version.
    src = tmp_path / "wrong"
    src.mkdir()
    maker.randomize(21)
    maker.peft.save_pretrained(src)
    _wrong_shapes(src)
    shaped = store.publish(env["store"], store.next_version(client), src, parent=good,
                           base_model=maker.base)
    other = maker.publish(seed=22, register=False, base_model="someone/else-7b")
    expected = {bad.version: "checksum", shaped.version: "shape", other.version: "base_model"}
    for manifest in (bad, shaped, other):
        store.register(client, manifest)
        time.sleep(0.3)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(rejected(s) != expected for s in env["servers"]):
        time.sleep(0.1)
    for server, stub in zip(env["servers"], env["stubs"], strict=True):
        assert rejected(server) == expected
        assert stub.GetInfo(pb.GetInfoRequest()).current_adapter_version == good
        assert greedy(stub, tokens=2)[1] == {good}


def test_rollback_through_the_cli(env):
    target = "v9"
    cmd = [sys.executable, "-m", "rlhf.cli", "adapters", "--redis-url", env["url"],
           "--store", str(env["store"]), "rollback", target]
    started = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["current"] == target
    wait_live(env["stubs"], target, started)
    for stub in env["stubs"]:
        assert greedy(stub, tokens=2)[1] == {target}
    listed = subprocess.run([*cmd[:-2], "list"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["version"] for r in rows if r["current"]] == [target]
    shown = subprocess.run([*cmd[:-2], "show", "v2"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert json.loads(shown.stdout)["parent"] == "v1"


def test_adapter_manager_unloads_only_free_old_versions(env):
    maker = env["maker"]
    manager = AdapterManager(load_model(maker.base).model, keep_versions=1)
    folders = [env["store"] / v for v in ("v2", "v3")]
    for folder in folders:
        manager.load(folder.name, folder)
    manager.set_current("v3")
    pinned = manager.acquire("v2")
    assert manager.evict() == [], "a pinned version stays"
    assert not manager.unload("v3"), "the current version stays"
    manager.release(pinned)
    assert manager.evict() == ["v2"]
    assert manager.loaded() == ["base", "v3"]
    with pytest.raises(AdapterRejected, match="shape"):
        manager.check_shapes(env["store"] / "v14")
