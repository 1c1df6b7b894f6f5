"""Red-team cases of issue #12 that need a server of their own: the bearer scheme in any
case and what is public (a server with --auth-token), and SIGTERM while the registry
follower runs (a server that is stopped).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg
from tests.conftest import ServerProcess

QUESTION = [{"role": "user", "content": "What is 12 + 7?"}]
CHAT = "/v1/chat/completions"


def _grpc_request(content: str = "What is 12 + 7?", **sampling) -> pb.GenerateRequest:
    sampling.setdefault("max_new_tokens", 16)
    return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=content)],
                              sampling=pb.SamplingParams(**sampling))


# -- findings 13 and 14: the bearer scheme in any case; what is public ------------------


@pytest.fixture(scope="module")
def auth_srv(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_model_dir, extra=["--auth-token", "s3cret"])
    yield proc
    proc.stop()


@pytest.mark.parametrize("scheme", ["bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive_on_both_wires(auth_srv, scheme):
    header = f"{scheme} s3cret"
    r = httpx.post(auth_srv.http_base + CHAT, headers={"authorization": header},
                   json={"messages": QUESTION, "max_tokens": 2})
    assert r.status_code == 200, r.text
    with grpc.insecure_channel(auth_srv.grpc_target) as ch:
        info = pbg.PolicyStub(ch).GetInfo(pb.GetInfoRequest(),
                                          metadata=[("authorization", header)])
        assert info.max_n == 9
    wrong = httpx.post(auth_srv.http_base + CHAT, headers={"authorization": f"{scheme} nope"},
                       json={"messages": QUESTION})
    assert wrong.status_code == 401


def test_public_routes_are_health_metrics_and_the_api_description(auth_srv):
    """README "Authentication": /healthz, /metrics and /openapi.json need no token; every
    /v1 route does."""
    base = auth_srv.http_base
    for path in ("/healthz", "/metrics", "/openapi.json"):
        assert httpx.get(base + path).status_code == 200, path
    for method, path in (("GET", "/v1/models"), ("POST", CHAT),
                         ("POST", "/v1/feedback/comparisons")):
        r = httpx.request(method, base + path, json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# -- finding 18: after NOT_SERVING, Generate is refused, always -------------------------


def test_generate_after_not_serving_is_unavailable(tiny_model_dir, redis_server, tmp_path):
    """With the registry follower on, stopping it takes a poll period: new calls must be
    refused from before health says NOT_SERVING, not from after the follower stopped."""
    store = tmp_path / "store"
    store.mkdir()
    proc = ServerProcess(tiny_model_dir, extra=["--redis-url", redis_server.db_url(4),
                                                "--adapter-store", str(store),
                                                "--registry-poll-s", "3"])
    with grpc.insecure_channel(proc.grpc_target) as ch:
        stub, health = pbg.PolicyStub(ch), health_pb2_grpc.HealthStub(ch)
        running = stub.Generate(_grpc_request(max_new_tokens=200, min_new_tokens=200))
        next(running)
        proc.proc.send_signal(15)
        deadline = time.monotonic() + 30
        while health.Check(health_pb2.HealthCheckRequest()).status != \
                health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(_grpc_request()))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert sum(1 for _ in running) > 0  # the running stream still finishes
    assert proc.proc.wait(30) == 0
