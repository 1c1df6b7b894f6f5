"""The Feedback API against a real `rlhf serve` process and a real Redis."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fbg
from rlhf.v1 import policy_pb2 as pb
from serving.feedback import GROUP, ID_INDEX, STREAM, decode_entry
from tests.conftest import RedisServer, ServerProcess

TOKEN = "fb-s3cret"
MAX_CHARS = 2000
ROUTE = "/v1/feedback/comparisons"


def db_url(redis_server: RedisServer) -> str:
    """A database of its own (1), so other suites sharing the session Redis see nothing."""
    return redis_server.db_url(1)


@pytest.fixture(scope="module")
def fb_server(tiny_model_dir: Path, redis_server: RedisServer) -> Iterator[ServerProcess]:
    srv = ServerProcess(tiny_model_dir, extra=["--redis-url", db_url(redis_server),
                                               "--max-feedback-chars", str(MAX_CHARS)])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def r(redis_server: RedisServer, fb_server: ServerProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(db_url(redis_server))
    yield client
    client.delete(STREAM, ID_INDEX)
    client.close()


@pytest.fixture(scope="module")
def channel(fb_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fb_server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> fbg.FeedbackStub:
    return fbg.FeedbackStub(channel)


def comparison(k: int = 4, ranks: tuple[int, ...] = (2, 1, 2, 4)) -> fb.Comparison:
    """A valid record: K = 4, candidates 0 and 2 tied, a flag on the last one."""
    msg = fb.Comparison(id=uuid.uuid4().hex, labeler_id="labeler-7", rank_time_ms=41_250,
                        comment="B is clearly best", ideal_answer="12 + 7 = 19.",
                        messages=[pb.ChatMessage(role="user", content="What is 12 + 7?")])
    for i in range(k):
        msg.candidates.add(text=f"answer {i}: {19 + i}", adapter_version="base",
                           sampling=pb.SamplingParams(max_new_tokens=24, temperature=0.7,
                                                      seed=100),
                           seed=100 + i, position=(i + 1) % k, rank=ranks[i],
                           request_id="req-1")
    msg.candidates[-1].flags.extend([fb.FLAG_MADE_UP_FACTS])
    msg.created_at.FromMilliseconds(1_700_000_000_123)
    return msg


def submit(stub: fbg.FeedbackStub, msg: fb.Comparison, **kw) -> fb.SubmitResponse:
    return stub.Submit(fb.SubmitRequest(comparison=msg), timeout=10, **kw)


def stored(r: redis.Redis, entry_id: str) -> tuple[dict[bytes, bytes], fb.Comparison]:
    [(got_id, fields)] = r.xrange(STREAM, entry_id, entry_id)
    assert got_id.decode() == entry_id
    return fields, decode_entry(fields)


def test_valid_record_lands_in_the_stream_exactly_as_sent(stub, r):
    msg = comparison()
    before = r.xlen(STREAM)
    reply = submit(stub, msg)
    assert (reply.id, reply.duplicate) == (msg.id, False) and reply.stream_entry_id
    assert r.xlen(STREAM) == before + 1
    fields, record = stored(r, reply.stream_entry_id)
    assert record.received_at.ToMilliseconds() > 1_700_000_000_123
    assert fields[b"id"].decode() == msg.id and fields[b"labeler_id"] == b"labeler-7"
    assert fields[b"k"] == b"4" and fields[b"schema"] == b"rlhf.v1.Comparison"
    assert int(fields[b"received_at"]) == record.received_at.ToMilliseconds()
    assert record.labeler_auth == fb.LABELER_AUTH_NONE  # no credentials: as sent, marked
    record.ClearField("received_at")
    record.ClearField("labeler_auth")
    assert record == msg
    assert [c.rank for c in record.candidates] == [2, 1, 2, 4]  # the tie survived
    assert list(record.candidates[3].flags) == [fb.FLAG_MADE_UP_FACTS]
    assert r.hget(ID_INDEX, msg.id).decode() == reply.stream_entry_id


def test_learner_group_exists_and_feedback_is_in_health_and_reflection(stub, r, channel):
    groups = {g["name"].decode(): g for g in r.xinfo_groups(STREAM)}
    assert GROUP in groups
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="rlhf.v1.Feedback"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert "rlhf.v1.Feedback" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_retry_with_same_id_is_stored_once(stub, r):
    msg = comparison()
    first = submit(stub, msg)
    length = r.xlen(STREAM)
    again = submit(stub, msg)
    assert again.duplicate and again.stream_entry_id == first.stream_entry_id
    assert r.xlen(STREAM) == length


def test_concurrent_submits_of_one_id_store_it_once(stub, r):
    msg, threads, n = comparison(), [], 8
    before = r.xlen(STREAM)
    start = threading.Barrier(n)
    replies: list[fb.SubmitResponse] = []

    def worker() -> None:
        start.wait()
        replies.append(submit(stub, msg))

    for _ in range(n):
        threads.append(threading.Thread(target=worker))
        threads[-1].start()
    for t in threads:
        t.join(30)
    assert len(replies) == n
    assert sorted(rep.duplicate for rep in replies) == [False] + [True] * (n - 1)
    assert len({rep.stream_entry_id for rep in replies}) == 1
    assert r.xlen(STREAM) == before + 1


def _set(field: str, value) -> Callable[[fb.Comparison], None]:
    def change(msg: fb.Comparison) -> None:
        target = msg
        *path, last = field.split(".")
        for part in path:
            target = target.candidates[int(part[1:])] if part[0] == "c" else target
        if isinstance(value, list):
            target.ClearField(last)
            getattr(target, last).extend(value)
        else:
            setattr(target, last, value)
    return change


def _resize(k: int) -> Callable[[fb.Comparison], None]:
    def change(msg: fb.Comparison) -> None:
        while len(msg.candidates) > k:
            del msg.candidates[-1]
        while len(msg.candidates) < k:
            msg.candidates.add(text="more", adapter_version="base", position=len(msg.candidates),
                               rank=1)
    return change


BAD = {
    "rank missing": (_set("c1.rank", 0), "candidates[1].rank must be in 1..4", "it is missing"),
    "rank too big": (_set("c0.rank", 5), "candidates[0].rank must be in 1..4", "got 5"),
    "one candidate": (_resize(1), "candidates must hold 2..9", "got 1"),
    "ten candidates": (_resize(10), "candidates must hold 2..9", "got 10"),
    "empty text": (_set("c2.text", ""), "candidates[2].text is empty", ""),
    "unknown adapter": (_set("c1.adapter_version", "v999"), "candidates[1].adapter_version",
                        "not a version this server knows (known: base)"),
    "oversize text": (_set("c0.text", "x" * (MAX_CHARS + 1)), "candidates[0].text is too long",
                      f"limit {MAX_CHARS}"),
    "oversize ideal answer": (_set("ideal_answer", "y" * (MAX_CHARS + 1)),
                              "ideal_answer is too long", ""),
    "short id": (_set("id", "abc"), "id must be 8..64 characters", "'abc'"),
    "bad id chars": (_set("id", "has spaces in it"), "id must be 8..64 characters", ""),
    "missing id": (_set("id", ""), "id is missing", "reuse it on every retry"),
    "empty labeler": (_set("labeler_id", ""), "labeler_id is empty", ""),
    "unknown flag": (_set("c3.flags", [99]), "candidates[3].flags[0] is not a known flag",
                     "FLAG_MADE_UP_FACTS"),
    "unspecified flag": (_set("c3.flags", [0]), "is not a known flag", ""),
    "repeated flag": (_set("c3.flags", [1, 1]), "candidates[3].flags[1] repeats", ""),
    "same position": (_set("c0.position", 2), "candidates.position must give each", ""),
    "no messages": (lambda m: m.ClearField("messages"), "messages is empty", ""),
    "bad role": (lambda m: setattr(m.messages[0], "role", "robot"), "messages[0].role", "user"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_invalid_argument_and_writes_nothing(stub, r, case):
    change, head, detail = BAD[case]
    msg = comparison()
    change(msg)
    before = r.xlen(STREAM)
    with pytest.raises(grpc.RpcError) as err:
        submit(stub, msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert head in err.value.details() and detail in err.value.details()
    assert r.xlen(STREAM) == before
    assert not r.hexists(ID_INDEX, msg.id)


def test_ties_everywhere_are_allowed(stub):
    assert not submit(stub, comparison(k=3, ranks=(1, 1, 1))).duplicate


def test_a_whitespace_only_answer_can_be_ranked(stub, r):
    """The model sometimes answers with blanks: that is a bad answer to rank, not bad input."""
    msg = comparison()
    msg.candidates[1].text = "  \n"
    assert not submit(stub, msg).duplicate
    assert r.hexists(ID_INDEX, msg.id)


def post(server: ServerProcess, body, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, fb.Comparison):
        body = json_format.MessageToJson(body)
    return httpx.post(server.http_base + ROUTE, content=body, headers=headers, timeout=10)


def test_http_accepts_the_same_record_as_json(fb_server, r):
    msg = comparison()
    reply = post(fb_server, msg)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["id"] == msg.id and body["duplicate"] is False
    _, record = stored(r, body["stream_entry_id"])
    record.ClearField("received_at")
    record.ClearField("labeler_auth")
    assert record == msg
    again = post(fb_server, json_format.MessageToJson(msg, preserving_proto_field_name=True))
    assert again.json() == {**body, "duplicate": True}


@pytest.mark.parametrize(("body", "param", "text"), [
    (None, "candidates[1].rank", "must be in 1..4"),
    ('{"id": "abcdefgh", "nope": 1}', None, 'no field named "nope"'),
    ('{"candidates": [{"flags": ["FLAG_SHINY"]}]}', None, "Invalid enum value FLAG_SHINY"),
    ("[1, 2]", None, "must be a JSON object"),
    ("{not json", None, "not valid JSON"),
])
def test_http_rejects_bad_records_with_400(fb_server, r, body, param, text):
    if body is None:
        msg = comparison()
        msg.candidates[1].rank = 0
        body = msg
    before = r.xlen(STREAM)
    reply = post(fb_server, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert text in error["message"] and error["param"] == param
    assert r.xlen(STREAM) == before


def test_unauthenticated_callers_and_the_shared_token_are_refused(tiny_model_dir, redis_server,
                                                                   r):
    """The shared serving token passes the gate but proves no labeler (finding 7): it may
    not submit rankings; tests/test_feedback_auth.py covers the credentials that may."""
    srv = ServerProcess(tiny_model_dir, extra=["--redis-url", db_url(redis_server),
                                               "--auth-token", TOKEN])
    try:
        before = r.xlen(STREAM)
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = fbg.FeedbackStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                submit(stub, comparison())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert r.xlen(STREAM) == before
            with pytest.raises(grpc.RpcError) as err:
                submit(stub, comparison(), metadata=[("authorization", f"Bearer {TOKEN}")])
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "shared serving token" in err.value.details()
        reply = post(srv, comparison())
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        denied = post(srv, comparison(), token=TOKEN)
        assert denied.status_code == 403 and denied.json()["error"]["param"] == "labeler_id"
        assert "shared serving token" in denied.json()["error"]["message"]
        assert r.xlen(STREAM) == before
    finally:
        srv.stop()


def test_redis_down_is_unavailable_and_not_stored_then_retry_works(stub, fb_server, r,
                                                                   redis_server):
    msg = comparison()
    before = r.xlen(STREAM)
    redis_server.stop()
    try:
        with pytest.raises(grpc.RpcError) as err:
            submit(stub, msg)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "NOT stored" in err.value.details()
        reply = post(fb_server, msg)
        assert reply.status_code == 503 and "NOT stored" in reply.json()["error"]["message"]
        assert reply.headers["retry-after"] == "1"
    finally:
        redis_server.start()
    first = submit(stub, msg)
    assert not first.duplicate
    assert submit(stub, msg).duplicate
    assert r.xlen(STREAM) == before + 1
