"""`rlhf data import|export` against a private Redis (db 1) and the real HH-RLHF test file."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from google.protobuf import json_format

from rlhf import data
from rlhf.cli import main as cli
from rlhf.comparisons import GROUP, ID_INDEX, STREAM, append_many, decode_entry, read_entries
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb
from serving.feedback import validate_comparison
from tests.conftest import RedisServer

HH = Path("/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
FIRST = 200
# Line 87 of the file has an empty chosen answer ("\n\nAssistant:" and nothing after it).
HH_MALFORMED = [{"line": 87, "reason": "the chosen answer is empty"}]


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return redis_server.db_url(1)


@pytest.fixture
def r(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    client.delete(STREAM, ID_INDEX)
    yield client
    client.delete(STREAM, ID_INDEX)
    client.close()


def run(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert cli(["data", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def hh_lines(n: int) -> list[dict]:
    if not HH.exists():
        pytest.skip(f"{HH} is not on this machine")
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def stored(r: redis.Redis) -> list[fb.Comparison]:
    return [decode_entry(fields) for _, fields in r.xrange(STREAM)]


def test_import_hh_stores_each_pair_once_and_reconstructs_it(r, url, capsys):
    source = hh_lines(FIRST)
    first = run(capsys, "import", "--redis-url", url, "--in", str(HH), "--limit", str(FIRST))
    assert (first["lines"], first["stored"], first["duplicates"]) == (FIRST, FIRST - 1, 0)
    assert first["malformed"] == 1 and first["malformed_lines"] == HH_MALFORMED
    assert r.xlen(STREAM) == FIRST - 1 == r.hlen(ID_INDEX)
    assert GROUP in {g["name"].decode() for g in r.xinfo_groups(STREAM)}

    again = run(capsys, "import", "--redis-url", url, "--in", str(HH), "--limit", str(FIRST))
    assert (again["stored"], again["duplicates"], again["malformed"]) == (0, FIRST - 1, 1)
    assert r.xlen(STREAM) == FIRST - 1

    by_id = {data.comparison_id(d["chosen"], d["rejected"]): d for d in source}
    records = stored(r)
    assert len({rec.id for rec in records}) == FIRST - 1
    for rec in records:
        original = by_id[rec.id]
        validate_comparison(rec, {"base"})  # what the Feedback service would accept
        assert rec.labeler_id == "imported" and rec.received_at.ToMilliseconds() > 0
        (win, lose) = rec.candidates
        assert [(c.rank, c.position, c.adapter_version) for c in (win, lose)] == [
            (1, 0, "base"), (2, 1, "base")]
        turns = [(m.role, m.content) for m in rec.messages]
        assert data.render_transcript([*turns, ("assistant", win.text)]) == original["chosen"]
        assert data.render_transcript([*turns, ("assistant", lose.text)]) == \
            original["rejected"]


def test_export_records_round_trips_and_leaves_the_group_alone(r, url, capsys, tmp_path):
    run(capsys, "import", "--redis-url", url, "--in", str(HH), "--limit", "60",
        "--labeler-id", "hh-test", "--adapter-version", "v0")
    out = tmp_path / "records.jsonl"
    summary = run(capsys, "export", "--redis-url", url, "--out", str(out))
    assert (summary["records"], summary["skipped"]) == (60, 0)
    exported = [json_format.ParseDict(json.loads(line), fb.Comparison())
                for line in out.read_text().splitlines()]
    assert exported == stored(r) and exported[0].labeler_id == "hh-test"
    assert exported[0].candidates[0].adapter_version == "v0"
    [group] = r.xinfo_groups(STREAM)  # nothing delivered, pending or acknowledged
    assert (group["pending"], group["last-delivered-id"]) == (0, b"0-0")
    paged = [entry_id for entry_id, _ in read_entries(r, page=7)]  # 60 = 8 pages of 7 + 4
    assert paged == [entry_id.decode() for entry_id, _ in r.xrange(STREAM)]


def k3_with_tie() -> fb.Comparison:
    """A = rank 1, B = rank 3, C = rank 1 (A and C tied)."""
    rec = fb.Comparison(id="hand-made-k3", labeler_id="alice",
                        messages=[pb.ChatMessage(role="user", content="Name a prime.")])
    for pos, (text, rank) in enumerate((("A: 7", 1), ("B: 9", 3), ("C: 2", 1))):
        rec.candidates.add(text=text, adapter_version="base", position=pos, rank=rank)
    rec.received_at.FromMilliseconds(1_700_000_000_000)
    return rec


def test_export_pairs_of_a_k3_record_with_a_tie(r, url, capsys, tmp_path):
    append_many(r, [k3_with_tie()])
    out = tmp_path / "pairs.jsonl.gz"
    summary = run(capsys, "export", "--redis-url", url, "--out", str(out), "--format", "pairs")
    assert (summary["records"], summary["pairs"], summary["skipped"]) == (1, 2, 0)
    prompt = [{"role": "user", "content": "Name a prime."}]

    def pair(win: str, lose: str) -> dict:
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": win}],
                "rejected": [{"role": "assistant", "content": lose}],
                "comparison_id": "hand-made-k3", "labeler_id": "alice", "margin": 2}

    # C(3,2) = 3 pairs minus the A-C tie: A over B, C over B, each by 3 - 1 = 2 ranks.
    with gzip.open(out, "rt") as f:
        assert [json.loads(line) for line in f] == [pair("A: 7", "B: 9"), pair("C: 2", "B: 9")]


def transcript(*turns: str) -> str:
    speakers = ["Human", "Assistant"]
    return "".join(f"\n\n{speakers[i % 2]}: {t}" for i, t in enumerate(turns))


def test_malformed_lines_are_reported_and_skipped(r, url, capsys, tmp_path):
    good = {"chosen": transcript("Hi", "Hello!", "2+2?", "4"),
            "rejected": transcript("Hi", "Hello!", "2+2?", "5")}
    lines = [
        json.dumps(good).encode(),                                       # 1 ok
        b"{not json",                                                    # 2
        b"[1, 2]",                                                       # 3
        json.dumps({"chosen": good["chosen"]}).encode(),                 # 4
        b'{"chosen": "\xff\xfe"}',                                       # 5
        b"   ",                                                          # 6
        json.dumps({"chosen": "Hi" + good["chosen"], "rejected": good["rejected"]}).encode(),
        json.dumps({"chosen": transcript("Hi", "a", "b", "c"),          # 8
                    "rejected": good["rejected"]}).encode(),
        json.dumps({"chosen": good["chosen"].replace("Human: Hi", "Human:Hi"),
                    "rejected": good["rejected"]}).encode(),             # 9
        json.dumps({"chosen": transcript("Hi", "Hello!", "2+2?"),      # 10
                    "rejected": good["rejected"]}).encode(),
        json.dumps({"chosen": transcript("a", "b"), "rejected": transcript("a", " ")}).encode(),
        json.dumps(good).encode(),                                       # 12 same pair again
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    summary = run(capsys, "import", "--redis-url", url, "--in", str(path))
    assert (summary["lines"], summary["stored"], summary["duplicates"]) == (12, 1, 1)
    assert summary["malformed"] == 10
    assert summary["malformed_lines"] == [
        {"line": 2, "reason": "not valid JSON (JSONDecodeError)"},
        {"line": 3, "reason": "not an object with string fields 'chosen' and 'rejected'"},
        {"line": 4, "reason": "not an object with string fields 'chosen' and 'rejected'"},
        {"line": 5, "reason": "not UTF-8"},
        {"line": 6, "reason": "empty line"},
        {"line": 7, "reason": "text before the first '\\n\\nHuman:' turn"},
        {"line": 8, "reason": "chosen and rejected differ before their last Assistant turn"},
        {"line": 9, "reason": "turn 0 has no space after 'Human:'"},
        {"line": 10, "reason": "chosen does not end with an Assistant turn"},
        {"line": 11, "reason": "the rejected answer is empty"},
    ]
    [rec] = stored(r)
    assert [(m.role, m.content) for m in rec.messages] == [
        ("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?")]
    assert [c.text for c in rec.candidates] == ["4", "5"]


@pytest.mark.parametrize(("flag", "value"), [
    ("--labeler-id", "alice\n"), ("--labeler-id", "alice "), ("--labeler-id", "al\u2028ice"),
    ("--adapter-version", "v1\n"), ("--adapter-version", "v1 "), ("--adapter-version", "has space"),
    ("--adapter-version", "../v1")])
def test_import_refuses_labeler_and_version_names_with_a_tail(url, tmp_path, flag, value):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"chosen": transcript("a", "b"), "rejected": transcript("a", "c")}))
    with pytest.raises(SystemExit) as exit_:
        cli(["data", "import", "--redis-url", url, "--in", str(path), flag, value])
    assert exit_.value.code == 2
