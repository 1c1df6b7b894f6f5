"""Comparison records in: validation, and the idempotent append to the Redis stream.

Wire-neutral like ``PolicyService``: the gRPC servicer and the HTTP route both hand a
``rlhf.v1.Comparison`` to ``FeedbackService.submit`` and translate ``ServiceError`` codes.
A ranking is acknowledged only after Redis accepted it (DESIGN.md §5); the Redis layout
(stream fields, the id index, the consumer group) is written down in
``proto/rlhf/v1/feedback.proto`` and coded once in ``rlhf.comparisons``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError

from rlhf.comparisons import GROUP, ID_INDEX, STREAM, SUBMIT_LUA, parse_reply, submit_call
from rlhf.comparisons import decode_entry as decode_entry  # re-exported for readers
from rlhf.comparisons import encode_entry as encode_entry
from rlhf.v1.feedback_pb2 import Candidate, Comparison, Flag
from serving.config import ServingConfig
from serving.service import ROLES, Code, PolicyService, ServiceError

log = logging.getLogger(__name__)

ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
KNOWN_FLAGS = frozenset(v.number for v in Flag.DESCRIPTOR.values if v.number != 0)
NOT_STORED = "the ranking was NOT stored; keep it and submit it again with the same id"


@dataclass(frozen=True)
class Limits:
    """What a valid record may hold."""

    max_chars: int = 32768  # each text: candidate, message, comment, ideal answer
    min_candidates: int = 2
    max_candidates: int = 9
    max_messages: int = 256
    max_labeler_chars: int = 128


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class SubmitResult:
    id: str
    duplicate: bool
    stream_entry_id: str


class InvalidComparison(ServiceError):
    """INVALID_ARGUMENT naming the offending field (``candidates[2].rank``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(Code.INVALID_ARGUMENT, f"{field} {message}")
        self.field = field


# -- validation (pure) -------------------------------------------------------------------


def validate_comparison(msg: Comparison, known_versions: Collection[str],
                        limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise ``InvalidComparison`` for the first rule ``msg`` breaks; return None if valid."""
    _check_id(msg.id)
    _check_labeler(msg.labeler_id, limits)
    _check_messages(msg, limits)
    _check_candidates(msg.candidates, known_versions, limits)
    _check_ranking(msg.candidates)
    for name in ("comment", "ideal_answer"):
        _check_size(name, getattr(msg, name), limits)


def _check_id(record_id: str) -> None:
    if not record_id:
        raise InvalidComparison("id", "is missing: make one per ranking on the client (8..64 "
                                "characters of A-Z a-z 0-9 _ -) and reuse it on every retry")
    if not ID_RE.match(record_id):
        raise InvalidComparison("id", f"must be 8..64 characters of A-Z a-z 0-9 _ -, got "
                                f"{record_id[:80]!r}")


def _check_labeler(labeler_id: str, limits: Limits) -> None:
    if not labeler_id.strip():
        raise InvalidComparison("labeler_id", "is empty: say who ranked")
    if len(labeler_id) > limits.max_labeler_chars or not labeler_id.isprintable():
        raise InvalidComparison("labeler_id", f"must be printable and at most "
                                f"{limits.max_labeler_chars} characters")


def _check_size(field: str, text: str, limits: Limits) -> None:
    if len(text) > limits.max_chars:
        raise InvalidComparison(field, f"is too long: {len(text)} characters, limit "
                                f"{limits.max_chars}")


def _check_messages(msg: Comparison, limits: Limits) -> None:
    if not msg.messages:
        raise InvalidComparison("messages", "is empty: send the conversation the candidates "
                                "answer (at least the user's turn)")
    if len(msg.messages) > limits.max_messages:
        raise InvalidComparison("messages", f"has {len(msg.messages)} messages, limit "
                                f"{limits.max_messages}")
    for i, m in enumerate(msg.messages):
        if m.role not in ROLES:
            raise InvalidComparison(f"messages[{i}].role", f"must be one of "
                                    f"{', '.join(ROLES)}, got {m.role[:40]!r}")
        if not m.content.strip():
            raise InvalidComparison(f"messages[{i}].content", "is empty")
        _check_size(f"messages[{i}].content", m.content, limits)


def _check_candidates(candidates: Sequence[Candidate], known_versions: Collection[str],
                      limits: Limits) -> None:
    k = len(candidates)
    if not limits.min_candidates <= k <= limits.max_candidates:
        raise InvalidComparison("candidates", f"must hold {limits.min_candidates}.."
                                f"{limits.max_candidates} alternatives, got {k}")
    for i, c in enumerate(candidates):
        where = f"candidates[{i}]"
        # A whitespace-only answer is a real (bad) answer the labeler may rank last; an
        # empty string means the client lost the text.
        if not c.text:
            raise InvalidComparison(f"{where}.text", "is empty: send the text that was shown")
        _check_size(f"{where}.text", c.text, limits)
        if c.adapter_version not in known_versions:
            shown = ", ".join(sorted(known_versions))
            raise InvalidComparison(f"{where}.adapter_version", f"{c.adapter_version!r} is not "
                                    f"a version this server knows (known: {shown}); send the "
                                    "adapter_version the Generate stream reported")
        _check_flags(where, c.flags)


def _check_flags(where: str, flags: Sequence[int]) -> None:
    seen: set[int] = set()
    for j, flag in enumerate(flags):
        if flag not in KNOWN_FLAGS:
            names = ", ".join(Flag.Name(f) for f in sorted(KNOWN_FLAGS))
            raise InvalidComparison(f"{where}.flags[{j}]", f"is not a known flag ({flag}); "
                                    f"known: {names}")
        if flag in seen:
            raise InvalidComparison(f"{where}.flags[{j}]", f"repeats {Flag.Name(flag)}")
        seen.add(flag)


def _check_ranking(candidates: Sequence[Candidate]) -> None:
    """Each rank in 1..K (1 = best, equal ranks = a tie); positions a permutation of 0..K-1."""
    k = len(candidates)
    for i, c in enumerate(candidates):
        if not 1 <= c.rank <= k:
            got = "it is missing" if c.rank == 0 else f"got {c.rank}"
            raise InvalidComparison(f"candidates[{i}].rank", f"must be in 1..{k} (1 = best, "
                                    f"equal ranks for a tie); {got}")
    positions = sorted(c.position for c in candidates)
    if positions != list(range(k)):
        raise InvalidComparison("candidates.position", f"must give each candidate its own "
                                f"displayed position 0..{k - 1}, got {positions}")


# -- storage -----------------------------------------------------------------------------


class ComparisonStore:
    """Appends records to the comparisons stream, once per id."""

    def __init__(self, client: aioredis.Redis, stream: str = STREAM, id_index: str = ID_INDEX,
                 group: str = GROUP) -> None:
        self.client, self.stream, self.id_index, self.group = client, stream, id_index, group
        self._script = client.register_script(SUBMIT_LUA)

    @classmethod
    def from_url(cls, url: str) -> ComparisonStore:
        # A few quick retries cover a dropped connection; a retried script is harmless
        # (the id index makes it idempotent). Redis down fails within about a second.
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2)
        client = aioredis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0,
                                   retry=retry)
        return cls(client)

    async def ensure_group(self) -> bool:
        """Create the learner's group (from 0, MKSTREAM) if missing; True if it was made."""
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    async def submit(self, record: Comparison) -> SubmitResult:
        """Store ``record`` unless its id is already stored; raises UNAVAILABLE if Redis fails."""
        keys, args = submit_call(record, self.stream, self.id_index, self.group)
        try:
            reply = await self._script(keys=keys, args=args)
        except RedisError as exc:
            log.warning("comparison %s not stored: %s: %s", record.id, type(exc).__name__, exc)
            raise ServiceError(Code.UNAVAILABLE, f"the feedback store (Redis) is unavailable "
                               f"({type(exc).__name__}: {exc}); {NOT_STORED}") from None
        duplicate, entry_id = parse_reply(reply)
        return SubmitResult(record.id, duplicate, entry_id)

    async def close(self) -> None:
        await self.client.aclose()


# -- the service ---------------------------------------------------------------------------


class FeedbackService:
    """Validate, stamp ``received_at``, store; every rule about a valid record lives here."""

    def __init__(self, store: ComparisonStore, known_versions: Callable[[], set[str]],
                 limits: Limits = DEFAULT_LIMITS, clock: Callable[[], float] = time.time) -> None:
        self.store, self.known_versions, self.limits, self.clock = (
            store, known_versions, limits, clock)

    @classmethod
    def from_config(cls, config: ServingConfig, policy: PolicyService) -> FeedbackService:
        return cls(ComparisonStore.from_url(config.redis_url), known_versions(policy),
                   Limits(max_chars=config.max_feedback_chars))

    async def submit(self, comparison: Comparison) -> SubmitResult:
        """Raises ServiceError: INVALID_ARGUMENT (nothing stored) or UNAVAILABLE (not stored)."""
        validate_comparison(comparison, self.known_versions(), self.limits)
        record = Comparison()
        record.CopyFrom(comparison)
        record.received_at.FromMilliseconds(int(self.clock() * 1000))
        result = await self.store.submit(record)
        log.debug("comparison %s from %s: %s as %s", record.id, record.labeler_id,
                 "duplicate" if result.duplicate else "stored", result.stream_entry_id)
        return result


def known_versions(policy: PolicyService) -> Callable[[], set[str]]:
    """Versions loaded in this process plus every version the adapter registry lists, so a
    ranking of a version unloaded after a hot-swap is still accepted."""

    def known() -> set[str]:
        if policy.adapters is None:
            raise ServiceError(Code.UNAVAILABLE, "the model is still loading, so adapter "
                               f"versions cannot be checked; {NOT_STORED}")
        return policy.adapters.known()

    return known
