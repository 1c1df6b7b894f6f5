"""Feedback records in: the labeler binding, the contract check, the idempotent append.

Wire-neutral like ``PolicyService``: the gRPC servicer and the HTTP routes hand a
``rlhf.v1.Comparison`` (``FeedbackService.submit``) or a ``rlhf.v1.Demonstration``
(``FeedbackService.submit_demonstration``) and the caller's ``Claim`` (serving.auth) to the
service and translate ``ServiceError`` codes. Both records take the same path: bind the
labeler, check the contract (``rlhf.contract``, shared with `rlhf data import` and the
learner's intake), stamp received_at, append once per id. The versions a candidate may cite
come from the adapter registry (``RegisteredVersions``). A record is acknowledged only after
Redis accepted it (docs/design.md §5); the Redis layouts (stream fields, id indexes, the
consumer group) are written down in ``proto/rlhf/v1/feedback.proto`` and coded once in
``rlhf.comparisons``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError

from rlhf import adapter_store, task_scripts, tasks
from rlhf.comparisons import (
    COMPARISONS,
    GROUP,
    ID_INDEX,
    LAYOUTS,
    STREAM,
    SUBMIT_LUA,
    parse_reply,
    submit_call,
)
from rlhf.comparisons import decode_entry as decode_entry  # re-exported for readers
from rlhf.comparisons import encode_entry as encode_entry
from rlhf.contract import (
    BASE,
    DEFAULT_LIMITS,
    InvalidComparison,
    Limits,
    check_candidate_versions,
    validate_comparison,
    validate_demonstration,
)
from rlhf.v1.feedback_pb2 import Comparison, Demonstration
from serving.auth import OPEN, Claim, bind_labeler
from serving.config import ServingConfig
from serving.service import Code, ServiceError

log = logging.getLogger(__name__)

NOT_STORED = "the ranking was NOT stored; keep it and submit it again with the same id"


@dataclass(frozen=True)
class SubmitResult:
    id: str
    duplicate: bool
    stream_entry_id: str


def limits_for(config: ServingConfig) -> Limits:
    """The contract's limits with this server's own sizes (recorded sampling included)."""
    return Limits(max_chars=config.max_feedback_chars, max_new_tokens=config.max_new_tokens,
                  max_stop_sequences=config.max_stop_sequences)


def invalid_argument(exc: InvalidComparison) -> ServiceError:
    return ServiceError(Code.INVALID_ARGUMENT, exc.message, field=exc.field)


# -- the versions a candidate may cite ---------------------------------------------------


class RegisteredVersions:
    """"base", every version the adapter registry lists (the same Redis as the stream) and
    this process's own --adapter, less the versions this replica refused to serve.

    Read from the registry, not from the loaded model, so rankings are accepted while the
    model is still loading. Cached for ``ttl_s``; a version missing from a cache older
    than ``recheck_s`` is looked up again at once (it may have been published just now).
    """

    def __init__(self, client: aioredis.Redis, local: Collection[str] = (), ttl_s: float = 1.0,
                 recheck_s: float = 0.05, clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.local, self.ttl_s, self.recheck_s, self.clock = (
            client, frozenset(local), ttl_s, recheck_s, clock)
        self.refused: Callable[[], Collection[str]] = frozenset
        self._cached: frozenset[str] | None = None
        self._read_at = 0.0

    async def get(self, wanted: Collection[str] = ()) -> frozenset[str]:
        age = self.clock() - self._read_at
        stale = self._cached is None or age >= self.ttl_s or (
            age >= self.recheck_s and not set(wanted) <= self._cached)
        if stale:
            try:
                listed = await self.client.zrange(adapter_store.VERSIONS, 0, -1)
            except RedisError as exc:
                raise ServiceError(Code.UNAVAILABLE, f"the adapter registry (Redis) is "
                                   f"unavailable ({type(exc).__name__}: {exc}), so adapter "
                                   f"versions cannot be checked; {NOT_STORED}") from None
            self._cached = frozenset({BASE, *self.local, *(
                v.decode() if isinstance(v, bytes) else str(v) for v in listed)})
            self._read_at = self.clock()
        assert self._cached is not None
        return self._cached - frozenset(self.refused())


# -- storage -----------------------------------------------------------------------------


class ComparisonStore:
    """Appends records once per id: comparisons to ``stream`` / ``id_index``, any other kind
    (demonstrations) to its own layout's keys (``rlhf.comparisons.LAYOUTS``)."""

    def __init__(self, client: aioredis.Redis, stream: str = STREAM, id_index: str = ID_INDEX,
                 group: str = GROUP) -> None:
        self.client, self.stream, self.id_index, self.group = client, stream, id_index, group
        self._script = client.register_script(SUBMIT_LUA)

    def streams(self) -> list[str]:
        """Every stream this store appends to (the comparisons' first)."""
        return [self.stream, *(lay.stream for lay in LAYOUTS.values() if lay is not COMPARISONS)]

    @classmethod
    def from_url(cls, url: str) -> ComparisonStore:
        # A few quick retries cover a dropped connection; a retried script is harmless
        # (the id index makes it idempotent). Redis down fails within about a second.
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2)
        client = aioredis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0,
                                   retry=retry)
        return cls(client)

    async def ensure_group(self) -> bool:
        """Create the learner's group (from 0, MKSTREAM) on every stream where it is missing;
        True if one was made."""
        made = False
        for stream in self.streams():
            try:
                await self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
                made = True
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        return made

    async def submit(self, record: Comparison | Demonstration) -> SubmitResult:
        """Store ``record`` unless its id is already stored; raises UNAVAILABLE if Redis fails."""
        if isinstance(record, Comparison):
            keys, args = submit_call(record, self.stream, self.id_index, self.group)
        else:
            keys, args = submit_call(record, group=self.group)
        try:
            reply = await self._script(keys=keys, args=args)
        except RedisError as exc:
            log.warning("%s %s not stored: %s: %s", type(record).__name__, record.id,
                        type(exc).__name__, exc)
            raise ServiceError(Code.UNAVAILABLE, f"the feedback store (Redis) is unavailable "
                               f"({type(exc).__name__}: {exc}); {NOT_STORED}") from None
        duplicate, entry_id = parse_reply(reply)
        return SubmitResult(record.id, duplicate, entry_id)

    async def submit_for_task(self, record: Comparison, now_ms: int) -> SubmitResult:
        """Store a ranking of a queued task (``record.task_id``) in one step with its lease
        check (``rlhf.task_scripts.SUBMIT_LUA``): INVALID_ARGUMENT when it does not answer
        the task as queued, PERMISSION_DENIED when the task is not leased to its labeler,
        FAILED_PRECONDITION when it is unknown, done by them, or lost to an expired lease."""
        try:
            raw = await self.client.hgetall(tasks.task_key(record.task_id))
            task = tasks.from_hash(raw) if raw else None
            problem = tasks.record_problem(record, task) if task else None
            if problem is None:
                keys, args = task_scripts.submit_call(record, tasks.PREFIX, now_ms,
                                                      self.stream, self.id_index, self.group)
                status, value = task_scripts.parse_reply(
                    await self.client.eval(task_scripts.SUBMIT_LUA, len(keys), *keys, *args))
        except RedisError as exc:
            log.warning("comparison %s not stored: %s: %s", record.id, type(exc).__name__, exc)
            raise ServiceError(Code.UNAVAILABLE, f"the feedback store (Redis) is unavailable "
                               f"({type(exc).__name__}: {exc}); {NOT_STORED}") from None
        if problem is not None:
            raise ServiceError(Code.INVALID_ARGUMENT, f"{problem[0]} {problem[1]}",
                               field=problem[0])
        if status < 0:
            code, text = task_scripts.REASONS.get(value, ("FAILED_PRECONDITION", value))
            raise ServiceError(Code[code], f"task_id {record.task_id[:80]!r} {text}; the "
                               "ranking was not stored", field="task_id")
        return SubmitResult(record.id, status == 1, value)

    async def close(self) -> None:
        await self.client.aclose()


# -- the service ---------------------------------------------------------------------------


class FeedbackService:
    """Bind the labeler, check the record against the contract, stamp it, store it."""

    def __init__(self, store: ComparisonStore, versions: RegisteredVersions,
                 limits: Limits = DEFAULT_LIMITS, clock: Callable[[], float] = time.time) -> None:
        self.store, self.versions, self.limits, self.clock = store, versions, limits, clock

    @classmethod
    def from_config(cls, config: ServingConfig) -> FeedbackService:
        store = ComparisonStore.from_url(config.redis_url)
        local = [config.adapter_version or Path(config.adapter).name] if config.adapter else []
        return cls(store, RegisteredVersions(store.client, local), limits_for(config))

    async def submit(self, comparison: Comparison, claim: Claim = OPEN) -> SubmitResult:
        """Raises ServiceError: PERMISSION_DENIED / INVALID_ARGUMENT (nothing stored) or
        UNAVAILABLE (not stored)."""
        record = Comparison()
        record.CopyFrom(comparison)
        bind_labeler(record, claim)
        try:
            validate_comparison(record, None, self.limits)
            versions = await self.versions.get({c.adapter_version for c in record.candidates})
            check_candidate_versions(record.candidates, versions)
        except InvalidComparison as exc:
            raise invalid_argument(exc) from None
        return await self._store(record)

    async def submit_demonstration(self, demonstration: Demonstration, claim: Claim = OPEN
                                   ) -> SubmitResult:
        """The same errors as ``submit``; the record breaks no adapter-version rule (it holds
        no candidates), so Redis is only touched to store it."""
        record = Demonstration()
        record.CopyFrom(demonstration)
        bind_labeler(record, claim)
        try:
            validate_demonstration(record, self.limits)
        except InvalidComparison as exc:
            raise invalid_argument(exc) from None
        return await self._store(record)

    async def _store(self, record: Comparison | Demonstration) -> SubmitResult:
        now_ms = int(self.clock() * 1000)
        record.received_at.FromMilliseconds(now_ms)
        queued = isinstance(record, Comparison) and record.task_id  # lease-checked (tasks)
        result = await (self.store.submit_for_task(record, now_ms) if queued
                        else self.store.submit(record))
        log.debug("%s %s from %s: %s as %s", type(record).__name__, record.id,
                  record.labeler_id, "duplicate" if result.duplicate else "stored",
                  result.stream_entry_id)
        return result
