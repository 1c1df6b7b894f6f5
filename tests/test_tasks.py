"""The task queue (rlhf.tasks) against a real Redis: loading refuses bad input whole, leases
share out overlap slots, never hand a task twice, expire, mix golden tasks in; serving's
Feedback service checks the lease of a ranking that names a task (FeedbackService on the
same Redis, no mocks)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
import redis

from rlhf import tasks
from rlhf.comparisons import ID_INDEX, STREAM, decode_entry
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb
from serving.feedback import ComparisonStore, FeedbackService, RegisteredVersions
from serving.service import Code, ServiceError
from tests.conftest import ROOT, RedisServer

DB = 14


@pytest.fixture()
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.db_url(DB))
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def lines(*objs) -> list[str]:
    return [json.dumps(o) for o in objs]


def test_parse_refuses_bad_tasks_naming_line_and_field():
    cases = [({"prompt": "  "}, "prompt"), ({}, "messages"),
             ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
             ({"prompt": "x", "candidates": ["a", "b"], "golden": {"ranking": [1, 2, 3]}},
              "golden.ranking"),
             ({"prompt": "x", "candidates": ["a", "b"], "golden": {"ranking": [1, 1]}},
              "golden.ranking"),
             ({"prompt": "x", "candidates": ["a", "b"], "golden": {"best": 2}}, "golden.best"),
             ({"prompt": "x", "golden": {"best": 0}}, "golden"),
             ({"prompt": "x", "id": "bad id"}, "id"), ({"prompt": "x", "labelers": 0},
                                                       "labelers")]
    for obj, field in cases:
        with pytest.raises(tasks.TaskError) as err:
            tasks.parse_lines(lines({"prompt": "fine"}, obj))
        assert err.value.field == field and err.value.line == 2, (obj, str(err.value))
    with pytest.raises(tasks.TaskError, match="repeats line 1"):
        tasks.parse_lines(lines({"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}))


def test_overlap_share_is_deterministic_and_explicit_labelers_win():
    objs = [{"prompt": f"question {i}"} for i in range(200)]
    first = tasks.parse_lines(lines(*objs), overlap_share=0.25, overlap_labelers=3)
    again = tasks.parse_lines(lines(*objs), overlap_share=0.25, overlap_labelers=3)
    assert [t.wanted for t in first] == [t.wanted for t in again]
    assert set(t.wanted for t in first) == {1, 3}
    assert 30 <= sum(t.wanted == 3 for t in first) <= 70  # ~50 of 200
    [t] = tasks.parse_lines(lines({"prompt": "x", "labelers": 2}), overlap_share=0.0)
    assert t.wanted == 2


def test_load_is_all_or_nothing_and_refuses_queued_ids(r):
    assert tasks.load(r, tasks.parse_lines(lines({"id": "a", "prompt": "x"}))) == 1
    batch = tasks.parse_lines(lines({"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}))
    with pytest.raises(tasks.TaskError, match="'a' is queued already"):
        tasks.load(r, batch)
    assert tasks.get(r, "b") is None and r.zcard(tasks.OPEN) == 1
    assert tasks.get(r, "a").messages == (("user", "x"),)


def test_cli_load_reports_the_bad_line_and_stores_nothing(r, redis_server, tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines({"prompt": "ok"}, {"prompt": ""})) + "\n")
    url = redis_server.db_url(DB)
    run = subprocess.run([sys.executable, "-m", "rlhf.cli", "tasks", "load", str(path),
                          "--redis-url", url], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "line 2: prompt is empty" in run.stderr
    assert r.zcard(tasks.OPEN) == 0
    path.write_text("\n".join(lines({"prompt": "ok"}, {"prompt": "g", "candidates": ["a", "b"],
                                                        "golden": {"best": 1}})))
    run = subprocess.run([sys.executable, "-m", "rlhf.cli", "tasks", "load", str(path),
                          "--redis-url", url], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"loaded": 2, "golden": 1, "overlapped": 0, "queue": {
        "open": 1, "golden": 1, "loaded": 2}}
    assert r.zcard(tasks.OPEN) == 1 and r.zcard(tasks.GOLDEN) == 1


def test_leases_share_slots_expire_and_never_repeat(r):
    tasks.load(r, tasks.parse_lines(lines({"id": "t1", "prompt": "one", "labelers": 2},
                                          {"id": "t2", "prompt": "two"})))
    now = 1_000_000
    a = tasks.lease(r, "alice", lease_s=60, now_ms=now)
    assert a.id == "t1"
    assert tasks.lease(r, "alice", lease_s=60, now_ms=now + 1).id == "t1"  # held: same task
    assert tasks.lease(r, "bob", lease_s=60, now_ms=now).id == "t1"  # the second slot
    assert tasks.lease(r, "carol", lease_s=60, now_ms=now).id == "t2"  # t1 is full
    assert tasks.lease(r, "dave", lease_s=60, now_ms=now) is None
    # alice's tab closed: after expiry her slot goes to dave
    assert tasks.lease(r, "dave", lease_s=60, now_ms=now + 61_000).id == "t1"
    # skipping: never offered again to that labeler (bob's lease expired too: t1 has a slot)
    tasks.release(r, "t2", "carol")
    assert tasks.lease(r, "carol", lease_s=60, now_ms=now + 61_000).id == "t1"
    assert tasks.lease(r, "carol", lease_s=60, now_ms=now + 200_000).id == "t1"  # held
    tasks.release(r, "t1", "carol")
    assert tasks.lease(r, "carol", lease_s=60, now_ms=now + 200_000) is None
    assert tasks.lease(r, "erin", lease_s=60, now_ms=now + 200_000).id == "t1"


def test_golden_tasks_come_at_the_rate_and_once_per_labeler(r):
    tasks.load(r, tasks.parse_lines(lines(
        {"id": "g1", "prompt": "2+2?", "candidates": ["4", "5"], "golden": {"best": 0}},
        *({"id": f"t{i}", "prompt": f"q{i}", "labelers": 9} for i in range(5)))))
    assert tasks.lease(r, "alice", golden_rate=0.0).id == "t0"
    g = tasks.lease(r, "bob", golden_rate=1.0)
    assert g.id == "g1" and g.is_golden and [c.text for c in g.candidates] == ["4", "5"]
    assert tasks.lease(r, "carol", golden_rate=1.0).id == "g1"  # everyone may take it
    picks = [tasks.lease(r, f"x{i}", golden_rate=0.3, rng=random.Random(i)).id
             for i in range(40)]
    assert 4 <= picks.count("g1") <= 22  # ~12 of 40


# -- serving's check -------------------------------------------------------------------------


def ranking(task: tasks.Task, ranks: list[int], labeler: str = "", texts=None) -> fb.Comparison:
    rec = fb.Comparison(id=uuid.uuid4().hex, labeler_id=labeler, task_id=task.id,
                        messages=[pb.ChatMessage(role=ro, content=c) for ro, c in task.messages])
    for i, (text, rank) in enumerate(zip(texts or [f"answer {i}" for i in range(len(ranks))],
                                         ranks, strict=True)):
        rec.candidates.add(text=text, adapter_version="base", position=i, rank=rank)
    return rec


def test_feedback_submit_checks_the_lease(r, redis_server):
    tasks.load(r, tasks.parse_lines(lines(
        {"id": "t1", "prompt": "one", "labelers": 2},
        {"id": "g1", "prompt": "2+2?", "candidates": ["4", "5"], "golden": {"best": 0}})))
    t1, g1 = tasks.get(r, "t1"), tasks.get(r, "g1")

    async def scenario() -> list:
        store = ComparisonStore.from_url(redis_server.db_url(DB))
        service = FeedbackService(store, RegisteredVersions(store.client))
        out = []

        async def attempt(rec):
            try:
                out.append(await service.submit(rec))
            except ServiceError as exc:
                out.append(exc)

        await attempt(ranking(t1, [1, 2], "alice"))  # 0: not leased to alice
        tasks.lease(r, "alice")
        rec = ranking(t1, [1, 2], "alice")
        await attempt(rec)  # 1: stored
        await attempt(rec)  # 2: the retry: duplicate, OK
        await attempt(ranking(t1, [2, 1], "alice"))  # 3: done by alice already
        tasks.lease(r, "bob")
        bad = ranking(t1, [1, 2], "bob")
        bad.messages[0].content = "something else"
        await attempt(bad)  # 4: not the task's conversation
        await attempt(ranking(fb_task("nope"), [1, 2], "bob"))  # 5: unknown task
        assert tasks.lease(r, "carol", golden_rate=1.0).id == "g1"
        await attempt(ranking(g1, [1, 2], "carol", texts=["4", "6"]))  # 6: wrong candidates
        await attempt(ranking(g1, [2, 1], "carol", texts=["5", "4"]))  # 7: stored
        await store.close()
        return out

    out = asyncio.run(scenario())
    assert isinstance(out[0], ServiceError) and out[0].code is Code.PERMISSION_DENIED
    assert out[0].field == "task_id" and "not leased" in str(out[0])
    assert not out[1].duplicate and out[2].duplicate
    assert out[2].stream_entry_id == out[1].stream_entry_id
    assert out[3].code is Code.FAILED_PRECONDITION and "ranked by this labeler" in str(out[3])
    assert out[4].code is Code.INVALID_ARGUMENT and out[4].field == "messages"
    assert out[5].code is Code.FAILED_PRECONDITION and "not a queued task" in str(out[5])
    assert out[6].code is Code.INVALID_ARGUMENT and out[6].field == "candidates"
    assert not out[7].duplicate
    assert r.xlen(STREAM) == 2 and r.hlen(ID_INDEX) == 2
    stored = [decode_entry(f) for _, f in r.xrange(STREAM)]
    assert [s.task_id for s in stored] == ["t1", "g1"]
    # alice's task is done for her; bob holds the second slot, then t1 leaves the open set
    assert r.smembers(tasks.task_key("t1") + ":done") == {b"alice"}
    assert tasks.lease(r, "alice") is None or tasks.lease(r, "alice").id != "t1"


def fb_task(task_id: str) -> tasks.Task:
    return tasks.Task(task_id, (("user", "one"),))


def test_a_task_leaves_the_open_set_when_its_slots_are_ranked(r, redis_server):
    tasks.load(r, tasks.parse_lines(lines({"id": "t1", "prompt": "one"})))
    t1 = tasks.get(r, "t1")

    async def scenario():
        store = ComparisonStore.from_url(redis_server.db_url(DB))
        service = FeedbackService(store, RegisteredVersions(store.client))
        await service.submit(ranking(t1, [1, 2], "alice"))
        await store.close()

    tasks.lease(r, "alice")
    asyncio.run(scenario())
    assert r.zcard(tasks.OPEN) == 0 and tasks.lease(r, "bob") is None


def test_an_expired_lease_submits_while_the_slot_is_free_not_once_it_is_taken(r, redis_server):
    tasks.load(r, tasks.parse_lines(lines({"id": "t1", "prompt": "one"},
                                          {"id": "t2", "prompt": "two"})))
    t1, t2 = tasks.get(r, "t1"), tasks.get(r, "t2")
    past = 1_000_000  # leases of 1 s taken long ago: expired now
    assert tasks.lease(r, "alice", lease_s=1, now_ms=past).id == "t1"
    assert tasks.lease(r, "bob", lease_s=600).id == "t1"  # alice's expired slot
    assert tasks.lease(r, "carol", lease_s=1, now_ms=past).id == "t2"

    async def scenario() -> list:
        store = ComparisonStore.from_url(redis_server.db_url(DB))
        service = FeedbackService(store, RegisteredVersions(store.client))
        out = []
        for rec in (ranking(t1, [1, 2], "alice"), ranking(t2, [1, 2], "carol")):
            try:
                out.append(await service.submit(rec))
            except ServiceError as exc:
                out.append(exc)
        await store.close()
        return out

    taken, late = asyncio.run(scenario())
    assert taken.code is Code.FAILED_PRECONDITION and "lease expired" in str(taken)
    assert not late.duplicate  # nobody took t2: a late ranking still counts
    assert r.xlen(STREAM) == 1


def test_a_malformed_task_id_is_invalid_argument(r, redis_server):
    rec = ranking(tasks.Task("ok", (("user", "one"),)), [1, 2], "alice")
    rec.task_id = "two words"

    async def scenario():
        store = ComparisonStore.from_url(redis_server.db_url(DB))
        try:
            await FeedbackService(store, RegisteredVersions(store.client)).submit(rec)
        finally:
            await store.close()

    with pytest.raises(ServiceError) as err:
        asyncio.run(scenario())
    assert err.value.code is Code.INVALID_ARGUMENT and err.value.field == "task_id"
    assert r.xlen(STREAM) == 0
