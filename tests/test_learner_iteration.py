"""One learner iteration end to end: comparisons in Redis (as the Feedback service writes
them) -> admin API trigger -> drain, RM, PPO, evaluate, publish v1 -> a serving replica
follows the registry to v1; a second iteration publishes v2 with parent v1.

Tiny starter model, private Redis db 3, the admin app in-process (TestClient), the
iteration on its worker thread.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
import torch
from fastapi.testclient import TestClient

from learner import records
from learner.admin_api import Runner, create_app
from learner.config import LearnerConfig
from learner.iteration import HISTORY, Learner
from learner.reward_model import fit_reward_model
from rlhf import adapter_store, comparisons
from rlhf.modeling import load_model
from rlhf.settings import from_flat
from rlhf.starter_data import make_tasks
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg
from tests.conftest import ROOT, ServerProcess

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TASKS = [("What is 2 + 3?", "5"), ("What is 4 + 1?", "5"), ("What is 6 - 2?", "4"),
         ("What is 3 + 3?", "6"), ("What is 7 - 5?", "2"), ("What is 1 + 8?", "9")]


def make_comparison(i: int, prompt: str, answer: str) -> fb.Comparison:
    """K=3, a clear preference: the short right answer, then a wordy one, then nonsense."""
    rec = fb.Comparison(id=f"cmp-{i:04d}", labeler_id=f"labeler-{i % 3}",
                        messages=[pb.ChatMessage(role="user", content=prompt)])
    texts = [f"{answer}.", f"Sure! Great question! The answer is {answer}, I hope it helps.",
             "banana banana banana"]
    for rank, text in enumerate(texts, 1):
        rec.candidates.add(text=text, adapter_version="base", position=rank - 1, rank=rank,
                           seed=i)
    rec.received_at.FromMilliseconds(1_700_000_000_000 + i)
    return rec


def submit(client: redis.Redis, start: int, n: int) -> list[str]:
    records = [make_comparison(i, *TASKS[i % len(TASKS)]) for i in range(start, start + n)]
    replies = comparisons.append_many(client, records)
    assert not any(dup for dup, _ in replies)
    return [r.id for r in records]


def demo(i: int, prompt: str, answer: str, labeler: str = "") -> fb.Demonstration:
    d = fb.Demonstration(id=f"demo-{i:04d}", labeler_id=labeler or f"labeler-{i % 4}",
                         answer=answer, source=fb.DEMONSTRATION_SOURCE_API)
    d.messages.add(role="user", content=prompt)
    return d


def demos(n: int, start: int = 0) -> list[fb.Demonstration]:
    """A style the base never writes, so SFT has something to learn that generalises."""
    return [demo(start + i, t.prompt, f"Answer: {t.answer}. Done!")
            for i, t in enumerate(make_tasks(n, seed=5 + start))]


@pytest.fixture(scope="module")
def env(tiny_model_dir: Path, redis_server, tmp_path_factory) -> Iterator[dict]:
    torch.set_num_threads(1)
    url = redis_server.db_url(3)
    client = redis.Redis.from_url(url)
    client.flushdb()
    root = tmp_path_factory.mktemp("learner")
    cfg = from_flat(LearnerConfig, dict(
        model=str(tiny_model_dir), device="cpu", redis_url=url, data_dir=str(root / "data"),
        adapter_store=str(root / "store"), admin_token=TOKEN, prompts_per_iteration=8,
        eval_prompts=3, ptx_eval_texts=4, rm_batch=4, rm_max_length=96, rm_lora_rank=4,
        rm_heldout_fraction=0.3, ppo_steps=2, ppo_batch_size=4, ppo_minibatch_size=2,
        ppo_max_new_tokens=12, ppo_lora_rank=4, ppo_ptx_coef=0.5))
    learner = Learner(cfg, load_model(cfg.model, device="cpu"))
    runner = Runner(learner)
    http = TestClient(create_app(runner, TOKEN))
    try:
        yield {"cfg": cfg, "client": client, "learner": learner, "runner": runner,
               "http": http, "url": url}
    finally:
        runner.join(60)
        learner.close()
        client.close()


def wait_done(http: TestClient, iteration_id: str, limit: float = 120.0) -> dict:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        body = http.get(f"/v1/iterations/{iteration_id}", headers=AUTH).json()
        if body["status"] != "running":
            assert body["status"] == "done", body.get("error")
            return body
        time.sleep(0.1)
    raise AssertionError(f"{iteration_id} still running after {limit} s")


def test_auth_is_required(env):
    http = env["http"]
    assert http.get("/v1/status").status_code == 401
    assert http.post("/v1/iterations", headers={"Authorization": "Bearer nope"}
                     ).status_code == 401
    assert http.get("/v1/status", headers=AUTH).status_code == 200


def test_two_iterations_publish_v1_then_v2(env, tiny_model_dir: Path, caplog):
    http, client, cfg = env["http"], env["client"], env["cfg"]
    caplog.set_level(logging.INFO, logger="learner.iteration")
    ids = submit(client, 0, 9)

    with env["learner"].lock:  # the worker waits here, so the iteration surely still runs
        reply = http.post("/v1/iterations", headers=AUTH)
        assert reply.status_code == 202
        first = reply.json()["id"]
        assert http.post("/v1/iterations", headers=AUTH).status_code == 409  # one at a time
        running = http.get("/v1/status", headers=AUTH).json()
        assert running["running"] and running["iteration"]["id"] == first
    body = wait_done(http, first)
    env["runner"].join(60)  # the worker logs its summary line last

    m = body["metrics"]
    # One console line per iteration with the phase times and the PPO time split.
    (line,) = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith(f"iteration {first} done in")]
    assert "-> v1" in line and "reward_model" in line and "samples/s" in line
    episodes = cfg.ppo_steps * cfg.ppo.batch_size
    assert m["ppo/episodes_per_s"] == pytest.approx(episodes / sum(
        m[f"time/{k}_total_s"] for k in ("generate", "score", "train")))
    assert body["version"] == "v1" and body["phase"] == "record"
    assert set(body["seconds"]) >= {"drain", "reward_model", "ppo", "evaluate", "publish"}
    assert m["data/comparisons"] == 9 and m["data/new"] == 9
    assert sorted(env["learner"].dataset.ids()) == sorted(ids)  # each stored once
    assert 0.0 <= m["rm/accuracy"] <= 1.0 and m["rm/heldout_comparisons"] > 0
    assert "rm/bias" in m and "rm/train_loss" in m
    for key in ("ppo/kl", "ppo/score", "ppo/clip_frac", "ppo/value_loss", "ppo/ptx_loss",
                "eval/policy_score", "eval/reference_score", "eval/kl",
                "ptx/loss_before", "ptx/loss_after"):
        assert isinstance(m[key], float), key

    base = load_model(cfg.model, device="cpu").name
    manifest = adapter_store.verify(cfg.adapter_store, "v1", base)  # checksums re-hashed
    assert manifest.parent is None and manifest.base_model == str(tiny_model_dir)
    assert manifest.metrics["rm/accuracy"] == m["rm/accuracy"]
    assert manifest.config["iteration"] == first and manifest.config["admin_token"] == "***"
    assert adapter_store.current(client) == "v1"
    assert adapter_store.list_versions(client) == ["v1"]
    record = json.loads((Path(cfg.data_dir) / "iterations" / f"{first}.json").read_text())
    assert record["version"] == "v1"
    assert first.encode() in client.lrange(HISTORY, 0, -1)

    # A replica following the registry picks up v1 (docs/design.md §4).
    server = ServerProcess(tiny_model_dir, extra=[
        "--redis-url", env["url"], "--adapter-store", cfg.adapter_store,
        "--registry-poll-s", "0.2"])
    try:
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub, deadline = pbg.PolicyStub(channel), time.monotonic() + 20
            while stub.GetInfo(pb.GetInfoRequest()).current_adapter_version != "v1":
                assert time.monotonic() < deadline, "replica did not load v1"
                time.sleep(0.1)
    finally:
        server.stop()

    # Second iteration: new comparisons + all old ones; the policy continues -> v2, parent v1.
    submit(client, 9, 3)
    second = http.post("/v1/iterations", headers=AUTH).json()["id"]
    body2 = wait_done(http, second)
    assert body2["version"] == "v2" and body2["metrics"]["data/comparisons"] == 12
    assert body2["metrics"]["data/new"] == 3
    assert body2["metrics"]["ppo/total_steps"] == 2 * cfg.ppo_steps  # state carried over
    manifest2 = adapter_store.verify(cfg.adapter_store, "v2", base)
    assert manifest2.parent == "v1" and adapter_store.current(client) == "v2"

    history = http.get("/v1/iterations", headers=AUTH).json()["iterations"]
    order = [h["id"] for h in history]
    assert order.index(first) < order.index(second)
    status = http.get("/v1/status", headers=AUTH).json()
    assert not status["running"] and status["dataset_size"] == 12
    assert status["current_adapter"] == "v2" and status["last_iteration"]["id"] == second
    assert http.get("/v1/iterations/it-9999", headers=AUTH).status_code == 404

    # Auto trigger: an iteration starts once N new comparisons are in the stream.
    runner = env["runner"]
    submit(client, 12, 2)
    assert runner.new_comparisons() == 2 and runner.maybe_auto_trigger(3) is None
    third = runner.maybe_auto_trigger(2)
    assert third is not None and wait_done(http, third.id)["version"] == "v3"
    assert runner.new_comparisons() == 0


def test_admin_api_lists_shows_and_rolls_back_adapters(env):
    """After the iterations above (v1..v3): the operator's adapter routes."""
    http, client, cfg = env["http"], env["client"], env["cfg"]
    listing = http.get("/v1/adapters", headers=AUTH).json()
    assert [v["version"] for v in listing["versions"]] == ["v1", "v2", "v3"]
    assert listing["current"] == "v3"
    shown = http.get("/v1/adapters/v2", headers=AUTH).json()
    assert shown["version"] == "v2" and shown["parent"] == "v1" and shown["files"]
    assert http.get("/v1/adapters/v9", headers=AUTH).status_code == 404

    reply = http.post("/v1/adapters/v1/rollback", headers=AUTH)
    assert reply.json() == {"current": "v1", "previous": "v3"}
    assert adapter_store.current(client) == "v1"
    assert http.post("/v1/adapters/v9/promote", headers=AUTH).status_code == 404

    weights = Path(cfg.adapter_store) / "v2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")  # checksum now fails
    refused = http.post("/v1/adapters/v2/promote", headers=AUTH)
    assert refused.status_code == 409 and "checksum" in refused.json()["detail"]
    assert adapter_store.current(client) == "v1"  # nobody was sent to the bad version
    assert http.post("/v1/adapters/v3/promote", headers=AUTH).json()["current"] == "v3"


def rlhf(*args: str, env: dict | None = None) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env={**os.environ, **(env or {})})
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def test_rlhf_learn_process_and_learner_cli(env, tmp_path: Path):
    """`rlhf learn` as its own process, driven by `rlhf learner ...`: with nothing new to
    learn from (its dataset is empty, the stream already consumed) the iteration fails in
    its drain phase and says why; the API keeps answering."""
    cmd = [sys.executable, "-m", "rlhf.cli", "learn", "--model", env["cfg"].model,
           "--device", "cpu", "--threads", "1", "--port", "0",
           "--data-dir", str(tmp_path / "data"), "--adapter-store", str(tmp_path / "store")]
    child_env = {**os.environ, "RLHF_LEARN_REDIS_URL": env["url"],
                 "RLHF_LEARN_ADMIN_TOKEN": TOKEN}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=child_env)
    try:
        event = json.loads(proc.stdout.readline())
        assert event["event"] == "listening" and event["base_model"] == env["cfg"].model
        url = f"http://127.0.0.1:{event['port']}"
        rc, status = rlhf("learner", "status", "--url", url, env={"RLHF_LEARN_ADMIN_TOKEN": ""})
        assert rc == 1 and status["detail"]
        rc, status = rlhf("learner", "status", "--url", url, "--token", TOKEN)
        assert rc == 0 and status["running"] is False and status["dataset_size"] == 0
        rc, started = rlhf("learner", "trigger", "--url", url,
                           env={"RLHF_LEARN_ADMIN_TOKEN": TOKEN})
        assert rc == 0 and started["id"].startswith("it-")
        deadline = time.monotonic() + 30
        while True:
            rc, shown = rlhf("learner", "show", started["id"], "--url", url, "--token", TOKEN)
            if shown["status"] != "running":
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert shown["status"] == "failed" and shown["phase"] == "drain"
        assert "no comparisons" in shown["error"]
        rc, history = rlhf("learner", "history", "--url", url, "--token", TOKEN)
        assert rc == 0 and started["id"] in [h["id"] for h in history["iterations"]]
    finally:
        proc.terminate()
        proc.wait(30)


def test_rm_phase_reports_each_step(env):
    """``fit_reward_model(on_step=...)``: what the RM progress bar and ``progress.step``
    follow: (done, total) after every optimizer step, ending at total."""
    learner = env["learner"]
    comparisons_ = learner.dataset.load_all()[:8]
    calls: list[tuple[int, int]] = []
    metrics = fit_reward_model(learner.rm, learner.loaded.tokenizer, comparisons_,
                               learner.rm_cfg, on_step=lambda done, total: calls.append(
                                   (done, total)))
    steps = int(metrics["rm/steps"])
    assert steps >= 1 and calls == [(i, steps) for i in range(1, steps + 1)]


@pytest.mark.parametrize("tty,enabled,shown", [(True, True, True), (True, False, False),
                                               (False, True, False)])
def test_progress_bars_only_on_a_terminal_and_when_enabled(monkeypatch, tty, enabled, shown):
    master, slave = os.openpty() if tty else os.pipe()  # a terminal, or a pipe (CI logs)
    if tty:  # a new pty is 0 columns wide: give it a real terminal's size
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    stream = os.fdopen(slave, "w")
    try:
        monkeypatch.setattr(sys, "stderr", stream)
        with records.progress_bar("it-0001 ppo", 3, enabled) as bar:
            hidden = bar.disable  # (closing sets it)
            bar.update(3)
        assert hidden is not shown
        stream.flush()
        if tty:  # the pty hands data over asynchronously: wait for it (or 2 s of nothing)
            ready, _, _ = select.select([master], [], [], 2.0 if shown else 0.2)
            written = os.read(master, 65536).decode(errors="replace") if ready else ""
            assert ("it-0001 ppo" in written) is shown
    finally:
        stream.close()
        os.close(master)
