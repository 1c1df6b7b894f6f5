"""The rules every feedback record shares (Comparison and Demonstration): the error type,
the limits, ids, names, sizes, timestamps and the conversation. ``rlhf.contract`` builds
each record's validator on these and re-exports them; import them from there.

Formats are matched with ``re.fullmatch`` (never ``match`` with ``$``, which also accepts a
trailing newline: "abcdefgh1" and "abcdefgh1\\n" would be two ids for one record). Free-form
names (labeler, request id) must be printable (no newline, tab, NEL, U+2028/U+2029, zero-width
or other control/format characters) and carry no leading or trailing whitespace, so two
spellings of one name cannot pass as two.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rlhf.v1.policy_pb2 import ChatMessage

MAX_CHARS = 32768  # each text: candidate, message, comment, answer (serving's default)
ROLES = ("system", "user", "assistant")

ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ID_RULE = "8..64 characters of A-Z a-z 0-9 _ -"
VERSION_RULE = "letters, digits, '.', '_', '-', starting with a letter or digit; at most 64"

_TIMESTAMP_MIN_S, _TIMESTAMP_MAX_S = -62135596800, 253402300799  # 0001-01-01 .. 9999-12-31


class InvalidComparison(ValueError):
    """A broken rule of any feedback record (the name is historical): ``field`` names where
    (``candidates[2].rank``, ``answer``), ``detail`` what. Kept apart from the text so each
    wire reports the field structurally (gRPC trailing metadata, HTTP error ``param``)."""

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
        raise InvalidComparison("labeler_id", "is empty: say who labeled")
    if problem:
        raise InvalidComparison("labeler_id", f"{problem} (at most {max_chars} printable "
                                "characters)")


def check_version_name(field: str, value: str) -> None:
    if not is_version_name(value):
        raise InvalidComparison(field, f"{value[:80]!r} is not a valid version name "
                                f"({VERSION_RULE})")


def check_id(record_id: str, field: str = "id") -> None:
    if not record_id:
        raise InvalidComparison(field, f"is missing: make one per record on the client "
                                f"({ID_RULE}) and reuse it on every retry")
    if not is_record_id(record_id):
        raise InvalidComparison(field, f"must be {ID_RULE}, got {record_id[:80]!r}")


def check_size(field: str, text: str, limits: Limits) -> None:
    if len(text) > limits.max_chars:
        raise InvalidComparison(field, f"is too long: {len(text)} characters, limit "
                                f"{limits.max_chars}")


def check_timestamps(msg, names: Sequence[str] = ("created_at", "received_at")) -> None:
    """Each set google.protobuf.Timestamp field of ``msg`` in years 1..9999."""
    for name in names:
        if not msg.HasField(name):
            continue
        ts = getattr(msg, name)
        if not (_TIMESTAMP_MIN_S <= ts.seconds <= _TIMESTAMP_MAX_S and 0 <= ts.nanos < 10**9):
            raise InvalidComparison(name, f"is not a valid timestamp (seconds {ts.seconds}, "
                                    f"nanos {ts.nanos}): years 1..9999, nanos 0..999999999")


def check_conversation(messages: Sequence[ChatMessage], limits: Limits, answered: str) -> None:
    """At least one and at most ``max_messages`` messages, each a known role with non-empty
    text within the size limit; ``answered`` says what answers it (for the empty case)."""
    if not messages:
        raise InvalidComparison("messages", f"is empty: send the conversation {answered} "
                                "answer (at least the user's turn)")
    if len(messages) > limits.max_messages:
        raise InvalidComparison("messages", f"has {len(messages)} messages, limit "
                                f"{limits.max_messages}")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidComparison(f"messages[{i}].role", f"must be one of "
                                    f"{', '.join(ROLES)}, got {m.role[:40]!r}")
        if not m.content.strip():
            raise InvalidComparison(f"messages[{i}].content", "is empty")
        check_size(f"messages[{i}].content", m.content, limits)
