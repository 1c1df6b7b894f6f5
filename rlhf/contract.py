"""The Comparison contract: every rule a valid ``rlhf.v1.Comparison`` obeys, in one place.

One function, ``validate_comparison``, used by every door a record comes through: the
Feedback service (``serving.feedback``, with the adapter registry's versions), ``rlhf data
import`` (``rlhf.data``) and the learner's intake (``learner.intake``, which dead-letters a
record that breaks it). The limits, the id / version / labeler / request-id formats, the
roles, the flags, the ranking and the recorded sampling parameters are defined here once;
``proto/rlhf/v1/feedback.proto`` documents them for clients.

Formats are matched with ``re.fullmatch`` (never ``match`` with ``$``, which also accepts a
trailing newline: "abcdefgh1" and "abcdefgh1\\n" would be two ids for one ranking). Free-form
names (labeler, request id) must be printable (no newline, tab, NEL, U+2028/U+2029, zero-width
or other control/format characters) and carry no leading or trailing whitespace, so two
spellings of one name cannot pass as two.

Errors are ``InvalidComparison`` with the offending ``field`` (``candidates[2].rank``) kept
apart from the text, so each wire reports it structurally (gRPC trailing metadata, HTTP
error ``param``) without parsing messages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from rlhf.v1.feedback_pb2 import Candidate, Comparison, Flag
from rlhf.v1.policy_pb2 import SamplingParams

MAX_CHARS = 32768  # each text: candidate, message, comment, ideal answer (serving's default)
ROLES = ("system", "user", "assistant")
BASE = "base"  # the adapter version of the base model with no adapter
KNOWN_FLAGS = frozenset(v.number for v in Flag.DESCRIPTOR.values if v.number != 0)
# Sampling ranges, the same for a Generate request and a recorded candidate. Temperature
# is 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]: below 0.01 the logits divided by
# it leave float32's range and every seed gives the same garbage. top_k: 0 or anything at
# least the vocabulary size means no limit; the cap keeps the value inside every integer
# type it passes through (int64 tensors, uint32 on the wire).
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20

ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TASK_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a queued task (rlhf.tasks)
ID_RULE = "8..64 characters of A-Z a-z 0-9 _ -"
TASK_ID_RULE = "1..128 characters of A-Z a-z 0-9 . _ : -"
VERSION_RULE = "letters, digits, '.', '_', '-', starting with a letter or digit; at most 64"

_TIMESTAMP_MIN_S, _TIMESTAMP_MAX_S = -62135596800, 253402300799  # 0001-01-01 .. 9999-12-31


class InvalidComparison(ValueError):
    """A broken rule: ``field`` names where (``candidates[2].rank``), ``detail`` what."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field} {detail}")
        self.field, self.detail = field, detail

    @property
    def message(self) -> str:
        return f"{self.field} {self.detail}"


@dataclass(frozen=True)
class Limits:
    """What a valid record may hold; serving fills the config-dependent ones from its config."""

    max_chars: int = MAX_CHARS
    min_candidates: int = 2
    max_candidates: int = 9
    max_messages: int = 256
    max_labeler_chars: int = 128
    max_request_id_chars: int = 128
    max_new_tokens: int = 2**32 - 1  # recorded sampling: serving passes its --max-new-tokens
    max_stop_sequences: int = 64  # recorded sampling: serving passes its --max-stop-sequences


DEFAULT_LIMITS = Limits()
# The learner's intake: the door (serving, import) enforced the sizes its operator chose;
# the intake re-checks every structural rule, not sizes it cannot know.
STRUCTURE_ONLY = Limits(max_chars=2**62, max_messages=2**62, max_stop_sequences=2**62)


# -- names (pure, shared with the other boundaries) ----------------------------------------


def is_record_id(value: str) -> bool:
    return ID_RE.fullmatch(value) is not None


def is_version_name(value: str) -> bool:
    return VERSION_RE.fullmatch(value) is not None


def name_problem(value: str, max_chars: int) -> str | None:
    """Why ``value`` is not a clean printable name (labeler id, request id), or None."""
    if not value.strip():
        return "is empty"
    if len(value) > max_chars:
        return f"is longer than {max_chars} characters"
    if not value.isprintable():
        return ("holds a control, line-separator or format character (newline, tab, "
                "U+2028...); send printable text only")
    if value != value.strip():
        return "has leading or trailing whitespace"
    return None


def check_labeler_id(value: str, max_chars: int = 128) -> None:
    problem = name_problem(value, max_chars)
    if problem == "is empty":
        raise InvalidComparison("labeler_id", "is empty: say who ranked")
    if problem:
        raise InvalidComparison("labeler_id", f"{problem} (at most {max_chars} printable "
                                "characters)")


def check_version_name(field: str, value: str) -> None:
    if not is_version_name(value):
        raise InvalidComparison(field, f"{value[:80]!r} is not a valid version name "
                                f"({VERSION_RULE})")


# -- the record ----------------------------------------------------------------------------


def validate_comparison(msg: Comparison, known_versions: Collection[str] | None = None,
                        limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise ``InvalidComparison`` for the first rule ``msg`` breaks; None if valid.

    ``known_versions``: the adapter versions a candidate may cite (the registry's
    registered versions, "base" included); None checks only that each is a valid name.
    """
    _check_id(msg.id)
    check_labeler_id(msg.labeler_id, limits.max_labeler_chars)
    _check_messages(msg, limits)
    _check_candidates(msg.candidates, known_versions, limits)
    _check_ranking(msg.candidates)
    for name in ("comment", "ideal_answer"):
        _check_size(name, getattr(msg, name), limits)
    if msg.task_id and TASK_ID_RE.fullmatch(msg.task_id) is None:
        raise InvalidComparison("task_id", f"must be {TASK_ID_RULE} (or empty for free "
                                f"chat), got {msg.task_id[:80]!r}")
    for name in ("created_at", "received_at"):
        if msg.HasField(name):
            _check_timestamp(name, getattr(msg, name))


def _check_id(record_id: str) -> None:
    if not record_id:
        raise InvalidComparison("id", f"is missing: make one per ranking on the client "
                                f"({ID_RULE}) and reuse it on every retry")
    if not is_record_id(record_id):
        raise InvalidComparison("id", f"must be {ID_RULE}, got {record_id[:80]!r}")


def _check_size(field: str, text: str, limits: Limits) -> None:
    if len(text) > limits.max_chars:
        raise InvalidComparison(field, f"is too long: {len(text)} characters, limit "
                                f"{limits.max_chars}")


def _check_timestamp(field: str, ts) -> None:  # google.protobuf.Timestamp
    if not (_TIMESTAMP_MIN_S <= ts.seconds <= _TIMESTAMP_MAX_S and 0 <= ts.nanos < 10**9):
        raise InvalidComparison(field, f"is not a valid timestamp (seconds {ts.seconds}, "
                                f"nanos {ts.nanos}): years 1..9999, nanos 0..999999999")


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
        _check_size(f"{where}.text", c.text, limits)
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
        _check_size(f"{where}.stop[{j}]", stop, limits)


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
