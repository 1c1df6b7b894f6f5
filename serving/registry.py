"""RegistryFollower: keep this replica on the registry's current adapter (docs/design.md §4).

One thread listens on ``rlhf:adapters:events`` and, at least every ``poll_s`` (a message
can be missed), re-reads ``rlhf:adapters:current``. Each round resolves what to serve the
same way on every replica, fresh or old, so the fleet never splits: the registry's current
version if it verifies here, else the newest version before it in publish order that does
(``walk_back``), else ``base``. Verifying is (1) checksums, base model and weight values
(rlhf/adapter_store.py) and shapes, off the engine thread; (2) on the engine thread,
between decode steps, loading it beside the current one and running the canary. New
requests get the chosen version from then on; running ones keep the version they pinned.
Versions beyond ``keep_versions`` are unloaded once nobody holds them.

Refusals. Any failure to load a version refuses it: counted once in
``rlhf_serving_adapter_rejected_total{version,reason}`` and logged once (no traceback).
A refusal is keyed by the version's file fingerprint (rlhf/adapter_checks.py), so a version
repaired in the store is verified again on the next round; a "current" event for a version
(promote, rollback, publish) makes this replica verify it again in any case. Each retry is
logged. While the registry's current version is refused the replica says so: a
``degraded`` ``FollowState`` (/healthz) and ``rlhf_serving_adapter_degraded``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisError

from rlhf import adapter_store as store
from rlhf.adapter_store import AdapterRejected
from serving.adapters import BASE, AdapterManager, FollowState
from serving.engine import Engine

log = logging.getLogger(__name__)

_ENGINE_CALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Refusal:
    fingerprint: tuple
    reason: str
    detail: str


def walk_back(target: str, versions: list[str]) -> list[str]:
    """Candidates to serve, best first: ``target``, the versions published before it
    (newest first), then ``base``. An unregistered target is followed by every registered
    version (pure)."""
    if target == BASE:
        return [BASE]
    older = versions[:versions.index(target)] if target in versions else list(versions)
    return [target, *reversed(older), BASE]


class RegistryFollower:
    """Follows the registry's current version on one engine."""

    def __init__(self, client: redis.Redis, store_dir: str | Path, base_model: str,
                 engine: Engine, adapters: AdapterManager, *, poll_s: float = 0.5,
                 on_change: Callable[[], None] = lambda: None,
                 metrics_registry: CollectorRegistry | None = None) -> None:
        self.client, self.store_dir, self.base_model = client, Path(store_dir), base_model
        self.engine, self.adapters, self.poll_s, self.on_change = (
            engine, adapters, poll_s, on_change)
        self.refused: dict[str, Refusal] = {}
        self.recheck: set[str] = set()  # versions "current" events named since last round
        self.state = FollowState(None, adapters.current)
        self.rejected = Counter("rlhf_serving_adapter_rejected",
                                "Adapter versions refused (files, checksum, shapes, base "
                                "model, values, canary), once per distinct file state",
                                ["version", "reason"], registry=metrics_registry)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="registry", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the follower thread -------------------------------------------------------------

    def _run(self) -> None:
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(store.EVENTS)
                self.sync()
                # Any message is a hint to re-read; the timeout is the poll.
                message = pubsub.get_message(timeout=self.poll_s)
                while message is not None:
                    self._note_event(message)
                    message = pubsub.get_message(timeout=0)
            except RedisError as exc:
                log.warning("adapter registry unreachable (%s); retrying", exc)
                if pubsub is not None:
                    pubsub.close()
                pubsub = None
                self._stop.wait(self.poll_s)
            except Exception:  # the follower must outlive any one bad round
                log.exception("adapter registry round failed")
                self._stop.wait(self.poll_s)
        if pubsub is not None:
            pubsub.close()

    def _note_event(self, message: dict) -> None:
        try:
            event = json.loads(message.get("data") or b"{}")
        except (TypeError, ValueError):
            return
        if isinstance(event, dict) and event.get("event") == "current":
            self.recheck.add(str(event.get("version")))

    def sync(self) -> None:
        """One round: resolve what to serve, switch to it, report, unload extras."""
        versions = store.list_versions(self.client)
        self.adapters.note_known(versions)
        target = store.current(self.client)
        forced, self.recheck = self.recheck & set(self.refused), set()
        for version in sorted(forced):
            log.info("adapter %s was announced current; verifying it again (refused before: "
                     "%s)", version, self.refused[version].reason)
        if target:
            chosen = self._resolve(target, versions, forced)
            if chosen != self.adapters.current:
                previous = self.adapters.current
                self._on_engine(lambda: self.adapters.set_current(chosen))
                log.info("serving adapter %s (was %s)", chosen, previous)
        self._report(target)
        if (len(self.adapters.loaded()) - 1 > self.adapters.keep_versions
                and self._on_engine(self.adapters.evict)):
            self.on_change()

    def _resolve(self, target: str, versions: list[str], forced: set[str]) -> str:
        for candidate in walk_back(target, versions):
            if candidate == BASE or candidate in self.adapters.loaded():
                return candidate
            if self._load(candidate, candidate in forced):
                return candidate
        return BASE

    def _load(self, version: str, forced: bool = False) -> bool:
        """Verify and load ``version`` beside the current one; False if refused. A version
        refused before is tried again only if its files changed or ``forced``."""
        try:
            fingerprint = store.version_fingerprint(self.store_dir, version)
        except ValueError:  # e.g. a NUL byte in a hostile registry entry
            fingerprint = ()
        prior = self.refused.get(version)
        if prior is not None and not forced:
            if prior.fingerprint == fingerprint:
                return False
            log.info("adapter %s changed in the store since it was refused (%s); verifying "
                     "it again", version, prior.reason)
        started = time.monotonic()
        path = self.store_dir / version
        try:
            store.verify(self.store_dir, version, self.base_model)
            self.adapters.check_files(path)
            self._on_engine(lambda: self.adapters.load(version, path, checked=True))
        except AdapterRejected as exc:
            self._refuse(version, fingerprint, exc.reason, exc.detail)
            return False
        except TimeoutError:
            raise  # the engine did not answer: not this version's fault, retried next round
        except Exception as exc:  # any other load failure is a refusal too
            self._refuse(version, fingerprint, "load_error", f"{type(exc).__name__}: {exc}")
            return False
        self.refused.pop(version, None)
        log.info("adapter %s verified, loaded and canaried (%.0f ms)", version,
                 (time.monotonic() - started) * 1e3)
        return True

    def _refuse(self, version: str, fingerprint: tuple, reason: str, detail: str) -> None:
        """Remember, count and log a refusal: once per (files, reason)."""
        refusal = Refusal(fingerprint, reason, detail)
        if self.refused.get(version) == refusal:  # a forced re-check found the same
            log.warning("adapter %s is still refused (%s)", version, reason)
            return
        self.refused[version] = refusal
        self.rejected.labels(version=version, reason=reason).inc()
        log.error("adapter %s refused (%s): %s", version, reason, detail)

    def _report(self, target: str | None) -> None:
        refusal = self.refused.get(target or "")
        state = FollowState(target, self.adapters.current, refusal.reason if refusal else "")
        if state == self.state:
            return
        if state.degraded:
            log.warning("%s", state.describe()["detail"])
        elif self.state.degraded:
            log.info("no longer degraded: serving the registry's current %s", state.serving)
        self.state = self.adapters.follow_state = state
        self.on_change()

    def _on_engine(self, fn: Callable[[], object]) -> object:
        return self.engine.call_soon(fn).result(_ENGINE_CALL_TIMEOUT_S)
