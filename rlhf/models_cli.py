"""`rlhf models`: the named base models and their cache.

    rlhf models list [--verify] [--json]   name, cached?, path, size, licence
    rlhf models pull NAME [--force]        fetch/convert it, or re-hash the cached entry (and
                                           rebuild it when it is corrupt); one JSON line

Any command's ``--model NAME`` pulls on first use too; ``pull`` just does it ahead of time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from rlhf import models


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf models", description="List the named base models "
                                "or fetch one into the cache ($RLHF_HOME/models).")
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="every named model: cached?, path, size, licence")
    ls.add_argument("--verify", action="store_true", help="re-hash cached files (slower)")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    pull = sub.add_parser("pull", help="fetch and convert NAME (reuses an intact entry)")
    pull.add_argument("name", help=f"one of: {', '.join(models.REGISTRY)}")
    pull.add_argument("--force", action="store_true", help="rebuild even if intact")
    return p


def _size(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n else "-"


def _list(verify: bool, as_json: bool) -> int:
    rows = [models.describe(m, hashes=verify) for m in models.REGISTRY.values()]
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row, sort_keys=True) + "\n")
        return 0
    head = ("NAME", "CACHED", "SIZE", "LICENCE", "PATH")
    table = [head, *((r["name"], "yes" if r["cached"] else r.get("problem", "no"),
                      _size(r["bytes"]), r["licence"], r["path"]) for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        sys.stdout.write("  ".join([*cells, row[-1]]) + "\n")
    return 0


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.action == "list":
        return _list(args.verify, args.json)
    try:
        pulled = models.ensure(args.name, force=args.force, rehash=True)
    except models.UnknownModel as exc:
        sys.stderr.write(f"rlhf models pull: {exc}\n")
        return 2
    except models.ModelFetchError as exc:
        sys.stderr.write(f"rlhf models pull: {exc}\n")
        return 1
    sys.stdout.write(json.dumps({"name": pulled.name, "path": str(pulled.path),
                                 "built": pulled.built, "rebuilt_because": pulled.problem,
                                 "seconds": round(pulled.seconds, 1)}) + "\n")
    return 0
