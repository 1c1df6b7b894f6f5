"""Pure logic of the ranking UI: turn state, shuffling, rank parsing, the records (the
Comparison of a ranking, and the Demonstration of a "better answer" written beside it).

Nothing here touches Gradio or the network, so every rule is unit-tested on its own.
Controls on screen are indexed by *displayed position*; the record lists candidates in
generation order (alternative index) with the position each was shown at.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb


def _readable(name: str) -> str:
    words = name.removeprefix("FLAG_").lower().replace("_", " ")
    return words[:1].upper() + words[1:]


# "Made up facts" -> fb.FLAG_MADE_UP_FACTS, in enum order, FLAG_UNSPECIFIED left out.
FLAG_LABELS: dict[str, int] = {
    _readable(name): value for name, value in fb.Flag.items() if value != fb.FLAG_UNSPECIFIED
}


class RankingError(ValueError):
    """The labeler's input cannot make a valid record; the message is shown as is."""


@dataclass
class Alternative:
    """One streamed alternative of a turn, in generation order."""

    index: int
    text: str = ""
    adapter_version: str = ""
    seed: int = 0
    done: bool = False


@dataclass
class Turn:
    """One user message and the K alternatives answering it."""

    messages: list[dict[str, str]]  # the conversation, ending with the user's message
    request_id: str
    sampling: pb.SamplingParams
    order: list[int]  # order[position] = alternative index shown there
    alternatives: list[Alternative] = field(default_factory=list)
    finished_at: float | None = None  # monotonic seconds when the last alternative ended

    @property
    def complete(self) -> bool:
        return bool(self.alternatives) and all(a.done for a in self.alternatives)

    def shown(self) -> list[Alternative]:
        """The alternatives in displayed order (left to right)."""
        return [self.alternatives[i] for i in self.order]


def display_order(k: int, seed: int) -> list[int]:
    """A permutation of 0..k-1, the same for the same seed (hides which index is which)."""
    order = list(range(k))
    random.Random(seed).shuffle(order)
    return order


def parse_ranks(values: Sequence[str | int | None], k: int) -> list[int]:
    """Ranks by displayed position, each 1..k; ties are allowed, missing ones are not."""
    if len(values) != k:
        raise RankingError(f"expected {k} ranks, got {len(values)}")
    ranks = []
    for pos, value in enumerate(values):
        try:
            rank = int(value) if value not in (None, "") else 0
        except (TypeError, ValueError):
            rank = 0
        if not 1 <= rank <= k:
            raise RankingError(f"Give answer {pos + 1} a rank from 1 (best) to {k}.")
        ranks.append(rank)
    return ranks


def parse_flags(labels: Sequence[str] | None) -> list[int]:
    """Readable flag names to Flag values, each once, in enum order."""
    chosen = set(labels or ())
    unknown = chosen - FLAG_LABELS.keys()
    if unknown:
        raise RankingError(f"unknown flag(s): {', '.join(sorted(unknown))}")
    return [value for label, value in FLAG_LABELS.items() if label in chosen]


def top_position(ranks: Sequence[int]) -> int:
    """The displayed position of the best-ranked answer; a tie goes to the leftmost."""
    return min(range(len(ranks)), key=lambda pos: (ranks[pos], pos))


def build_comparison(turn: Turn, *, comparison_id: str, labeler_id: str,
                     ranks: Sequence[int], flags: Sequence[Sequence[int]], comment: str,
                     ideal_answer: str, rank_time_ms: int, created_at_ms: int
                     ) -> fb.Comparison:
    """The record of one ranking; ``ranks`` and ``flags`` are by displayed position."""
    if not labeler_id:
        raise RankingError("You are not logged in: the ranking needs a labeler.")
    if not turn.complete:
        raise RankingError("Wait until all answers have finished.")
    k = len(turn.alternatives)
    if len(ranks) != k or len(flags) != k:
        raise RankingError(f"expected {k} ranks and flag sets")
    position_of = {index: pos for pos, index in enumerate(turn.order)}
    record = fb.Comparison(
        id=comparison_id, labeler_id=labeler_id, comment=comment.strip(),
        ideal_answer=ideal_answer.strip(), rank_time_ms=max(0, int(rank_time_ms)),
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in turn.messages])
    for alt in turn.alternatives:
        pos = position_of[alt.index]
        record.candidates.add(text=alt.text, adapter_version=alt.adapter_version,
                              sampling=turn.sampling, seed=alt.seed, position=pos,
                              rank=ranks[pos], flags=list(flags[pos]),
                              request_id=turn.request_id)
    record.created_at.FromMilliseconds(created_at_ms)
    return record


def build_demonstration(turn: Turn, *, demonstration_id: str, comparison: fb.Comparison
                        ) -> fb.Demonstration | None:
    """The labeler's better answer as a Demonstration of the turn's conversation (which ends
    on the user message the candidates answer), beside ``comparison`` (its id, labeler,
    time); None when they wrote none. The Comparison keeps the same text as
    ``ideal_answer``: the learner counts it once (learner.demonstrations)."""
    if not comparison.ideal_answer.strip():
        return None
    record = fb.Demonstration(
        id=demonstration_id, labeler_id=comparison.labeler_id,
        answer=comparison.ideal_answer, source=fb.DEMONSTRATION_SOURCE_UI,
        comparison_id=comparison.id,
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in turn.messages])
    record.created_at.CopyFrom(comparison.created_at)
    return record


def continue_with(turn: Turn, ranks: Sequence[int]) -> list[dict[str, str]]:
    """The conversation after a ranking: the turn's messages plus the top-ranked answer."""
    best = turn.shown()[top_position(ranks)]
    return [*turn.messages, {"role": "assistant", "content": best.text}]
