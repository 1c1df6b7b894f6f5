"""``GET /v1/dashboard`` of the learner's admin API against a real Redis with known contents:
queue depth from the consumer group (lag, pending), comparisons per labeler (stream and
dataset), iteration history with the curves' metrics, adapter versions; auth and Redis-down.

A real Learner on the tiny model (no iteration runs: the history and registry are written
the way the learner writes them), private Redis db 6.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from fastapi.testclient import TestClient

from learner.admin_api import Runner, create_app
from learner.config import LearnerConfig
from learner.iteration import Learner, Progress
from rlhf import adapter_store, comparisons
from rlhf.modeling import load_model
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb

TOKEN = "dash-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def record(i: int, labeler: str) -> fb.Comparison:
    rec = fb.Comparison(id=f"dash-{i:03d}", labeler_id=labeler,
                        messages=[pb.ChatMessage(role="user", content=f"What is {i} + 1?")])
    for rank, text in enumerate([f"{i + 1}.", "no idea"], 1):
        rec.candidates.add(text=text, adapter_version="base", position=rank - 1, rank=rank)
    rec.received_at.FromMilliseconds(1_700_000_000_000 + i)
    return rec


@pytest.fixture(scope="module")
def env(tiny_model_dir: Path, redis_server, tmp_path_factory) -> Iterator[dict]:
    torch.set_num_threads(1)
    url = redis_server.db_url(6)
    client = redis.Redis.from_url(url)
    client.flushdb()
    root = tmp_path_factory.mktemp("dashboard")
    cfg = LearnerConfig(model=str(tiny_model_dir), device="cpu", redis_url=url,
                        data_dir=str(root / "data"), adapter_store=str(root / "store"),
                        admin_token=TOKEN, consumer="dash-learner")
    learner = Learner(cfg, load_model(cfg.model, device="cpu"))
    runner = Runner(learner)
    try:
        yield {"client": client, "learner": learner, "runner": runner,
               "http": TestClient(create_app(runner, TOKEN))}
    finally:
        learner.close()
        client.flushdb()
        client.close()


def dashboard(env, **params) -> dict:
    reply = env["http"].get("/v1/dashboard", headers=AUTH, params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()


def row(submitted: int, learned: int, demos_submitted: int = 0, demos_learned: int = 0
        ) -> dict[str, int]:
    return {"submitted": submitted, "learned": learned,
            "demonstrations_submitted": demos_submitted, "demonstrations_learned": demos_learned}


def demonstration(i: int, labeler: str) -> fb.Demonstration:
    d = fb.Demonstration(id=f"dash-demo-{i:03d}", labeler_id=labeler, answer=f"{i + 1}.",
                         source=fb.DEMONSTRATION_SOURCE_API,
                         messages=[pb.ChatMessage(role="user", content=f"What is {i} + 1?")])
    d.received_at.FromMilliseconds(1_700_000_000_000 + i)
    return d


def test_dashboard_needs_the_token(env):
    assert env["http"].get("/v1/dashboard").status_code == 401
    assert env["http"].get("/v1/dashboard", headers={"Authorization": "Bearer x"}
                           ).status_code == 401


def test_queue_and_labelers_follow_the_stream_and_the_dataset(env):
    client, learner = env["client"], env["learner"]
    empty = dashboard(env)
    assert empty["queue"] == {"stream_length": 0, "lag": 0, "pending": 0, "depth": 0}
    assert empty["labelers"] == {} and empty["iterations"] == [] and empty["adapters"] == []

    labelers = ["alice", "alice", "bob", "alice", "bob"]
    comparisons.append_many(client, [record(i, who) for i, who in enumerate(labelers)])
    body = dashboard(env)
    assert body["queue"] == {"stream_length": 5, "lag": 5, "pending": 0, "depth": 5}
    assert body["labelers"] == {"alice": row(3, 0), "bob": row(2, 0)}
    comparisons.append_many(client, [demonstration(0, "alice"), demonstration(1, "erin")])
    assert dashboard(env)["labelers"] == {"alice": row(3, 0, 1, 0), "bob": row(2, 0),
                                          "erin": row(0, 0, 1, 0)}

    # The learner drains three (stored + acked); another consumer holds one unacked.
    assert learner.intake.drain(max_records=3).acked == 3
    client.xreadgroup(comparisons.GROUP, "someone-else", {comparisons.STREAM: ">"}, count=1)
    comparisons.append_many(client, [record(5, "carol")])
    body = dashboard(env)
    assert body["queue"] == {"stream_length": 6, "lag": 2, "pending": 1, "depth": 3}
    assert body["labelers"] == {"alice": row(3, 2, 1, 1), "bob": row(2, 1),
                                "carol": row(1, 0), "erin": row(0, 0, 1, 1)}
    assert body["status"]["dataset_size"] == 3 and body["status"]["running"] is False

    # A deleted and refilled stream is counted afresh, not on top of the old counts.
    client.delete(comparisons.STREAM, comparisons.ID_INDEX)
    comparisons.append_many(client, [record(9, "dave")])
    body = dashboard(env)
    assert {k: v["submitted"] for k, v in body["labelers"].items()} == {
        "alice": 0, "bob": 0, "dave": 1, "erin": 0}
    assert body["queue"] == {"stream_length": 1, "lag": 1, "pending": 0, "depth": 1}


def test_iterations_and_adapters(env):
    client, learner, runner = env["client"], env["learner"], env["runner"]
    first = Progress("it-0001", status="done", phase="record", phase_number=6, version="v1",
                     seconds={"drain": 1.0, "ppo": 2.5},
                     metrics={"rm/accuracy": 0.75, "ppo/kl": 0.01, "ppo/reward": 0.2,
                              "eval/win_rate": 0.5, "ptx/loss_after": 3.25, "rm/bias": 0.1,
                              "eval/prompts_heldout": True})
    second = Progress("it-0002", status="done", phase="record", phase_number=6, version="v2",
                      metrics={"rm/accuracy": 0.8, "eval/gold_win_rate": 0.6})
    failed = Progress("it-0003", status="failed", phase="reward_model", error="boom")
    for progress in (first, second, failed):
        learner._store_record(progress)  # what phase 6 (or a failure) writes
    runner.current = Progress("it-0004", phase="ppo", phase_number=3, step=1, steps=4)

    made = {}
    for version, parent in (("v1", None), ("v2", "v1")):
        made[version] = adapter_store.Manifest(
            version=version, parent=parent, base_model="tiny", files={}, lora={},
            created_at=time.time(), metrics={"rm/accuracy": 0.5, "rm/bias": 1.0},
            config={"iteration": f"it-000{version[1]}"})
        adapter_store.register(client, made[version], make_current=True)
    adapter_store.set_current(client, "v1")  # rolled back
    try:
        body = dashboard(env)
    finally:
        runner.current = None

    rows = body["iterations"]
    assert [r["id"] for r in rows] == ["it-0001", "it-0002", "it-0003", "it-0004"]
    assert rows[0]["metrics"] == {"rm/accuracy": 0.75, "ppo/kl": 0.01, "ppo/reward": 0.2,
                                  "eval/win_rate": 0.5, "ptx/loss_after": 3.25}
    assert rows[0]["seconds"] == 3.5 and rows[0]["version"] == "v1"
    assert rows[1]["metrics"] == {"rm/accuracy": 0.8, "eval/gold_win_rate": 0.6}
    assert rows[2]["status"] == "failed" and rows[2]["error"] == "boom"
    assert rows[3]["status"] == "running" and rows[3]["phase"] == "ppo"
    status = body["status"]
    assert status["running"] and status["iteration"]["phase_number"] == 3
    assert status["iteration"]["step"] == 1 and status["current_adapter"] == "v1"

    v1, v2 = body["adapters"]
    assert (v1["version"], v1["current"], v1["parent"]) == ("v1", True, None)
    assert (v2["version"], v2["current"], v2["parent"]) == ("v2", False, "v1")
    assert v2["created_at"] == made["v2"].created_at and v2["iteration"] == "it-0002"
    assert v2["metrics"] == {"rm/accuracy": 0.5}

    assert [r["id"] for r in dashboard(env, limit=2)["iterations"]] == ["it-0002", "it-0003"]
    bad = env["http"].get("/v1/dashboard", headers=AUTH, params={"limit": 0})
    assert bad.status_code == 400 and "limit" in bad.json()["detail"]  # documented: 400


def test_redis_down_is_a_503_with_a_reason(env, redis_server):
    redis_server.stop()
    try:
        reply = env["http"].get("/v1/dashboard", headers=AUTH)
    finally:
        redis_server.start()
    assert reply.status_code == 503 and "Redis is unreachable" in reply.json()["detail"]
    assert dashboard(env)["queue"]["stream_length"] == 1  # AOF kept it; answers again


def test_redis_down_is_a_503_on_every_route_not_a_500(env, redis_server):
    redis_server.stop()
    try:
        replies = {path: env["http"].get(path, headers=AUTH)
                   for path in ("/v1/status", "/v1/adapters", "/v1/adapters/v1")}
    finally:
        redis_server.start()
    for path, reply in replies.items():
        assert reply.status_code == 503, (path, reply.text)
        assert "Redis is unreachable" in reply.json()["detail"]


def test_the_openapi_document_is_behind_the_token_and_there_are_no_docs(env):
    http = env["http"]
    assert http.get("/openapi.json").status_code == 401
    assert http.get("/openapi.json", headers={"Authorization": "Bearer nope"}).status_code == 401
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert http.get(page, headers=AUTH).status_code == 404
        assert http.get(page).status_code in (401, 404)
    assert http.get("/openapi.json", headers=AUTH).status_code == 200


def test_the_openapi_document_lists_the_codes_the_routes_answer(env):
    doc = env["http"].get("/openapi.json", headers=AUTH).json()
    codes = {(method.upper(), path): set(op["responses"])
             for path, ops in doc["paths"].items() for method, op in ops.items()}
    assert not any("422" in c for c in codes.values())  # validation errors answer 400
    assert all({"401", "503"} <= c for c in codes.values())
    assert "400" in codes[("GET", "/v1/dashboard")]
    assert "202" in codes[("POST", "/v1/iterations")] and "409" in codes[("POST",
                                                                          "/v1/iterations")]
    assert "404" in codes[("GET", "/v1/iterations/{iteration_id}")]
    assert {"404", "409"} <= codes[("POST", "/v1/adapters/{version}/promote")]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    # ...and they really are those codes
    http = env["http"]
    assert http.get("/v1/iterations/it-nope", headers=AUTH).status_code == 404
    assert http.get("/v1/adapters/v-nope", headers=AUTH).status_code == 404
    assert http.post("/v1/adapters/v-nope/promote", headers=AUTH).status_code == 404
    assert http.get("/v1/dashboard", headers=AUTH, params={"limit": "x"}).status_code == 400


def test_a_wrong_method_names_every_method_of_the_path(env):
    reply = env["http"].request("DELETE", "/v1/iterations", headers=AUTH)
    assert reply.status_code == 405
    assert set(reply.headers["allow"].split(", ")) == {"GET", "POST"}
