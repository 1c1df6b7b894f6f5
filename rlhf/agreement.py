"""Agreement between labelers, and with golden answers: pure math, no I/O (docs/design.md §4b).

InstructGPT (Ouyang et al. 2022 §3.4, appendix B) screened labelers by how often they agreed
with each other and with the researchers, and reports ~73% inter-labeler agreement. The same
numbers here, for the dashboard (``rlhf.labelers``), `rlhf data export --labelers` and the
learner's exclusion or weighting of labelers in the reward-model loss.

A *ranking* maps a candidate key (the candidate's text: two labelers of one overlapped task
see the same texts) to its rank, 1 = best, equal ranks = a tie.

**Pairwise agreement** of two rankings of the same candidates: over every unordered pair of
candidates both ranked, a pair scores 1 when both order it the same way (or both tie it),
0 when they order it oppositely, and **0.5 when one ties it and the other orders it**. Why
half: a tie is "no preference", halfway between the two orders (the convention of a tie as
half a win, as in Kendall's tau's tie handling and in win rates); counting it as a full
disagreement would punish a careful labeler who ties two near-equal answers exactly as much
as one who flips them, and the RM loss itself skips tied pairs (it learns nothing wrong from
them). Agreement over many tasks pools the pairs (a 9-way ranking weighs more than a 2-way
one: it says more).

**Krippendorff's alpha (ordinal)** over the overlapped tasks: each (task, candidate) is a
unit, the ranks the labelers gave it are its values; 1 = perfect agreement, 0 = what chance
gives, below 0 = systematic disagreement. Coincidence matrix o_ck = sum over units of
(ordered pairs of values c, k from different labelers) / (m_u - 1); n_c = sum_k o_ck; the
ordinal distance d_ck = (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2;
alpha = 1 - (n - 1) * sum o_ck d_ck / sum_{c,k} n_c n_k d_ck (Krippendorff 2011,
"Computing Krippendorff's Alpha-Reliability").

**Golden accuracy**: a golden item has a known ranking of its candidates (score = the
pairwise agreement with it) or a known best answer (score = top-1 hit: 1 when the labeler
ranks it alone at the top, 1/m when it shares the top rank with m-1 others, else 0).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

Ranking = Mapping[str, int]


@dataclass(frozen=True)
class Rated:
    """One labeler's ranking of one task's candidates."""

    task_id: str
    labeler: str
    ranking: Ranking


@dataclass(frozen=True)
class Golden:
    """The known answer of a golden task: a ranking of its candidates, or the best one."""

    ranking: Ranking | None = None
    best: str | None = None


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def pair_scores(a: Ranking, b: Ranking) -> tuple[float, int]:
    """(sum of pair scores, number of pairs) over the candidates both rankings hold."""
    common = sorted(set(a) & set(b))
    total, pairs = 0.0, 0
    for x, y in itertools.combinations(common, 2):
        sa, sb = _sign(a[x] - a[y]), _sign(b[x] - b[y])
        total += 1.0 if sa == sb else 0.5 if sa == 0 or sb == 0 else 0.0
        pairs += 1
    return total, pairs


def pairwise_agreement(a: Ranking, b: Ranking) -> float | None:
    """Share of the common candidate pairs ordered alike (ties: see the module doc)."""
    total, pairs = pair_scores(a, b)
    return total / pairs if pairs else None


def top1_hit(ranking: Ranking, best: str) -> float | None:
    """1 if ``best`` is ranked alone at the top, 1/m if m candidates share the top rank
    with it, 0 otherwise; None when the ranking does not hold ``best``."""
    if best not in ranking:
        return None
    top = min(ranking.values())
    if ranking[best] != top:
        return 0.0
    return 1.0 / sum(1 for r in ranking.values() if r == top)


def golden_score(ranking: Ranking, golden: Golden) -> tuple[float, int] | None:
    """(score sum, weight) of one ranking of a golden task: pairs against the known ranking
    (each pair weighs 1), or the top-1 hit (weighs 1); None when nothing is comparable."""
    if golden.ranking is not None:
        total, pairs = pair_scores(ranking, golden.ranking)
        return (total, pairs) if pairs else None
    if golden.best is not None:
        hit = top1_hit(ranking, golden.best)
        return None if hit is None else (hit, 1)
    return None


def _latest(rated: Iterable[Rated]) -> dict[str, dict[str, Ranking]]:
    """task -> labeler -> ranking (a labeler's last ranking of a task wins)."""
    out: dict[str, dict[str, Ranking]] = defaultdict(dict)
    for r in rated:
        out[r.task_id][r.labeler] = r.ranking
    return out


def agreement_by_pair(rated: Iterable[Rated], skip: frozenset[str] = frozenset()
                      ) -> dict[tuple[str, str], tuple[float, int]]:
    """(labeler a, labeler b) with a < b -> pooled (score sum, pairs) over the tasks both
    ranked; tasks in ``skip`` (golden ones, scored apart) are left out."""
    out: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for task, by_labeler in _latest(rated).items():
        if task in skip:
            continue
        for x, y in itertools.combinations(sorted(by_labeler), 2):
            total, pairs = pair_scores(by_labeler[x], by_labeler[y])
            if pairs:
                out[(x, y)][0] += total
                out[(x, y)][1] += pairs
    return {k: (v[0], int(v[1])) for k, v in out.items()}


def agreement_by_labeler(by_pair: Mapping[tuple[str, str], tuple[float, int]]
                         ) -> dict[str, tuple[float, int]]:
    """labeler -> pooled (score sum, pairs) with everyone they overlapped with."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for (x, y), (total, pairs) in by_pair.items():
        for who in (x, y):
            out[who][0] += total
            out[who][1] += pairs
    return {k: (v[0], int(v[1])) for k, v in out.items()}


def overall_agreement(by_pair: Mapping[tuple[str, str], tuple[float, int]]) -> float | None:
    total = sum(t for t, _ in by_pair.values())
    pairs = sum(p for _, p in by_pair.values())
    return total / pairs if pairs else None


def golden_accuracy(rated: Iterable[Rated], golden: Mapping[str, Golden]
                    ) -> dict[str, tuple[float, int]]:
    """labeler -> pooled (score sum, weight) over the golden tasks they ranked."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for task, by_labeler in _latest(rated).items():
        if task not in golden:
            continue
        for who, ranking in by_labeler.items():
            scored = golden_score(ranking, golden[task])
            if scored is not None:
                out[who][0] += scored[0]
                out[who][1] += scored[1]
    return {k: (v[0], int(v[1])) for k, v in out.items()}


def krippendorff_alpha_ordinal(units: Sequence[Sequence[int]]) -> float | None:
    """Alpha over ``units`` (each: the values the labelers gave one unit); units with fewer
    than two values are not pairable and left out. None when there is no pairable unit or
    every value is the same (no variation: alpha is undefined)."""
    o: dict[tuple[int, int], float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, j in itertools.permutations(range(m), 2):
            o[(values[i], values[j])] += 1.0 / (m - 1)
    n_c: dict[int, float] = defaultdict(float)
    for (c, _), v in o.items():
        n_c[c] += v
    n = sum(n_c.values())
    cats = sorted(n_c)
    if len(cats) < 2:
        return None

    def delta(c: int, k: int) -> float:
        lo, hi = min(c, k), max(c, k)
        inner = sum(n_c[g] for g in cats if lo <= g <= hi)
        return (inner - (n_c[c] + n_c[k]) / 2) ** 2

    observed = sum(v * delta(c, k) for (c, k), v in o.items())
    expected = sum(n_c[c] * n_c[k] * delta(c, k) for c in cats for k in cats)
    return 1.0 - (n - 1) * observed / expected


def alpha_over_tasks(rated: Iterable[Rated], skip: frozenset[str] = frozenset()
                     ) -> float | None:
    """Ordinal alpha with one unit per (overlapped task, candidate)."""
    units: list[list[int]] = []
    for task, by_labeler in _latest(rated).items():
        if task in skip or len(by_labeler) < 2:
            continue
        keys = sorted({key for r in by_labeler.values() for key in r})
        units += [[r[key] for r in by_labeler.values() if key in r] for key in keys]
    return krippendorff_alpha_ordinal(units)
