"""The figures every benchmark reports: percentiles, per-request samples and their level
summary, spread over repeats, and targets met or not."""

from __future__ import annotations

import math
import operator
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

PERCENTILES = ("p50", "p90", "p95", "p99")
_OPS = {">=": operator.ge, "<=": operator.le, "<": operator.lt, "==": operator.eq}


def percentiles(values: Sequence[float], names: Sequence[str] = PERCENTILES
                ) -> dict[str, float | None]:
    """``{"p50": ..}`` in ms of ``values`` in seconds (NaN left out), linear interpolation
    between the closest ranks; None when there are no values."""
    v, out = sorted(x for x in values if not math.isnan(x)), {}
    for name in names:
        pos = (len(v) - 1) * float(name[1:]) / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        out[name] = round(1000 * (v[lo] + (v[hi] - v[lo]) * (pos - lo)), 2) if v else None
    return out


@dataclass
class Sample:
    """One streamed request as its client saw it (seconds; NaN: not measured)."""

    ttft: float = math.nan
    latency: float = math.nan
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    tpot: float = math.nan
    error: str | None = None


def level_summary(samples: Sequence[Sample], wall: float, concurrency: int,
                  choices: int = 1) -> dict:
    """Requests, errors (with a few examples), tokens/s over the level's wall time and the
    client-side time distributions of the requests that finished."""
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in ok)
    errors = [s.error for s in samples if s.error is not None]
    return {"concurrency": concurrency, "requests": len(samples), "errors": len(errors),
            "error_examples": sorted(set(errors))[:3], "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "mean_completion_tokens": round(tokens / max(1, len(ok)) / choices, 1),
            "ttft_ms": percentiles([s.ttft for s in ok]),
            "itl_ms": percentiles([x for s in ok for x in s.itl]),
            "latency_ms": percentiles([s.latency for s in ok])}


def spread(values: Sequence[float]) -> dict:
    """Median and spread of one metric over repeated runs."""
    vals = [float(v) for v in values]
    return {"median": round(statistics.median(vals), 4), "min": round(min(vals), 4),
            "max": round(max(vals), 4), "runs": [round(v, 4) for v in vals]}


def check_target(got: float | None, want: float, op: str) -> dict:
    """``{"target", "got", "met"}``: met when ``got op want`` (never when ``got`` is None)."""
    return {"target": want, "got": got, "met": got is not None and _OPS[op](got, want)}


def spread_runs(runs: Sequence[dict]) -> dict:
    """Per key of repeated runs' results: floats as their spread, anything else (counts,
    equal in every run) as the first run has it."""
    return {k: spread([r[k] for r in runs]) if isinstance(v, float) else v
            for k, v in runs[0].items()}


def ratio_spread(num: Sequence[dict], den: Sequence[dict], key: str) -> dict:
    """Spread of ``num[i][key] / den[i][key]`` over paired runs."""
    return spread([a[key] / b[key] for a, b in zip(num, den, strict=True)])
