"""`rlhf data import|export --demonstrations` against a private Redis (db 12), and the pure
reader `read_demonstrations`: both file shapes, all-or-nothing refusal naming line and field,
an export -> import round trip."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from rlhf.cli import main as cli
from rlhf.comparisons import DEMONSTRATIONS
from rlhf.contract import MAX_CHARS, validate_demonstration
from rlhf.data import DemonstrationFileError, read_demonstrations
from rlhf.v1 import feedback_pb2 as fb
from tests.conftest import RedisServer

CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is 2 + 2?"},
                     {"role": "assistant", "content": "4."},
                     {"role": "user", "content": "And 3 + 3?"},
                     {"role": "assistant", "content": "6."}]}
PAIR = {"prompt": "Name a primary colour.", "response": "Red."}


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return redis_server.db_url(12)


@pytest.fixture
def r(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    client.delete(DEMONSTRATIONS.stream, DEMONSTRATIONS.id_index)
    yield client
    client.delete(DEMONSTRATIONS.stream, DEMONSTRATIONS.id_index)
    client.close()


def write(path: Path, rows: list) -> str:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def stored(r: redis.Redis) -> list[fb.Demonstration]:
    return [DEMONSTRATIONS.decode(f) for _, f in r.xrange(DEMONSTRATIONS.stream)]


def test_reader_takes_both_shapes_as_valid_imported_demonstrations(tmp_path):
    path = write(tmp_path / "d.jsonl", [CHAT, "", PAIR])
    chat, pair = read_demonstrations(path)
    for d in (chat, pair):
        validate_demonstration(d)
        assert (d.source, d.labeler_auth, d.labeler_id) == (
            fb.DEMONSTRATION_SOURCE_IMPORT, fb.LABELER_AUTH_IMPORT, "imported")
    assert [(m.role, m.content) for m in chat.messages] == [
        (m["role"], m["content"]) for m in CHAT["messages"][:-1]]
    assert chat.answer == "6."
    assert [(m.role, m.content) for m in pair.messages] == [("user", PAIR["prompt"])]
    assert pair.answer == "Red."
    assert read_demonstrations(path)[0].id == chat.id != pair.id  # content-derived
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(Path(path).read_bytes()))
    assert read_demonstrations(str(gz), labeler_id="op")[1].labeler_id == "op"


def _chat(*roles_contents):
    return {"messages": [{"role": r, "content": c} for r, c in roles_contents]}


BAD_LINES = {
    "not json": ("{nope", None),
    "neither shape": ({"text": "hi"}, None),
    "both shapes": ({**PAIR, **CHAT}, None),
    "empty response": ({"prompt": "hi", "response": "  "}, "response"),
    "response too long": ({"prompt": "hi", "response": "x" * (MAX_CHARS + 1)}, "response"),
    "empty prompt": ({"prompt": "", "response": "ok"}, "prompt"),
    "chat ends on the user": (_chat(("user", "hi")), "messages[0].role"),
    "answer after an answer": (_chat(("user", "hi"), ("assistant", "a"), ("assistant", "b")),
                               "messages[1].role"),
    "unknown role": (_chat(("robot", "x"), ("user", "hi"), ("assistant", "ok")),
                     "messages[0].role"),
    "empty answer": (_chat(("user", "hi"), ("assistant", "")), "messages[1].content"),
    "only an answer": (_chat(("assistant", "ok")), "messages"),
    "message not an object": ({"messages": ["hi"]}, "messages[0]"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_line_refuses_the_whole_file_naming_line_and_field(tmp_path, r, url, capsys,
                                                                 case):
    row, field = BAD_LINES[case]
    path = write(tmp_path / "d.jsonl", [PAIR, CHAT, row, {"prompt": "later", "response": "x"}])
    with pytest.raises(DemonstrationFileError) as err:
        read_demonstrations(path)
    assert isinstance(err.value, ValueError)
    assert (err.value.line, err.value.field) == (3, field)
    assert "line 3" in str(err.value)
    assert cli(["data", "import", "--redis-url", url, "--demonstrations", path]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["refused"], report["line"], report["field"]) == (True, 3, field)
    assert r.xlen(DEMONSTRATIONS.stream) == 0  # all or nothing


def test_import_export_round_trip_and_reimport_stores_nothing(tmp_path, r, url, capsys):
    path = write(tmp_path / "in.jsonl", [CHAT, PAIR])
    assert cli(["data", "import", "--redis-url", url, "--demonstrations", path,
                "--labeler-id", "seed-set"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["stored"], report["duplicates"]) == (2, 0)
    first = stored(r)
    assert [d.labeler_id for d in first] == ["seed-set", "seed-set"]
    assert all(d.received_at.ToMilliseconds() > 0 for d in first)

    out = tmp_path / "out.jsonl"
    assert cli(["data", "export", "--redis-url", url, "--out", str(out),
                "--demonstrations"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 2
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["messages"] == CHAT["messages"]
    assert (lines[0]["id"], lines[0]["source"]) == (first[0].id, "DEMONSTRATION_SOURCE_IMPORT")
    # The export is an import file: the same contents, the same ids, nothing new stored.
    again = read_demonstrations(str(out), labeler_id="seed-set")
    assert [(d.id, list(d.messages), d.answer) for d in again] == [
        (d.id, list(d.messages), d.answer) for d in first]
    assert cli(["data", "import", "--redis-url", url, "--demonstrations", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["duplicates"] == 2
    assert r.xlen(DEMONSTRATIONS.stream) == 2
