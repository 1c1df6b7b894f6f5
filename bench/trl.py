"""Our trainers against TRL's, side by side in one process (issue #4): prints JSON.

    bash deploy/bench-env.sh                       # once: .venv-trl with trl==1.12.0
    .venv-trl/bin/python -m bench.trl rm   # K-wise RM vs TRL RewardTrainer on pairs
    .venv-trl/bin/python -m bench.trl ppo  # LoRA-PPO vs trl.experimental.ppo

TRL is not a dependency of the project: it is imported lazily, only by ``bench.trl_rm`` and
``bench.trl_ppo`` and only inside their functions, so the main venv (and pytest collection)
never needs it. Both sides run in the same process, on the same model directory (the starter
model by default), the same data, the same torch thread count, alternating ``--repeats``
times with a fresh model for every run; medians over the repeats, wall-clock and CPU seconds
of the process (the latter barely moved by other work on shared cores). What is matched and
what is not is written into the JSON itself (``matched`` / ``not_matched``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Sequence

import torch

from bench.kit.report import machine, write_report

log = logging.getLogger(__name__)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.trl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["rm", "ppo"])
    p.add_argument("--model", default="", help="a name of `rlhf models list`, a directory or "
                   "a hub id; default: the starter")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per side")
    p.add_argument("--seed", type=int, default=0, help="data seed; repeat i trains with seed+i")
    p.add_argument("--lora-rank", type=int, default=8, help="both sides (RM and policy)")
    rm = p.add_argument_group("rm")
    rm.add_argument("--train", type=int, default=400, help="K = 4 training comparisons")
    rm.add_argument("--test", type=int, default=100, help="K = 4 held-out comparisons")
    rm.add_argument("--batch", type=int, default=16,
                    help="comparisons per step (TRL: their 6x as many pairs per step)")
    rm.add_argument("--also-batch", type=int, default=0,
                    help="also run ours at this many comparisons per step (more steps)")
    rm.add_argument("--rm-lr", type=float, default=1e-3)
    rm.add_argument("--epochs", type=int, default=1)
    ppo = p.add_argument_group("ppo")
    ppo.add_argument("--steps", type=int, default=4, help="PPO batches timed per run")
    ppo.add_argument("--ppo-batch", type=int, default=16, help="episodes per PPO batch")
    ppo.add_argument("--minibatch", type=int, default=8, help="episodes per optimizer step")
    ppo.add_argument("--response-length", type=int, default=32, help="max new tokens")
    ppo.add_argument("--ppo-lr", type=float, default=1e-4)
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        sys.stderr.write(f"bench.trl: {', '.join(missing)} not installed here (not project "
                         "dependencies): run `bash deploy/bench-env.sh`, then "
                         "`.venv-trl/bin/python -m bench.trl ...`\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(args.threads)
    from rlhf.modeling import resolve_model_name

    model_dir = resolve_model_name(args.model)
    start = time.perf_counter()
    if args.which == "rm":
        from bench.trl_rm import run
    else:
        from bench.trl_ppo import run
    with contextlib.redirect_stdout(sys.stderr):  # Trainer's log printer writes to stdout
        results = run(args, model_dir)
    info = machine("torch", "transformers", "peft", "trl", torch_threads=args.threads)
    report = {"benchmark": args.which, "model": model_dir, "machine": info, **results}
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    write_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
