"""`rlhf data export|import`: comparisons out of and into the Redis stream, as JSONL.

export reads the stream with XRANGE only (never XREADGROUP/XACK), so the learner's consumer
group is not disturbed, and writes either whole records (protobuf canonical JSON) or
TRL-style preference pairs, one per untied ordered pair of candidates.

import reads the common ``{"chosen": transcript, "rejected": transcript}`` format
(Anthropic HH-RLHF: "\\n\\nHuman: ...\\n\\nAssistant: ..."), splits each pair into the shared
conversation and the two final answers, and stores a K = 2 Comparison through the same
idempotent script as the Feedback service (``rlhf.comparisons``) under an id derived from
the content, so importing a file twice stores each pair once. Bad lines are counted and
reported by line number, never fatal.

``--demonstrations`` does the same for demonstrations (``rlhf.demonstration_files``): import
reads prompt/response or chat-format JSONL, all or nothing (one bad line refuses the file,
naming the line and field; nothing is stored); export writes the stream in chat format.
``read_demonstrations`` (re-exported here) is the pure reader `rlhf sft` uses.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import redis
from google.protobuf import json_format

from rlhf import adapter_store, tasks
from rlhf.comparisons import append_many, decode_entry, read_entries
from rlhf.contract import (
    BASE,
    InvalidComparison,
    check_labeler_id,
    check_version_name,
    validate_comparison,
)
from rlhf.demonstration_files import (
    DemonstrationFileError,
    export_demonstrations,
    import_demonstrations,
    read_demonstrations,
)
from rlhf.labelers import COLUMNS as LABELER_COLUMNS
from rlhf.labelers import LabelerStats
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb

log = logging.getLogger(__name__)
__all__ = ["DemonstrationFileError", "export", "import_file", "main", "read_demonstrations"]

TURN_RE = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}
SPEAKERS = {role: name for name, role in ROLES.items()}
MAX_REPORTED = 100  # malformed lines listed in the summary (all are counted)
BATCH = 256  # records per pipelined round trip


class Malformed(ValueError):
    """A line that cannot become a valid record; the message says why (never the text)."""


# -- transcripts (pure) --------------------------------------------------------------------


def parse_transcript(text: str) -> list[tuple[str, str]]:
    """"\\n\\nHuman: a\\n\\nAssistant: b" -> [("user", "a"), ("assistant", "b")], exactly
    invertible by ``render_transcript`` (one space after each speaker is the separator)."""
    parts = TURN_RE.split(text)
    if parts[0]:
        raise Malformed("text before the first '\\n\\nHuman:' turn")
    if len(parts) == 1:
        raise Malformed("no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    turns = []
    for i, (speaker, body) in enumerate(zip(parts[1::2], parts[2::2], strict=True)):
        if not body.startswith(" "):
            raise Malformed(f"turn {i} has no space after '{speaker}:'")
        turns.append((ROLES[speaker], body[1:]))
    return turns


def render_transcript(turns: Sequence[tuple[str, str]]) -> str:
    return "".join(f"\n\n{SPEAKERS[role]}: {content}" for role, content in turns)


def split_pair(chosen: str, rejected: str) -> tuple[list[tuple[str, str]], str, str]:
    """(shared conversation, chosen answer, rejected answer) of one preference pair."""
    win, lose = parse_transcript(chosen), parse_transcript(rejected)
    for name, turns in (("chosen", win), ("rejected", lose)):
        if turns[-1][0] != "assistant":
            raise Malformed(f"{name} does not end with an Assistant turn")
        if not turns[-1][1].strip():
            raise Malformed(f"the {name} answer is empty")
    prefix = win[:-1]
    if prefix != lose[:-1]:
        raise Malformed("chosen and rejected differ before their last Assistant turn")
    if not prefix:
        raise Malformed("no conversation before the answers")
    return prefix, win[-1][1], lose[-1][1]


def comparison_id(chosen: str, rejected: str) -> str:
    """Content-derived, so the same pair always gets the same id (36 chars, valid)."""
    digest = hashlib.sha256(json.dumps([chosen, rejected]).encode()).hexdigest()
    return "imp-" + digest[:32]


def pair_record(line: str, labeler_id: str, adapter_version: str) -> fb.Comparison:
    """One JSONL line -> a K = 2 Comparison (candidate 0 = chosen, rank 1, shown first),
    checked against the Comparison contract (the Feedback service's rules and limits)."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise Malformed(f"not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str) for k in ("chosen", "rejected")):
        raise Malformed("not an object with string fields 'chosen' and 'rejected'")
    prefix, win, lose = split_pair(data["chosen"], data["rejected"])
    record = fb.Comparison(
        id=comparison_id(data["chosen"], data["rejected"]), labeler_id=labeler_id,
        messages=[pb.ChatMessage(role=role, content=content) for role, content in prefix])
    for rank, text in enumerate((win, lose), start=1):
        record.candidates.add(text=text, adapter_version=adapter_version, position=rank - 1,
                              rank=rank)
    record.labeler_auth = fb.LABELER_AUTH_IMPORT
    try:
        # Imported pairs come from outside: their version is a provenance label the
        # operator chose (checked as a name; main() warns when it is not registered).
        validate_comparison(record)
    except InvalidComparison as exc:
        raise Malformed(str(exc)) from None
    return record


# -- export (pure) ---------------------------------------------------------------------------


def record_json(record: fb.Comparison) -> dict:
    return json_format.MessageToDict(record, preserving_proto_field_name=True)


def untied_pairs(record: fb.Comparison) -> list[tuple[fb.Candidate, fb.Candidate]]:
    """(better, worse) for every pair of candidates with different ranks (C(K,2) minus ties),
    in candidate order."""
    cands = list(record.candidates)
    return [(a, b) if a.rank < b.rank else (b, a)
            for i, a in enumerate(cands) for b in cands[i + 1:] if a.rank != b.rank]


def preference_pairs(record: fb.Comparison) -> list[dict]:
    """TRL preference pairs: one per untied pair of candidates, the better one as "chosen";
    margin = rank of the worse - rank of the better."""
    prompt = [{"role": m.role, "content": m.content} for m in record.messages]
    return [{"prompt": prompt, "chosen": [{"role": "assistant", "content": win.text}],
             "rejected": [{"role": "assistant", "content": lose.text}],
             "comparison_id": record.id, "labeler_id": record.labeler_id,
             "margin": lose.rank - win.rank}
            for win, lose in untied_pairs(record)]


# -- files and Redis -------------------------------------------------------------------------


@contextmanager
def _atomic_output(path: str) -> Iterator[IO[str]]:
    """Write beside ``path`` and rename at the end: no half-written export on failure."""
    tmp = f"{path}.tmp{os.getpid()}"
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(tmp, "wt", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export(client: redis.Redis, out: str, fmt: str) -> dict:
    counts = {"records": 0, "pairs": 0, "skipped": 0}
    skipped: list[str] = []
    with _atomic_output(out) as f:
        for entry_id, fields in read_entries(client):
            try:
                record = decode_entry(fields)
            except Exception as exc:  # a foreign or damaged entry is reported, not fatal
                counts["skipped"] += 1
                skipped.append(f"{entry_id}: {type(exc).__name__}")
                continue
            counts["records"] += 1
            rows = [record_json(record)] if fmt == "records" else preference_pairs(record)
            counts["pairs"] += 0 if fmt == "records" else len(rows)
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"format": fmt, "out": out, **counts, "skipped_entries": skipped[:MAX_REPORTED]}


def export_labelers(client: redis.Redis, out: str) -> dict:
    """The per-labeler report (rlhf.labelers) over the whole stream: CSV (one row per
    labeler) when ``out`` ends in .csv, else JSON with the pairs and the overall numbers."""
    stats = LabelerStats()
    for _, fields in read_entries(client):
        try:
            stats.add(decode_entry(fields))
        except Exception:  # damaged entries are counted by the plain export
            continue
    report = stats.report(tasks.golden_map(client))
    with _atomic_output(out) as f:
        if out.endswith((".csv", ".csv.gz")):
            writer = csv.DictWriter(f, fieldnames=list(LABELER_COLUMNS))
            writer.writeheader()
            writer.writerows(report["labelers"])
        else:
            json.dump(report, f, indent=1)
    return {"format": "labelers", "out": out, "labelers": len(report["labelers"]),
            **{k: v for k, v in report["overall"].items()}}


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from enumerate(f, start=1)


@dataclass
class ImportSummary:
    lines: int = 0
    stored: int = 0
    duplicates: int = 0
    malformed: int = 0
    malformed_lines: list[dict] = field(default_factory=list)

    def bad(self, line_no: int, reason: str) -> None:
        self.malformed += 1
        if len(self.malformed_lines) < MAX_REPORTED:
            self.malformed_lines.append({"line": line_no, "reason": reason})


def import_file(client: redis.Redis, path: str, labeler_id: str = "imported",
                adapter_version: str = "base", limit: int = 0) -> ImportSummary:
    """Store each pair of ``path`` (first ``limit`` lines; 0 = all) once."""
    summary, batch = ImportSummary(), []

    def flush() -> None:
        now_ms = int(time.time() * 1000)
        for record in batch:
            record.received_at.FromMilliseconds(now_ms)
        for duplicate, _ in append_many(client, batch):
            summary.duplicates += duplicate
            summary.stored += not duplicate
        batch.clear()

    for line_no, raw in _lines(path):
        if limit and line_no > limit:
            break
        summary.lines = line_no
        if not raw.strip():
            summary.bad(line_no, "empty line")
            continue
        try:
            batch.append(pair_record(raw.decode("utf-8"), labeler_id, adapter_version))
        except UnicodeDecodeError:
            summary.bad(line_no, "not UTF-8")
        except Malformed as exc:
            summary.bad(line_no, str(exc))
        if len(batch) >= BATCH:
            flush()
    flush()
    return summary


# -- command line ----------------------------------------------------------------------------


def labeler_arg(value: str) -> str:
    """argparse type of a --labeler-id: the contract's labeler rule, its message on failure."""
    try:
        check_labeler_id(value)
    except InvalidComparison as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None
    return value


def _version(value: str) -> str:
    try:
        check_version_name("--adapter-version", value)
    except InvalidComparison as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None
    return value


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf data", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    exp = sub.add_parser("export", help="stream -> JSONL (records or preference pairs)")
    exp.add_argument("--redis-url", required=True)
    exp.add_argument("--out", required=True, help="JSONL file (.gz: compressed)")
    exp.add_argument("--format", choices=["records", "pairs"], default="records")
    exp.add_argument("--demonstrations", action="store_true",
                     help="export the demonstrations stream instead (chat-format JSONL)")
    exp.add_argument("--labelers", action="store_true", help="write the per-labeler report "
                     "instead (agreement, golden accuracy, median time, flag rate): CSV when "
                     "--out ends in .csv, else JSON")
    imp = sub.add_parser("import", help='{"chosen", "rejected"} JSONL -> K = 2 comparisons; '
                         "--demonstrations: prompt/response or chat JSONL -> demonstrations")
    imp.add_argument("--redis-url", required=True)
    what = imp.add_mutually_exclusive_group(required=True)
    what.add_argument("--in", dest="path", help="pairs JSONL file (.gz: compressed)")
    what.add_argument("--demonstrations", metavar="FILE", help="demonstrations JSONL file "
                      "(all or nothing: a bad line refuses the file)")
    imp.add_argument("--labeler-id", type=labeler_arg, default="imported")
    imp.add_argument("--adapter-version", type=_version, default="base")
    imp.add_argument("--limit", type=int, default=0, help="read only the first N lines")
    return p.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = _parse(argv)
    client = redis.Redis.from_url(args.redis_url, socket_connect_timeout=5.0)
    start = time.perf_counter()
    try:
        if args.action == "export" and args.labelers:
            summary = export_labelers(client, args.out)
        elif args.action == "export" and args.demonstrations:
            with _atomic_output(args.out) as f:
                summary = {"format": "demonstrations", "out": args.out,
                           **export_demonstrations(client, f)}
        elif args.action == "export":
            summary = export(client, args.out, args.format)
        elif args.demonstrations:
            if not Path(args.demonstrations).is_file():
                log.error("no such file: %s", args.demonstrations)
                return 2
            try:
                counts = import_demonstrations(client, args.demonstrations, args.labeler_id)
            except DemonstrationFileError as exc:
                log.error("refused, nothing stored: %s", exc)
                sys.stdout.write(json.dumps({"in": exc.path, "refused": True, "line": exc.line,
                                             "field": exc.field, "reason": exc.detail}) + "\n")
                return 1
            summary = {"in": args.demonstrations, **counts}
        else:
            if not Path(args.path).is_file():
                log.error("no such file: %s", args.path)
                return 2
            registered = {BASE, *adapter_store.list_versions(client)}
            if args.adapter_version not in registered:
                log.warning("--adapter-version %s is not a registered adapter version; the "
                            "imported pairs carry it as a label only", args.adapter_version)
            result = import_file(client, args.path, args.labeler_id, args.adapter_version,
                                 args.limit)
            summary = {"in": args.path, **vars(result)}
    except redis.RedisError as exc:
        # Import is idempotent by content id: running it again resumes where this stopped.
        log.error("redis failed (%s: %s); what was sent before is stored, run again to resume",
                  type(exc).__name__, exc)
        return 1
    finally:
        client.close()
    summary["elapsed_s"] = round(time.perf_counter() - start, 3)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
