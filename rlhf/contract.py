"""The feedback records' contract: every rule a valid ``rlhf.v1.Comparison`` and
``rlhf.v1.Demonstration`` obey, in one place.

One function per record, ``validate_comparison`` and ``validate_demonstration``, used by
every door a record comes through: the Feedback service (``serving.feedback``, with the
adapter registry's versions), ``rlhf data import`` (``rlhf.data``) and the learner's intake
(``learner.intake``, which dead-letters a record that breaks it). The rules both records
share (ids, labeler names, the conversation, sizes, timestamps, the error type) are in
``rlhf.rules`` and re-exported here; the candidates' rules (versions, request ids, flags,
the ranking, the recorded sampling parameters) are below. ``proto/rlhf/v1/feedback.proto``
documents them for clients.

Errors are ``InvalidComparison`` with the offending ``field`` (``candidates[2].rank``,
``answer``) kept apart from the text, so each wire reports it structurally (gRPC trailing
metadata, HTTP error ``param``) without parsing messages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence

from rlhf.rules import (  # noqa: F401 (re-exported: the contract's one import point)
    DEFAULT_LIMITS,
    ID_RE,
    ID_RULE,
    MAX_CHARS,
    ROLES,
    STRUCTURE_ONLY,
    VERSION_RE,
    VERSION_RULE,
    InvalidComparison,
    Limits,
    check_conversation,
    check_id,
    check_labeler_id,
    check_size,
    check_timestamps,
    check_version_name,
    is_record_id,
    is_version_name,
    name_problem,
)
from rlhf.v1.feedback_pb2 import Candidate, Comparison, Demonstration, DemonstrationSource, Flag
from rlhf.v1.policy_pb2 import SamplingParams

BASE = "base"  # the adapter version of the base model with no adapter
KNOWN_FLAGS = frozenset(v.number for v in Flag.DESCRIPTOR.values if v.number != 0)
KNOWN_SOURCES = frozenset(v.number for v in DemonstrationSource.DESCRIPTOR.values
                          if v.number != 0)
# Sampling ranges, the same for a Generate request and a recorded candidate. Temperature
# is 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]: below 0.01 the logits divided by
# it leave float32's range and every seed gives the same garbage. top_k: 0 or anything at
# least the vocabulary size means no limit; the cap keeps the value inside every integer
# type it passes through (int64 tensors, uint32 on the wire).
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20
TASK_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a queued task (rlhf.tasks)
TASK_ID_RULE = "1..128 characters of A-Z a-z 0-9 . _ : -"


# -- the record ----------------------------------------------------------------------------


def validate_comparison(msg: Comparison, known_versions: Collection[str] | None = None,
                        limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise ``InvalidComparison`` for the first rule ``msg`` breaks; None if valid.

    ``known_versions``: the adapter versions a candidate may cite (the registry's
    registered versions, "base" included); None checks only that each is a valid name.
    """
    check_id(msg.id)
    check_labeler_id(msg.labeler_id, limits.max_labeler_chars)
    check_conversation(msg.messages, limits, "the candidates")
    _check_candidates(msg.candidates, known_versions, limits)
    _check_ranking(msg.candidates)
    for name in ("comment", "ideal_answer"):
        check_size(name, getattr(msg, name), limits)
    if msg.task_id and TASK_ID_RE.fullmatch(msg.task_id) is None:
        raise InvalidComparison("task_id", f"must be {TASK_ID_RULE} (or empty for free "
                                f"chat), got {msg.task_id[:80]!r}")
    check_timestamps(msg)


def validate_demonstration(msg: Demonstration, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise ``InvalidComparison`` for the first rule ``msg`` breaks; None if valid.

    The id, labeler, conversation, size and timestamp rules are the Comparison's; the
    conversation ends on the user turn the answer answers; the answer is not empty
    (whitespace only is empty: a demonstration is text to imitate) and within the size
    limit; the source is set; a comparison_id, when given, is a record id.
    """
    check_id(msg.id)
    check_labeler_id(msg.labeler_id, limits.max_labeler_chars)
    check_conversation(msg.messages, limits, "the answer")
    last = len(msg.messages) - 1
    if msg.messages[last].role != "user":
        raise InvalidComparison(f"messages[{last}].role", f"must be 'user': the conversation "
                                "ends on the turn the answer answers (put the answer in "
                                f"'answer', not in messages); got {msg.messages[last].role!r}")
    if not msg.answer.strip():
        raise InvalidComparison("answer", "is empty: send the answer the labeler wants")
    check_size("answer", msg.answer, limits)
    if msg.source not in KNOWN_SOURCES:
        got = "it is missing" if msg.source == 0 else f"got {msg.source}"
        names = ", ".join(DemonstrationSource.Name(s) for s in sorted(KNOWN_SOURCES))
        raise InvalidComparison("source", f"must be one of {names}; {got}")
    if msg.comparison_id:
        check_id(msg.comparison_id, "comparison_id")
    check_timestamps(msg)


def _check_candidates(candidates: Sequence[Candidate], known_versions: Collection[str] | None,
                      limits: Limits) -> None:
    k = len(candidates)
    if not limits.min_candidates <= k <= limits.max_candidates:
        raise InvalidComparison("candidates", f"must hold {limits.min_candidates}.."
                                f"{limits.max_candidates} alternatives, got {k} candidates")
    for i, c in enumerate(candidates):
        where = f"candidates[{i}]"
        # A whitespace-only answer is a real (bad) answer the labeler may rank last; an
        # empty string means the client lost the text.
        if not c.text:
            raise InvalidComparison(f"{where}.text", "is empty: send the text that was shown")
        check_size(f"{where}.text", c.text, limits)
        _check_version(f"{where}.adapter_version", c.adapter_version, known_versions)
        if c.request_id:
            problem = name_problem(c.request_id, limits.max_request_id_chars)
            if problem:
                raise InvalidComparison(f"{where}.request_id", f"{problem} (at most "
                                        f"{limits.max_request_id_chars} printable characters)")
        if c.HasField("sampling"):
            _check_sampling(f"{where}.sampling", c.sampling, limits)
        _check_flags(where, c.flags)


def check_candidate_versions(candidates: Sequence[Candidate], known_versions: Collection[str]
                             ) -> None:
    """Only the version rule, for a door that checks the rest before it reads the registry."""
    for i, c in enumerate(candidates):
        _check_version(f"candidates[{i}].adapter_version", c.adapter_version, known_versions)


def _check_version(field: str, version: str, known_versions: Collection[str] | None) -> None:
    if known_versions is not None and version not in known_versions:
        names = sorted(known_versions)
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20
                                         else "")
        raise InvalidComparison(field, f"{version[:80]!r} is not a version this server knows "
                                f"(known: {shown}); send the adapter_version the Generate "
                                "stream reported")
    check_version_name(field, version)


def _check_sampling(where: str, s: SamplingParams, limits: Limits) -> None:
    """The sampling parameters the candidate was generated with: the ranges serving
    accepts for a Generate request (what could not have been served is not a record)."""
    if s.max_new_tokens > limits.max_new_tokens:
        raise InvalidComparison(f"{where}.max_new_tokens", f"must be at most "
                                f"{limits.max_new_tokens} (0 = the server default), got "
                                f"{s.max_new_tokens}")
    if s.max_new_tokens and s.min_new_tokens > s.max_new_tokens:
        raise InvalidComparison(f"{where}.min_new_tokens", f"must be at most max_new_tokens "
                                f"({s.max_new_tokens}), got {s.min_new_tokens}")
    if s.min_new_tokens > limits.max_new_tokens:
        raise InvalidComparison(f"{where}.min_new_tokens", f"must be at most "
                                f"{limits.max_new_tokens}, got {s.min_new_tokens}")
    if s.HasField("temperature") and not (math.isfinite(s.temperature) and (
            s.temperature == 0 or MIN_TEMPERATURE <= s.temperature <= MAX_TEMPERATURE)):
        raise InvalidComparison(f"{where}.temperature", f"must be 0 (greedy) or between "
                                f"{MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, got "
                                f"{s.temperature}")
    if s.top_k > MAX_TOP_K:
        raise InvalidComparison(f"{where}.top_k", f"must be between 0 and {MAX_TOP_K} (0 = no "
                                f"limit), got {s.top_k}")
    if s.HasField("top_p") and not (math.isfinite(s.top_p) and 0 < s.top_p <= 1):
        raise InvalidComparison(f"{where}.top_p", f"must be a finite number in (0, 1], got "
                                f"{s.top_p}")
    if len(s.stop) > limits.max_stop_sequences:
        raise InvalidComparison(f"{where}.stop", f"has {len(s.stop)} stop sequences, limit "
                                f"{limits.max_stop_sequences}")
    for j, stop in enumerate(s.stop):
        if not stop:
            raise InvalidComparison(f"{where}.stop[{j}]", "is empty")
        check_size(f"{where}.stop[{j}]", stop, limits)


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
