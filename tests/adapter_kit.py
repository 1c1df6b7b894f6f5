"""Shared by the adapter safety tests: a module's server on the registry, and versions
written into the store the way a bug or an attacker would (files changed after the fact,
manifest checksums recomputed), so only the checks beyond checksums can catch them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import redis
from safetensors.torch import load_file, save_file

from rlhf import adapter_store as store
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg
from tests.conftest import ROOT, ServerProcess
from tests.test_hot_swap import Maker

POLL = ["--registry-poll-s", "0.3"]


def make_env(model_dir: Path, url: str, store_dir: Path) -> Iterator[dict]:
    """Registry (``url``, flushed) with v1, one `rlhf serve` following it."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    maker = Maker(model_dir, store_dir, client)
    maker.publish(seed=100)  # v1
    extra = ["--redis-url", url, "--adapter-store", str(store_dir), *POLL]
    server = ServerProcess(model_dir, extra=extra)
    channel = grpc.insecure_channel(server.grpc_target)
    try:
        yield {"url": url, "client": client, "maker": maker, "server": server, "extra": extra,
               "stub": pbg.PolicyStub(channel), "store": store_dir, "model": model_dir}
    finally:
        channel.close()
        server.stop()
        client.close()

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


def rejected_any(server: ServerProcess) -> set[tuple[str, str]]:
    pattern = r'^rlhf_serving_adapter_rejected_total\{reason="(\w+)",version="([^"]+)"\} '
    return {(v, r) for r, v in re.findall(pattern, metrics(server), re.M)}
