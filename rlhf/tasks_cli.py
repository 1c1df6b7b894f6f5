"""`rlhf tasks load FILE | status`: queue prompts for labelers (rlhf.tasks).

A task file is JSONL, one task per line::

    {"prompt": "Explain photosynthesis to a child."}
    {"id": "q-17", "messages": [{"role": "user", "content": "..."}], "labelers": 3}
    {"prompt": "2 + 2?", "candidates": ["4", "5", "22"], "golden": {"ranking": [1, 2, 3]}}
    {"prompt": "Capital of France?", "candidates": ["Paris", "Lyon"], "golden": {"best": 0}}

The whole file is checked first and loaded in one atomic step: a bad line (an empty
prompt, a golden ranking that does not fit its candidates, an id repeated in the file) or an
id already queued loads nothing and exits 2 naming the line and field.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import redis

from rlhf import tasks


def _share(value: str) -> float:
    share = float(value)
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError("must be in 0..1")
    return share


def _labelers(value: str) -> int:
    n = int(value)
    if not 2 <= n <= 9:
        raise argparse.ArgumentTypeError("must be 2..9")
    return n


def status(client: redis.Redis) -> dict:
    """Queued tasks: open (with free slots), golden, and rankings stored per task."""
    return {"open": int(client.zcard(tasks.OPEN)), "golden": int(client.zcard(tasks.GOLDEN)),
            "loaded": int(client.get(tasks.SEQ) or 0)}


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhf tasks", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    load = sub.add_parser("load", help="queue the tasks of a JSONL file (all or nothing)")
    load.add_argument("file")
    load.add_argument("--overlap-share", type=_share, default=0.1,
                      help="share of tasks without 'labelers' that several labelers rank "
                      "(agreement is measured on them); default 0.1")
    load.add_argument("--overlap-labelers", type=_labelers, default=2,
                      help="labelers per overlapped task (2..9); default 2")
    for s in (load, sub.add_parser("status", help="counts of queued tasks (JSON)")):
        s.add_argument("--redis-url", required=True)
    args = p.parse_args(list(argv))
    client = redis.Redis.from_url(args.redis_url, socket_connect_timeout=5.0)
    try:
        if args.action == "status":
            summary = status(client)
        else:
            try:
                lines = Path(args.file).read_text(encoding="utf-8").splitlines()
                queued = tasks.parse_lines(lines, args.overlap_share, args.overlap_labelers)
                loaded = tasks.load(client, queued)
            except (OSError, UnicodeDecodeError) as exc:
                sys.stderr.write(f"rlhf tasks load: {args.file}: {exc}\n")
                return 2
            except tasks.TaskError as exc:
                sys.stderr.write(f"rlhf tasks load: {args.file}: {exc}; nothing was loaded\n")
                return 2
            summary = {"loaded": loaded, "golden": sum(t.is_golden for t in queued),
                       "overlapped": sum(t.wanted > 1 for t in queued), "queue": status(client)}
    except redis.RedisError as exc:
        sys.stderr.write(f"rlhf tasks: redis failed ({type(exc).__name__}: {exc})\n")
        return 1
    finally:
        client.close()
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
