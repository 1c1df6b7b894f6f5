"""Servers a benchmark runs as child processes: `rlhf serve` (ready on its JSON "ready" event)
or any command listening on a free port (ready when its caller says), always stopped after."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serve_child(model_dir: str, extra: list[str], threads: int, timeout: float = 600.0
                ) -> Iterator[str]:
    """`rlhf serve` with ``extra`` flags as a child; yields its gRPC target once ready.

    Raises if the server exits early or prints nothing for ``timeout`` seconds; the child
    is always stopped afterwards.
    """
    cmd = [sys.executable, "-m", "rlhf.cli", "serve", "--model", model_dir, "--threads",
           str(threads), "--grpc-port", "0", "--http-port", "-1", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stdout or ():
            lines.put(line)
        lines.put("")  # EOF: the server exited

    threading.Thread(target=read, daemon=True).start()
    try:
        event: dict = {}
        while event.get("event") != "ready":
            line = lines.get(timeout=timeout)  # queue.Empty: no progress for `timeout` s
            if not line:
                raise RuntimeError(f"the server exited early (code {proc.wait()})")
            event = {**event, **json.loads(line)}
        yield f"127.0.0.1:{event['grpc_port']}"
    finally:
        stop_process(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drain(proc: subprocess.Popen, tail: list[str]) -> None:
    """Keep the child's output moving (a full pipe would block it); keep its last lines."""
    for line in proc.stdout or ():
        tail.append(line)
        del tail[:-40]


@contextlib.contextmanager
def port_child(cmd: list[str], env: dict[str, str], name: str
               ) -> Iterator[tuple[str, Callable[[], bool]]]:
    """``cmd`` (``{port}`` replaced by a free port) run from the repository root; yields its
    base URL and whether it is still alive. On an error its last output goes to stderr."""
    port = free_port()
    cmd = [c.replace("{port}", str(port)) for c in cmd]
    log.info("starting %s: %s", name, " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env}, cwd=ROOT)
    tail: list[str] = []
    threading.Thread(target=_drain, args=(proc, tail), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}", lambda: proc.poll() is None
    except Exception:
        sys.stderr.write(f"--- last output of {name} ---\n" + "".join(tail))
        raise
    finally:
        stop_process(proc)


def resolve_model(name: str) -> str:
    """``--model`` as every command reads it (rlhf.modeling); "tiny" = ``starter-tiny``."""
    from rlhf.modeling import resolve_model_name

    return resolve_model_name("starter-tiny" if name == "tiny" else name)
