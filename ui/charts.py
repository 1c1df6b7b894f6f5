"""Small line charts as inline SVG, for the Dashboard's per-iteration curves.

Pure string building, no browser code: each series is a polyline over the iterations in
history order with a dot (and a hover title "metric · iteration · value") per logged point,
so a single iteration is visible too. (Gradio 6's LinePlot keeps the color domain of the
first data it got and redraws with the previous value when other props change, which
drops metrics that appear later, e.g. a gold win rate.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

PALETTE = ("#2563eb", "#ea580c", "#16a34a", "#dc2626", "#9333ea", "#0891b2")
WIDTH, HEIGHT = 520, 190
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28  # plot-area margins (axis labels live there)


def _num(value: float, span: float = 0.0) -> str:
    """3 significant digits, more when the axis spans little of the value (3.861..3.869)."""
    extra = math.ceil(math.log10(abs(value) / span)) if span > 0 and value else 0
    return f"{value:.{3 + max(0, extra)}g}"


def _y_range(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low < 1e-12:  # one value (or a flat line): centre it
        pad = abs(high) * 0.1 or 0.5
        return low - pad, high + pad
    pad = (high - low) * 0.08
    return low - pad, high + pad


def line_chart(title: str, ids: Sequence[str], series: Mapping[str, Sequence[float | None]],
               elem_id: str = "") -> str:
    """An SVG chart: x = ``ids`` (iterations, in order), one line per ``series`` entry
    (values aligned with ``ids``; None where that iteration did not log the metric)."""
    points = {name: [(i, v) for i, v in enumerate(vals)
                     if v is not None and math.isfinite(v)] for name, vals in series.items()}
    points = {name: pts for name, pts in points.items() if pts}
    head = f'<div class="dash-chart" id="{escape(elem_id)}"><b>{escape(title)}</b>'
    if not points:
        return head + '<p class="dash-empty">No data yet.</p></div>'
    low, high = _y_range([v for pts in points.values() for _, v in pts])
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(i: int) -> float:
        return LEFT + (inner_w / 2 if len(ids) == 1 else inner_w * i / (len(ids) - 1))

    def y(v: float) -> float:
        return TOP + inner_h * (high - v) / (high - low)

    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{inner_w}" height="{inner_h}" '
             'fill="none" stroke="#d4d4d8"/>']
    for v in (low, (low + high) / 2, high):  # three y ticks with grid lines
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(v):.1f}" '
                     f'y2="{y(v):.1f}" stroke="#f4f4f5"/>'
                     f'<text x="{LEFT - 4}" y="{y(v) + 4:.1f}" text-anchor="end" '
                     f'font-size="11">{_num(v, high - low)}</text>')
    for i in sorted({0, len(ids) - 1}):  # first and last iteration on the x axis
        anchor = "middle" if len(ids) == 1 else "start" if i == 0 else "end"
        parts.append(f'<text x="{x(i):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}" '
                     f'font-size="11">{escape(ids[i])}</text>')
    legend = []
    for n, (name, pts) in enumerate(points.items()):
        color = PALETTE[n % len(PALETTE)]
        if len(pts) > 1:
            path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                         'stroke-width="2"/>')
        for i, v in pts:
            label = escape(f"{name} · {ids[i]} · {_num(v)}")
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3.5" fill="{color}" '
                         f'data-metric="{escape(name)}" data-iteration="{escape(ids[i])}" '
                         f'data-value="{v!r}"><title>{label}</title></circle>')
        legend.append(f'<span style="color:{color}">● {escape(name)}</span>')
    svg = (f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" '
           f'aria-label="{escape(title)}">{"".join(parts)}</svg>')
    return f'{head}<div class="dash-legend">{" &nbsp; ".join(legend)}</div>{svg}</div>'
