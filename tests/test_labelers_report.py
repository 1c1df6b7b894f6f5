"""rlhf.labelers' report over Comparison records, and `rlhf data export --labelers` (CSV and
JSON) from a real Redis stream with golden tasks queued."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import redis

from rlhf import comparisons, tasks
from rlhf.agreement import Golden
from rlhf.labelers import LabelerStats, excluded
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb
from tests.conftest import ROOT

DB = 10


def rec(rid: str, who: str, task: str, ranks: list[int], texts=("A", "B", "C"),
        ms: int = 0, flag: bool = False) -> fb.Comparison:
    r = fb.Comparison(id=rid, labeler_id=who, task_id=task, rank_time_ms=ms,
                      messages=[pb.ChatMessage(role="user", content="q")])
    for pos, (text, rank) in enumerate(zip(texts, ranks, strict=True)):
        r.candidates.add(text=text, adapter_version="base", position=pos, rank=rank)
    if flag:
        r.candidates[0].flags.append(fb.FLAG_HARMFUL)
    r.received_at.FromMilliseconds(1_700_000_000_000)
    return r


def records() -> list[fb.Comparison]:
    return [
        # t1 overlapped: alice A>B>C, bob A>C>B -> 2 of 3 pairs agree
        rec("r-alice-t1", "alice", "t1", [1, 2, 3], ms=4000),
        rec("r-bob-t1", "bob", "t1", [1, 3, 2], ms=10_000, flag=True),
        # g1 golden (known best "A"): alice hits, bob ties A with B -> 0.5
        rec("r-alice-g1", "alice", "g1", [1, 2, 3], ms=6000),
        rec("r-bob-g1", "bob", "g1", [1, 1, 3], ms=2000),
        # free chat: counts for time and flags only
        rec("r-bob-free", "bob", "", [1, 2, 3], ms=3000, flag=True),
    ]


GOLDEN = {"g1": Golden(best="A")}


def test_report_by_hand():
    report = LabelerStats().extend(records()).report(GOLDEN)
    alice, bob = report["labelers"]
    # alice: agreement 2/3 over 3 pairs; golden 1 of 1; median of 4 s and 6 s = 5 s; no flags
    assert alice == {"labeler": "alice", "comparisons": 2, "tasks": 2,
                     "agreement": pytest.approx(2 / 3), "agreement_pairs": 3,
                     "golden_accuracy": 1.0, "golden_items": 1, "median_rank_s": 5.0,
                     "flag_rate": 0.0}
    # bob: golden 0.5 (a tied top); median of 10, 2, 3 s = 3 s; 2 of 3 rankings flagged
    assert bob["golden_accuracy"] == 0.5 and bob["median_rank_s"] == 3.0
    assert bob["flag_rate"] == pytest.approx(2 / 3) and bob["comparisons"] == 3
    assert report["pairs"] == [{"a": "alice", "b": "bob", "agreement": pytest.approx(2 / 3),
                                "pairs": 3}]
    overall = report["overall"]
    assert overall["overlapped_tasks"] == 1 and overall["golden_tasks"] == 1
    # alpha over t1's units A (1, 1), B (2, 3), C (3, 2): o11 = 2, o23 = o32 = 2;
    # n1 = 2, n2 = 2, n3 = 2, n = 6; d12 = (4 - 2)^2 = 4, d23 = 4, d13 = (6 - 2)^2 = 16;
    # observed = 2 * 2 * d23 = 16; expected = 2 (4*4 + 4*16 + 4*4) = 192;
    # alpha = 1 - 5 * 16 / 192 = 7 / 12
    assert overall["alpha"] == pytest.approx(7 / 12)
    assert excluded(report, min_golden_accuracy=0.75) == {
        "bob": "golden accuracy 0.500 < 0.75 on 1 golden items"}
    assert excluded(report, min_golden_accuracy=0.75, min_scored=2) == {}


@pytest.fixture()
def r(redis_server):
    client = redis.Redis.from_url(redis_server.db_url(DB))
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_export_labelers_csv_and_json(r, redis_server, tmp_path):
    tasks.load(r, [tasks.Task("g1", (("user", "q"),), 0, tuple(map(tasks.Candidate, "ABC")),
                              GOLDEN["g1"])])
    comparisons.append_many(r, records())
    url = redis_server.db_url(DB)
    for name in ("labelers.csv", "labelers.json"):
        out = tmp_path / name
        run = subprocess.run([sys.executable, "-m", "rlhf.cli", "data", "export", "--labelers",
                              "--redis-url", url, "--out", str(out)], cwd=ROOT,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["labelers"] == 2
    rows = list(csv.DictReader((tmp_path / "labelers.csv").open()))
    assert [row["labeler"] for row in rows] == ["alice", "bob"]
    assert float(rows[1]["golden_accuracy"]) == 0.5 and rows[0]["golden_items"] == "1"
    body = json.loads((tmp_path / "labelers.json").read_text())
    assert body["pairs"][0]["pairs"] == 3 and body["overall"]["golden_tasks"] == 1
