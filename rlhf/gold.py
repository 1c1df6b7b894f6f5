"""The hidden "gold" preference of simulated labelers (InstructGPT's labelers, stood in for).

One rule, shared by ``rlhf simulate`` (rehearsals, load tests, demos) and the learner's
efficacy benchmark, so "the policy got better" is measured against the same taste the
labelers ranked with. On the starter model's tasks (``rlhf.starter_data``) it prefers, in
this order of weight:

1. a correct answer (``starter_data.check``)            +2.0
2. a polite one (a friendly opener or polite phrasing)  +1.0
3. a concise one (no rambling opener/closer)            -0.5 for rambling
4. a non-empty one                                      -1.0 for an empty answer

Equal scores tie. The learner never sees this function: it only sees the rankings.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from rlhf import starter_data
from rlhf.starter_data import Task

CORRECT, POLITE, RAMBLING, EMPTY = 2.0, 1.0, -0.5, -1.0

POLITE_MARKERS: tuple[str, ...] = (
    *(p.lower() for p in starter_data._POLITE_PREFIXES),
    "glad you asked", "nice to meet you", "thank you for asking", "very welcome", "lovely",
)
RAMBLING_MARKERS: tuple[str, ...] = tuple(
    s.lower() for s in (*starter_data._VERBOSE_OPENERS, *starter_data._VERBOSE_CLOSERS))


def gold_score(task: Task, text: str) -> float:
    """The gold utility of ``text`` as an answer to ``task`` (higher = preferred)."""
    answer = text.strip()
    if not answer:
        return EMPTY
    lowered = answer.lower()
    score = CORRECT if starter_data.check(task, answer) else 0.0
    if any(marker in lowered for marker in POLITE_MARKERS):
        score += POLITE
    if any(marker in lowered for marker in RAMBLING_MARKERS):
        score += RAMBLING
    return score


def gold_ranks(task: Task, texts: Sequence[str]) -> list[int]:
    """Ranks as the Comparison record holds them: 1 = best; equal gold scores share a rank
    (1 + the number of strictly better texts)."""
    scores = [gold_score(task, t) for t in texts]
    return [1 + sum(other > mine for other in scores) for mine in scores]


def gold_prefers(task: Task, a: str, b: str) -> float:
    """1.0 if ``a`` beats ``b`` under the gold preference, 0.5 on a tie, else 0.0 (the
    per-prompt term of a gold win rate)."""
    sa, sb = gold_score(task, a), gold_score(task, b)
    return 1.0 if sa > sb else 0.5 if sa == sb else 0.0


def gold_tasks(n: int, seed: int) -> list[Task]:
    """``n`` tasks for simulated labelers to ask (all kinds, balanced, shuffled by seed)."""
    tasks = starter_data.make_tasks(n, seed)
    random.Random(seed).shuffle(tasks)
    return tasks
