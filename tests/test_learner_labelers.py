"""The learner leaves out a labeler who fails the golden items: the exclusion rule on its
own, then one real iteration (tiny model, private Redis db 12) whose metrics and published
manifest show it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from learner.config import LearnerConfig
from learner.iteration import Learner
from learner.labeler_filter import exclude_labelers
from learner.records import Progress
from rlhf import adapter_store, comparisons, tasks
from rlhf.agreement import Golden
from rlhf.modeling import load_model
from rlhf.settings import from_flat
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb

DB = 12
GOLDEN = [(f"g{i}", f"What is {i} + 1?", [f"{i + 1}.", f"{i + 7}, surely."]) for i in range(3)]
TASKS = [("What is 2 + 3?", "5"), ("What is 4 + 1?", "5"), ("What is 6 - 2?", "4")]


def record(rid: str, labeler: str, prompt: str, texts: list[str], ranks: list[int],
           task_id: str = "") -> fb.Comparison:
    rec = fb.Comparison(id=rid, labeler_id=labeler, task_id=task_id,
                        messages=[pb.ChatMessage(role="user", content=prompt)])
    for pos, (text, rank) in enumerate(zip(texts, ranks, strict=True)):
        rec.candidates.add(text=text, adapter_version="base", position=pos, rank=rank)
    rec.received_at.FromMilliseconds(1_700_000_000_000)
    return rec


def dataset() -> list[fb.Comparison]:
    """alice and bob rank every golden item right, mallory ranks each one upside down; all
    three rank free-chat turns (the short right answer first)."""
    out = []
    for who in ("alice", "bob", "mallory"):
        wrong = who == "mallory"
        for task_id, prompt, texts in GOLDEN:
            out.append(record(f"{who}-{task_id}-0001", who, prompt, texts,
                              [2, 1] if wrong else [1, 2], task_id))
        for i, (prompt, answer) in enumerate(TASKS * 2):
            out.append(record(f"{who}-free-{i:04d}", who, prompt,
                              [f"{answer}.", "banana banana"], [1, 2]))
    return out


def golden() -> dict[str, Golden]:
    return {task_id: Golden(ranking={texts[0]: 1, texts[1]: 2})
            for task_id, _, texts in GOLDEN}


def test_exclusion_needs_a_threshold_and_enough_evidence():
    data = dataset()
    kept, m = exclude_labelers(data, golden(), 0.0, 0.0, 1)
    assert kept == data and m["rm/excluded_labelers"] == 0
    kept, m = exclude_labelers(data, golden(), 0.5, 0.0, 3)
    # mallory: 0 of 3 golden pairs -> golden accuracy 0 < 0.5, on 3 golden items
    assert m["labelers/excluded"] == {"mallory": "golden accuracy 0.000 < 0.5 on 3 golden items"}
    assert m["rm/excluded_comparisons"] == 9 and {c.labeler_id for c in kept} == {"alice", "bob"}
    assert m["labelers/golden_accuracy"] == {"alice": 1.0, "bob": 1.0, "mallory": 0.0}
    _, m = exclude_labelers(data, golden(), 0.5, 0.0, 4)  # 3 items are not enough evidence
    assert m["labelers/excluded"] == {}


@pytest.fixture()
def env(tiny_model_dir: Path, redis_server, tmp_path) -> Iterator[dict]:
    torch.set_num_threads(1)
    url = redis_server.db_url(DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    lines = [tasks.Task(task_id, (("user", prompt),), 0, tuple(map(tasks.Candidate, texts)),
                        golden()[task_id]) for task_id, prompt, texts in GOLDEN]
    tasks.load(client, lines)
    comparisons.append_many(client, dataset())
    cfg = from_flat(LearnerConfig, dict(
        model=str(tiny_model_dir), device="cpu", redis_url=url, data_dir=str(tmp_path / "d"),
        adapter_store=str(tmp_path / "store"), prompts_per_iteration=4, eval_prompts=2,
        ptx_eval_texts=2, rm_batch=4, rm_epochs=1, rm_max_length=64, rm_lora_rank=2,
        rm_heldout_fraction=0.3, rm_min_golden_accuracy=0.6, rm_min_scored=2, ppo_steps=1,
        ppo_batch_size=2, ppo_minibatch_size=2, ppo_max_new_tokens=6, ppo_lora_rank=2,
        progress_bars=False))
    learner = Learner(cfg, load_model(cfg.model, device="cpu"))
    try:
        yield {"learner": learner, "client": client, "cfg": cfg}
    finally:
        learner.close()
        client.flushdb()
        client.close()


def test_an_iteration_leaves_out_the_labeler_who_fails_golden_items(env):
    learner, client = env["learner"], env["client"]
    progress = learner.run(Progress(id=learner.new_id()))
    m = progress.metrics
    assert progress.status == "done", progress.error
    assert list(m["labelers/excluded"]) == ["mallory"]
    assert m["rm/excluded_labelers"] == 1 and m["rm/excluded_comparisons"] == 9
    assert m["data/comparisons"] == 27
    # the held-out split stays by labeler, over alice and bob only (9 comparisons each)
    assert m["rm/split"] == "labeler" and m["rm/heldout_comparisons"] == 9
    assert m["rm/train_comparisons"] == 9
    manifest = adapter_store.get_manifest(client, progress.version)
    assert manifest.metrics["rm/excluded_labelers"] == 1
    assert manifest.config["rm"]["min_golden_accuracy"] == 0.6
    assert manifest.config["rm"]["min_scored"] == 2


def test_operators_load_tasks_through_the_admin_api(env):
    from fastapi.testclient import TestClient

    from learner.admin_api import Runner, create_app

    http = TestClient(create_app(Runner(env["learner"]), "tok"))
    auth = {"Authorization": "Bearer tok"}
    body = '{"id": "q1", "prompt": "Hello?"}\n{"id": "q2", "prompt": "Bye?", "labelers": 3}\n'
    assert http.post("/v1/tasks", content=body).status_code == 401
    reply = http.post("/v1/tasks", content=body, headers=auth)
    assert reply.status_code == 200 and reply.json() == {"loaded": 2, "golden": 0,
                                                         "overlapped": 1}
    again = http.post("/v1/tasks", content=body, headers=auth)
    assert again.status_code == 400 and "'q1' is queued already" in again.json()["detail"]
    bad = http.post("/v1/tasks", content='{"id": "q3", "prompt": "ok"}\n{"prompt": ""}',
                    headers=auth)
    assert bad.status_code == 400 and "line 2: prompt is empty" in bad.json()["detail"]
    assert tasks.get(env["client"], "q3") is None and tasks.get(env["client"], "q2").wanted == 3
    assert "/v1/tasks" in http.get("/openapi.json", headers=auth).json()["paths"]
