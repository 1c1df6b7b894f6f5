"""Crash safety and resume of the learner (docs/design.md §5): a restarted learner continues the
same policy (bitwise: LoRA, value head, Adam, adaptive beta, PPO step) from its checkpoint
with parent = the version it published last and the same reference (base, adapters off;
tests/test_sft.py: the SFT adapter); `rlhf learn` processes SIGKILLed at every phase (and
inside SFT and publish), with new comparisons and demonstrations each round, leave only
complete adapter versions, lose or double-count no comparison, show the killed iteration
as "interrupted", redo a lost SFT, and the next iteration publishes with the right parent.

Tiny starter model, private Redis dbs 7 (in-process) and 8 (child processes). The kill points
are reached through the test hook ``RLHF_LEARN_TEST_PAUSE_FILE`` (learner/records.py), which
blocks the iteration's worker there: no race with fast phases.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch
from safetensors.torch import load_file

from learner import checkpoint, records
from learner.config import LearnerConfig
from learner.iteration import CHECKPOINT, Learner, Progress
from learner.ppo import POLICY, rollout
from learner.ppo import score as ppo_score
from learner.records import PAUSE_ENV
from rlhf import adapter_store
from rlhf.comparisons import append_many
from rlhf.modeling import load_model
from rlhf.settings import from_flat
from tests.conftest import ROOT
from tests.test_learner_iteration import demos, submit

SMALL = dict(prompts_per_iteration=8, eval_prompts=3, ptx_eval_texts=4, rm_batch=4,
             rm_max_length=96, rm_lora_rank=4, rm_heldout_fraction=0.3, ppo_steps=2,
             ppo_batch_size=4, ppo_minibatch_size=2, ppo_max_new_tokens=12, ppo_lora_rank=4,
             ppo_ptx_coef=0.5, ppo_target_kl=0.5, ppo_kl_coef=0.05, progress_bars=False)


def db_url(redis_server, db: int) -> str:
    return redis_server.db_url(db)


def policy_state(learner: Learner) -> dict:
    """Everything the next iteration continues from, as plain tensors and numbers."""
    ppo = learner.ppo
    assert ppo is not None
    return {"policy": checkpoint.policy_tensors(ppo),
            "value_head": {k: v.clone() for k, v in ppo.value_head.state_dict().items()},
            "adam": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                     for i, s in ppo.optimizer.state_dict()["state"].items()},
            "beta": ppo.kl_ctl.value, "step": ppo.step, "parent": learner.parent}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_bitwise_equal(a[key], b[key])
        elif torch.is_tensor(a[key]):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_restart_continues_the_same_policy_from_its_checkpoint(tiny_model_dir, redis_server,
                                                               tmp_path):
    torch.set_num_threads(1)
    url = db_url(redis_server, 7)
    client = redis.Redis.from_url(url)
    client.flushdb()
    cfg = from_flat(LearnerConfig, dict(
        model=str(tiny_model_dir), device="cpu", redis_url=url, data_dir=str(tmp_path / "data"),
        adapter_store=str(tmp_path / "store"), consumer="resume-learner", **SMALL))
    first = Learner(cfg, load_model(cfg.model, device="cpu"))
    assert first.ppo is None and first.parent is None  # a fresh data dir: from the base
    submit(client, 0, 9)
    done = first.run(Progress(first.new_id()))
    assert done.status == "done" and done.version == "v1"
    at_publish = policy_state(first)
    assert at_publish["beta"] != SMALL["ppo_kl_coef"]  # the adaptive controller moved it
    assert at_publish["parent"] == "v1" and at_publish["step"] == SMALL["ppo_steps"]
    # The published adapter holds exactly these weights (PEFT drops the adapter name).
    published = load_file(Path(cfg.adapter_store) / "v1" / "adapter_model.safetensors")
    assert {n.replace(f".{POLICY}.", "."): t for n, t in at_publish["policy"].items()
            }.keys() == published.keys()
    for name, tensor in at_publish["policy"].items():
        assert torch.equal(tensor, published[name.replace(f".{POLICY}.", ".")]), name
    prompts = ["What is 2 + 3?", "What is 6 - 2?"]
    torch.manual_seed(123)
    ro = rollout(first.ppo, prompts)
    before = ppo_score(first.ppo, ro)
    first.close()

    # Leftovers of kills: a publish's staging folders, a manifest-less version, a half
    # checkpoint. The restart sweeps them and keeps every complete thing.
    store = Path(cfg.adapter_store)
    (store / ".tmp-v9-0badc0de").mkdir()
    (store / "v8").mkdir()
    (store / "v8" / adapter_store.CONFIG_FILE).write_text("{}")
    (Path(cfg.data_dir) / ".publish-x1").mkdir()
    (Path(cfg.data_dir) / CHECKPOINT / ".tmp-deadbeef").mkdir()
    (Path(cfg.data_dir) / CHECKPOINT / "000009-v9").mkdir()  # no manifest: incomplete

    second = Learner(cfg, load_model(cfg.model, device="cpu"))
    try:
        assert_bitwise_equal(policy_state(second), at_publish)
        assert second.ppo is not None and second.ppo.ref_adapter is None
        after = ppo_score(second.ppo, ro)  # the same samples, scored by the new process
        assert torch.equal(after.ref_logprobs, before.ref_logprobs)  # the same reference
        assert torch.equal(after.logprobs, before.logprobs)  # the same policy
        assert not torch.equal(after.logprobs, after.ref_logprobs)  # which is not the base
        assert sorted(p.name for p in store.iterdir()) == ["v1"]
        assert not (Path(cfg.data_dir) / ".publish-x1").exists()
        assert [p.name for p in (Path(cfg.data_dir) / CHECKPOINT).iterdir()] == ["000001-v1"]

        submit(client, 9, 3)
        again = second.run(Progress(second.new_id()))
        assert again.version == "v2" and again.metrics["data/comparisons"] == 12
        assert again.metrics["ppo/total_steps"] == 2 * SMALL["ppo_steps"]  # continued
        assert adapter_store.verify(store, "v2", cfg.model).parent == "v1"
        assert [p.name for p in (Path(cfg.data_dir) / CHECKPOINT).iterdir()] == ["000002-v2"]
    finally:
        second.close()

    # A checkpoint of another base model is refused with a clear error (no silent restart
    # from the base) and the dataset is released for the next try.
    other = dataclasses.replace(load_model(cfg.model, device="cpu"), name="someone/else-7b")
    with pytest.raises(checkpoint.CheckpointError, match="someone/else-7b"):
        Learner(cfg, other)
    fresh = Learner(dataclasses.replace(cfg, data_dir=str(tmp_path / "fresh")),
                    load_model(cfg.model, device="cpu"))
    assert fresh.ppo is None and fresh.parent is None
    fresh.close()
    Learner(cfg, load_model(cfg.model, device="cpu")).close()  # the lock was released
    client.flushdb()
    client.close()


def test_startup_marks_only_this_learners_unfinished_records(redis_server, tmp_path):
    """The kill windows of a record write (disk first, then Redis) and other learners'
    records: only what this learner left running becomes "interrupted"."""
    client = redis.Redis.from_url(db_url(redis_server, 7))
    client.flushdb()
    folder = tmp_path / "iterations"
    mine = dict(learner="me", phase="ppo", status="running")
    records.save(client, folder, {"id": "it-0001", **mine})  # killed in ppo
    records.save(client, folder, {"id": "it-0002", **mine, "phase": "record"})
    finished = {"id": "it-0002", **mine, "phase": "record", "status": "done"}
    (folder / "it-0002.json").write_text(json.dumps(finished))  # killed before the Redis write
    folder.joinpath("it-0003.json").write_text(json.dumps({"id": "it-0003", **mine}))  # no Redis
    records.save(client, tmp_path / "other", {"id": "it-0004", **mine, "learner": "other"})
    client.hset(records.RECORDS, "it-0005", json.dumps({"id": "it-0005", **mine}))  # no disk

    assert records.mark_interrupted(client, folder, "me") == ["it-0001", "it-0003", "it-0005"]
    by_id = {r["id"]: r for r in records.history(client)}
    assert [by_id[i]["status"] for i in ("it-0001", "it-0002", "it-0003", "it-0004",
                                         "it-0005")] == [
        "interrupted", "done", "interrupted", "running", "interrupted"]
    assert "during phase 'ppo'" in by_id["it-0001"]["error"]
    assert json.loads((folder / "it-0001.json").read_text())["status"] == "interrupted"
    assert json.loads((folder / "it-0002.json").read_text())["status"] == "done"
    assert records.mark_interrupted(client, folder, "me") == []  # once
    ids = [i.decode() for i in client.lrange(records.HISTORY, 0, -1)]
    assert sorted(ids) == [f"it-000{i}" for i in range(1, 6)]  # each listed once
    client.flushdb()
    client.close()


# -- real SIGKILLs of `rlhf learn` -------------------------------------------------------------


class Learn:
    """One `rlhf learn` child; stderr goes to a log file (read for the pause line)."""

    def __init__(self, env: dict) -> None:
        flags = [(f"--{k}={v}" if not isinstance(v, bool) else f"--{'' if v else 'no-'}{k}"
                  ).replace("_", "-") for k, v in SMALL.items()]
        cmd = [sys.executable, "-m", "rlhf.cli", "learn", "--model", env["model"],
               "--device", "cpu", "--threads", "1", "--port", "0", "--consumer",
               "crash-learner", "--data-dir", env["data"], "--adapter-store", env["store"],
               *flags]
        child_env = {**os.environ, "RLHF_LEARN_REDIS_URL": env["url"],
                     PAUSE_ENV: env["pause_file"]}
        self.log = Path(env["root"]) / f"learn-{time.monotonic_ns()}.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                                         text=True, env=child_env)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line, f"rlhf learn exited: {self.tail()}"
        self.event = json.loads(line)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.event['port']}",
                                 timeout=30)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def trigger(self) -> str:
        reply = self.http.post("/v1/iterations")
        assert reply.status_code == 202, reply.text
        return reply.json()["id"]

    def iteration(self, iteration_id: str) -> dict:
        return self.http.get(f"/v1/iterations/{iteration_id}").json()

    def wait_paused(self, point: str, limit: float = 120.0) -> None:
        deadline, marker = time.monotonic() + limit, f"{PAUSE_ENV}: pausing at {point} "
        while marker not in self.log.read_text():
            assert self.proc.poll() is None, self.tail()
            assert time.monotonic() < deadline, f"never paused at {point}: {self.tail()}"
            time.sleep(0.05)

    def wait_done(self, iteration_id: str, limit: float = 180.0) -> dict:
        deadline = time.monotonic() + limit
        while (body := self.iteration(iteration_id))["status"] == "running":
            assert time.monotonic() < deadline, f"{iteration_id} still running: {self.tail()}"
            time.sleep(0.1)
        assert body["status"] == "done", (body.get("error"), self.tail())
        return body

    def kill(self) -> None:
        self.http.close()
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def crash_env(tiny_model_dir, redis_server, tmp_path_factory) -> Iterator[dict]:
    """One data dir, store and Redis db for all kill points; ``env["learn"]`` is the process
    the previous point restarted (each point kills it and starts the next one: one process
    start per point, not two)."""
    url = db_url(redis_server, 8)
    client = redis.Redis.from_url(url)
    client.flushdb()
    root = tmp_path_factory.mktemp("crash")
    env = {"model": str(tiny_model_dir), "url": url, "root": str(root), "client": client,
           "data": str(root / "data"), "store": str(root / "store"), "submitted": 0,
           "pause_file": str(root / "pause-at"), "learn": None,
           "demo_texts": set()}  # one text counts once in the SFT set
    yield env
    if env["learn"] is not None:
        env["learn"].stop()
    client.flushdb()
    client.close()


def assert_store_complete(env: dict) -> None:
    """Every folder in the store is a complete, verifying version; the registry lists only
    those, and its current version is one of them."""
    store, client = Path(env["store"]), env["client"]
    folders = sorted(p.name for p in store.iterdir()) if store.is_dir() else []
    for name in folders:
        assert not name.startswith("."), f"leftover {name} in the store"
        adapter_store.verify(store, name, env["model"])  # manifest + sha256 of every file
    registered = adapter_store.list_versions(client)
    assert set(registered) <= set(folders)
    current = adapter_store.current(client)
    assert current is None or current in registered


# Where the learner is killed; "publish:stored" = adapter files complete in the store, not
# yet checkpointed; "publish:checkpointed" = checkpointed, not yet in the registry.
POINTS = ["drain", "sft", "sft:trained", "reward_model", "ppo", "evaluate", "publish",
          "publish:stored", "publish:checkpointed", "record"]
FAST = {"sft:trained", "ppo", "publish:checkpointed"}


@pytest.mark.parametrize("point", [p if p in FAST else pytest.param(p, marks=pytest.mark.slow)
                                   for p in POINTS])
def test_sigkill_at_each_phase_loses_nothing_and_resumes(crash_env, point):
    env, client, phase = crash_env, crash_env["client"], point.split(":")[0]
    pause = Path(env["pause_file"])
    doomed = env["learn"] or Learn(env)
    env["learn"] = None
    submit(client, env["submitted"], 6)  # new work each round: drained in or after the kill
    new_demos = demos(2, start=env["submitted"])  # so every iteration has SFT to do
    append_many(client, new_demos)
    env["demo_texts"].update((d.messages[0].content, d.answer) for d in new_demos)
    env["submitted"] += 6
    last = adapter_store.list_versions(client)
    parent_before = last[-1] if last else None
    try:
        pause.write_text(point)
        killed = doomed.trigger()
        doomed.wait_paused(point)
        listed = doomed.http.get("/v1/iterations").json()["iterations"]
        assert [h["status"] for h in listed if h["id"] == killed] == ["running"]  # once
    finally:
        doomed.kill()
        pause.unlink()
    on_disk = json.loads((Path(env["data"]) / "iterations" / f"{killed}.json").read_text())
    assert on_disk["status"] == "running" and on_disk["phase"] == phase  # the kill is visible
    store = Path(env["store"])
    left = sorted(p.name for p in store.iterdir()) if store.is_dir() else []

    learn = env["learn"] = Learn(env)
    record = learn.iteration(killed)
    assert record["status"] == "interrupted" and record["phase"] == phase
    assert repr(phase) in record["error"] and "restarted" in record["error"]
    on_disk = json.loads((Path(env["data"]) / "iterations" / f"{killed}.json").read_text())
    assert on_disk["status"] == "interrupted"
    assert_store_complete(env)
    # A kill after the checkpoint is finished at restart (that version gets registered and
    # the policy continues from it); a kill before it continues from the previous version.
    versions = adapter_store.list_versions(client)
    after_checkpoint = point in ("publish:checkpointed", "record")
    assert len(versions) == len(last) + after_checkpoint
    expected_parent = versions[-1] if after_checkpoint else parent_before
    assert learn.event["resumed_from"] == expected_parent
    assert adapter_store.current(client) == expected_parent

    new = learn.wait_done(learn.trigger())
    assert new["metrics"]["data/comparisons"] == env["submitted"]  # none lost or doubled
    # A kill before the checkpoint lost that iteration's SFT: it is redone on all the
    # demonstrations, though the killed drain had stored every one; after the checkpoint
    # the reference already learned from them all: skipped.
    assert new["metrics"]["data/demonstrations"] == len(env["demo_texts"])
    assert new["metrics"]["sft/ran"] is not after_checkpoint
    assert new["skipped"] == (["sft"] if after_checkpoint else [])
    if not after_checkpoint:
        assert new["metrics"]["sft/demonstrations"] == len(env["demo_texts"])
    assert new["version"] not in left  # a version number allocated before the kill: skipped
    manifest = adapter_store.verify(env["store"], new["version"], env["model"])
    assert manifest.parent == expected_parent
    assert adapter_store.current(client) == new["version"]
    status = learn.http.get("/v1/status").json()
    assert status["dataset_size"] == env["submitted"] and not status["running"]
    history = [h["id"] for h in learn.http.get("/v1/iterations").json()["iterations"]]
    assert history.count(killed) == 1 and history[-1] == new["id"]
    assert_store_complete(env)
