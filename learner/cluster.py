"""One learner over several processes (``torchrun``; docs/design.md §6): rank 0 leads.

Rank 0 is the learner the outside world sees: the admin API, the intake (Redis), the
dataset, checkpoints, the records and publishing are its alone; the other ranks hold the
same base model and no Redis connection. Every rank builds a ``Learner`` with a ``Cluster``;
the leader drives iterations as one process does, and the others sit in ``follow``.

Commands go from the leader to the followers by ``broadcast_object`` (gloo or NCCL, the
process group learner/distributed.py joins):

- ``phase``  run this phase of iteration ``id`` now, on ``work`` when given (the leader's
             ``Work`` after a phase only it ran: drained comparisons, and any other record
             list a later phase adds to ``Work``, travel with it), else on the work as the
             previous shared phase left it (every rank computed the same)
- ``idle``   a heartbeat while no shared phase runs, so a waiting follower's collective
             never reaches the process group's timeout however long the learner is idle
- ``stop``   the leader is shutting down

Which phases every rank runs is ``SHARED`` below (a phase that trains on the data set data-
parallel belongs there; one line for a new one). A shared phase reads only ``Work``, the
model and the config: whatever it needs from Redis or the data dir, a leader-only phase
(drain) puts on ``Work`` (the followers have neither). The others run on the leader alone while the
followers wait (drain, publish, record, and evaluate: a few prompts, sampled as one process
samples them, so the metrics do not depend on the number of processes). The order of the
phases is the leader's: a follower runs what it is sent.

Failures: a rank that dies (kill, OOM) breaks the collectives of the others and
``torchrun`` stops the rest, so the whole learner ends the way a killed one-process learner
ends (the iteration is left "running" or recorded "failed", nothing is published) and the
next start recovers from rank 0's checkpoint. A phase that raises on the leader while the
followers are inside the same shared phase cannot be resumed in step, so the leader records
the failure and exits (``torchrun --max-restarts`` starts the learner again).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from learner import distributed as dd
from learner.records import Progress, pause_for_tests

log = logging.getLogger(__name__)

SHARED = frozenset({"sft", "reward_model", "ppo"})  # phases every rank runs (SFT: each on
# all demonstrations, then rank 0's weights; RM and PPO data-parallel)
ABORT_EXIT = 70  # the leader's exit status after a failed shared phase


@dataclass(frozen=True)
class Command:
    kind: str  # "phase" | "idle" | "stop"
    phase: str = ""
    iteration: str = ""
    work: Any = None


class Cluster:
    """The leader's or a follower's side of the command channel (world size 1: no-ops)."""

    def __init__(self, heartbeat_s: float = 30.0) -> None:
        self.world, self.rank = dd.world_size(), dd.rank()
        self.is_leader = self.rank == 0
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()  # one collective at a time on the leader
        self._shared = False  # a shared phase runs: its collectives own the channel
        self._synced = False  # the followers hold the leader's current Work
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # -- the leader ----------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        if self.distributed and self.is_leader and self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, name="cluster-heartbeat",
                                          daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                if self._shared or self._stop.is_set():
                    continue
                try:
                    dd.broadcast_object(Command("idle"))
                except Exception:  # a follower died: torchrun stops this process too
                    log.exception("heartbeat to the other ranks failed")
                    return

    def before_phase(self, name: str, iteration: str, work: Any) -> None:
        """Leader, before each phase: a shared one is sent to the followers (with the Work
        when a leader-only phase may have changed it)."""
        if not self.distributed:
            return
        with self._lock:
            if name not in SHARED:
                self._shared = self._synced = False
                return
            dd.broadcast_object(Command("phase", name, iteration,
                                        None if self._synced else work))
            self._shared = self._synced = True

    @contextlib.contextmanager
    def iteration(self) -> Iterator[None]:
        """Leader, around one iteration: the next one starts by sending its Work; a failure
        inside a shared phase ends the process (the followers cannot be brought back in
        step: they wait in one of its collectives)."""
        self._synced = False
        try:
            yield
        except BaseException:
            if self.distributed and self._shared:
                log.critical("a shared phase failed on rank 0: the learner exits (status %d)",
                             ABORT_EXIT)
                logging.shutdown()
                os._exit(ABORT_EXIT)
            raise
        finally:
            with self._lock:
                self._shared = False

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (startup: the checkpoint to continue from)."""
        with self._lock:
            return dd.broadcast_object(value)

    def stop(self) -> None:
        """Leader, at shutdown: release the followers (they exit 0)."""
        self._stop.set()
        if not (self.distributed and self.is_leader):
            return
        with self._lock:
            if self._shared:  # an iteration is inside collectives: torchrun ends the rest
                return
            log.info("stopping the other %d ranks", self.world - 1)
            try:
                dd.broadcast_object(Command("stop"))
            except Exception:
                log.warning("could not tell the other ranks to stop (one is gone)")

    # -- a follower ----------------------------------------------------------------------------
    def follow(self, learner: Any) -> None:
        """Run the phases the leader sends until it says stop (or dies: the collective then
        raises and this process ends, non-zero). SIGTERM and SIGINT (torchrun passes them
        on, a terminal's Ctrl-C reaches every rank) are ignored: the leader's shutdown
        sends ``stop``, and torchrun SIGKILLs a rank that outlives its grace period."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        work = None
        while True:
            command: Command = dd.broadcast_object(None)
            if command.kind == "stop":
                log.info("rank %d: the leader stopped", self.rank)
                return
            if command.kind != "phase":
                continue
            if command.work is not None:
                work = command.work
            pause_for_tests(f"rank{self.rank}:{command.phase}")
            log.info("rank %d: iteration %s phase %s", self.rank, command.iteration,
                     command.phase)
            learner.phases()[command.phase](work, Progress(command.iteration))


def die_with_parent() -> None:
    """Linux: this rank gets SIGKILL when its parent (torchrun's agent) dies, even by
    SIGKILL, so no rank outlives the learner it belongs to."""
    if not os.path.exists("/proc/self"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGKILL)
