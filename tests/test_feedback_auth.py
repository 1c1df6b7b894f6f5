"""Who ranked is bound to the caller's credential (red-team finding 7), on both wires of a
real `rlhf serve` process with a real Redis: per-labeler tokens (a --labeler-tokens file of
sha256 hashes), the ranking UI's service token forwarding the logged-in labeler, and the
shared serving token, which proves no labeler."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from google.protobuf import json_format

from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fbg
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg
from serving.auth import hash_token
from serving.feedback import ID_INDEX, STREAM, decode_entry
from tests.conftest import ROOT, RedisServer, ServerProcess

SHARED, UI = "shared-s3cret", "ui-s3cret"
ALICE, BOB = "alice-token-0123456789", "bob-token-9876543210"
ROUTE = "/v1/feedback/comparisons"


@pytest.fixture(scope="module")
def url(redis_server: RedisServer) -> str:
    return redis_server.db_url(7)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, url: str, tmp_path_factory) -> Iterator[ServerProcess]:
    tokens = tmp_path_factory.mktemp("auth") / "labelers.json"
    tokens.write_text(json.dumps({"alice": hash_token(ALICE), "bob": [hash_token(BOB)]}))
    assert ALICE not in tokens.read_text()  # the file holds hashes only
    srv = ServerProcess(tiny_model_dir, extra=[
        "--redis-url", url, "--auth-token", SHARED, "--ui-token", UI,
        "--labeler-tokens", str(tokens)])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def r(url: str, server: ServerProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    client.delete(STREAM, ID_INDEX)
    yield client
    client.delete(STREAM, ID_INDEX)
    client.close()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[fbg.FeedbackStub]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield fbg.FeedbackStub(ch)


def record(labeler: str) -> fb.Comparison:
    msg = fb.Comparison(id=uuid.uuid4().hex, labeler_id=labeler,
                        messages=[pb.ChatMessage(role="user", content="What is 2 + 2?")])
    for i, text in enumerate(("4", "5")):
        msg.candidates.add(text=text, adapter_version="base", position=i, rank=i + 1)
    return msg


def meta(token: str | None, labeler: str | None = None) -> list[tuple[str, str]]:
    out = [("authorization", f"Bearer {token}")] if token else []
    return out + ([("x-rlhf-labeler", labeler)] if labeler is not None else [])


def grpc_submit(stub, msg, token=None, labeler=None):
    """(code, details, stored record or None, trailing field)."""
    try:
        reply = stub.Submit(fb.SubmitRequest(comparison=msg), timeout=10,
                            metadata=meta(token, labeler))
    except grpc.RpcError as exc:
        field = dict(exc.trailing_metadata() or ()).get("rlhf-field")
        return exc.code(), exc.details(), None, field
    return grpc.StatusCode.OK, "", reply.stream_entry_id, None


def http_submit(server, msg, token=None, labeler=None) -> httpx.Response:
    return httpx.post(server.http_base + ROUTE, content=json_format.MessageToJson(msg),
                      headers=dict(meta(token, labeler)), timeout=10)


def stored_record(r: redis.Redis, entry_id: str) -> fb.Comparison:
    [(_, fields)] = r.xrange(STREAM, entry_id, entry_id)
    return decode_entry(fields)


# (credential, forwarded labeler, record labeler) -> stored labeler and how it is known
ACCEPTED = {
    "labeler token, own name": (ALICE, None, "alice", "alice", fb.LABELER_AUTH_TOKEN),
    "labeler token, empty name": (BOB, None, "", "bob", fb.LABELER_AUTH_TOKEN),
    "labeler token, lowercase scheme": ("lower:" + ALICE, None, "alice", "alice",
                                        fb.LABELER_AUTH_TOKEN),
    "ui token, forwarded login": (UI, "carol", "carol", "carol", fb.LABELER_AUTH_UI_LOGIN),
    "ui token, empty name": (UI, "carol", "", "carol", fb.LABELER_AUTH_UI_LOGIN),
}


@pytest.mark.parametrize("wire", ["grpc", "http"])
@pytest.mark.parametrize("case", list(ACCEPTED))
def test_credentials_that_prove_a_labeler_store_it(server, stub, r, wire, case):
    token, forwarded, body_labeler, expected, how = ACCEPTED[case]
    msg = record(body_labeler)
    if token.startswith("lower:"):
        token = token.removeprefix("lower:")
        headers = [("authorization", f"bearer {token}")]
    else:
        headers = meta(token, forwarded)
    if wire == "grpc":
        reply = stub.Submit(fb.SubmitRequest(comparison=msg), timeout=10, metadata=headers)
        entry = reply.stream_entry_id
    else:
        got = httpx.post(server.http_base + ROUTE, content=json_format.MessageToJson(msg),
                         headers=dict(headers), timeout=10)
        assert got.status_code == 200, got.text
        entry = got.json()["stream_entry_id"]
    stored = stored_record(r, entry)
    assert (stored.labeler_id, stored.labeler_auth) == (expected, how)
    assert r.hget(ID_INDEX, msg.id).decode() == entry


# (credential, forwarded labeler, record labeler) -> refused with this code and text
REFUSED = {
    "no credential": (None, None, "alice", grpc.StatusCode.UNAUTHENTICATED, 401, ""),
    "unknown token": ("guess", None, "alice", grpc.StatusCode.UNAUTHENTICATED, 401, ""),
    "shared token": (SHARED, None, "alice", grpc.StatusCode.PERMISSION_DENIED, 403,
                     "shared serving token"),
    "shared token forwarding": (SHARED, "alice", "alice", grpc.StatusCode.PERMISSION_DENIED,
                                403, "shared serving token"),
    "labeler token claiming another": (ALICE, None, "bob", grpc.StatusCode.PERMISSION_DENIED,
                                       403, "not the authenticated labeler 'alice'"),
    "labeler token forwarding another": (ALICE, "bob", "", grpc.StatusCode.PERMISSION_DENIED,
                                         403, "a labeler token submits only as its own"),
    "ui token without a login": (UI, None, "carol", grpc.StatusCode.PERMISSION_DENIED, 403,
                                 "x-rlhf-labeler"),
    "ui token, body names someone else": (UI, "carol", "alice",
                                          grpc.StatusCode.PERMISSION_DENIED, 403,
                                          "not the authenticated labeler 'carol'"),
    # (gRPC metadata cannot even carry a control character: HTTP only)
    "ui token, forwarded name with a tab": (UI, "car\tol", "", None, 400, "control"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_credential_that_does_not_prove_the_labeler_is_refused_on_both_wires(
        server, stub, r, case):
    token, forwarded, body_labeler, grpc_code, http_status, text = REFUSED[case]
    before = r.xlen(STREAM) if r.exists(STREAM) else 0
    msg = record(body_labeler)
    if grpc_code is not None:
        code, details, entry, _ = grpc_submit(stub, msg, token, forwarded)
        assert (code, entry) == (grpc_code, None) and text in details
    got = http_submit(server, msg, token, forwarded)
    assert got.status_code == http_status, got.text
    assert text in got.json()["error"]["message"]
    if http_status == 403:
        assert got.json()["error"]["param"] == "labeler_id"
    assert (r.xlen(STREAM) if r.exists(STREAM) else 0) == before
    assert not r.hexists(ID_INDEX, msg.id)


def test_labeler_and_ui_tokens_pass_the_gate_for_generation(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        policy = pbg.PolicyStub(ch)
        for token in (SHARED, UI, ALICE):
            info = policy.GetInfo(pb.GetInfoRequest(), metadata=meta(token), timeout=10)
            assert info.current_adapter_version == "base"
        with pytest.raises(grpc.RpcError) as err:
            policy.GetInfo(pb.GetInfoRequest(), metadata=meta("guess"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_bad_labeler_tokens_file_stops_serving_at_start(tmp_path):
    bad = tmp_path / "labelers.json"
    for content, problem in ((json.dumps({"alice": "plain-text-token"}),
                              "sha256:<64 lowercase hex digits>"),
                             (json.dumps({"alice\n": hash_token(ALICE)}), "control"),
                             (json.dumps({"alice": hash_token(SHARED)}), "equals --auth-token")):
        bad.write_text(content)
        proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "serve", "--labeler-tokens",
                               str(bad), "--auth-token", SHARED], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and problem in proc.stderr, proc.stderr[-2000:]


def test_without_a_shared_token_rankings_still_need_a_labeler_credential(tiny_model_dir, url,
                                                                        r, tmp_path):
    """Generation open (no --auth-token), labelers bound (--labeler-tokens): an anonymous
    ranking is refused, a labeler token's is stored as that labeler's."""
    tokens = tmp_path / "labelers.json"
    tokens.write_text(json.dumps({"alice": hash_token(ALICE)}))
    srv = ServerProcess(tiny_model_dir, extra=["--redis-url", url, "--labeler-tokens",
                                               str(tokens)])
    try:
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = fbg.FeedbackStub(ch)
            code, details, _, _ = grpc_submit(stub, record("alice"))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "labeler credential" in details
            assert grpc_submit(stub, record("alice"), "guess")[0] == \
                grpc.StatusCode.UNAUTHENTICATED
            code, _, entry, _ = grpc_submit(stub, record(""), ALICE)
            assert code == grpc.StatusCode.OK
            assert stored_record(r, entry).labeler_id == "alice"
            assert pbg.PolicyStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10).max_n > 0
        got = http_submit(srv, record("alice"))
        assert got.status_code == 401 and got.headers["www-authenticate"] == "Bearer"
    finally:
        srv.stop()


def test_the_ui_client_submits_as_the_logged_in_person_any_name(server, r):
    """ui.client names the labeler from the UI token; a non-ASCII name goes as UTF-8 in
    x-rlhf-labeler-bin (gRPC text metadata is ASCII only), over HTTP as UTF-8 bytes."""
    from ui.client import ServingClient, ServingError

    client = ServingClient(server.grpc_target, UI, timeout_s=10)
    try:
        for name in ("dana", "José Müller", "李雷"):
            reply = client.submit(record(name))
            stored = stored_record(r, reply.stream_entry_id)
            assert (stored.labeler_id, stored.labeler_auth) == (name,
                                                                fb.LABELER_AUTH_UI_LOGIN)
    finally:
        client.close()
    shared = ServingClient(server.grpc_target, SHARED, timeout_s=10)
    try:
        with pytest.raises(ServingError) as err:
            shared.submit(record("dana"))
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and not err.value.retryable
        assert "would not store this ranking under your name" in str(err.value)
    finally:
        shared.close()
    got = httpx.post(server.http_base + ROUTE, content=json_format.MessageToJson(
        record("José Müller")), timeout=10, headers={
        "authorization": f"Bearer {UI}", "x-rlhf-labeler": "José Müller".encode()})
    assert got.status_code == 200, got.text
    assert stored_record(r, got.json()["stream_entry_id"]).labeler_id == "José Müller"
