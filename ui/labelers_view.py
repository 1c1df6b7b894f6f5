"""The Dashboard's Labelers view: rlhf.labelers' report (from the learner's
``GET /v1/dashboard`` ``labeler_quality``) as a sortable table, a bar chart and a summary line.
Pure formatting; the UI imports no learner code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from ui.charts import PALETTE

HEADERS = ["labeler", "rankings", "tasks", "agreement", "pairs", "golden accuracy",
           "golden items", "median s / ranking", "flag rate"]
KEYS = ["labeler", "comparisons", "tasks", "agreement", "agreement_pairs", "golden_accuracy",
        "golden_items", "median_rank_s", "flag_rate"]


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def table_rows(quality: Mapping[str, Any] | None) -> list[list[Any]]:
    """One row per labeler in HEADERS order (None where there is nothing to score yet)."""
    return [[_round(row.get(k)) for k in KEYS] for row in (quality or {}).get("labelers", [])]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def overall_text(quality: Mapping[str, Any] | None) -> str:
    o = (quality or {}).get("overall") or {}
    if not o:
        return "No rankings yet."
    alpha = o.get("alpha")
    return (f"**Inter-labeler agreement: {_pct(o.get('agreement'))}** over {o.get('pairs', 0)} "
            f"candidate pairs of {o.get('overlapped_tasks', 0)} overlapped tasks · "
            f"Krippendorff's alpha (ordinal): {'–' if alpha is None else f'{alpha:.3f}'} · "
            f"{o.get('golden_tasks', 0)} golden tasks ranked (InstructGPT reports ~73% "
            "agreement)")


def bar_chart(rows: Sequence[Mapping[str, Any]], elem_id: str = "dash-labeler-chart",
              series: Sequence[tuple[str, str]] = (("agreement", "agreement"),
                                                   ("golden_accuracy", "golden accuracy")),
              width: int = 520, bar_h: int = 12) -> str:
    """Horizontal bars 0..1 per labeler, one bar per series; hover titles give the values."""
    head = (f'<div class="dash-chart" id="{escape(elem_id)}"><b>Agreement and golden '
            'accuracy per labeler</b>')
    scored = [r for r in rows if any(r.get(k) is not None for k, _ in series)]
    if not scored:
        return head + '<p class="dash-empty">No overlapped or golden rankings yet.</p></div>'
    left, group_h = 110, bar_h * len(series) + 8
    inner = width - left - 10
    parts = []
    for i, row in enumerate(scored):
        y0 = 6 + i * group_h
        parts.append(f'<text x="{left - 6}" y="{y0 + group_h / 2 + 3:.1f}" text-anchor="end" '
                     f'font-size="11">{escape(str(row["labeler"]))[:18]}</text>')
        for j, (key, label) in enumerate(series):
            value = row.get(key)
            if value is None:
                continue
            parts.append(f'<rect x="{left}" y="{y0 + j * bar_h}" width="{inner * value:.1f}" '
                         f'height="{bar_h - 2}" fill="{PALETTE[j]}" '
                         f'data-labeler="{escape(str(row["labeler"]))}" data-metric="{key}" '
                         f'data-value="{value!r}"><title>{escape(str(row["labeler"]))} · '
                         f'{label} · {value:.3f}</title></rect>')
    height = 12 + len(scored) * group_h
    legend = " &nbsp; ".join(f'<span style="color:{PALETTE[j]}">■ {escape(label)}</span>'
                             for j, (_, label) in enumerate(series))
    return (f'{head}<div class="dash-legend">{legend}</div><svg viewBox="0 0 {width} '
            f'{height}" width="100%" role="img" aria-label="labeler agreement">'
            f'{"".join(parts)}</svg></div>')
