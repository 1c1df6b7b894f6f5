"""Efficacy bench: ``rlhf bench efficacy [--preferences a,b] [learner flags]``.

Runs ``bench.efficacy_loop`` (simulated labelers with a hidden preference rank the policy's own
samples; real Redis stream, real ``Learner.run`` iterations) once per arm: one arm per
preference (``rlhf.preferences``), and with ``--ptx-ablation`` each preference twice, ptx off
and on (InstructGPT's PPO vs PPO-ptx). The learner runs with its SHIPPED defaults
(``LearnerConfig``); any ``rlhf learn`` flag (``--rm-lr``, ``--ppo-steps``...) given here
overrides one, so "the defaults learn" and "these settings learn" are the same command.
Prints one JSON document (per-iteration curves of every arm: win rate vs the reference, RM
held-out accuracy, RM reward, KL, held-out pretraining loss, ...) and writes a PNG with one
panel per curve, every arm on each.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench.efficacy_loop import EfficacyConfig, run_efficacy
from bench.kit.report import plot_curves, write_report
from learner.config import LearnerConfig
from rlhf import preferences, settings
from rlhf.local_redis import private_redis
from rlhf.modeling import load_model, resolve_model_name

log = logging.getLogger(__name__)

PANELS = (("win_rate", "win rate vs reference"), ("rm_accuracy", "RM held-out accuracy"),
          ("reward", "RM reward (policy, eval prompts)"), ("kl", "KL(policy || reference)"),
          ("ptx_loss", "held-out pretraining loss"))
INFRA = {"model", "device", "threads", "redis_url", "data_dir", "adapter_store", "seed",
         "progress_bars"}
"""LearnerConfig fields the bench sets itself (they are not learning knobs)."""


def learner_config(overrides: dict, model: str, device: str, threads: int, seed: int,
                   redis_url: str, folder: Path, ptx_coef: float | None) -> LearnerConfig:
    given = {**overrides, "model": model, "device": device, "threads": threads,
             "redis_url": redis_url, "data_dir": str(folder / "data"),
             "adapter_store": str(folder / "store"), "seed": seed, "progress_bars": False}
    if ptx_coef is not None:
        given["ppo_ptx_coef"] = ptx_coef
    return settings.from_flat(LearnerConfig, given)


def run_arm(cfg_of: Callable[[str, Path], LearnerConfig], name: str, eff: EfficacyConfig,
            redis_url: str, demonstrations: Callable | None = None) -> dict:
    """One arm on a fresh copy of the base (a Learner wraps its base in place) and its own
    Redis database and data folders; ``demonstrations`` as ``run_efficacy`` takes it."""
    start = time.perf_counter()
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)  # "concise/ptx_on"
    with tempfile.TemporaryDirectory(prefix=f"efficacy-{safe}-") as tmp:
        cfg = cfg_of(redis_url, Path(tmp))
        loaded = load_model(cfg.model, device=cfg.device)
        torch.manual_seed(eff.seed)
        curve = run_efficacy(eff, cfg, loaded, on_point=lambda p: log.info(
            "%s iteration %d: %s", name, p["iteration"], json.dumps(p)),
            demonstrations=demonstrations)
    return {"preference": eff.preference, "ptx_coef": cfg.ppo.ptx_coef,
            "seconds": round(time.perf_counter() - start, 1), "curve": curve,
            "summary": summarize(curve)}


def summarize(curve: Sequence[dict]) -> dict:
    first, last = curve[0], curve[-1]
    at3 = curve[min(3, len(curve) - 1)]
    return {"win_rate_start": first["win_rate"], "win_rate_at_3": at3["win_rate"],
            "win_rate_end": last["win_rate"],
            "win_rate_best": max(p["win_rate"] for p in curve),
            "score_start": first["score"], "score_end": last["score"],
            "rm_accuracy_end": last["rm_accuracy"], "reward_end": last["reward"],
            "kl_max": max(p["kl"] for p in curve), "kl_end": last["kl"],
            "empty_end": last["empty"], "ptx_loss_start": first["ptx_loss"],
            "ptx_loss_end": last["ptx_loss"],
            "ptx_loss_rise": (last["ptx_loss"] - first["ptx_loss"]
                              if last["ptx_loss"] is not None and first["ptx_loss"] is not None
                              else None)}


def loop_parser(prog: str, doc: str | None, iterations: int, png: str
                ) -> argparse.ArgumentParser:
    """The flags of a simulated-labeler run (`rlhf bench efficacy`, `rlhf bench tax`)."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other flag is an `rlhf learn` knob (see "
                                       "`rlhf learn --help`), e.g. --rm-lr 3e-3.")
    p.add_argument("--model", default="", help="model name, dir or hub id; default: starter")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: a shared 2-core machine crawls with more)")
    p.add_argument("--prompts", choices=["auto", "starter", "general"], default="auto",
                   help="auto: the starter's tasks on the starter model, else general prompts")
    p.add_argument("--iterations", type=int, default=iterations)
    p.add_argument("--tasks-per-iteration", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="samples ranked per prompt")
    p.add_argument("--labelers", type=int, default=8)
    p.add_argument("--eval-tasks", type=int, default=200, help="held-out prompts (win rate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=png, help="where the plot goes")
    return p


def learner_overrides(rest: Sequence[str], **defaults: object) -> dict:
    """The `rlhf learn` knobs among ``rest`` (``defaults`` where not given), checked before
    any work is done."""
    knobs = argparse.ArgumentParser(prog="learner knobs", add_help=False)
    settings.add_arguments(knobs, LearnerConfig)
    given = knobs.parse_args(list(rest))
    overrides = {k: v for k, v in vars(given).items() if v is not None and k not in INFRA}
    for key, value in defaults.items():
        overrides.setdefault(key, value)
    settings.from_flat(LearnerConfig, overrides)  # a bad value fails before any work
    return overrides


def start_run(args: argparse.Namespace) -> tuple[str, str]:
    """Logging and threads set; (the resolved model, the prompt set)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("learner.reward_model", "learner.ppo", "learner.intake", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    starter = not args.model or args.model.startswith("starter")
    model = resolve_model_name(args.model)  # builds / fetches on first use
    prompts = args.prompts if args.prompts != "auto" else "starter" if starter else "general"
    return model, prompts


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, dict]:
    p = loop_parser("rlhf bench efficacy", __doc__, 5, "bench-out/efficacy.png")
    p.add_argument("--preferences", default="gold",
                   help="comma-separated, one arm each; known: "
                   + ", ".join(preferences.PREFERENCES))
    p.add_argument("--ptx-ablation", type=float, default=None, metavar="COEF",
                   help="run every preference twice: ptx off and ptx COEF")
    args, rest = p.parse_known_args(list(argv))
    return args, learner_overrides(rest)


def _arm_urls(base: str, n: int) -> list[str]:
    root, _, db = base.rpartition("/")
    first = int(db) if db.isdigit() else 0
    return [f"{root}/{first + i}" for i in range(n)]


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    model, prompts = start_run(args)
    names = [n.strip() for n in args.preferences.split(",") if n.strip()]
    arms: dict[str, tuple[str, float | None]] = {}
    for name in names:
        preferences.get(name)  # unknown names fail before any work
        if args.ptx_ablation is None:
            arms[name] = (name, None)
        else:
            arms[f"{name}/ptx_off"] = (name, 0.0)
            arms[f"{name}/ptx_on"] = (name, args.ptx_ablation)
    start = time.perf_counter()
    results = {}
    with private_redis("rlhf-efficacy-") as url:  # a throwaway redis-server for the run
        for (arm, (pref, ptx)), arm_url in zip(arms.items(), _arm_urls(url, len(arms)),
                                               strict=True):
            eff = EfficacyConfig(iterations=args.iterations,
                                 tasks_per_iteration=args.tasks_per_iteration, k=args.k,
                                 labelers=args.labelers, eval_tasks=args.eval_tasks,
                                 preference=pref, prompts=prompts, seed=args.seed)
            results[arm] = run_arm(
                lambda u, folder, ptx=ptx: learner_config(
                    overrides, model, args.device, args.threads, args.seed, u, folder, ptx),
                arm, eff, arm_url)
    report = {"model": model, "threads": args.threads, "prompts": prompts,
              "learner_overrides": overrides,
              "learner": settings.describe(learner_config(overrides, model, args.device,
                                                          args.threads, args.seed, "", Path(),
                                                          None)),
              "arms": results, "elapsed_s": round(time.perf_counter() - start, 1)}
    png = Path(args.png)
    plot_curves({name: arm["curve"] for name, arm in results.items()}, PANELS, png,
                f"efficacy on {Path(model).name}: {len(results)} arms, "
         f"{args.iterations} iterations, {args.eval_tasks} held-out prompts",
                lines={"win_rate": 0.5})
    report["png"] = str(png.resolve())
    write_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
