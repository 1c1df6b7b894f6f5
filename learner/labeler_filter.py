"""Which labelers' rankings train the reward model (docs/design.md §4b).

InstructGPT kept the labelers who agreed with the researchers' golden labels; here the
operator sets thresholds (``--rm-min-golden-accuracy``, ``--rm-min-agreement``) and every
labeler below one, with enough evidence (``--rm-min-scored``), leaves the RM's data for this
iteration (their rankings stay in the dataset: a later iteration with other thresholds, or
more evidence, takes them back). The scores are rlhf.labelers' over the very comparisons
the RM is fitted on, with the golden tasks' known answers from the task queue.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf.agreement import Golden
from rlhf.labelers import LabelerStats, excluded
from rlhf.v1.feedback_pb2 import Comparison

log = logging.getLogger(__name__)


def exclude_labelers(comparisons: Sequence[Comparison], golden: Mapping[str, Golden],
                     min_golden_accuracy: float, min_agreement: float, min_scored: int
                     ) -> tuple[list[Comparison], dict[str, Any]]:
    """(the comparisons kept, ``labelers/...`` and ``rm/excluded_*`` metrics)."""
    if min_golden_accuracy <= 0 and min_agreement <= 0:
        return list(comparisons), {"rm/excluded_labelers": 0, "rm/excluded_comparisons": 0}
    report = LabelerStats().extend(comparisons).report(golden)
    out = excluded(report, min_golden_accuracy, min_agreement, min_scored)
    kept = [c for c in comparisons if c.labeler_id not in out]
    if out:
        log.info("rm: leaving out labelers %s", out)
    return kept, {"rm/excluded_labelers": len(out),
                  "rm/excluded_comparisons": len(comparisons) - len(kept),
                  "labelers/excluded": out,
                  "labelers/golden_accuracy": {r["labeler"]: r["golden_accuracy"]
                                               for r in report["labelers"]
                                               if r["golden_accuracy"] is not None},
                  "labelers/agreement": report["overall"]["agreement"]}
