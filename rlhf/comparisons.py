"""The feedback records' Redis layout, shared by every writer and reader of the streams.

One definition of the key names, the entry fields and the idempotent check-and-append
script, used by the Feedback service (``serving.feedback``, async), the data tools
(``rlhf.data``, sync) and the learner's intake, so an imported record and a labeler's
record are stored the same way. Two record kinds share it, each a ``Layout``: comparisons
(``COMPARISONS``, the default everywhere) and demonstrations (``DEMONSTRATIONS``); the
functions pick the layout from the record's type. The layout itself is written down in
``proto/rlhf/v1/feedback.proto``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import redis
from google.protobuf.message import Message

from rlhf.v1.feedback_pb2 import Comparison, Demonstration

GROUP = "learner"


@dataclass(frozen=True)
class Layout:
    """One record kind's keys: its stream, id index, dead-letter stream and schema name."""

    record_type: type[Message]
    stream: str
    id_index: str
    group: str = GROUP

    @property
    def dead_letter(self) -> str:  # entries the learner could not decode, with "dead:reason"
        return self.stream + ":dead"

    @property
    def schema(self) -> str:
        return self.record_type.DESCRIPTOR.full_name

    def decode(self, fields: dict[bytes, bytes]) -> Message:
        return self.record_type.FromString(base64.b64decode(fields[b"record"]))


COMPARISONS = Layout(Comparison, "rlhf:comparisons", "rlhf:comparison_ids")
DEMONSTRATIONS = Layout(Demonstration, "rlhf:demonstrations", "rlhf:demonstration_ids")
LAYOUTS = {layout.record_type: layout for layout in (COMPARISONS, DEMONSTRATIONS)}
STREAM, ID_INDEX = COMPARISONS.stream, COMPARISONS.id_index
DEAD_LETTER, SCHEMA = COMPARISONS.dead_letter, COMPARISONS.schema


def layout_of(record: Message) -> Layout:
    return LAYOUTS[type(record)]

# Check-and-append in one atomic step: a record id already in the index answers with the
# entry it was stored as; otherwise the group is made (from 0, so the learner reads every
# entry) when the stream is new, then XADD (no MAXLEN: nothing is ever trimmed) and index.
# KEYS: id index hash, stream. ARGV: record id, group, then the entry's field/value pairs.
SUBMIT_LUA = """
local seen = redis.call('HGET', KEYS[1], ARGV[1])
if seen then return {1, seen} end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
end
local entry = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('HSET', KEYS[1], ARGV[1], entry)
return {0, entry}
"""


def encode_entry(record: Comparison | Demonstration) -> dict[str, bytes]:
    """The stream entry's fields for a record whose received_at is set (a Comparison's also
    carry ``k``, its number of candidates)."""
    fields = {
        "id": record.id.encode(),
        "labeler_id": record.labeler_id.encode(),
        "received_at": str(record.received_at.ToMilliseconds()).encode(),
    }
    if isinstance(record, Comparison):
        fields["k"] = str(len(record.candidates)).encode()
    return {**fields, "schema": layout_of(record).schema.encode(),
            "record": base64.b64encode(record.SerializeToString(deterministic=True))}


def decode_entry(fields: dict[bytes, bytes]) -> Comparison:
    """The Comparison of one stream entry (what the learner does); for another kind,
    ``Layout.decode``."""
    return Comparison.FromString(base64.b64decode(fields[b"record"]))


def submit_call(record: Comparison | Demonstration, stream: str | None = None,
                id_index: str | None = None, group: str = GROUP
                ) -> tuple[list[str], list[str | bytes]]:
    """``(keys, args)`` of ``SUBMIT_LUA`` storing ``record`` (received_at set); the keys
    default to the record kind's layout."""
    layout = layout_of(record)
    fields = [part for pair in encode_entry(record).items() for part in pair]
    return [id_index or layout.id_index, stream or layout.stream], [record.id, group, *fields]


def parse_reply(reply: Sequence[int | bytes | str]) -> tuple[bool, str]:
    """``(duplicate, stream entry id)`` from the script's reply."""
    seen, entry = reply
    return bool(seen), entry.decode() if isinstance(entry, bytes) else str(entry)


def append_many(client: redis.Redis, records: Sequence[Comparison | Demonstration],
                stream: str | None = None, id_index: str | None = None, group: str = GROUP
                ) -> list[tuple[bool, str]]:
    """Store each record unless its id is stored already, pipelined (one round trip);
    ``(duplicate, entry id)`` per record. Each script call is atomic on its own."""
    if not records:
        return []
    script = client.register_script(SUBMIT_LUA)
    pipe = client.pipeline(transaction=False)
    for record in records:
        keys, args = submit_call(record, stream, id_index, group)
        script(keys=keys, args=args, client=pipe)
    return [parse_reply(reply) for reply in pipe.execute()]


def read_entries(client: redis.Redis, stream: str = STREAM, page: int = 500
                 ) -> Iterator[tuple[str, dict[bytes, bytes]]]:
    """Every entry, oldest first, by XRANGE pages: reads only, so no consumer group (the
    learner's included) sees a delivery, a pending entry or an ack."""
    start = "-"
    while True:
        batch = client.xrange(stream, min=start, max="+", count=page)
        for entry_id, fields in batch:
            yield entry_id.decode(), fields
        if len(batch) < page:
            return
        start = "(" + batch[-1][0].decode()
