"""What an outside red team sent to a real `rlhf serve` (issue #12), through both wires.

Hostile numbers, text that is not Unicode, bytes that are not protobuf, deep JSON, 16
simultaneous streams, lower-case auth schemes, a SIGTERM: each gets a clear status code and
harms no other request.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from rlhf.local_redis import RedisServer
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg
from tests.conftest import ServerProcess

QUESTION = [{"role": "user", "content": "What is 12 + 7?"}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, redis_server: RedisServer) -> Iterator[ServerProcess]:
    """Feedback on (its HTTP route too), and the red team's queue settings."""
    proc = ServerProcess(tiny_model_dir, extra=["--redis-url", redis_server.db_url(3),
                                                "--max-queue", "8", "--max-batch-size", "64"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(srv: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(srv.grpc_target) as ch:
        yield ch


def _grpc_request(content: str = "What is 12 + 7?", **sampling) -> pb.GenerateRequest:
    sampling.setdefault("max_new_tokens", 16)
    return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=content)],
                              sampling=pb.SamplingParams(**sampling))


def _stream_http(base: str, seed: int, out: dict, tokens: int = 40) -> None:
    """One streaming chat completion; records its text and finish reason (or the error)."""
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    text, finish = "", None
    try:
        for chunk in client.chat.completions.create(
                model="base", messages=QUESTION, stream=True, seed=seed, max_tokens=tokens,
                extra_body={"min_tokens": tokens}):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        out[seed] = (text, finish)
    except Exception as exc:  # recorded: the assertion shows which neighbour was harmed
        out[seed] = exc


# -- finding 1: a poisoned request harms no neighbour; every number is bounded ---------


def test_top_k_beyond_int64_is_refused_and_harms_no_stream_in_flight(srv):
    expected: dict = {}
    for seed in range(4):
        _stream_http(srv.http_base, seed, expected)
    got: dict = {}
    threads = [threading.Thread(target=_stream_http, args=(srv.http_base, seed, got))
               for seed in range(4)]
    for t in threads:
        t.start()
    r = httpx.post(srv.http_base + CHAT, json={"messages": QUESTION, "max_tokens": 8,
                                                "top_k": 9223372036854775808}, timeout=60)
    for t in threads:
        t.join(120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "top_k" and "top_k must be between" in r.text
    assert got == expected  # all four finished, each with exactly its own text
    assert all(finish == "length" for _, finish in got.values())


HTTP_OUT_OF_RANGE = [
    ("top_k", 2**63), ("top_k", 2**31), ("top_k", -1), ("n", 2**64), ("max_tokens", 2**63),
    ("max_completion_tokens", -(2**63)), ("min_tokens", 2**63), ("seed", 2**64), ("seed", -1),
    ("temperature", 1e-38), ("temperature", 1e-45), ("temperature", 0.005), ("top_p", 1e300),
    ("temperature", 1e300),
]


def test_every_http_number_is_range_checked(srv):
    for name, value in HTTP_OUT_OF_RANGE:
        r = httpx.post(srv.http_base + CHAT, json={"messages": QUESTION, name: value})
        assert r.status_code == 400, (name, value, r.text)
        error = r.json()["error"]
        expected = "max_tokens" if name == "max_completion_tokens" else name
        assert error["param"] == expected and error["type"] == "invalid_request_error", \
            (name, value, error)


def test_every_grpc_number_is_range_checked(channel):
    stub = pbg.PolicyStub(channel)
    for field, value, says in [("top_k", 2**32 - 1, "top_k must be between 0 and 1048576"),
                               ("temperature", 1e-38, "temperature must be 0 (greedy) or "
                                                      "between 0.01 and 100"),
                               ("temperature", 1e-45, "temperature must be 0 (greedy)"),
                               ("max_new_tokens", 2**32 - 1, "max_new_tokens must be")]:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(_grpc_request(**{field: value})))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, value)
        assert says in err.value.details()


# -- finding 9: every HTTP error is the API's JSON shape with a 4xx ---------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
     "messages[0].content[0].text"),
    ({"messages": QUESTION, "stop": ["\udc00"]}, "stop[0]"),
    ({"messages": QUESTION, "model": "\ud800"}, "model"),
    ({"messages": QUESTION, "adapter_version": "\ud800"}, "adapter_version"),
])
def test_lone_surrogates_are_400_naming_the_field(srv, body, param):
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as "\ud800"
    r = httpx.post(srv.http_base + CHAT, content=raw,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "not valid Unicode" in error["message"], error


def _deep(depth: int) -> bytes:
    return b'{"id": ' + b"[" * depth + b"]" * depth + b"}"


def test_deeply_nested_json_is_a_json_400_on_every_route(srv):
    for route in (CHAT, "/v1/feedback/comparisons"):
        r = httpx.post(srv.http_base + route, content=_deep(100_000),
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, (route, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_bytes_that_are_not_http_get_the_json_error_too(srv):
    import socket

    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as sock:
            sock.sendall(garbage)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, reply
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_an_unexpected_server_bug_is_a_json_500_not_plain_text():
    """The catch-all, on the real app: a route that fails in a way nobody foresaw."""
    import asyncio

    from serving.config import ServingConfig
    from serving.http_api import create_app
    from serving.service import PolicyService

    app = create_app(PolicyService(ServingConfig()))

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/v1/boom")

    r = asyncio.run(call())
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "server_error" and "a bug" not in r.text


# -- finding 11: bytes that are not valid protobuf are INVALID_ARGUMENT ----------------


def _raw(channel: grpc.Channel, method: str, payload: bytes, streaming: bool) -> grpc.RpcError:
    call = (channel.unary_stream if streaming else channel.unary_unary)(
        method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        result = call(payload, timeout=30)
        if streaming:
            list(result)
    return err.value


def test_invalid_utf8_in_a_grpc_string_field_is_invalid_argument_naming_it(srv, channel):
    before = sum("Traceback" in line for line in srv.stderr_lines)
    good = _grpc_request("hé").SerializeToString()
    cases = [
        ("/rlhf.v1.Policy/Generate", good.replace("hé".encode(), b"h\xff"), True,
         "field messages[0].content is not valid UTF-8"),
        ("/rlhf.v1.Policy/Generate", b"\xff\xff\xff\xff", True, "not valid protobuf"),
        ("/rlhf.v1.Policy/GetInfo", b"\x0a\x05", False, "not valid protobuf"),
        ("/rlhf.v1.Feedback/Submit", b"\x0a\x04\x0a\x02\xc3\x28", False,
         "is not valid UTF-8"),
        ("/grpc.health.v1.Health/Check", b"\x0a\x02\xc3\x28", False,
         "field service is not valid UTF-8"),
    ]
    for method, payload, streaming, says in cases:
        err = _raw(channel, method, payload, streaming)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.details())
        assert says in err.details() and "Error" not in err.details(), err.details()
    # and the server still answers, without a traceback per request
    assert list(pbg.PolicyStub(channel).Generate(_grpc_request()))
    assert sum("Traceback" in line for line in srv.stderr_lines) == before


# -- finding 12: free batch slots are never refused -------------------------------------


def test_sixteen_simultaneous_streams_all_run_with_max_queue_8(srv):
    """--max-queue 8 --max-batch-size 64: 16 streams of 1 alternative fit the batch."""
    outcomes: list[str] = []
    start = threading.Barrier(16)

    def worker(seed: int) -> None:
        with grpc.insecure_channel(srv.grpc_target) as ch:
            start.wait()
            try:
                chunks = list(pbg.PolicyStub(ch).Generate(
                    _grpc_request(seed=seed, max_new_tokens=40, min_new_tokens=40)))
                outcomes.append("ok" if chunks[-1].completion_tokens == 40 else "short")
            except grpc.RpcError as exc:
                outcomes.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcomes == ["ok"] * 16


# -- finding 15: the OpenAPI document tells the truth ------------------------------------


def test_the_openapi_document_lists_the_statuses_and_bodies_the_server_really_uses(srv):
    doc = httpx.get(srv.http_base + "/openapi.json").json()
    assert "422" not in json.dumps(doc["paths"])  # validation errors are 400
    schemas = doc["components"]["schemas"]
    feedback = doc["paths"]["/v1/feedback/comparisons"]["post"]
    ref = feedback["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    record = schemas[ref.rsplit("/", 1)[1]]
    assert {"id", "labeler_id", "messages", "candidates"} <= set(record["required"])
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    limits = schemas["ChatRequest"]["properties"]
    assert {"minimum": 1, "maximum": 9, "type": "integer"} in limits["n"]["anyOf"]
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (2 << 20) + b'"}]}'
    real = [  # (path, operation, response) for the statuses a client meets
        ("/v1/chat/completions", chat, httpx.post(srv.http_base + CHAT, json={
            "n": 0, "messages": QUESTION})),
        ("/v1/chat/completions", chat, httpx.post(srv.http_base + CHAT, json={
            "model": "nope", "messages": QUESTION})),
        ("/v1/chat/completions", chat, httpx.post(srv.http_base + CHAT, content=big, headers={
            "content-type": "application/json"})),
        ("/v1/feedback/comparisons", feedback, httpx.post(
            srv.http_base + "/v1/feedback/comparisons", json={"id": "x"})),
    ]
    for path, operation, response in real:
        documented = operation["responses"].get(str(response.status_code))
        assert documented, (path, response.status_code, sorted(operation["responses"]))
        schema = documented["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}
        assert set(response.json()["error"]) == set(schemas["Error"]["properties"]["error"][
            "required"])
    for status in ("401", "429", "503"):
        assert status in chat["responses"]
