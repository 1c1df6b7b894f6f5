"""`rlhf adapters`: the operator's view of the adapter registry (Redis) and store (files).

    rlhf adapters --redis-url URL list
    rlhf adapters --redis-url URL show V
    rlhf adapters --redis-url URL --store DIR rollback V   (or promote V)

``rollback`` and ``promote`` both point the registry's current version at V (every replica
follows within its poll interval, and re-checks V even if it refused it before). The files
in the store are always verified first (checksums, base model, weight values): without
``--store`` (or $RLHF_SERVE_ADAPTER_STORE) they refuse to run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

import redis

from rlhf import adapter_store as store


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf adapters", description="List, inspect, promote or "
                                "roll back adapter versions in the registry.")
    p.add_argument("--redis-url", default=os.environ.get("RLHF_SERVE_REDIS_URL", ""),
                   help="Redis holding the registry (default: $RLHF_SERVE_REDIS_URL)")
    p.add_argument("--store", default=os.environ.get("RLHF_SERVE_ADAPTER_STORE", ""),
                   help="adapter store the files are verified in before promote/rollback "
                   "(required for those; default: $RLHF_SERVE_ADAPTER_STORE)")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="registered versions in publish order, current marked")
    for name, text in (("show", "print a version's manifest"),
                       ("rollback", "make an older version current"),
                       ("promote", "make a version current")):
        sub.add_parser(name, help=text).add_argument("version")
    return p


def _print(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")


def _switch(client: redis.Redis, version: str, store_dir: str) -> int:
    if not store_dir and version != "base":
        sys.stderr.write(f"rlhf adapters: cannot verify {version} before switching to it: "
                         "give --store DIR (the adapter store, STORE/<version>/) or set "
                         "RLHF_SERVE_ADAPTER_STORE\n")
        return 2
    try:
        previous = store.switch_current(client, version, store_dir)
    except KeyError:
        sys.stderr.write(f"rlhf adapters: {version!r} is not registered\n")
        return 1
    except store.AdapterRejected as exc:
        sys.stderr.write(f"rlhf adapters: refusing {version}: {exc}\n")
        return 1
    _print({"current": version, "previous": previous})
    return 0


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if not args.redis_url:
        sys.stderr.write("rlhf adapters: give --redis-url (or RLHF_SERVE_REDIS_URL)\n")
        return 2
    client = redis.Redis.from_url(args.redis_url, socket_connect_timeout=2.0)
    try:
        if args.action == "list":
            now = store.current(client)
            for version in store.list_versions(client):
                m = store.get_manifest(client, version)
                _print({"version": version, "current": version == now,
                        "parent": m.parent if m else None,
                        "created_at": m.created_at if m else None})
            return 0
        if args.action == "show":
            manifest = store.get_manifest(client, args.version)
            if manifest is None:
                sys.stderr.write(f"rlhf adapters: {args.version!r} is not registered\n")
                return 1
            _print(asdict(manifest))
            return 0
        return _switch(client, args.version, args.store)
    except redis.RedisError as exc:
        sys.stderr.write(f"rlhf adapters: registry unreachable: {exc}\n")
        return 1
    finally:
        client.close()
