"""Learner intake against a private Redis (db 1): stream -> durable dataset -> ack, with real
SIGKILLs of the intake process, torn tails, duplicates, malformed entries and the writer lock."""

from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from learner.dataset import ComparisonDataset, DatasetError, DatasetLocked, frame
from learner.intake import DEAD_LETTER, Intake
from rlhf.comparisons import GROUP, ID_INDEX, STREAM, append_many, decode_entry, encode_entry
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb
from tests.conftest import RedisServer

ROOT = Path(__file__).resolve().parent.parent
CONSUMER = "learner-test"


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return redis_server.db_url(1)


@pytest.fixture
def r(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    client.delete(STREAM, ID_INDEX, DEAD_LETTER)
    yield client
    client.delete(STREAM, ID_INDEX, DEAD_LETTER)
    client.close()


def record(i: int, k: int = 3) -> fb.Comparison:
    rec = fb.Comparison(id=f"cmp-{i:08d}", labeler_id=f"labeler-{i % 7}", comment="c" * (i % 50),
                        messages=[pb.ChatMessage(role="user", content=f"question {i}?")])
    for j in range(k):
        rec.candidates.add(text=f"answer {i}.{j} " + "x" * (i % 90), adapter_version="base",
                           position=j, rank=j + 1, seed=i * 10 + j)
    rec.received_at.FromMilliseconds(1_700_000_000_000 + i)
    return rec


def submit(r: redis.Redis, records: list[fb.Comparison]) -> None:
    """Store records as the Feedback service does (idempotent script, group made first)."""
    for start in range(0, len(records), 500):
        append_many(r, records[start:start + 500])


def pending(r: redis.Redis) -> int:
    return r.xpending(STREAM, GROUP)["pending"]


def acked_ids(r: redis.Redis) -> set[str]:
    """Record ids of entries the group has delivered and that are no longer pending."""
    (group,) = [g for g in r.xinfo_groups(STREAM) if g["name"] == GROUP.encode()]
    waiting = {p["message_id"] for p in r.xpending_range(STREAM, GROUP, "-", "+", 100_000)}
    delivered = r.xrange(STREAM, "-", group["last-delivered-id"])
    return {fields[b"id"].decode() for eid, fields in delivered if eid not in waiting}


def assert_exactly_once(ds: ComparisonDataset, records: list[fb.Comparison]) -> None:
    loaded = ds.load_all()
    assert len(loaded) == len(ds) == len(records)
    assert sorted(loaded, key=lambda c: c.id) == sorted(records, key=lambda c: c.id)


def test_drain_stores_each_record_once_acks_it_and_round_trips(r, url, tmp_path):
    records = [record(i, k=2 + i % 8) for i in range(300)]
    submit(r, records)
    with ComparisonDataset(tmp_path / "ds", segment_bytes=16_384) as ds:
        intake = Intake(url, ds, CONSUMER, batch=64)
        first = intake.drain(max_records=50)
        assert (first.read, first.stored, first.acked) == (50, 50, 50)
        rest = intake.drain()
        assert (rest.read, rest.stored, rest.duplicates, rest.malformed, rest.acked) == (
            250, 250, 0, 0, 250)
        assert intake.drain().read == 0 and pending(r) == 0
        intake.close()
        assert ds.load_all() == records  # exactly, in stream order
        by_labeler = dict(Counter(c.labeler_id for c in records))
        assert len(by_labeler) > 1 and ds.labeler_counts() == by_labeler  # kept on append
    segments = sorted((tmp_path / "ds").glob("comparisons-*.bin"))
    assert len(segments) > 3 and segments[0].name == "comparisons-000001.bin"
    with ComparisonDataset(tmp_path / "ds") as again:
        assert again.load_all() == records and again.ids() == {c.id for c in records}
        assert again.labeler_counts() == by_labeler  # rebuilt on load
        assert ComparisonDataset(tmp_path / "ds", readonly=True).load_all() == records


def test_drain_creates_the_group_on_an_empty_stream(r, url, tmp_path):
    with ComparisonDataset(tmp_path / "ds") as ds:
        intake = Intake(url, ds, CONSUMER, block_ms=50)
        assert intake.drain().read == 0
        intake.close()
    assert [g["name"] for g in r.xinfo_groups(STREAM)] == [GROUP.encode()]


def test_duplicates_by_id_are_stored_once(r, url, tmp_path):
    twice, once = record(1), record(2)
    submit(r, [once])
    r.xadd(STREAM, encode_entry(twice))  # bypassing the idempotency index, twice
    r.xadd(STREAM, encode_entry(twice))
    with ComparisonDataset(tmp_path / "ds") as ds:
        intake = Intake(url, ds, CONSUMER)
        result = intake.drain()
        assert (result.read, result.stored, result.duplicates, result.acked) == (3, 2, 1, 3)
        r.xadd(STREAM, encode_entry(once))  # again, in a later drain
        later = intake.drain()
        assert (later.read, later.stored, later.duplicates, later.acked) == (1, 0, 1, 1)
        intake.close()
        assert_exactly_once(ds, [once, twice])
        assert sum(ds.labeler_counts().values()) == 2  # a duplicate is not counted again
    assert pending(r) == 0


def test_malformed_entries_go_to_the_dead_letter_stream_and_are_acked(r, url, tmp_path):
    good = [record(i) for i in range(4)]
    no_id, one_candidate = record(10), record(11, k=1)
    no_id.id = ""
    bad = {
        "unknown schema": {**encode_entry(record(12)), "schema": b"rlhf.v2.Other"},
        "no 'record' field": {"id": b"cmp-missing", "schema": b"rlhf.v1.Comparison"},
        "not padded standard base64": {"id": b"cmp-b64", "record": b"!!not base64!!"},
        "not a binary rlhf.v1.Comparison": {"id": b"cmp-pb",
                                            "record": base64.b64encode(b"\xff\xff\xff\xff")},
        "record has no id": {**encode_entry(no_id), "id": b"cmp-noid"},
        "differs from the record's id": {**encode_entry(record(13)), "id": b"cmp-other"},
        "1 candidates": encode_entry(one_candidate),
    }
    submit(r, good[:2])
    bad_ids = {r.xadd(STREAM, fields): reason for reason, fields in bad.items()}
    submit(r, good[2:])
    with ComparisonDataset(tmp_path / "ds") as ds:
        intake = Intake(url, ds, CONSUMER, batch=3)
        result = intake.drain()
        intake.close()
        assert (result.read, result.stored, result.malformed, result.acked) == (11, 4, 7, 11)
        assert_exactly_once(ds, good)
    assert pending(r) == 0
    dead = r.xrange(DEAD_LETTER)
    assert len(dead) == len(bad)
    for _, fields in dead:
        expected = bad_ids[fields[b"dead:entry_id"]]
        assert expected in fields[b"dead:reason"].decode()
        assert fields[b"dead:stream"] == STREAM.encode()
        original = bad[expected]
        assert all(fields[k.encode()] == v for k, v in original.items())


@pytest.mark.parametrize("cut", ["one byte", "into the frame header", "zeros appended"])
def test_torn_tail_is_repaired_and_the_unacked_record_read_again(r, url, tmp_path, caplog,
                                                                  cut):
    records = [record(i) for i in range(20)]
    submit(r, records)
    with ComparisonDataset(tmp_path / "ds") as ds:
        intake = Intake(url, ds, CONSUMER, batch=4)
        assert intake.drain(max_records=10).acked == 10
        intake.close()
        # A crash after the fsync of 10 more records and before their XACK.
        ((_, entries),) = r.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, count=10)
        assert ds.append([decode_entry(fields) for _, fields in entries]) == 10
    (segment,) = (tmp_path / "ds").glob("comparisons-*.bin")
    size, last = segment.stat().st_size, len(frame(records[-1]))
    if cut == "zeros appended":  # what an OS crash can leave past the end
        with open(segment, "ab") as f:
            f.write(bytes(4096))
    else:
        os.truncate(segment, size - (1 if cut == "one byte" else last - 3))
    with caplog.at_level(logging.WARNING, logger="learner.dataset"):
        ds = ComparisonDataset(tmp_path / "ds")
    assert "truncating" in caplog.text
    with ds:
        expected_len = 20 if cut == "zeros appended" else 19
        assert len(ds) == expected_len and segment.stat().st_size == size - (20 - len(ds)) * last
        assert acked_ids(r) <= ds.ids()  # acked => in the dataset, even after the crash
        intake = Intake(url, ds, CONSUMER, batch=4)
        result = intake.drain()
        intake.close()
        assert (result.read, result.stored, result.duplicates, result.acked) == (
            10, 20 - expected_len, expected_len - 10, 10)
        assert_exactly_once(ds, records)
    assert pending(r) == 0 and acked_ids(r) == {c.id for c in records}


def test_damage_inside_a_sealed_segment_is_refused(tmp_path):
    with ComparisonDataset(tmp_path / "ds", segment_bytes=1) as ds:
        for i in range(3):  # one record per segment
            ds.append([record(i)])
    first = tmp_path / "ds" / "comparisons-000001.bin"
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"CRC mismatch .* sealed segment"):
        ComparisonDataset(tmp_path / "ds")


def test_a_second_writer_gets_a_clear_error(tmp_path):
    with ComparisonDataset(tmp_path / "ds") as ds:
        ds.append([record(1)])
        with pytest.raises(DatasetLocked, match=f"already open for writing .*pid {os.getpid()}"):
            ComparisonDataset(tmp_path / "ds")
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from learner.dataset import ComparisonDataset; "
             "ComparisonDataset(sys.argv[1])", str(tmp_path / "ds")],
            cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert child.returncode != 0 and "DatasetLocked" in child.stderr
        assert ComparisonDataset(tmp_path / "ds", readonly=True).ids() == {record(1).id}
    with ComparisonDataset(tmp_path / "ds") as again:  # released on close
        assert len(again) == 1


def _bytes_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("comparisons-*.bin"))


def _kill_intake_at(url: str, directory: Path, at_bytes: int) -> None:
    """Run the intake process and SIGKILL it once the dataset holds ``at_bytes``."""
    cmd = [sys.executable, "-m", "learner.intake", "--redis-url", url, "--dataset-dir",
           str(directory), "--consumer", CONSUMER, "--batch", "4", "--segment-bytes", "65536"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while _bytes_on_disk(directory) < at_bytes and proc.poll() is None:
        assert time.monotonic() < deadline, "the intake process made no progress"
        time.sleep(0.002)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=10)
    assert running, "the intake finished before it could be killed:\n" + stderr.decode()[-2000:]


def test_sigkill_at_any_point_loses_nothing_and_counts_nothing_twice(r, url, tmp_path):
    records = [record(i) for i in range(3000)]
    submit(r, records)
    total = sum(len(frame(c)) for c in records)
    directory = tmp_path / "ds"
    for fraction in (0.2, 0.6):
        _kill_intake_at(url, directory, int(total * fraction))
        with ComparisonDataset(directory) as ds:  # repairs a torn tail, if any
            assert acked_ids(r) <= ds.ids() <= {c.id for c in records}
            assert 0 < len(ds) < len(records)
    with ComparisonDataset(directory, segment_bytes=65536) as ds:
        intake = Intake(url, ds, CONSUMER, batch=256)
        intake.drain()
        intake.close()
        assert_exactly_once(ds, records)
    assert pending(r) == 0 and acked_ids(r) == {c.id for c in records}


def test_a_record_breaking_the_comparison_contract_is_dead_lettered(r, url, tmp_path):
    """The intake applies rlhf.contract (the Feedback door's rules, sizes excepted): a
    record XADDed past serving is dead-lettered, not trained on."""
    bad = {}
    for name, change in {
        "id with a newline": lambda c: setattr(c, "id", c.id + "\n"),
        "labeler with a line separator": lambda c: setattr(c, "labeler_id", "alice\u2028"),
        "rank 0": lambda c: setattr(c.candidates[0], "rank", 0),
        "NaN temperature": lambda c: setattr(c.candidates[1].sampling, "temperature",
                                             float("nan")),
        "unknown role": lambda c: setattr(c.messages[0], "role", "robot"),
        "version with a tail": lambda c: setattr(c.candidates[0], "adapter_version", "v1\n"),
    }.items():
        rec = record(100 + len(bad))
        change(rec)
        bad[r.xadd(STREAM, encode_entry(rec))] = name
    huge = record(200)
    huge.candidates[0].text = "x" * 100_000  # over serving's default size: the door's call
    submit(r, [huge])
    with ComparisonDataset(tmp_path / "ds") as ds:
        intake = Intake(url, ds, CONSUMER)
        result = intake.drain()
        intake.close()
        assert (result.read, result.stored, result.malformed) == (len(bad) + 1, 1, len(bad))
        assert [c.id for c in ds.load_all()] == [huge.id]
    dead = {fields[b"dead:entry_id"]: fields[b"dead:reason"].decode()
            for _, fields in r.xrange(DEAD_LETTER)}
    assert set(dead) == set(bad)
    assert all("breaks the Comparison contract" in reason for reason in dead.values())
