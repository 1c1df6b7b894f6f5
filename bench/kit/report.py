"""How a benchmark reports: one JSON document on stdout (and in ``--out``), the machine it
ran on, and curves as a PNG."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_IMPORT_NAMES = {"grpcio": "grpc"}  # distribution -> module, where they differ


def write_report(report: dict, out: str | None = None) -> None:
    """Print the report as one JSON document (and write it to ``out`` when given)."""
    text = json.dumps(report, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    sys.stdout.write(text + "\n")


def run_and_report(run: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> int:
    """``run(args)``'s report on stdout and in ``args.out``; exit code 0."""
    write_report(run(args), args.out)
    return 0


def server_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--model, --threads and --out, as the benchmarks of a `rlhf serve` child read them."""
    p.add_argument("--model", default="", help="a name of `rlhf models list` (tiny = "
                   "starter-tiny), a directory or a hub id; default: the starter")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--out", help="also write the JSON here")
    return p


def machine(*libraries: str, **extra: object) -> dict:
    """CPU count, platform, Python and the version of each library (None: not installed)."""
    info: dict = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                  "python": platform.python_version()}
    for name in libraries:
        try:
            info[name] = importlib.import_module(_IMPORT_NAMES.get(name, name)).__version__
        except ImportError:
            info[name] = None
    return {**info, **extra}


def plot_curves(arms: Mapping[str, Sequence[dict]], panels: Sequence[tuple[str, str]],
                path: Path, title: str, x: str = "iteration",
                lines: Mapping[str, float] | None = None) -> None:
    """One panel per ``(key, label)`` of ``panels``, every arm's curve (a list of points,
    each a dict with ``x`` and the keys; None values skipped) on each; ``lines`` adds a
    dashed horizontal line to a panel. Agg backend: no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, curve in arms.items():
            points = [(p[x], p[key]) for p in curve if p[key] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
        if lines and key in lines:
            ax.axhline(lines[key], color="grey", lw=0.8, ls="--")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
