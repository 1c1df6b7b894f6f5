"""Feedback.SubmitDemonstration and POST /v1/feedback/demonstrations against a real `rlhf
serve` process (tiny model) and a real Redis: stored once per id, bound to the labeler's
credential, every bad input refused with its field and nothing stored."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from google.protobuf import json_format

from rlhf.comparisons import DEMONSTRATIONS, GROUP, STREAM
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fbg
from rlhf.v1 import policy_pb2 as pb
from serving.auth import hash_token
from tests.conftest import RedisServer, ServerProcess

SHARED, UI, ALICE = "shared-s3cret", "ui-s3cret", "alice-token-0123456789"
MAX_CHARS = 500
ROUTE = "/v1/feedback/demonstrations"
DEMOS = DEMONSTRATIONS.stream


@pytest.fixture(scope="module")
def url(redis_server: RedisServer) -> str:
    return redis_server.db_url(14)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, url: str, tmp_path_factory) -> Iterator[ServerProcess]:
    tokens = tmp_path_factory.mktemp("auth") / "labelers.json"
    tokens.write_text(json.dumps({"alice": hash_token(ALICE)}))
    srv = ServerProcess(tiny_model_dir, extra=[
        "--redis-url", url, "--auth-token", SHARED, "--ui-token", UI,
        "--labeler-tokens", str(tokens), "--max-feedback-chars", str(MAX_CHARS)])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def r(url: str, server: ServerProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    yield client
    client.delete(DEMOS, DEMONSTRATIONS.id_index, STREAM)
    client.close()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[fbg.FeedbackStub]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield fbg.FeedbackStub(ch)


def demo(labeler: str = "alice", **kw) -> fb.Demonstration:
    d = fb.Demonstration(id=uuid.uuid4().hex, labeler_id=labeler, answer="12 + 7 = 19.",
                         source=fb.DEMONSTRATION_SOURCE_API, messages=[
                             pb.ChatMessage(role="system", content="Be brief."),
                             pb.ChatMessage(role="user", content="What is 12 + 7?")], **kw)
    d.created_at.FromMilliseconds(1_700_000_000_123)
    return d


def meta(token: str | None, labeler: str | None = None) -> list[tuple[str, str]]:
    out = [("authorization", f"Bearer {token}")] if token else []
    return out + ([("x-rlhf-labeler", labeler)] if labeler is not None else [])


def via_grpc(server, stub, d, token=ALICE, labeler=None):
    """(status name, field, stream entry id or None)."""
    try:
        reply = stub.SubmitDemonstration(fb.SubmitDemonstrationRequest(demonstration=d),
                                         timeout=10, metadata=meta(token, labeler))
    except grpc.RpcError as exc:
        return exc.code().name, dict(exc.trailing_metadata() or ()).get("rlhf-field"), None
    return "OK", None, reply.stream_entry_id


def via_http(server, stub, d, token=ALICE, labeler=None):
    got = httpx.post(server.http_base + ROUTE, content=json_format.MessageToJson(d),
                     headers=dict(meta(token, labeler)), timeout=10)
    if got.status_code != 200:
        error = got.json()["error"]
        return {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                503: "UNAVAILABLE"}[got.status_code], error["param"], None
    return "OK", None, got.json()["stream_entry_id"]


WIRES: dict[str, Callable] = {"grpc": via_grpc, "http": via_http}


def stored(r: redis.Redis, entry_id: str) -> tuple[dict[bytes, bytes], fb.Demonstration]:
    [(_, fields)] = r.xrange(DEMOS, entry_id, entry_id)
    return fields, DEMONSTRATIONS.decode(fields)


@pytest.mark.parametrize("wire", list(WIRES))
def test_a_demonstration_is_stored_once_as_its_labeler(server, stub, r, wire):
    d = demo(labeler="")  # filled from alice's token
    code, _, entry = WIRES[wire](server, stub, d)
    assert code == "OK"
    fields, record = stored(r, entry)
    assert fields[b"schema"] == b"rlhf.v1.Demonstration" and b"k" not in fields
    assert fields[b"id"].decode() == d.id and fields[b"labeler_id"] == b"alice"
    assert (record.labeler_id, record.labeler_auth) == ("alice", fb.LABELER_AUTH_TOKEN)
    assert int(fields[b"received_at"]) == record.received_at.ToMilliseconds() > 1_700_000_000_123
    assert (list(record.messages), record.answer) == (list(d.messages), d.answer)
    assert r.hget(DEMONSTRATIONS.id_index, d.id).decode() == entry
    before = r.xlen(DEMOS)
    again = stub.SubmitDemonstration(fb.SubmitDemonstrationRequest(demonstration=d),
                                     timeout=10, metadata=meta(ALICE))
    assert (again.duplicate, again.stream_entry_id) == (True, entry)
    assert r.xlen(DEMOS) == before  # the retry stored nothing
    assert GROUP.encode() in {g["name"] for g in r.xinfo_groups(DEMOS)}


def _ends_on_assistant(d):
    d.messages.add(role="assistant", content="19")


def _bad_role(d):
    d.messages.add(role="robot", content="beep")
    d.messages.add(role="user", content="and now?")


BAD: dict[str, tuple[Callable[[fb.Demonstration], None], str]] = {
    "empty answer": (lambda d: setattr(d, "answer", ""), "answer"),
    "whitespace answer": (lambda d: setattr(d, "answer", " \n "), "answer"),
    "answer over the size limit": (lambda d: setattr(d, "answer", "x" * (MAX_CHARS + 1)),
                                   "answer"),
    "ends on an assistant turn": (_ends_on_assistant, "messages[2].role"),
    "unknown role": (_bad_role, "messages[2].role"),
    "no conversation": (lambda d: d.ClearField("messages"), "messages"),
    "bad id": (lambda d: setattr(d, "id", "short"), "id"),
    "id with a newline": (lambda d: setattr(d, "id", "abcdefgh1\n"), "id"),
    "no source": (lambda d: setattr(d, "source", fb.DEMONSTRATION_SOURCE_UNSPECIFIED),
                  "source"),
    "bad comparison id": (lambda d: setattr(d, "comparison_id", "no spaces allowed"),
                          "comparison_id"),
    "impersonation": (lambda d: setattr(d, "labeler_id", "bob"), "labeler_id"),
}


@pytest.mark.parametrize("wire", list(WIRES))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_with_its_field_and_nothing_stored(server, stub, r, wire, case):
    d = demo()
    spoil, field = BAD[case]
    spoil(d)
    before = r.xlen(DEMOS)
    code, got_field, _ = WIRES[wire](server, stub, d)
    want = "PERMISSION_DENIED" if case == "impersonation" else "INVALID_ARGUMENT"
    assert (code, got_field) == (want, field)
    assert r.xlen(DEMOS) == before and not r.hexists(DEMONSTRATIONS.id_index, d.id)


@pytest.mark.parametrize("wire", list(WIRES))
def test_credentials_are_checked_as_for_rankings(server, stub, r, wire):
    before = r.xlen(DEMOS)
    send = WIRES[wire]
    assert send(server, stub, demo(), token=None)[0] == "UNAUTHENTICATED"
    assert send(server, stub, demo(), token=SHARED)[:2] == ("PERMISSION_DENIED", "labeler_id")
    assert send(server, stub, demo("bob"), token=UI, labeler="carol")[:2] == (
        "PERMISSION_DENIED", "labeler_id")
    assert r.xlen(DEMOS) == before
    code, _, entry = send(server, stub, demo(""), token=UI, labeler="carol")
    assert code == "OK"
    assert stored(r, entry)[1].labeler_auth == fb.LABELER_AUTH_UI_LOGIN


def test_a_body_that_is_not_a_demonstration_is_a_400(server, r):
    got = httpx.post(server.http_base + ROUTE, content=b'{"answer": 5}',
                     headers=dict(meta(ALICE)), timeout=10)
    assert got.status_code == 400
    assert "rlhf.v1.Demonstration" in got.json()["error"]["message"]
    doc = httpx.get(server.http_base + "/openapi.json", timeout=10).json()
    op = doc["paths"][ROUTE]["post"]
    assert {"400", "401", "403", "503"} <= set(op["responses"])
