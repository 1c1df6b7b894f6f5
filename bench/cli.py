"""`rlhf bench SUITE [flags]`: one benchmark per suite, each printing one JSON document.

rlhf/cli.py hands ``rlhf bench`` here (lazily: the product never imports bench); each suite
is a module of this package with ``main(argv) -> int`` and its own flags (``--help``). A new
benchmark is a module plus a line in SUITES.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

SUITES: dict[str, tuple[str, str]] = {
    "serving": ("bench.serving", "tokens/s, TTFT, ITL of `rlhf serve` vs sequential generate; "
                "--against vllm: vs vLLM's server"),
    "feedback": ("bench.feedback", "comparisons/s stored durably; simulated labelers end to end"),
    "hotswap": ("bench.hotswap", "publish-to-live latency of adapter hot-swaps, tokens/s dip"),
    "efficacy": ("bench.efficacy", "hidden preferences learned through real iterations "
                 "(win-rate curves, PNG)"),
    "tax": ("bench.tax", "alignment tax: PPO vs PPO-ptx vs SFT + PPO-ptx (win rate, KL, "
            "held-out LM loss rise; the paper's target as pass/fail)"),
    "rm": ("bench.rm", "K-wise vs pairwise RM training; held-out HH-RLHF accuracy"),
    "dist": ("bench.dist", "one iteration of `rlhf learn` with 1 vs N processes (wall, CPU, "
             "agreement)"),
    "memory": ("bench.memory", "peak tensor memory of an iteration over the base weights"),
    "trl": ("bench.trl", "our RM / PPO vs TRL's (in .venv-trl: deploy/bench-env.sh)"),
}


def module_of(suite: str, argv: Sequence[str]) -> str:
    if suite == "serving" and any(a.split("=")[0] == "--against" for a in argv):
        return "bench.vllm"
    return SUITES[suite][0]


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        lines = [f"  {name:<10} {text}" for name, (_, text) in SUITES.items()]
        out = sys.stdout if not argv or argv[0] in ("-h", "--help") else sys.stderr
        out.write("usage: rlhf bench SUITE [options]   (rlhf bench SUITE --help)\n\n"
                  "suites:\n" + "\n".join(lines) + "\n")
        return 0 if out is sys.stdout else 2
    return importlib.import_module(module_of(argv[0], argv[1:])).main(argv[1:])
