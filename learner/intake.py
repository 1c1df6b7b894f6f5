"""Intake: the feedback streams -> the durable datasets, through the "learner" consumer group.

Two streams, each into its own dataset: comparisons (``rlhf:comparisons`` ->
``ComparisonDataset``) and, when a ``DemonstrationDataset`` is given, demonstrations
(``rlhf:demonstrations``). Each stream's batches go through the same three steps, in this
order (docs/design.md §5):

1. read: first this group's pending entries, claimed again (XAUTOCLAIM, min-idle 0) because
   a learner that crashed left them delivered but unacknowledged; then new ones
   (XREADGROUP ">").
2. store: decode each entry and check it against its record's contract (rlhf.contract,
   the same rules the Feedback service and `rlhf data import` apply; sizes excepted, which
   the door enforced); append the good records to the dataset, which fsyncs before it
   returns and drops ids it already holds (a record re-delivered after a crash, or XADDed
   twice, is stored once).
3. acknowledge: in one MULTI/EXEC, XADD each malformed entry (with its reason) to the
   stream's dead-letter stream and XACK the whole batch.

So a record is acknowledged only once it is on disk (acked => stored), and one that is not
acknowledged is delivered again: a crash at any point loses nothing and counts nothing twice.

A single learner process owns the group. Min-idle 0 claims every pending entry, including
ones another consumer is still working on, so two intakes at once would steal each other's
batches; the dataset's writer lock keeps a second process off the same dataset.
"""

from __future__ import annotations

import binascii
import json
import logging
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path

import redis
from google.protobuf.message import DecodeError, Message

from learner.dataset import SEGMENT_BYTES, ComparisonDataset, DemonstrationDataset, RecordDataset
from rlhf.comparisons import COMPARISONS, DEAD_LETTER, DEMONSTRATIONS, GROUP, STREAM, Layout
from rlhf.contract import (
    STRUCTURE_ONLY,
    InvalidComparison,
    validate_comparison,
    validate_demonstration,
)
from rlhf.v1.feedback_pb2 import Comparison, Demonstration

log = logging.getLogger(__name__)

_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
# The one contract every door applies, per record type; sizes were the door's to enforce.
CONTRACTS: dict[type[Message], Callable[[Message], None]] = {
    Comparison: lambda r: validate_comparison(r, None, STRUCTURE_ONLY),
    Demonstration: lambda r: validate_demonstration(r, STRUCTURE_ONLY),
}

Entry = tuple[bytes, dict[bytes, bytes]]


class Malformed(ValueError):
    """An entry that holds no usable record; the message says why."""


@dataclass(frozen=True)
class StreamResult:
    read: int = 0  # entries delivered (reclaimed or new)
    stored: int = 0  # records newly written to the dataset
    duplicates: int = 0  # good records whose id the dataset already held
    malformed: int = 0  # entries moved to the dead-letter stream
    acked: int = 0  # entries acknowledged (XACK's count)

    def counts(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in dataclass_fields(StreamResult))

    def __add__(self, other: StreamResult) -> StreamResult:
        return StreamResult(*(a + b for a, b in zip(self.counts(), other.counts(),
                                                    strict=True)))


@dataclass(frozen=True)
class DrainResult(StreamResult):
    """The comparisons stream's counts (the fields it shares with ``StreamResult``) and the
    demonstrations stream's (``demonstrations``)."""

    demonstrations: StreamResult = StreamResult()

    def __add__(self, other: DrainResult) -> DrainResult:
        total = StreamResult(*self.counts()) + StreamResult(*other.counts())
        return DrainResult(*total.counts(), demonstrations=self.demonstrations
                           + other.demonstrations)


def parse_entry(fields: dict[bytes, bytes], layout: Layout = COMPARISONS) -> Message:
    """The record of one stream entry, or ``Malformed`` saying why there is none."""
    name = layout.schema
    schema = fields.get(b"schema", name.encode())
    if schema != name.encode():
        raise Malformed(f"unknown schema {schema[:64]!r}")
    raw = fields.get(b"record")
    if raw is None:
        raise Malformed("no 'record' field")
    if not _BASE64.fullmatch(raw):
        raise Malformed("'record' is not padded standard base64")
    try:
        record = layout.decode(fields)
    except (binascii.Error, DecodeError) as exc:
        raise Malformed(f"'record' is not a binary {name} ({exc})") from None
    entry_id = fields.get(b"id", record.id.encode())
    if not record.id:
        raise Malformed("record has no id")
    if entry_id != record.id.encode():
        raise Malformed(f"entry field id {entry_id[:64]!r} differs from the record's id")
    try:
        CONTRACTS[layout.record_type](record)
    except InvalidComparison as exc:
        raise Malformed(f"record breaks the {name.rsplit('.', 1)[-1]} contract: {exc}"
                        ) from None
    return record


class _Stream:
    """One stream of the group into one dataset: read, store, acknowledge."""

    def __init__(self, intake: Intake, layout: Layout, dataset: RecordDataset,
                 stream: str, group: str, dead_letter: str) -> None:
        self.intake, self.layout, self.dataset = intake, layout, dataset
        self.client = intake.client
        self.stream, self.group, self.dead_letter = stream, group, dead_letter
        self._cursor: bytes | None = None

    def ensure_group(self) -> None:
        """Create the group from id 0 (every entry) with the stream, unless it exists."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, self.stream)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def drain(self, max_records: int | None) -> StreamResult:
        self.ensure_group()
        self._cursor = b"0-0"
        result, batch = StreamResult(), self.intake.batch
        for phase in (self._claim, self._read_new):
            while max_records is None or result.read < max_records:
                left = batch if max_records is None else max_records - result.read
                entries = phase(min(batch, left))
                if entries is None:
                    break
                if entries:
                    result += self._store(entries)
        if result.read:
            log.info("intake %s: %s", self.stream, result)
        return result

    def _claim(self, count: int) -> list[Entry] | None:
        """The next ``count`` pending entries, now this consumer's; None when done."""
        if self._cursor is None:
            return None
        reply = self.client.xautoclaim(self.stream, self.group, self.intake.consumer,
                                       min_idle_time=0, start_id=self._cursor, count=count)
        cursor, claimed = reply[0], reply[1]
        gone = list(reply[2]) if len(reply) > 2 else []
        gone += [entry_id for entry_id, fields in claimed if fields is None]  # Redis 6.2
        if gone:  # deleted from the stream while pending: nothing left to store
            log.warning("%d pending entries no longer exist: %s", len(gone), gone[:10])
            self.client.xack(self.stream, self.group, *gone)
        self._cursor = None if cursor in (b"0-0", "0-0") else cursor
        return [(entry_id, fields) for entry_id, fields in claimed if fields is not None]

    def _read_new(self, count: int) -> list[Entry] | None:
        """The next ``count`` never-delivered entries; None when there are none."""
        block = self.intake.block_ms or None
        reply = self.client.xreadgroup(self.group, self.intake.consumer, {self.stream: ">"},
                                       count=count, block=block)
        entries = reply[0][1] if reply else []
        return entries or None

    def _store(self, entries: list[Entry]) -> StreamResult:
        good: list[Message] = []
        bad: list[tuple[bytes, dict[bytes, bytes], str]] = []
        for entry_id, fields in entries:
            try:
                good.append(parse_entry(fields, self.layout))
            except Malformed as exc:
                log.warning("entry %s of %s is malformed (%s): moved to %s",
                            entry_id.decode(), self.stream, exc, self.dead_letter)
                bad.append((entry_id, fields, str(exc)))
        stored = self.dataset.append(good)  # fsynced: from here on an ack loses nothing
        pipe = self.client.pipeline(transaction=True)
        for entry_id, fields, reason in bad:
            pipe.xadd(self.dead_letter, self._dead_fields(entry_id, fields, reason))
        pipe.xack(self.stream, self.group, *(entry_id for entry_id, _ in entries))
        acked = pipe.execute()[-1]
        log.debug("batch: %d read, %d stored, %d acked", len(entries), stored, acked)
        return StreamResult(read=len(entries), stored=stored, duplicates=len(good) - stored,
                            malformed=len(bad), acked=acked)

    def _dead_fields(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str
                     ) -> dict[bytes, bytes]:
        """The entry's own fields, untouched (to re-inject after a fix), plus why and where."""
        return {**fields, b"dead:reason": reason.encode(), b"dead:entry_id": entry_id,
                b"dead:stream": self.stream.encode(), b"dead:group": self.group.encode()}


class Intake:
    """Moves the streams into the datasets; ``drain`` until caught up, as often as needed.
    ``stream`` / ``dead_letter`` name the comparisons' keys; the demonstrations stream is
    read only when ``demonstrations`` (its dataset) is given."""

    def __init__(self, redis_url: str, dataset: ComparisonDataset, consumer_name: str,
                 batch: int = 256, block_ms: int = 0, stream: str = STREAM,
                 group: str = GROUP, dead_letter: str = DEAD_LETTER,
                 demonstrations: DemonstrationDataset | None = None) -> None:
        if batch < 1 or block_ms < 0:
            raise ValueError("batch must be >= 1 and block_ms >= 0")
        self.client = redis.Redis.from_url(redis_url, socket_connect_timeout=5.0)
        self.dataset, self.consumer, self.batch = dataset, consumer_name, batch
        self.block_ms = block_ms  # 0: do not wait; BLOCK 0 would mean "wait forever"
        self.comparisons = _Stream(self, COMPARISONS, dataset, stream, group, dead_letter)
        self.demonstrations = None if demonstrations is None else _Stream(
            self, DEMONSTRATIONS, demonstrations, DEMONSTRATIONS.stream, group,
            DEMONSTRATIONS.dead_letter)

    def ensure_group(self) -> None:
        for s in (self.comparisons, self.demonstrations):
            if s is not None:
                s.ensure_group()

    def drain(self, max_records: int | None = None) -> DrainResult:
        """Reclaim pending entries, then read new ones, until none are left (or
        ``max_records`` were read, per stream); every batch is stored, then acknowledged."""
        ours = self.comparisons.drain(max_records)
        demos = (self.demonstrations.drain(max_records) if self.demonstrations is not None
                 else StreamResult())
        return DrainResult(*ours.counts(), demonstrations=demos)

    def close(self) -> None:
        self.client.close()


# -- process entry point (a future `rlhf learner intake`) -------------------------------------


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class IntakeConfig:
    """Everything the intake process needs; flags and RLHF_INTAKE_* env vars override."""

    redis_url: str = _f("redis://127.0.0.1:6379/0", "Redis holding the comparisons stream",
                        secret=True)
    dataset_dir: str = _f("learner-data/comparisons", "directory of the durable dataset")
    demonstrations_dir: str = _f("", "directory of the durable demonstrations dataset; "
                                 "empty = 'demonstrations' beside --dataset-dir")
    consumer: str = _f("", "consumer name in the group; empty = learner-<hostname>")
    batch: int = _f(256, "entries per read, fsync and ack")
    segment_bytes: int = _f(SEGMENT_BYTES, "start a new dataset segment after this many bytes")
    follow: bool = _f(False, "keep reading until SIGTERM/SIGINT instead of stopping when "
                      "caught up")
    block_ms: int = _f(1000, "with --follow, how long one read waits for new entries")


def run(config: IntakeConfig) -> int:
    """Drain once (or follow until SIGTERM/SIGINT); print the totals as one JSON line."""
    stop: list[int] = []
    if config.follow:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: stop.append(signum))
    consumer = config.consumer or f"learner-{socket.gethostname()}"
    demos = DemonstrationDataset(config.demonstrations_dir or Path(config.dataset_dir).parent
                                 / "demonstrations", config.segment_bytes)
    with ComparisonDataset(config.dataset_dir, config.segment_bytes) as dataset:
        intake = Intake(config.redis_url, dataset, consumer, config.batch,
                        config.block_ms if config.follow else 0, demonstrations=demos)
        try:
            total = intake.drain()
            while config.follow and not stop:
                try:
                    total += intake.drain()
                except redis.ConnectionError as exc:  # unacked entries wait in Redis
                    log.error("redis unreachable (%s); retrying in 1 s", exc)
                    time.sleep(1.0)
        finally:
            intake.close()
            demos.close()
        sys.stdout.write(json.dumps({**asdict(total), "dataset": len(dataset),
                                     "demonstrations_dataset": len(demos)}) + "\n")
    return 0


def main(argv: Sequence[str]) -> int:
    import argparse

    from rlhf import settings

    parser = argparse.ArgumentParser(prog="learner.intake", description=__doc__.splitlines()[0])
    settings.add_arguments(parser, IntakeConfig)
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = settings.build(IntakeConfig, args, "RLHF_INTAKE_")
    log.info("config: %s", settings.describe(config))
    return run(config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
