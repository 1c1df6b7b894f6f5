"""The SFT set: every demonstration the learner holds, each text once (pure; no I/O).

Two sources feed it: the stored demonstrations (``DemonstrationDataset``: the UI's "Write a
better answer", SubmitDemonstration by programs, `rlhf data import --demonstrations`) and
the ``ideal_answer`` of stored comparisons, turned into demonstrations here (source
COMPARISON, an id derived from the comparison's, so the same comparison always yields the
same demonstration). The UI sends its better answer both ways (the Comparison keeps
``ideal_answer`` so the text survives even when the Demonstration could not be stored),
so the two overlap by design; one text counts once:

- a stored demonstration beside comparison X (``comparison_id`` X) with the same answer
  as X's ``ideal_answer`` (whitespace at the ends ignored) is the same demonstration;
- more generally, two demonstrations with the same conversation and the same answer are
  one (a second copy only re-weights it).

Stored demonstrations come first (they carry the better provenance), in stored order, then
the comparison-derived ones in the comparisons' order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from rlhf.contract import STRUCTURE_ONLY, InvalidComparison, validate_demonstration
from rlhf.v1.feedback_pb2 import DEMONSTRATION_SOURCE_COMPARISON, Comparison, Demonstration

ID_PREFIX = "ideal-"


def derived_id(comparison_id: str) -> str:
    """The id of comparison ``comparison_id``'s ideal answer as a demonstration (38 chars,
    a valid record id, the same every time)."""
    return ID_PREFIX + hashlib.sha256(comparison_id.encode()).hexdigest()[:32]


def from_comparison(c: Comparison) -> Demonstration | None:
    """``c``'s ideal answer as a demonstration, or None when it has none or it would break
    the Demonstration contract (a Comparison's conversation may end on an assistant turn)."""
    if not c.ideal_answer.strip():
        return None
    d = Demonstration(id=derived_id(c.id), labeler_id=c.labeler_id, messages=c.messages,
                      answer=c.ideal_answer, source=DEMONSTRATION_SOURCE_COMPARISON,
                      comparison_id=c.id, labeler_auth=c.labeler_auth)
    for name in ("created_at", "received_at"):
        if c.HasField(name):
            getattr(d, name).CopyFrom(getattr(c, name))
    try:
        validate_demonstration(d, STRUCTURE_ONLY)
    except InvalidComparison:
        return None
    return d


def _keys(d: Demonstration) -> list[tuple]:
    answer = d.answer.strip()
    keys: list[tuple] = [("text", tuple((m.role, m.content) for m in d.messages), answer)]
    if d.comparison_id:
        keys.append(("beside", d.comparison_id, answer))
    return keys


def sft_demonstrations(stored: Iterable[Demonstration], comparisons: Iterable[Comparison]
                       ) -> list[Demonstration]:
    """Stored demonstrations + the comparisons' ideal answers, de-duplicated (module doc)."""
    derived = (from_comparison(c) for c in comparisons)
    out: list[Demonstration] = []
    seen: set[tuple] = set()
    ids: set[str] = set()
    for d in [*stored, *(d for d in derived if d is not None)]:
        keys = _keys(d)
        if d.id in ids or any(k in seen for k in keys):
            continue
        ids.add(d.id)
        seen.update(keys)
        out.append(d)
    return out


def count_new(demonstrations: Sequence[Demonstration], old_demonstration_ids: Iterable[str],
              old_comparison_ids: Iterable[str]) -> int:
    """How many of ``demonstrations`` come from a record that was not stored before (a
    derived one is new when its comparison is)."""
    old_d, old_c = set(old_demonstration_ids), set(old_comparison_ids)
    return sum(1 for d in demonstrations
               if (d.comparison_id not in old_c if d.source == DEMONSTRATION_SOURCE_COMPARISON
                   else d.id not in old_d))
