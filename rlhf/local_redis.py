"""A private ``redis-server`` child on a free port: for ``rlhf up`` without a Redis URL,
benchmarks and tests (the real server, never a fake).

Durability as ``deploy/redis.conf``: AOF on (``appendfsync everysec``), no RDB snapshots.
``stop()`` sends SIGTERM, on which Redis fsyncs the AOF, so ``start()`` again reloads
everything (tests use that for "Redis went down" cases).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """``redis-server`` with its data in ``data_dir``; ``port`` 0 picks a free one."""

    def __init__(self, data_dir: Path | str, port: int = 0, binary: str = "redis-server",
                 log_file: str = "") -> None:
        self.data_dir, self.binary, self.log_file = Path(data_dir), binary, log_file
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.db_url(0)

    def db_url(self, db: int) -> str:
        """The URL of logical database ``db`` (tests keep their keys apart this way)."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait for PING; raises RuntimeError (and leaves nothing running) if it
        does not answer in ``timeout`` seconds."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.data_dir),
               "--logfile", self.log_file]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def stop(self, timeout: float = 10.0) -> None:
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


@contextlib.contextmanager
def private_redis(prefix: str = "rlhf-redis-") -> Iterator[str]:
    """A throwaway server with its data in a temp dir; yields its URL, removes everything."""
    with tempfile.TemporaryDirectory(prefix=prefix) as data_dir:
        server = RedisServer(data_dir)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()
