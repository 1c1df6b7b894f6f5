"""Demonstration files: JSONL in (``read_demonstrations``, `rlhf data import
--demonstrations`) and out (`rlhf data export --demonstrations`).

One demonstration per line, in either of the two shapes SFT data comes in:

- ``{"prompt": "...", "response": "..."}``: a one-turn conversation and its answer;
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat format): the conversation,
  whose last message is the assistant's answer (the one learned).

Other keys are ignored (an export adds ``id``, ``labeler_id``, ``source``,
``comparison_id``). Blank lines are skipped. Each line becomes a ``rlhf.v1.Demonstration``
(source IMPORT, the labeler the operator names, ``labeler_auth`` IMPORT) under an id
derived from its content, so importing a file twice stores each demonstration once, and is
checked against the Demonstration contract (``rlhf.contract``). A file is all or nothing:
the first bad line refuses the whole file (``DemonstrationFileError`` naming the line and
the field, in the file's own terms: ``response``, ``messages[3].role``) and nothing is
stored.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections.abc import Iterator
from typing import IO, Any

import redis

from rlhf.comparisons import DEMONSTRATIONS, append_many, read_entries
from rlhf.contract import DEFAULT_LIMITS, InvalidComparison, Limits, validate_demonstration
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb

BATCH = 256  # records per pipelined round trip


class DemonstrationFileError(ValueError):
    """A line that cannot become a valid demonstration: ``line`` (1-based), ``field`` (in
    the file's terms; None when the line as a whole is wrong), ``detail``."""

    def __init__(self, path: str, line: int, field: str | None, detail: str) -> None:
        where = f"{path} line {line}" + (f": {field}" if field else "")
        super().__init__(f"{where} {detail}")
        self.path, self.line, self.field, self.detail = path, line, field, detail


def demonstration_id(messages: list[dict[str, str]], answer: str) -> str:
    """Content-derived (36 chars, a valid record id): the same line, the same id."""
    digest = hashlib.sha256(json.dumps([messages, answer]).encode()).hexdigest()
    return "dem-" + digest[:32]


def _chat(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise InvalidComparison(field, "must be a list of {\"role\", \"content\"} objects")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise InvalidComparison(f"{field}[{i}]", "must be an object with string fields "
                                    "'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_line(text: str, labeler_id: str, limits: Limits = DEFAULT_LIMITS
               ) -> fb.Demonstration:
    """One line -> a valid Demonstration; InvalidComparison with the file's field name."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidComparison("line", f"is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise InvalidComparison("line", "must be a JSON object")
    if ("messages" in data) == ("prompt" in data or "response" in data):
        raise InvalidComparison("line", "must have either 'messages' (chat format) or "
                                "'prompt' and 'response'")
    if "messages" in data:
        chat = _chat(data["messages"], "messages")
        last = len(chat) - 1
        if not chat or chat[last]["role"] != "assistant":
            where = f"messages[{last}].role" if chat else "messages"
            raise InvalidComparison(where, "must end with the assistant's answer (the "
                                    "message learned)")
        conversation, answer = chat[:-1], chat[last]["content"]
        rename = {"answer": f"messages[{last}].content"}
    else:
        for key in ("prompt", "response"):
            if not isinstance(data.get(key), str):
                raise InvalidComparison(key, "must be a string")
        conversation = [{"role": "user", "content": data["prompt"]}]
        answer = data["response"]
        rename = {"answer": "response", "messages[0].content": "prompt", "messages": "prompt"}
    record = fb.Demonstration(
        id=demonstration_id(conversation, answer), labeler_id=labeler_id, answer=answer,
        source=fb.DEMONSTRATION_SOURCE_IMPORT, labeler_auth=fb.LABELER_AUTH_IMPORT,
        messages=[pb.ChatMessage(**m) for m in conversation])
    try:
        validate_demonstration(record, limits)
    except InvalidComparison as exc:
        raise InvalidComparison(rename.get(exc.field, exc.field), exc.detail) from None
    return record


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from enumerate(f, start=1)


def read_demonstrations(path: str, labeler_id: str = "imported",
                        limits: Limits = DEFAULT_LIMITS) -> list[fb.Demonstration]:
    """Every demonstration of the JSONL file ``path`` (``.gz``: compressed), in file order;
    ``DemonstrationFileError`` (a ValueError) at the first bad line. Pure: reads the file
    only."""
    out: list[fb.Demonstration] = []
    for line_no, raw in _lines(path):
        if not raw.strip():
            continue
        try:
            out.append(parse_line(raw.decode("utf-8"), labeler_id, limits))
        except UnicodeDecodeError:
            raise DemonstrationFileError(path, line_no, None, "is not UTF-8") from None
        except InvalidComparison as exc:
            field = None if exc.field == "line" else exc.field
            raise DemonstrationFileError(path, line_no, field, exc.detail) from None
    return out


def import_demonstrations(client: redis.Redis, path: str, labeler_id: str = "imported",
                          now_ms: int | None = None) -> dict[str, int]:
    """Read (and check) the whole file, then store each demonstration once; raises
    ``DemonstrationFileError`` before anything is stored."""
    records = read_demonstrations(path, labeler_id)
    stamp = int(time.time() * 1000) if now_ms is None else now_ms
    for record in records:
        record.received_at.FromMilliseconds(stamp)
    counts = {"lines_read": len(records), "stored": 0, "duplicates": 0}
    for start in range(0, len(records), BATCH):
        for duplicate, _ in append_many(client, records[start:start + BATCH]):
            counts["duplicates" if duplicate else "stored"] += 1
    return counts


def export_line(record: fb.Demonstration) -> dict[str, Any]:
    """The chat-format line of one demonstration (what ``read_demonstrations`` reads)."""
    chat = [{"role": m.role, "content": m.content} for m in record.messages]
    return {"messages": [*chat, {"role": "assistant", "content": record.answer}],
            "id": record.id, "labeler_id": record.labeler_id,
            "source": fb.DemonstrationSource.Name(record.source),
            "comparison_id": record.comparison_id}


def export_demonstrations(client: redis.Redis, out: IO[str]) -> dict[str, Any]:
    """Every demonstration of the stream (XRANGE only), one chat-format line each."""
    counts: dict[str, Any] = {"records": 0, "skipped": 0, "skipped_entries": []}
    for entry_id, fields in read_entries(client, DEMONSTRATIONS.stream):
        try:
            record = DEMONSTRATIONS.decode(fields)
        except Exception as exc:  # a foreign or damaged entry is reported, not fatal
            counts["skipped"] += 1
            counts["skipped_entries"].append(f"{entry_id}: {type(exc).__name__}")
            continue
        counts["records"] += 1
        out.write(json.dumps(export_line(record), ensure_ascii=False) + "\n")
    return counts
