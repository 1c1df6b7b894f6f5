"""Shared fixtures: the tiny test model and real `rlhf serve` processes on free ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny starter preset (cached under RLHF_HOME, built once)."""
    from rlhf.starter import ensure_starter_model

    return ensure_starter_model("tiny")


class ServerProcess:
    """A real `rlhf serve` child process; ports are picked by the server (port 0)."""

    def __init__(self, model_dir: Path, extra: Sequence[str] = (), env: dict | None = None,
                 ready_timeout: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "rlhf.cli", "serve", "--model", str(model_dir),
               "--grpc-port", "0", "--http-port", "0", "--threads", "1", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.grpc_port = self.http_port = 0
        self.ready = False
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            if event["event"] == "listening":
                self.grpc_port, self.http_port = event["grpc_port"], event["http_port"]
            elif event["event"] == "ready":
                self.ready = True
                return
        self.stop()
        raise RuntimeError("server did not become ready:\n" + "".join(self.stderr_lines[-40:]))

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """One shared server with default limits and no auth."""
    proc = ServerProcess(tiny_model_dir)
    yield proc
    proc.stop()


class RedisServer:
    """A private `redis-server` (AOF on, no RDB) on a free port; stop/start keep its data."""

    def __init__(self, data_dir: Path, binary: str = "redis-server") -> None:
        import socket

        self.data_dir, self.binary = data_dir, binary
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        import redis

        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "yes", "--dir", str(self.data_dir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis fsyncs the AOF and exits; a restart reloads everything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private Redis for the session (``.url``; ``.stop()``/``.start()`` for Redis-down
    tests, which must start it again)."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (deploy/setup.sh installs it)")
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    yield srv
    srv.stop()
