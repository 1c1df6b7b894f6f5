"""The gRPC Policy service against a real `rlhf serve` process and the tiny model."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg
from tests.conftest import ServerProcess

USER = [pb.ChatMessage(role="user", content="What is 12 + 7?")]


def request(n: int = 1, **sampling) -> pb.GenerateRequest:
    sampling.setdefault("max_new_tokens", 24)
    return pb.GenerateRequest(messages=USER, n=n, sampling=pb.SamplingParams(**sampling))


def collect(chunks) -> tuple[dict[int, str], dict[int, pb.GenerateChunk], list[pb.GenerateChunk]]:
    texts: dict[int, str] = {}
    finals: dict[int, pb.GenerateChunk] = {}
    seen = []
    for c in chunks:
        assert c.index not in finals, "a chunk arrived after its alternative's final chunk"
        texts[c.index] = texts.get(c.index, "") + c.text
        if c.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            finals[c.index] = c
        seen.append(c)
    return texts, finals, seen


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pbg.PolicyStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pbg.PolicyStub(channel)


def generated_tokens(server: ServerProcess) -> float:
    text = httpx.get(server.http_base + "/metrics").text
    match = re.search(r"^rlhf_serving_generated_tokens_total (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


def test_get_info_reports_model_and_limits(stub, tiny_model_dir):
    info = stub.GetInfo(pb.GetInfoRequest())
    assert info.base_model == str(tiny_model_dir)
    assert info.current_adapter_version == "base"
    assert list(info.loaded_adapter_versions) == ["base"]
    assert (info.max_n, info.max_new_tokens, info.default_max_new_tokens) == (9, 512, 128)
    assert info.context_length == 256


def test_streams_n_alternatives_each_tagged_and_finished_once(stub):
    texts, finals, chunks = collect(stub.Generate(request(n=4, seed=11)))
    assert sorted(finals) == [0, 1, 2, 3]
    assert {c.adapter_version for c in chunks} == {"base"}
    assert {c.request_id for c in chunks} == {chunks[0].request_id} and chunks[0].request_id
    assert [finals[i].seed for i in range(4)] == [11, 12, 13, 14]
    for i, final in finals.items():
        assert final.prompt_tokens > 0
        assert 1 <= final.completion_tokens <= 24
        assert texts[i].strip(), "every alternative produced text"
    # Alternatives stream interleaved, not one after another.
    first_final = min(chunks.index(f) for f in finals.values())
    assert len({c.index for c in chunks[:first_final + 1]}) > 1


def test_same_seed_same_text_and_different_seeds_differ(stub):
    a, _, _ = collect(stub.Generate(request(n=3, seed=5, temperature=1.0)))
    b, _, _ = collect(stub.Generate(request(n=3, seed=5, temperature=1.0)))
    assert a == b
    others = [collect(stub.Generate(request(seed=s)))[0][0] for s in range(100, 106)]
    assert len(set(others)) > 1


def test_greedy_alternatives_are_identical(stub):
    texts, _, _ = collect(stub.Generate(request(n=3, temperature=0.0)))
    assert len(set(texts.values())) == 1


def test_request_id_is_echoed(stub):
    req = request(seed=1)
    req.request_id = "my-req-1"
    assert {c.request_id for c in stub.Generate(req)} == {"my-req-1"}
    chunks = list(stub.Generate(request(seed=1), metadata=[("x-request-id", "from-meta")]))
    assert {c.request_id for c in chunks} == {"from-meta"}


def test_max_and_min_new_tokens(stub):
    _, finals, _ = collect(stub.Generate(request(n=2, max_new_tokens=30, min_new_tokens=30,
                                                 seed=3)))
    for final in finals.values():
        assert final.completion_tokens == 30
        assert final.finish_reason == pb.FINISH_REASON_MAX_TOKENS


def test_stop_sequence_ends_text_before_it(stub):
    texts, _, _ = collect(stub.Generate(request(n=4, seed=21, min_new_tokens=20,
                                                max_new_tokens=20)))
    common = max(set("".join(texts.values())) - {""}, key=lambda ch: "".join(texts.values())
                 .count(ch))
    texts2, finals, _ = collect(stub.Generate(request(n=4, seed=21, min_new_tokens=20,
                                                      max_new_tokens=20, stop=[common])))
    for i in range(4):
        assert common not in texts2[i]
        if common in texts[i]:
            assert finals[i].finish_reason == pb.FINISH_REASON_STOP
            assert texts2[i] == texts[i][: texts[i].index(common)]


def test_raw_prompt(stub):
    req = pb.GenerateRequest(prompt="12 plus 7 is", sampling=pb.SamplingParams(max_new_tokens=5))
    _, finals, _ = collect(stub.Generate(req))
    assert finals[0].completion_tokens <= 5


def test_concurrent_streams_all_complete(server):
    results: dict[int, dict] = {}

    def worker(k: int) -> None:
        with grpc.insecure_channel(server.grpc_target) as channel:
            _, finals, _ = collect(pbg.PolicyStub(channel).Generate(request(n=2, seed=k)))
            results[k] = finals

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(8))
    assert all(sorted(f) == [0, 1] for f in results.values())


BAD = [
    (dict(n=10), grpc.StatusCode.INVALID_ARGUMENT, "n must be between 1 and 9"),
    (dict(sampling=dict(max_new_tokens=513)), grpc.StatusCode.INVALID_ARGUMENT,
     "max_new_tokens must be between 1 and 512"),
    (dict(sampling=dict(temperature=-0.5)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(sampling=dict(temperature=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT,
     "temperature"),
    (dict(sampling=dict(top_p=0.0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
    (dict(sampling=dict(top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
    (dict(sampling=dict(max_new_tokens=10, min_new_tokens=11)),
     grpc.StatusCode.INVALID_ARGUMENT, "min_new_tokens"),
    (dict(sampling=dict(stop=[""])), grpc.StatusCode.INVALID_ARGUMENT, "stop sequences"),
    (dict(sampling=dict(stop=[str(i) for i in range(9)])), grpc.StatusCode.INVALID_ARGUMENT,
     "at most 8 stop sequences"),
    (dict(messages=[]), grpc.StatusCode.INVALID_ARGUMENT, "exactly one of messages"),
    (dict(prompt="hi"), grpc.StatusCode.INVALID_ARGUMENT, "exactly one of messages"),
    (dict(messages=[dict(role="robot", content="hi")]), grpc.StatusCode.INVALID_ARGUMENT,
     "role must be one of"),
    (dict(messages=[dict(role="user", content="   ")]), grpc.StatusCode.INVALID_ARGUMENT,
     "content is empty"),
    (dict(messages=[dict(role="user", content="7 " * 400)]), grpc.StatusCode.INVALID_ARGUMENT,
     "context window is 256"),
    (dict(messages=[dict(role="user", content="x" * 70000)]), grpc.StatusCode.INVALID_ARGUMENT,
     "request too large"),
    (dict(messages=[dict(role="user", content="x" * (9 << 20))]),
     grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    (dict(adapter_version="v404"), grpc.StatusCode.NOT_FOUND, "'v404' is not loaded"),
    (dict(adapter_version="../etc"), grpc.StatusCode.INVALID_ARGUMENT, "not a valid version"),
    (dict(request_id="x" * 200), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
]


@pytest.mark.parametrize(("fields", "code", "message"), BAD,
                         ids=[f"{i}-{b[1].name}" for i, b in enumerate(BAD)])
def test_bad_requests_get_clear_status(stub, fields, code, message):
    base = {"messages": [dict(role="user", content="hi")], "sampling": {}}
    base.update(fields)
    req = pb.GenerateRequest(
        messages=[pb.ChatMessage(**m) for m in base["messages"]], prompt=base.get("prompt", ""),
        n=base.get("n", 0), sampling=pb.SamplingParams(**base["sampling"]),
        adapter_version=base.get("adapter_version", ""), request_id=base.get("request_id", ""))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(req))
    assert err.value.code() == code
    assert message in err.value.details()


def test_server_still_serves_after_bad_requests(stub):
    _, finals, _ = collect(stub.Generate(request(seed=2)))
    assert 0 in finals


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "rlhf.v1.Policy"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "rlhf.v1.Policy" in services and "grpc.health.v1.Health" in services


LONG = dict(max_new_tokens=200, min_new_tokens=200)  # fits the tiny model's 256-token context


def test_cancelled_stream_stops_generating(stub, server):
    before = generated_tokens(server)
    call = stub.Generate(request(n=4, seed=9, **LONG))
    next(call)
    call.cancel()
    time.sleep(2.0)  # long enough for 4 x 200 tokens had the generation gone on
    spent = generated_tokens(server) - before
    assert spent < 200, f"{spent} tokens generated after cancel"
    _, finals, _ = collect(stub.Generate(request(seed=1)))  # and the slots are free again
    assert 0 in finals


def test_deadline_stops_generation(stub, server):
    before = generated_tokens(server)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request(n=9, **LONG), timeout=0.05))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(2.0)
    assert generated_tokens(server) - before < 9 * 200 / 2


def test_full_queue_answers_resource_exhausted(tiny_model_dir):
    srv = ServerProcess(tiny_model_dir, extra=["--max-batch-size", "1", "--max-queue", "1",
                                               "--max-n", "1"])
    outcomes: list[str] = []

    def worker() -> None:
        with grpc.insecure_channel(srv.grpc_target) as channel:
            try:
                _, finals, _ = collect(pbg.PolicyStub(channel).Generate(request(**LONG)))
                outcomes.append("ok" if finals[0].completion_tokens == 200 else "short")
            except grpc.RpcError as exc:
                busy = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and \
                    "busy" in exc.details()
                outcomes.append("busy" if busy else f"{exc.code()}: {exc.details()}")

    try:
        # Six requests at once; each runs for a while on the single slot: one runs, one
        # waits in the queue, the rest are refused at once rather than left hanging.
        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(set(outcomes)) == ["busy", "ok"], outcomes
        assert outcomes.count("busy") >= 3  # at most one running and one queued at a time
    finally:
        assert srv.stop() == 0


def test_bearer_auth(tiny_model_dir):
    srv = ServerProcess(tiny_model_dir, extra=["--auth-token", "s3cret"])
    try:
        with grpc.insecure_channel(srv.grpc_target) as channel:
            stub = pbg.PolicyStub(channel)
            for metadata in ([], [("authorization", "Bearer wrong")]):
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Generate(request(), metadata=metadata))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as err:
                    stub.GetInfo(pb.GetInfoRequest(), metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = [("authorization", "Bearer s3cret")]
            assert stub.GetInfo(pb.GetInfoRequest(), metadata=ok).max_n == 9
            _, finals, _ = collect(stub.Generate(request(), metadata=ok))
            assert 0 in finals
            health = health_pb2_grpc.HealthStub(channel)  # probes need no token
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop()


def test_graceful_shutdown_finishes_running_streams(tiny_model_dir):
    srv = ServerProcess(tiny_model_dir)
    with grpc.insecure_channel(srv.grpc_target) as channel:
        stub = pbg.PolicyStub(channel)
        calls = [stub.Generate(request(n=9, **LONG)) for _ in range(3)]
        for call in calls:
            next(call)
        srv.proc.send_signal(15)
        health = health_pb2_grpc.HealthStub(channel)
        statuses = set()
        for _ in range(100):
            statuses.add(health.Check(health_pb2.HealthCheckRequest()).status)
            if health_pb2.HealthCheckResponse.NOT_SERVING in statuses:
                break
            time.sleep(0.01)
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        assert httpx.get(srv.http_base + "/healthz").status_code == 503
        with pytest.raises(grpc.RpcError) as err:  # no new work while draining
            list(stub.Generate(request()))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        for call in calls:  # the running streams still complete
            _, finals, _ = collect(call)
            assert sorted(finals) == list(range(9))
            assert all(f.completion_tokens == 200 for f in finals.values())
    assert srv.proc.wait(30) == 0


def test_tls(tiny_model_dir, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    srv = ServerProcess(tiny_model_dir, extra=["--tls-cert", str(cert), "--tls-key", str(key)])
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(srv.grpc_target, creds) as channel:
            _, finals, _ = collect(pbg.PolicyStub(channel).Generate(request(seed=4)))
            assert 0 in finals
        with grpc.insecure_channel(srv.grpc_target) as channel:  # plaintext is refused
            with pytest.raises(grpc.RpcError) as err:
                pbg.PolicyStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()
