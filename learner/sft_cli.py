"""`rlhf sft --demonstrations FILE [learner flags]`: the SFT phase offline, for a cold start.

The learner of `rlhf learn` (same flags, data dir, Redis, adapter store) stores the file's
demonstrations in its durable dataset (so every later SFT trains on them too), then runs
the phases sft -> publish -> record on the whole SFT set (``Learner.cold_start``): the
"sft" adapter is published as the next version through the iteration's own publish path
(store, checkpoint, registry: made current) and recorded as an iteration. `rlhf learn` on
that data dir then continues from the checkpoint: the policy starts as a copy of the SFT
adapter, which stays PPO's frozen KL reference and the RM's initial LoRA. Prints one JSON
line: version, iteration, metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from rlhf.data import DemonstrationFileError, labeler_arg, read_demonstrations

if TYPE_CHECKING:
    from learner.config import LearnerConfig


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demonstrations", required=True, metavar="FILE",
                        help="JSONL (.gz ok) as `rlhf data import --demonstrations` reads: "
                        "{\"prompt\", \"response\"} or chat {\"messages\": [...]} ending on "
                        "the assistant's answer; all or nothing")
    parser.add_argument("--labeler-id", type=labeler_arg, default="imported",
                        help="labeler the file's demonstrations are stored under")


def run(cfg: LearnerConfig, path: str, labeler_id: str = "imported") -> int:
    try:
        demonstrations = read_demonstrations(path, labeler_id)
    except (DemonstrationFileError, OSError) as exc:
        sys.stderr.write(f"rlhf sft: --demonstrations: {exc}\n")
        return 2
    if not demonstrations:
        sys.stderr.write(f"rlhf sft: --demonstrations: {path} holds no demonstrations\n")
        return 2
    import torch

    from learner.iteration import Learner
    from rlhf.modeling import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype,
                        load_in_4bit=cfg.load_in_4bit)
    learner = Learner(cfg, loaded)
    try:
        done = learner.cold_start(demonstrations)
    finally:
        learner.close()
    sys.stdout.write(json.dumps({"event": "published", "version": done.version,
                                 "iteration": done.id, "metrics": done.metrics},
                                default=str) + "\n")
    return 0
