"""Intake: the comparison stream -> the durable dataset, through the "learner" consumer group.

Each batch goes through the same three steps, in this order (docs/design.md §5):

1. read: first this group's pending entries, claimed again (XAUTOCLAIM, min-idle 0) because
   a learner that crashed left them delivered but unacknowledged; then new ones
   (XREADGROUP ">").
2. store: decode each entry and check it against the Comparison contract (rlhf.contract,
   the same rules the Feedback service and `rlhf data import` apply; sizes excepted, which
   the door enforced); append the good records to the dataset, which fsyncs before it
   returns and drops ids it already holds (a record re-delivered after a crash, or XADDed
   twice, is stored once).
3. acknowledge: in one MULTI/EXEC, XADD each malformed entry (with its reason) to the
   dead-letter stream and XACK the whole batch.

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
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field

import redis
from google.protobuf.message import DecodeError

from learner.dataset import SEGMENT_BYTES, ComparisonDataset
from rlhf.comparisons import DEAD_LETTER, GROUP, SCHEMA, STREAM, decode_entry
from rlhf.contract import STRUCTURE_ONLY, InvalidComparison, validate_comparison
from rlhf.v1.feedback_pb2 import Comparison

log = logging.getLogger(__name__)

_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")

Entry = tuple[bytes, dict[bytes, bytes]]


class Malformed(ValueError):
    """An entry that holds no usable record; the message says why."""


@dataclass(frozen=True)
class DrainResult:
    read: int = 0  # entries delivered (reclaimed or new)
    stored: int = 0  # records newly written to the dataset
    duplicates: int = 0  # good records whose id the dataset already held
    malformed: int = 0  # entries moved to the dead-letter stream
    acked: int = 0  # entries acknowledged (XACK's count)

    def __add__(self, other: DrainResult) -> DrainResult:
        return DrainResult(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


def parse_entry(fields: dict[bytes, bytes]) -> Comparison:
    """The record of one stream entry, or ``Malformed`` saying why there is none."""
    schema = fields.get(b"schema", SCHEMA.encode())
    if schema != SCHEMA.encode():
        raise Malformed(f"unknown schema {schema[:64]!r}")
    raw = fields.get(b"record")
    if raw is None:
        raise Malformed("no 'record' field")
    if not _BASE64.fullmatch(raw):
        raise Malformed("'record' is not padded standard base64")
    try:
        record = decode_entry(fields)
    except (binascii.Error, DecodeError) as exc:
        raise Malformed(f"'record' is not a binary rlhf.v1.Comparison ({exc})") from None
    entry_id = fields.get(b"id", record.id.encode())
    if not record.id:
        raise Malformed("record has no id")
    if entry_id != record.id.encode():
        raise Malformed(f"entry field id {entry_id[:64]!r} differs from the record's id")
    try:  # the one contract every door applies; sizes were the door's to enforce
        validate_comparison(record, None, STRUCTURE_ONLY)
    except InvalidComparison as exc:
        raise Malformed(f"record breaks the Comparison contract: {exc}") from None
    return record


class Intake:
    """Moves the stream into ``dataset``; ``drain`` until caught up, as often as needed."""

    def __init__(self, redis_url: str, dataset: ComparisonDataset, consumer_name: str,
                 batch: int = 256, block_ms: int = 0, stream: str = STREAM,
                 group: str = GROUP, dead_letter: str = DEAD_LETTER) -> None:
        if batch < 1 or block_ms < 0:
            raise ValueError("batch must be >= 1 and block_ms >= 0")
        self.client = redis.Redis.from_url(redis_url, socket_connect_timeout=5.0)
        self.dataset, self.consumer, self.batch = dataset, consumer_name, batch
        self.block_ms = block_ms  # 0: do not wait; BLOCK 0 would mean "wait forever"
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

    def drain(self, max_records: int | None = None) -> DrainResult:
        """Reclaim pending entries, then read new ones, until none are left (or
        ``max_records`` were read); every batch is stored, then acknowledged."""
        self.ensure_group()
        self._cursor = b"0-0"
        result = DrainResult()
        for phase in (self._claim, self._read_new):
            while max_records is None or result.read < max_records:
                left = self.batch if max_records is None else max_records - result.read
                entries = phase(min(self.batch, left))
                if entries is None:
                    break
                if entries:
                    result += self._store(entries)
        if result.read:
            log.info("intake: %s", result)
        return result

    def _claim(self, count: int) -> list[Entry] | None:
        """The next ``count`` pending entries, now this consumer's; None when done."""
        if self._cursor is None:
            return None
        reply = self.client.xautoclaim(self.stream, self.group, self.consumer, min_idle_time=0,
                                       start_id=self._cursor, count=count)
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
        reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                       count=count, block=self.block_ms or None)
        entries = reply[0][1] if reply else []
        return entries or None

    def _store(self, entries: list[Entry]) -> DrainResult:
        good: list[Comparison] = []
        bad: list[tuple[bytes, dict[bytes, bytes], str]] = []
        for entry_id, fields in entries:
            try:
                good.append(parse_entry(fields))
            except Malformed as exc:
                log.warning("entry %s is malformed (%s): moved to %s", entry_id.decode(), exc,
                            self.dead_letter)
                bad.append((entry_id, fields, str(exc)))
        stored = self.dataset.append(good)  # fsynced: from here on an ack loses nothing
        pipe = self.client.pipeline(transaction=True)
        for entry_id, fields, reason in bad:
            pipe.xadd(self.dead_letter, self._dead_fields(entry_id, fields, reason))
        pipe.xack(self.stream, self.group, *(entry_id for entry_id, _ in entries))
        acked = pipe.execute()[-1]
        log.debug("batch: %d read, %d stored, %d acked", len(entries), stored, acked)
        return DrainResult(read=len(entries), stored=stored, duplicates=len(good) - stored,
                           malformed=len(bad), acked=acked)

    def _dead_fields(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str
                     ) -> dict[bytes, bytes]:
        """The entry's own fields, untouched (to re-inject after a fix), plus why and where."""
        return {**fields, b"dead:reason": reason.encode(), b"dead:entry_id": entry_id,
                b"dead:stream": self.stream.encode(), b"dead:group": self.group.encode()}

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
    with ComparisonDataset(config.dataset_dir, config.segment_bytes) as dataset:
        intake = Intake(config.redis_url, dataset, consumer, config.batch,
                        config.block_ms if config.follow else 0)
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
        sys.stdout.write(json.dumps({**vars(total), "dataset": len(dataset)}) + "\n")
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
