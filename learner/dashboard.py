"""What the operator's dashboard shows (``GET /v1/dashboard``), gathered cheaply per poll.

- ``queue``: the comparisons stream's length and the "learner" consumer group's ``lag``
  (entries never delivered to it) and ``pending`` (delivered, not yet acknowledged, e.g.
  after a crash), from XINFO GROUPS; ``depth`` = lag + pending is what the next drain reads.
- ``labelers``: comparisons and demonstrations per labeler id. ``submitted`` is counted from
  the comparisons stream's ``labeler_id`` field, incrementally: the stream is append-only and
  never trimmed, so each poll reads only the entries after the last one it counted.
  ``learned`` is the durable dataset's own per-labeler count (kept as it loads and appends:
  no disk read per poll). ``demonstrations_submitted`` / ``demonstrations_learned`` are the
  same for the demonstrations stream and dataset (stored demonstrations; a comparison's
  ideal answer counts with its comparison).
- ``labeler_quality``: rlhf.labelers' report over every ranking in the comparisons stream
  (fed by the same incremental read) with the task queue's golden answers: agreement on
  overlapped tasks, golden accuracy, median time per ranking, flag rate, per labeler and
  overall.
- ``iterations``: the history (finished ones plus the running one) with the metrics the
  curves plot; a key an iteration did not log (e.g. a gold win rate outside simulations) is
  simply absent.
- ``adapters``: registered versions in publish order with parent, created_at, current and
  the same metric subset from their manifests.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis

from learner.dataset import ComparisonDataset, DemonstrationDataset
from rlhf import adapter_store, tasks
from rlhf.comparisons import DEMONSTRATIONS, GROUP, STREAM, decode_entry
from rlhf.labelers import LabelerStats

# The per-iteration curves (docs/design.md §3 "log per iteration"), plus every key naming a gold
# (simulated-labeler) metric.
CURVE_METRICS = ("rm/accuracy", "ppo/reward", "ppo/score", "ppo/kl", "ppo/kl_k3",
                 "eval/win_rate", "eval/kl", "ptx/loss_before", "ptx/loss_after",
                 "data/comparisons", "data/new")


def metric_subset(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The curve metrics present in ``metrics`` (numbers only, bools left out)."""
    return {k: v for k, v in metrics.items()
            if (k in CURVE_METRICS or "gold" in k)
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def iteration_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One history record (``Progress.to_dict``) as a dashboard row."""
    return {"id": record.get("id"), "status": record.get("status"),
            "version": record.get("version"), "phase": record.get("phase"),
            "skipped": list(record.get("skipped") or []),
            "started_at": record.get("started_at"), "finished_at": record.get("finished_at"),
            "seconds": round(sum((record.get("seconds") or {}).values()), 3),
            "error": record.get("error"), "metrics": metric_subset(record.get("metrics") or {})}


def queue_depth(client: redis.Redis, stream: str = STREAM, group: str = GROUP
                ) -> dict[str, int]:
    """``{stream_length, lag, pending, depth}`` of the learner's consumer group."""
    length = int(client.xlen(stream))
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no stream yet
        groups = []
    info = next((g for g in groups if _text(g.get("name")) == group), None)
    if info is None:  # no group yet: nothing was ever delivered, everything is waiting
        return {"stream_length": length, "lag": length, "pending": 0, "depth": length}
    lag = info.get("lag")
    if lag is None:  # Redis answers nil when it cannot tell (after deletions): count them
        lag = _entries_after(client, stream, _text(info.get("last-delivered-id")) or "0-0")
    pending = int(info.get("pending") or 0)
    return {"stream_length": length, "lag": int(lag), "pending": pending,
            "depth": int(lag) + pending}


def _entries_after(client: redis.Redis, stream: str, last: str, page: int = 1000) -> int:
    count, start = 0, "(" + last
    while True:
        batch = client.xrange(stream, min=start, max="+", count=page)
        count += len(batch)
        if len(batch) < page:
            return count
        start = "(" + batch[-1][0].decode()


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class StreamTally:
    """Records per labeler in one stream, counted once each (thread-safe)."""

    def __init__(self, stream: str = STREAM, page: int = 1000) -> None:
        self.stream, self.page = stream, page
        self.last = "0-0"  # id of the last entry counted
        self.counts: Counter[str] = Counter()
        self.stats = self._fresh_stats()  # the comparisons themselves, for labeler_quality
        self._lock = threading.Lock()

    def _fresh_stats(self) -> LabelerStats | None:
        return LabelerStats() if self.stream == STREAM else None

    def update(self, client: redis.Redis) -> dict[str, int]:
        with self._lock:
            if int(client.xlen(self.stream)) < sum(self.counts.values()):
                self.last, self.counts = "0-0", Counter()  # stream deleted and refilled
                self.stats = self._fresh_stats()
            while True:
                batch = client.xrange(self.stream, min="(" + self.last, max="+",
                                      count=self.page)
                for entry_id, fields in batch:
                    self.counts[_text(fields.get(b"labeler_id")) or "?"] += 1
                    self.last = entry_id.decode()
                    if self.stats is not None:
                        # a damaged entry is the learner's to dead-letter, not ours to count
                        with contextlib.suppress(Exception):
                            self.stats.add(decode_entry(fields))
                if len(batch) < self.page:
                    return dict(self.counts)

    def report(self, golden: Mapping[str, Any]) -> dict[str, Any]:
        """rlhf.labelers' report over the comparisons counted so far."""
        with self._lock:
            return (self.stats or LabelerStats()).report(golden)


def labeler_rows(submitted: Mapping[str, int], learned: Mapping[str, int],
                 demos_submitted: Mapping[str, int] | None = None,
                 demos_learned: Mapping[str, int] | None = None) -> dict[str, dict[str, int]]:
    """``{labeler: {submitted, learned, demonstrations_submitted, demonstrations_learned}}``
    over every labeler any side knows."""
    counts = {"submitted": submitted, "learned": learned,
              "demonstrations_submitted": demos_submitted or {},
              "demonstrations_learned": demos_learned or {}}
    everyone = sorted(set().union(*counts.values()))
    return {who: {name: int(by.get(who, 0)) for name, by in counts.items()} for who in everyone}


def adapter_rows(client: redis.Redis) -> list[dict[str, Any]]:
    """Registered versions in publish order (one MGET for all manifests)."""
    versions = adapter_store.list_versions(client)
    now = adapter_store.current(client)
    raws = client.mget([adapter_store.MANIFEST_PREFIX + v for v in versions]) if versions else []
    rows = []
    for version, raw in zip(versions, raws, strict=True):
        m = adapter_store.Manifest.from_json(raw) if raw is not None else None
        rows.append({"version": version, "current": version == now,
                     "parent": m.parent if m else None,
                     "created_at": m.created_at if m else None,
                     "iteration": m.config.get("iteration") if m else None,
                     "metrics": metric_subset(m.metrics) if m else {}})
    return rows


class Dashboard:
    """The aggregation behind ``GET /v1/dashboard``; keeps the per-labeler tallies."""

    def __init__(self, client: redis.Redis, dataset: ComparisonDataset,
                 demonstrations: DemonstrationDataset | None = None) -> None:
        self.client, self.dataset, self.demonstrations = client, dataset, demonstrations
        self.submitted = StreamTally()
        self.demos_submitted = StreamTally(DEMONSTRATIONS.stream)

    def snapshot(self, history: Sequence[Mapping[str, Any]], running: Mapping[str, Any] | None,
                 limit: int = 100) -> dict[str, Any]:
        """Everything at once; ``history`` the finished records (oldest first), ``running``
        the running iteration's progress (or None)."""
        rows: Iterable[Mapping[str, Any]] = [*history, running] if running else history
        iterations = [iteration_row(r) for r in rows][-limit:]
        adapters = adapter_rows(self.client)
        return {"time": time.time(),
                "status": {"running": running is not None,
                           "iteration": dict(running) if running else None,
                           "dataset_size": len(self.dataset),
                           "current_adapter": adapter_store.current(self.client)},
                "iterations": iterations,
                "queue": queue_depth(self.client),
                "labelers": labeler_rows(
                    self.submitted.update(self.client), self.dataset.labeler_counts(),
                    self.demos_submitted.update(self.client),
                    self.demonstrations.labeler_counts() if self.demonstrations else {}),
                "adapters": adapters,
                "labeler_quality": self.submitted.report(tasks.golden_map(self.client))}
