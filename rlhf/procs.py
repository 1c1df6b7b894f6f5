"""Child processes of `rlhf up`: started in their own process group, output prefixed, stopped
with SIGTERM -> wait -> SIGKILL.

Each child gets its own session (so a Ctrl-C in the terminal reaches only the launcher, which
then stops the parts in order) and, on Linux, ``PR_SET_PDEATHSIG`` (so a launcher killed with
SIGKILL still takes its children with it). One reader thread per child copies its merged
stdout/stderr to our stdout as ``name | line`` and posts every line and the exit code on a
shared queue the launcher's main loop reads.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_OUTPUT_LOCK = threading.Lock()  # one prefixed line at a time on our stdout


def _load_libc() -> ctypes.CDLL | None:
    """libc, loaded in the parent: the child between fork and exec only calls into it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def _die_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class Event:
    """A line a child printed (``rc`` None) or its exit (``line`` empty, ``rc`` set)."""

    name: str
    line: str = ""
    rc: int | None = None


def write_line(text: str) -> None:
    """One line on our stdout, never interleaved with another thread's."""
    with _OUTPUT_LOCK:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


class Child:
    """One running part: ``name`` prefixes its output; ``stop`` ends its whole group."""

    def __init__(self, name: str, cmd: Sequence[str], events: queue.Queue[Event],
                 env: Mapping[str, str] | None = None, cwd: str | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
            env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
            preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        self._events = events
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        width = max(5, len(self.name))
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            write_line(f"{self.name:<{width}} | {line}")
            self._events.put(Event(self.name, line))
        self._events.put(Event(self.name, rc=self.proc.wait()))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)  # the child is its group's leader (own session)

    def stop(self, timeout: float, hurry: Callable[[], bool] = lambda: False) -> int:
        """SIGTERM the group, wait up to ``timeout`` s (less if ``hurry()`` turns true), then
        SIGKILL; returns the exit code. Leftover grandchildren get SIGKILL too (only when it
        was running until now: the group id of a long-dead child may belong to another)."""
        was_alive = self.alive
        if was_alive:
            log.info("stopping %s (pid %d)", self.name, self.pid)
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive and time.monotonic() < deadline and not hurry():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(0.1)
            if self.alive:
                log.warning("%s did not stop within %.0f s: SIGKILL", self.name, timeout)
                self._signal_group(signal.SIGKILL)
        rc = self.proc.wait()
        if was_alive:
            self._signal_group(signal.SIGKILL)  # anything it left behind in its group
        self._reader.join(timeout=5.0)
        return rc
