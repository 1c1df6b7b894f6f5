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

from rlhf.local_redis import RedisServer  # the tests import it from here too

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    """The tiny model loaded in this process (one per test module: engines may add adapters)."""
    from rlhf.modeling import load_model

    return load_model(str(tiny_model_dir))


def chat_prompt_ids(loaded, text: str) -> list[int]:
    """Token ids of one user turn through the model's chat template, as serving builds them."""
    from rlhf.chat import chat_ids, user_turn

    return chat_ids(loaded.tokenizer, user_turn(text))


def terminate(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
