"""Per-labeler quality from the comparisons: agreement on overlapped tasks, golden accuracy,
time per ranking, flag rate (rlhf.agreement does the math; docs/design.md §4b).

Shared by the learner's dashboard (``GET /v1/dashboard`` -> the UI's Labelers view), its
reward-model phase (``excluded``: labelers below a golden-accuracy or agreement threshold
leave the RM's data) and `rlhf data export --labelers`. Only rankings of queued tasks
(``Comparison.task_id``) enter agreement and golden accuracy; every ranking counts for time
and flags. A labeler's last ranking of a task is the one scored.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from rlhf import agreement as ag
from rlhf.tasks import ranking_of
from rlhf.v1.feedback_pb2 import Comparison

COLUMNS = ("labeler", "comparisons", "tasks", "agreement", "agreement_pairs",
           "golden_accuracy", "golden_items", "median_rank_s", "flag_rate")


class LabelerStats:
    """Accumulates what a report needs, one record at a time (the dashboard feeds it the
    stream incrementally); ``report`` is cheap enough per poll for 10^5 rankings."""

    def __init__(self) -> None:
        self.rated: dict[tuple[str, str], ag.Rated] = {}  # (task, labeler) -> last ranking
        self.count: dict[str, int] = defaultdict(int)
        self.flagged: dict[str, int] = defaultdict(int)
        self.times: dict[str, list[float]] = defaultdict(list)

    def add(self, record: Comparison) -> None:
        who = record.labeler_id
        self.count[who] += 1
        self.flagged[who] += any(c.flags for c in record.candidates)
        if record.rank_time_ms:
            self.times[who].append(record.rank_time_ms / 1000)
        if record.task_id:
            self.rated[(record.task_id, who)] = ag.Rated(record.task_id, who,
                                                         ranking_of(record))

    def extend(self, records: Iterable[Comparison]) -> LabelerStats:
        for record in records:
            self.add(record)
        return self

    def report(self, golden: Mapping[str, ag.Golden]) -> dict[str, Any]:
        """``{"labelers": [row per labeler, COLUMNS], "pairs": [...], "overall": {...}}``."""
        rated = list(self.rated.values())
        skip = frozenset(golden)
        by_pair = ag.agreement_by_pair(rated, skip)
        by_labeler = ag.agreement_by_labeler(by_pair)
        gold = ag.golden_accuracy(rated, golden)
        gold_items: dict[str, int] = defaultdict(int)
        tasks: dict[str, int] = defaultdict(int)
        for r in rated:
            tasks[r.labeler] += 1
            gold_items[r.labeler] += r.task_id in golden
        rows = []
        for who in sorted(self.count):
            a_sum, a_pairs = by_labeler.get(who, (0.0, 0))
            g_sum, g_weight = gold.get(who, (0.0, 0))
            rows.append({"labeler": who, "comparisons": self.count[who], "tasks": tasks[who],
                         "agreement": a_sum / a_pairs if a_pairs else None,
                         "agreement_pairs": a_pairs,
                         "golden_accuracy": g_sum / g_weight if g_weight else None,
                         "golden_items": gold_items[who],
                         "median_rank_s": statistics.median(self.times[who])
                         if self.times[who] else None,
                         "flag_rate": self.flagged[who] / self.count[who]})
        per_task = Counter(r.task_id for r in rated)
        overlapped = {t for t, n in per_task.items() if n > 1 and t not in skip}
        return {"labelers": rows,
                "pairs": [{"a": a, "b": b, "agreement": s / p, "pairs": p}
                          for (a, b), (s, p) in sorted(by_pair.items())],
                "overall": {"agreement": ag.overall_agreement(by_pair),
                            "pairs": sum(p for _, p in by_pair.values()),
                            "alpha": ag.alpha_over_tasks(rated, skip),
                            "overlapped_tasks": len(overlapped),
                            "golden_tasks": len({r.task_id for r in rated
                                                 if r.task_id in golden})}}


def excluded(report: Mapping[str, Any], min_golden_accuracy: float = 0.0,
             min_agreement: float = 0.0, min_scored: int = 1) -> dict[str, str]:
    """labeler -> why they fall below a threshold; a threshold applies to a labeler only
    once they have ``min_scored`` golden items (for golden accuracy) or overlapped pairs
    (for agreement): too little evidence excludes nobody."""
    out = {}
    for row in report["labelers"]:
        g, a = row["golden_accuracy"], row["agreement"]
        if (min_golden_accuracy > 0 and g is not None and row["golden_items"] >= min_scored
                and g < min_golden_accuracy):
            out[row["labeler"]] = (f"golden accuracy {g:.3f} < {min_golden_accuracy} on "
                                   f"{row['golden_items']} golden items")
        elif (min_agreement > 0 and a is not None and row["agreement_pairs"] >= min_scored
              and a < min_agreement):
            out[row["labeler"]] = (f"agreement {a:.3f} < {min_agreement} over "
                                   f"{row['agreement_pairs']} pairs")
    return out
