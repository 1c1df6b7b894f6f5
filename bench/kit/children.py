"""What the benchmark commands share: a real `rlhf serve` child process and the JSON report."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path


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


def write_report(report: dict, out: str | None) -> None:
    """Print the report as one JSON document (and write it to ``out`` when given)."""
    text = json.dumps(report, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    sys.stdout.write(text + "\n")
