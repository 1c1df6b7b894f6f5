"""Demonstrations in the learner: the intake drains the demonstrations stream into its durable
dataset (private Redis db 15), dead-letters what breaks the contract without losing the rest;
the SFT set counts one text once; the drain phase of a real Learner (tiny model) puts it on
``Work`` with its metrics."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from learner.dataset import ComparisonDataset, DemonstrationDataset
from learner.demonstrations import count_new, derived_id, from_comparison, sft_demonstrations
from learner.intake import Intake, StreamResult
from rlhf.comparisons import COMPARISONS, DEMONSTRATIONS, append_many, encode_entry
from rlhf.contract import validate_demonstration
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb
from tests.conftest import RedisServer

KEYS = [k for lay in (COMPARISONS, DEMONSTRATIONS)
        for k in (lay.stream, lay.id_index, lay.dead_letter)]


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return redis_server.db_url(15)


@pytest.fixture
def r(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    client.delete(*KEYS)
    yield client
    client.delete(*KEYS)
    client.close()


def user(text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role="user", content=text)


def demo(i: int, labeler: str = "alice", **kw) -> fb.Demonstration:
    kw.setdefault("answer", f"answer {i}")
    kw.setdefault("messages", [user(f"question {i}?")])
    kw.setdefault("source", fb.DEMONSTRATION_SOURCE_API)
    d = fb.Demonstration(id=f"demo-{i:06d}", labeler_id=labeler, **kw)
    d.received_at.FromMilliseconds(1_700_000_000_000 + i)
    return d


def comparison(i: int, ideal: str = "", messages=None) -> fb.Comparison:
    c = fb.Comparison(id=f"cmp-{i:06d}", labeler_id="bob", ideal_answer=ideal,
                      messages=messages or [user(f"question {i}?")])
    for j in range(2):
        c.candidates.add(text=f"c{j}", adapter_version="base", position=j, rank=j + 1)
    c.received_at.FromMilliseconds(1_700_000_000_000 + i)
    return c


def test_intake_drains_both_streams_and_dead_letters_a_corrupt_demonstration(r, url, tmp_path):
    good = [demo(i) for i in range(5)]
    append_many(r, [*good[:2], comparison(1), *good[2:]])
    corrupt = encode_entry(demo(90))
    corrupt[b"record"] = base64.b64encode(b"\xff\xfe not protobuf")
    ends_on_assistant = demo(91)
    ends_on_assistant.messages.add(role="assistant", content="already answered")
    r.xadd(DEMONSTRATIONS.stream, corrupt)
    r.xadd(DEMONSTRATIONS.stream, encode_entry(ends_on_assistant))
    r.xadd(DEMONSTRATIONS.stream, encode_entry(good[0]))  # again, past the id index
    append_many(r, [demo(5)])
    with ComparisonDataset(tmp_path / "c") as cds, DemonstrationDataset(tmp_path / "d") as dds:
        intake = Intake(url, cds, "learner-test", batch=3, demonstrations=dds)
        result = intake.drain()
        assert (result.read, result.stored) == (1, 1)  # the comparisons stream
        assert result.demonstrations == StreamResult(read=9, stored=6, duplicates=1,
                                                     malformed=2, acked=9)
        assert intake.drain().demonstrations.read == 0
        intake.close()
        assert dds.load_all() == [*good, demo(5)] and len(cds) == 1
        assert dds.labeler_counts() == {"alice": 6}
    dead = r.xrange(DEMONSTRATIONS.dead_letter)
    assert [f[b"id"] for _, f in dead] == [b"demo-000090", b"demo-000091"]
    assert b"not a binary rlhf.v1.Demonstration" in dead[0][1][b"dead:reason"]
    assert b"messages[1].role" in dead[1][1][b"dead:reason"]
    assert r.xlen(COMPARISONS.dead_letter) == 0
    assert r.xpending(DEMONSTRATIONS.stream, "learner")["pending"] == 0
    assert sorted(p.name for p in (tmp_path / "d").glob("*.bin")) == [
        "demonstrations-000001.bin"]
    with DemonstrationDataset(tmp_path / "d", readonly=True) as again:  # durable
        assert again.load_all() == [*good, demo(5)]


def test_a_comparisons_ideal_answer_becomes_a_valid_deterministic_demonstration():
    c = comparison(1, ideal="  The answer is 2.  ")
    d = from_comparison(c)
    validate_demonstration(d)
    assert d.id == derived_id(c.id) == from_comparison(c).id and d.id != derived_id("cmp-2xyz")
    assert (d.source, d.comparison_id, d.labeler_id) == (
        fb.DEMONSTRATION_SOURCE_COMPARISON, c.id, "bob")
    assert list(d.messages) == list(c.messages) and d.received_at == c.received_at
    assert from_comparison(comparison(2)) is None  # no ideal answer
    ends_on_answer = [user("hi"), pb.ChatMessage(role="assistant", content="hello")]
    assert from_comparison(comparison(3, "better", ends_on_answer)) is None


def test_one_text_counts_once():
    ui = demo(1, source=fb.DEMONSTRATION_SOURCE_UI, comparison_id="cmp-000001",
              answer="The answer is 2.", messages=[user("question 1?")])
    other_context = comparison(4, ideal="The answer is 2.", messages=[user("other?")])
    comparisons = [comparison(1, ideal="The answer is 2.\n"),  # = the UI demonstration
                   comparison(2, ideal="Something else."),
                   comparison(3),  # no ideal answer
                   other_context]
    copy = demo(7, answer="answer 5", messages=[user("question 5?")])  # = demo(5)'s text
    out = sft_demonstrations([ui, demo(5), copy, demo(5)], comparisons)
    assert [d.id for d in out] == [ui.id, "demo-000005", derived_id("cmp-000002"),
                                   derived_id("cmp-000004")]
    # A different answer beside the same comparison is a second demonstration.
    changed = comparison(1, ideal="A different, longer answer.")
    assert len(sft_demonstrations([ui], [changed])) == 2
    assert count_new(out, {ui.id}, {"cmp-000001", "cmp-000002"}) == 2  # demo 5, cmp 4


@pytest.fixture(scope="module")
def learner(tiny_model_dir: Path, redis_server: RedisServer, tmp_path_factory):
    from learner.config import LearnerConfig
    from learner.iteration import Learner
    from rlhf.modeling import load_model

    torch.set_num_threads(1)
    url = redis_server.db_url(15)
    root = tmp_path_factory.mktemp("sft-set")
    cfg = LearnerConfig(model=str(tiny_model_dir), device="cpu", redis_url=url,
                        data_dir=str(root / "data"), adapter_store=str(root / "store"),
                        consumer="demo-learner")
    lrn = Learner(cfg, load_model(cfg.model, device="cpu"))
    yield lrn
    lrn.close()


def test_the_drain_phase_puts_the_sft_set_on_work(learner, r):
    from learner.iteration import Progress, Work

    append_many(r, [comparison(1, ideal="Two."), comparison(2),
                    demo(1, source=fb.DEMONSTRATION_SOURCE_UI, comparison_id="cmp-000001",
                         answer="Two.", messages=[user("question 1?")]), demo(2)])
    work, progress = Work(), Progress("it-test")
    learner.drain(work, progress)
    assert [d.id for d in work.demonstrations] == ["demo-000001", "demo-000002"]
    assert work.new_demonstrations == 2
    assert (progress.metrics["data/demonstrations"],
            progress.metrics["data/demonstrations_new"]) == (2, 2)
    assert (learner.data_dir / "demonstrations").is_dir()
    append_many(r, [comparison(3, ideal="Three.")])
    work, progress = Work(), Progress("it-test-2")
    learner.drain(work, progress)
    assert work.new_demonstrations == 1 and len(work.demonstrations) == 3
    assert progress.metrics["data/demonstrations_new"] == 1
