"""RegistryFollower: keep this replica on the registry's current adapter (DESIGN.md §4).

One thread listens on ``rlhf:adapters:events`` and, at least every ``poll_s`` (a message
can be missed), re-reads ``rlhf:adapters:current``. When it differs from what this replica
serves: (1) verify checksums and base model here, off the engine thread; (2) check LoRA
shapes; (3) on the engine thread, between decode steps, load it beside the current one
and make it current. New requests get it from then on; running ones keep the version they
pinned at submit. Versions beyond ``keep_versions`` are unloaded once nobody holds them.
A refused version is remembered and not tried again; the old one keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisError

from rlhf import adapter_store as store
from rlhf.adapter_store import AdapterRejected
from serving.adapters import BASE, AdapterManager
from serving.engine import Engine

log = logging.getLogger(__name__)

_ENGINE_CALL_TIMEOUT_S = 60.0


class RegistryFollower:
    """Follows the registry's current version on one engine."""

    def __init__(self, client: redis.Redis, store_dir: str | Path, base_model: str,
                 engine: Engine, adapters: AdapterManager, *, poll_s: float = 0.5,
                 on_change: Callable[[], None] = lambda: None,
                 metrics_registry: CollectorRegistry | None = None) -> None:
        self.client, self.store_dir, self.base_model = client, Path(store_dir), base_model
        self.engine, self.adapters, self.poll_s, self.on_change = (
            engine, adapters, poll_s, on_change)
        self.refused: dict[str, str] = {}
        self.rejected = Counter("rlhf_serving_adapter_rejected",
                                "Adapter versions refused (bad checksum, shapes, base model)",
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
                # Any message is only a hint to re-read; the timeout is the poll.
                pubsub.get_message(timeout=self.poll_s)
                while pubsub.get_message(timeout=0) is not None:
                    pass
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

    def sync(self) -> None:
        """One round: follow ``current``, learn the registry's versions, unload extras."""
        self.adapters.note_known(store.list_versions(self.client))
        target = store.current(self.client)
        if target and target != self.adapters.current and target not in self.refused:
            self.switch(target)
        if len(self.adapters.loaded()) - 1 > self.adapters.keep_versions:
            self.engine.call_soon(self.adapters.evict).result(_ENGINE_CALL_TIMEOUT_S)

    def switch(self, version: str) -> bool:
        """Make ``version`` current (loading it first if needed); False if refused."""
        started = time.monotonic()
        try:
            if version != BASE and version not in self.adapters.loaded():
                path = self.store_dir / version
                store.verify(self.store_dir, version, self.base_model)
                self.adapters.check_shapes(path)
                self._on_engine(lambda: self._load_and_switch(version, path))
            else:
                self._on_engine(lambda: self.adapters.set_current(version))
        except AdapterRejected as exc:
            self.refused[version] = exc.reason
            self.rejected.labels(version=version, reason=exc.reason).inc()
            log.error("adapter %s refused (%s); still serving %s", version, exc,
                      self.adapters.current)
            return False
        log.info("adapter %s is live (%.0f ms)", version, (time.monotonic() - started) * 1e3)
        self.on_change()
        return True

    def _load_and_switch(self, version: str, path: Path) -> None:
        self.adapters.load(version, path)
        self.adapters.set_current(version)

    def _on_engine(self, fn: Callable[[], object]) -> None:
        self.engine.call_soon(fn).result(_ENGINE_CALL_TIMEOUT_S)
