"""Iteration records: what an operator sees of each iteration, on disk and in Redis.

A record is written when an iteration starts and at each phase start (status "running"),
so an iteration killed mid-way stays visible; at startup ``mark_interrupted`` turns records
still "running" into "interrupted", naming the phase the process died in.

- ``DATA/iterations/<id>.json``   the record (replaced atomically)
- ``rlhf:learner:iterations``     hash: id -> record JSON
- ``rlhf:learner:history``        list of ids, in start order
- ``rlhf:learner:iteration_seq``  counter behind the ids (never reused)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import redis
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)

PAUSE_ENV = "RLHF_LEARN_TEST_PAUSE_FILE"  # see pause_for_tests
PHASES = ("drain", "sft", "reward_model", "ppo", "evaluate", "publish", "record")
HISTORY = "rlhf:learner:history"  # list of iteration ids, oldest first
RECORDS = "rlhf:learner:iterations"  # hash: iteration id -> record JSON
SEQ = "rlhf:learner:iteration_seq"


@dataclass
class Progress:
    """What an operator sees of one iteration; mutated only by the worker thread."""

    id: str
    status: str = "running"  # running | done | failed | interrupted
    phase: str = "pending"
    phase_number: int = 0
    phases: int = len(PHASES)
    step: int = 0  # within the phase (RM or PPO steps)
    steps: int = 0
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: str | None = None
    version: str | None = None
    learner: str = ""  # the consumer name of the learner that ran it
    skipped: list[str] = field(default_factory=list)  # phases with nothing to do (sft)
    seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A snapshot; safe while the worker updates (dict() copies atomically under the GIL,
        where ``asdict`` would iterate a dict that may change size)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["metrics"], out["seconds"] = dict(self.metrics), dict(self.seconds)
        out["skipped"] = list(self.skipped)
        return out


def _write_json(path: Path, record: str) -> None:
    part = path.with_name(path.name + ".tmp")
    part.write_text(record)
    os.replace(part, path)  # a kill leaves the old record or the new one, never half


# The record, and its id appended to the history unless listed: one atomic step, so writes
# at every phase list an iteration once. KEYS: records, history; ARGV: id, record JSON.
_SAVE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('LPOS', KEYS[2], ARGV[1]) == false then redis.call('RPUSH', KEYS[2], ARGV[1]) end
"""


def save(client: redis.Redis, folder: Path, record: dict[str, Any]) -> None:
    """Write (or rewrite) one record on disk and in Redis."""
    text = json.dumps(record, sort_keys=True, default=str)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / f"{record['id']}.json", text)
    client.eval(_SAVE, 2, RECORDS, HISTORY, record["id"], text)


def history(client: redis.Redis) -> list[dict[str, Any]]:
    ids = [i.decode() for i in client.lrange(HISTORY, 0, -1)]
    raws = client.hmget(RECORDS, ids) if ids else []
    return [json.loads(raw) for raw in raws if raw is not None]


def _on_disk(folder: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            record = json.loads(path.read_text())
        except ValueError:
            log.warning("unreadable iteration record %s: skipped", path)
            continue
        found[record["id"]] = record
    return found


def mark_interrupted(client: redis.Redis, folder: Path, learner: str) -> list[str]:
    """At startup: every record this learner left "running" (on disk, or in Redis under its
    name) becomes "interrupted" (and is listed in the history). Returns their ids. A record
    finished on disk but "running" in Redis (killed between the two writes) is copied over."""
    disk = _on_disk(folder)
    stale = {i: r for i, r in disk.items() if r.get("status") == "running"}
    for raw_id, raw in client.hgetall(RECORDS).items():
        record, iteration_id = json.loads(raw), raw_id.decode()
        if record.get("status") != "running" or record.get("learner", "") not in ("", learner):
            continue
        if iteration_id in disk and iteration_id not in stale:
            save(client, folder, disk[iteration_id])
        else:
            stale.setdefault(iteration_id, record)
    for iteration_id, record in sorted(stale.items()):
        phase = record.get("phase", "pending")
        record.update(status="interrupted", finished_at=time.time(),
                      error=f"the learner was restarted during phase {phase!r} (killed or "
                            "crashed): this iteration did not finish; trigger a new one")
        save(client, folder, record)
        log.warning("iteration %s was interrupted in phase %s by a restart", iteration_id,
                    phase)
    return sorted(stale)


def summary_line(progress: Progress) -> str:
    """One console line per iteration: time per phase and the PPO time split."""
    m, s = progress.metrics, progress.seconds
    phases = ", ".join(f"{name} skipped" if name in progress.skipped else f"{name} {s[name]:.1f}s"
                       for name in PHASES if name in s)
    split = ""
    if "time/generate_total_s" in m:
        split = (f"; ppo: generate {m['time/generate_total_s']:.1f}s, score "
                 f"{m['time/score_total_s']:.1f}s, train {m['time/train_total_s']:.1f}s, "
                 f"{m['ppo/episodes_per_s']:.2f} samples/s")
    total = (progress.finished_at or time.time()) - progress.started_at
    return (f"iteration {progress.id} {progress.status} in {total:.1f}s -> "
            f"{progress.version or 'no version'} ({phases}{split})")


@contextlib.contextmanager
def progress_bar(desc: str, total: int | None, enabled: bool) -> Iterator[tqdm]:
    """A tqdm bar on stderr, shown only on a terminal and with ``progress_bars`` on; while
    shown, log lines go through ``tqdm.write`` so they do not tear the bar."""
    shown = enabled and sys.stderr.isatty()
    with tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False,
              disable=not shown, dynamic_ncols=True) as bar:
        if not shown:
            yield bar
            return
        with logging_redirect_tqdm(tqdm_class=tqdm):
            yield bar


def pause_for_tests(point: str) -> None:
    """Test hook (tests/test_learner_crash.py): with ``RLHF_LEARN_TEST_PAUSE_FILE=<path>``
    set, reaching a point (a phase name, ``sft:trained``, ``publish:stored`` or
    ``publish:checkpointed``) that
    the file names blocks the iteration's worker forever, so a test can SIGKILL the process
    exactly there; the file is re-read at each point, so one process can first run whole
    iterations. Unset (production): a no-op."""
    path = os.environ.get(PAUSE_ENV)
    if not path:
        return
    try:
        wanted = Path(path).read_text().strip()
    except FileNotFoundError:
        return
    if wanted == point:
        log.warning("%s: pausing at %s for good (test hook)", PAUSE_ENV, point)
        threading.Event().wait()
