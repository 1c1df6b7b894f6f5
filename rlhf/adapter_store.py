"""The adapter store and its Redis registry, shared by the learner's publisher and serving.

Store layout (docs/design.md §4): ``STORE/<version>/`` holds a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) and ``manifest.json``, written
last, so a directory without a manifest is incomplete. Versions are immutable.

Registry layout (one Redis database):

- ``rlhf:adapters:versions``     sorted set, member = version, score = publish order
- ``rlhf:adapters:order``        counter behind those scores
- ``rlhf:adapters:seq``          counter behind ``next_version`` ("v1", "v2", ... never reused)
- ``rlhf:adapters:manifest:<v>`` the manifest as JSON
- ``rlhf:adapters:current``      the version new requests should get
- ``rlhf:adapters:events``       pub/sub channel: {"event": "published"|"current", "version"}

Messages are only hints: a follower re-reads ``current`` on each one and also polls it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from rlhf.adapter_checks import config_problem, fingerprint, weight_problems

VERSIONS = "rlhf:adapters:versions"
ORDER = "rlhf:adapters:order"
SEQ = "rlhf:adapters:seq"
MANIFEST_PREFIX = "rlhf:adapters:manifest:"
CURRENT = "rlhf:adapters:current"
EVENTS = "rlhf:adapters:events"

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# A version names a directory of the store: no path separators, no leading dot, no "..".
_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdapterRejected(Exception):
    """An adapter that must not be served; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Manifest:
    version: str
    parent: str | None
    base_model: str
    files: dict[str, str]  # file name -> sha256 hex
    lora: dict[str, Any]  # r, lora_alpha, target_modules
    created_at: float
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        return cls(**json.loads(text))


# -- the store (files) -------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename or a new name is durable only once its
    directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lora_summary(adapter_dir: Path) -> dict[str, Any]:
    cfg = json.loads((adapter_dir / CONFIG_FILE).read_text())
    targets = cfg.get("target_modules")
    return {"r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets}


def _write_adapter(source: Path | Any, into: Path) -> None:
    """Copy an adapter directory, or ``save_pretrained`` a PEFT model, into ``into``."""
    if isinstance(source, (str, Path)):
        for name in ADAPTER_FILES:
            shutil.copyfile(Path(source) / name, into / name)
        return
    source.save_pretrained(str(into))
    nested = [p for p in into.iterdir() if p.is_dir()]  # PEFT nests non-default adapter names
    if not (into / WEIGHTS_FILE).exists() and len(nested) == 1:
        for name in ADAPTER_FILES:
            shutil.move(str(nested[0] / name), into / name)
        shutil.rmtree(nested[0])


def publish(store: str | Path, version: str, adapter: str | Path | Any, *, parent: str | None,
            base_model: str, metrics: dict[str, Any] | None = None,
            config: dict[str, Any] | None = None) -> Manifest:
    """Write ``STORE/<version>/`` atomically (temp dir, fsync, rename), manifest last."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    final = store / version
    if final.exists():
        raise FileExistsError(f"adapter version {version!r} already exists in {store}")
    tmp = store / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_adapter(adapter, tmp)
        check_weights(tmp)  # the learner never publishes NaN or exploded weights
        for name in ADAPTER_FILES:
            fsync_path(tmp / name)
        fsync_path(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = Manifest(version=version, parent=parent, base_model=base_model,
                        files={n: sha256_file(final / n) for n in ADAPTER_FILES},
                        lora=_lora_summary(final), created_at=time.time(),
                        metrics=dict(metrics or {}), config=dict(config or {}))
    part = final / (MANIFEST_FILE + ".tmp")
    part.write_text(manifest.to_json())
    fsync_path(part)
    os.rename(part, final / MANIFEST_FILE)
    fsync_path(final)
    fsync_path(store)
    return manifest


def check_weights(folder: Path) -> None:
    """Raise ``AdapterRejected`` unless the adapter's files parse and every weight is
    finite and within the bounds of ``rlhf/adapter_checks.py``."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:  # SafetensorError, OSError, JSON: any unreadable file
        raise AdapterRejected("load_error", f"{folder.name}: unreadable adapter files "
                              f"({type(exc).__name__}: {exc})") from None
    problem = config_problem(config)
    if problem is not None:
        raise AdapterRejected("values", f"{folder.name}: {problem}")
    problems = weight_problems(tensors)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterRejected("values", f"{folder.name}: {problems[0]}{more}")


def version_fingerprint(store: str | Path, version: str) -> tuple:
    """Changes whenever a file of ``STORE/<version>`` is written or replaced."""
    return fingerprint(Path(store) / version, (MANIFEST_FILE, *ADAPTER_FILES))


def verify(store: str | Path, version: str, expected_base_model: str) -> Manifest:
    """Re-hash ``STORE/<version>`` against its manifest and check its weights' values;
    raises ``AdapterRejected``."""
    if not _VERSION_NAME.fullmatch(version) or ".." in version:
        raise AdapterRejected("name", f"{version!r} is not a valid version name (letters, "
                              "digits, '.', '_', '-'; at most 64; no '..')")
    folder = Path(store) / version
    try:
        manifest = Manifest.from_json((folder / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise AdapterRejected("missing_file", f"{folder / MANIFEST_FILE} not found") from None
    except (OSError, ValueError, TypeError) as exc:
        raise AdapterRejected("manifest", f"unreadable manifest in {folder}: {exc}") from None
    if not (isinstance(manifest.files, dict)
            and all(isinstance(v, str) for v in manifest.files.values())):
        raise AdapterRejected("manifest", f"{folder}: manifest 'files' must map file names "
                              "to sha256 hex strings")
    if manifest.version != version:
        raise AdapterRejected("manifest", f"{folder} holds version {manifest.version!r}")
    if manifest.base_model != expected_base_model:
        raise AdapterRejected("base_model", f"{version} was trained on "
                              f"{manifest.base_model!r}, this server runs "
                              f"{expected_base_model!r}")
    for name in ADAPTER_FILES:  # only these are read: a manifest cannot point elsewhere
        if name not in manifest.files or not (folder / name).is_file():
            raise AdapterRejected("missing_file", f"{version}: {name} is missing")
        try:
            digest = sha256_file(folder / name)
        except OSError as exc:
            raise AdapterRejected("load_error", f"{version}: cannot read {name}: {exc}") \
                from None
        if digest != manifest.files[name]:
            raise AdapterRejected("checksum", f"{version}: sha256 of {name} does not match "
                                  "its manifest")
    check_weights(folder)
    return manifest


# -- the registry (Redis) ----------------------------------------------------------------


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _announce(client: redis.Redis, event: str, version: str) -> None:
    client.publish(EVENTS, json.dumps({"event": event, "version": version}))


def next_version(client: redis.Redis) -> str:
    """A fresh version name: "v1", "v2", ...; a name handed out is never handed out again."""
    return f"v{client.incr(SEQ)}"


# Manifest, publish order and (optionally) current in one step: a crash can't leave a
# manifest that is not in the versions list. KEYS: manifest, order, versions, current.
_REGISTER = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') == false then return 0 end
redis.call('ZADD', KEYS[3], 'NX', redis.call('INCR', KEYS[2]), ARGV[2])
if ARGV[3] == '1' then redis.call('SET', KEYS[4], ARGV[2]) end
return 1
"""


def register(client: redis.Redis, manifest: Manifest, make_current: bool = True) -> None:
    """Record a published version (once; versions are immutable) and announce it."""
    keys = [MANIFEST_PREFIX + manifest.version, ORDER, VERSIONS, CURRENT]
    args = [manifest.to_json(), manifest.version, "1" if make_current else "0"]
    if not client.eval(_REGISTER, len(keys), *keys, *args):
        raise FileExistsError(f"adapter version {manifest.version!r} is already registered")
    _announce(client, "published", manifest.version)
    if make_current:
        _announce(client, "current", manifest.version)


def set_current(client: redis.Redis, version: str) -> None:
    """Point new requests of every replica at ``version`` without checking its files (the
    low-level step; operators go through ``switch_current``)."""
    if version != "base" and client.zscore(VERSIONS, version) is None:
        raise KeyError(f"adapter version {version!r} is not registered")
    client.set(CURRENT, version)
    _announce(client, "current", version)


def switch_current(client: redis.Redis, version: str, store_dir: str | Path) -> str | None:
    """Promote or roll back every replica to ``version``; returns the previous current.

    The files are always verified first (checksums, base model, weight values), so no
    replica is sent to a version it would refuse. Raises KeyError when the version is not
    registered, ValueError when no store is given to verify against, and AdapterRejected
    when verification fails. The "current" event it sends makes every replica re-check
    the version even if it refused it before.
    """
    manifest = get_manifest(client, version)
    if manifest is None and version != "base":
        raise KeyError(f"adapter version {version!r} is not registered")
    if manifest is not None:
        if not str(store_dir):
            raise ValueError(f"cannot verify {version} without the adapter store directory")
        verify(store_dir, version, manifest.base_model)
    previous = current(client)
    set_current(client, version)
    return previous


def current(client: redis.Redis) -> str | None:
    return _text(client.get(CURRENT))


def list_versions(client: redis.Redis) -> list[str]:
    """Registered versions in publish order."""
    return [_text(v) or "" for v in client.zrange(VERSIONS, 0, -1)]


def get_manifest(client: redis.Redis, version: str) -> Manifest | None:
    raw = client.get(MANIFEST_PREFIX + version)
    return None if raw is None else Manifest.from_json(raw)
