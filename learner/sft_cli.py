"""`rlhf sft --demonstrations FILE [learner flags]`: the SFT phase offline, for a cold start.

The learner of `rlhf learn` (same flags, data dir, Redis, adapter store) runs the phases
sft -> publish -> record on the file's demonstrations: the "sft" adapter is published as the
next version through the iteration's own publish path (store, checkpoint, registry: made
current) and recorded as an iteration. `rlhf learn` on that data dir then continues from the
checkpoint: the policy starts as a copy of the SFT adapter, which stays PPO's frozen KL
reference and the RM's initial LoRA. Prints one JSON line: version, iteration, metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import json_format

from rlhf.v1.feedback_pb2 import Demonstration

if TYPE_CHECKING:
    from learner.config import LearnerConfig

PHASES = ("sft", "publish", "record")


class DemonstrationFileError(ValueError):
    """A demonstrations file that cannot be used; names the line."""


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demonstrations", required=True, metavar="FILE",
                        help="JSONL, one Demonstration record (proto JSON) per line")


def read_demonstrations(path: str | Path) -> list[Demonstration]:
    """Demonstrations of a JSONL file (stand-in until ``rlhf.data.read_demonstrations``):
    each line a Demonstration in proto JSON with an id, messages ending on a user turn and a
    non-empty answer; the first bad line raises ``DemonstrationFileError``."""
    out, seen = [], set()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DemonstrationFileError(f"{path}: {exc.strerror or exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            demo = json_format.Parse(line, Demonstration())
        except json_format.ParseError as exc:
            raise DemonstrationFileError(f"{path}:{number}: not a Demonstration: {exc}") from None
        problem = ("id is empty" if not demo.id
                   else "messages must end on a user turn" if not demo.messages
                   or demo.messages[-1].role != "user"
                   else "answer is empty" if not demo.answer.strip() else None)
        if problem is not None:
            raise DemonstrationFileError(f"{path}:{number}: {problem}")
        if demo.id not in seen:
            seen.add(demo.id)
            out.append(demo)
    if not out:
        raise DemonstrationFileError(f"{path}: no demonstrations")
    return out


def run(cfg: LearnerConfig, path: str) -> int:
    try:
        demonstrations = read_demonstrations(path)
    except DemonstrationFileError as exc:
        sys.stderr.write(f"rlhf sft: --demonstrations: {exc}\n")
        return 2
    import torch

    from learner.iteration import Learner, Progress, Work
    from rlhf.modeling import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype,
                        load_in_4bit=cfg.load_in_4bit)
    learner = Learner(cfg, loaded)
    try:
        work = Work(demonstrations=demonstrations, new_demonstrations=len(demonstrations))
        done = learner.run(Progress(learner.new_id()), work, PHASES)
    finally:
        learner.close()
    sys.stdout.write(json.dumps({"event": "published", "version": done.version,
                                 "iteration": done.id, "metrics": done.metrics},
                                default=str) + "\n")
    return 0
