"""The learner's durable stores of feedback records: append-only segment files on disk.

One format for every record kind (``RecordDataset``): ``ComparisonDataset`` (segments
``comparisons-*.bin``, header ``RLHFCMP1``) and ``DemonstrationDataset``
(``demonstrations-*.bin``, ``RLHFDEM1``), each in its own directory.

Layout of ``dir``: ``LOCK`` (fcntl lock of the one writer process; holds its pid) and
segments ``comparisons-000001.bin``, ``-000002`` ... Each segment is the 8-byte header
(``RLHFCMP1``) then records, each framed as::

    u32 little-endian payload length | u32 little-endian CRC32 of payload | payload

where the payload is one record (``rlhf.v1.Comparison``) as deterministic binary protobuf. Writes
only ever append to the last segment; ``append`` returns after the bytes are fsynced (and
the directory too when a segment was created), which is what lets the intake acknowledge a
record: acked => on disk. A crash can therefore only leave a torn record at the end of the
last segment; opening for writing truncates it (logged), and the intake reads that record
again because it was never acknowledged. Damage anywhere else is refused, never repaired.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from google.protobuf.message import Message

from rlhf.adapter_store import fsync_path
from rlhf.v1.feedback_pb2 import Comparison, Demonstration

log = logging.getLogger(__name__)

MAGIC = b"RLHFCMP1"
FRAME = struct.Struct("<II")  # payload length, CRC32 of the payload
MAX_RECORD = 64 << 20  # a length above this is a torn/garbage frame, not a record
SEGMENT_BYTES = 64 << 20  # roll over to a new segment after this many bytes
LOCK_NAME = "LOCK"


class DatasetError(RuntimeError):
    """The dataset cannot be opened or written (damaged, or locked by another writer)."""


class DatasetLocked(DatasetError):
    """Another process holds the dataset's writer lock."""


R = TypeVar("R", bound=Message)


def segment_name(number: int, prefix: str = "comparisons") -> str:
    return f"{prefix}-{number:06d}.bin"


def frame(record: Message) -> bytes:
    payload = record.SerializeToString(deterministic=True)
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def scan_segment(data: bytes, record_type: type[R] = Comparison, magic: bytes = MAGIC
                 ) -> tuple[list[R], int, str]:
    """(records, bytes of valid data, why it stopped early or "") of one segment's bytes."""
    if data[:len(magic)] != magic:
        return [], 0, "bad or torn segment header"
    records, pos = [], len(magic)
    while pos < len(data):
        if pos + FRAME.size > len(data):
            return records, pos, "torn frame header"
        length, crc = FRAME.unpack_from(data, pos)
        end = pos + FRAME.size + length
        if length > MAX_RECORD or end > len(data):
            return records, pos, "record runs past the end"
        payload = data[pos + FRAME.size:end]
        if zlib.crc32(payload) != crc:
            return records, pos, "CRC mismatch"
        try:
            record = record_type.FromString(payload)
        except Exception as exc:  # a CRC-valid payload that is not a record: damage
            return records, pos, f"undecodable record ({type(exc).__name__})"
        if not record.id:  # e.g. zeros a crash left past the end: length 0, CRC32(b"") = 0
            return records, pos, "record without an id"
        records.append(record)
        pos = end
    return records, pos, ""


class RecordDataset(Generic[R]):
    """Append-only, deduplicated by the record's ``id``; one writer process at a time.
    A subclass names the record type, the segment prefix and the header.

    ``readonly=True`` takes no lock, never repairs and refuses ``append`` (for readers in
    other processes); its view is the data on disk when it was opened.
    """

    record_type: ClassVar[type[Message]]
    prefix: ClassVar[str]
    magic: ClassVar[bytes]

    def __init__(self, directory: str | os.PathLike, segment_bytes: int = SEGMENT_BYTES,
                 readonly: bool = False) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.readonly = readonly
        self._ids: set[str] = set()
        self._labelers: Counter[str] = Counter()  # records per labeler id (operators' view)
        self._sizes: dict[Path, int] = {}  # valid bytes per segment, in order
        self._lock_fd: int | None = None
        self._file = None
        if not readonly:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock()
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _scan(self, data: bytes) -> tuple[list[R], int, str]:
        return scan_segment(data, self.record_type, self.magic)

    # -- opening ---------------------------------------------------------------------------

    def _lock(self) -> None:
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DatasetLocked(f"dataset {self.dir} is already open for writing by another "
                                f"process (pid {holder}); one writer at a time") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _load(self) -> None:
        segments = sorted(self.dir.glob(f"{self.prefix}-*.bin"))
        for i, path in enumerate(segments):
            records, valid, why = self._scan(path.read_bytes())
            if why:
                self._torn(path, valid, why, last=i == len(segments) - 1)
            self._sizes[path] = max(valid, len(self.magic))
            for record in records:
                if record.id in self._ids:
                    log.warning("dataset %s: id %s stored twice (ignored)", self.dir, record.id)
                    continue
                self._ids.add(record.id)
                self._labelers[record.labeler_id] += 1
        log.info("dataset %s: %d records in %d segments", self.dir, len(self._ids),
                 len(self._sizes))

    def _torn(self, path: Path, valid: int, why: str, last: bool) -> None:
        size = path.stat().st_size
        if not last:
            raise DatasetError(f"{path}: {why} at byte {valid} of {size} in a sealed segment; "
                               "refusing to repair (restore it from a backup)")
        if self.readonly:
            log.warning("%s: %s at byte %d of %d; reading up to it", path, why, valid, size)
            return
        log.warning("%s: %s at byte %d of %d (a write cut short by a crash); truncating %d "
                    "bytes: those records were never acknowledged and will be read again",
                    path, why, valid, size, size - valid)
        with open(path, "r+b") as f:
            if valid < len(self.magic):
                f.seek(0)
                f.write(self.magic)
                valid = len(self.magic)
            f.truncate(valid)
            f.flush()
            os.fsync(f.fileno())

    # -- writing ---------------------------------------------------------------------------

    def append(self, records: Iterable[R]) -> int:
        """Write the records whose id is new, fsync, and return how many were written."""
        if self.readonly:
            raise DatasetError(f"dataset {self.dir} was opened read-only")
        fresh: dict[str, R] = {}
        for record in records:
            if not record.id:
                raise ValueError("a record without an id cannot be stored")
            if record.id not in self._ids:
                fresh.setdefault(record.id, record)
        if not fresh:
            return 0
        data = b"".join(frame(record) for record in fresh.values())
        self._write(data)
        self._ids.update(fresh)
        self._labelers.update(record.labeler_id for record in fresh.values())
        return len(fresh)

    def _write(self, data: bytes) -> None:
        f = self._current()
        path = Path(f.name)
        start = self._sizes[path]
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            # Leave no half-written batch behind for the next append to bury.
            self._close_file()
            with open(path, "r+b") as g:
                g.truncate(start)
                os.fsync(g.fileno())
            raise
        self._sizes[path] = start + len(data)

    def _current(self):
        """The open last segment, rolled over to a new one when it is full."""
        if self._sizes:
            last = next(reversed(self._sizes))
            if self._sizes[last] < self.segment_bytes:
                if self._file is None:
                    self._file = open(last, "ab")  # noqa: SIM115 (open across appends)
                return self._file
            number = int(last.stem.rsplit("-", 1)[1]) + 1
        else:
            number = 1
        self._close_file()
        path = self.dir / segment_name(number, self.prefix)
        self._file = open(path, "xb")  # noqa: SIM115 (open across appends)
        self._file.write(self.magic)
        self._file.flush()
        os.fsync(self._file.fileno())
        fsync_path(self.dir)  # the new name itself must survive a crash
        self._sizes[path] = len(self.magic)
        return self._file

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._ids

    def labeler_counts(self) -> dict[str, int]:
        """Records per labeler id (a copy; safe to call while another thread appends)."""
        return dict(self._labelers)

    def ids(self) -> frozenset[str]:
        return frozenset(self._ids)

    def iter_records(self) -> Iterator[R]:
        """Every stored record once, in the order it was stored."""
        seen: set[str] = set()
        for path, size in list(self._sizes.items()):
            with open(path, "rb") as f:
                data = f.read(size)
            for record in self._scan(data)[0]:
                if record.id not in seen:
                    seen.add(record.id)
                    yield record

    def load_all(self) -> list[R]:
        return list(self.iter_records())

    # -- closing ---------------------------------------------------------------------------

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_file()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ComparisonDataset(RecordDataset[Comparison]):
    """The comparisons: ``comparisons-*.bin`` segments."""

    record_type, prefix, magic = Comparison, "comparisons", MAGIC


class DemonstrationDataset(RecordDataset[Demonstration]):
    """The demonstrations: ``demonstrations-*.bin`` segments, header ``RLHFDEM1``."""

    record_type, prefix, magic = Demonstration, "demonstrations", b"RLHFDEM1"
