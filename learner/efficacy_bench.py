"""Efficacy bench (issue #4): ``python -m learner.efficacy_bench [--iterations N ...]``.

Runs ``learner.efficacy`` (simulated labelers with the hidden gold preference rank the
policy's own samples; real Redis stream, real ``Learner.run`` iterations) on the starter model
twice with the same seeds: ptx off and ptx on (``--ptx-coef``), InstructGPT's PPO vs
PPO-ptx (the pretraining mix should cost little reward and keep the pretraining loss from
rising). Caveat: the starter model never trained on ``pretraining_corpus`` (its loss there is
about ln(vocab)), so ptx on teaches that text rather than keeping it; the loss falls, and the
LoRA's capacity it takes shows as a lower gold win rate.
Prints one JSON document (per-iteration curves of both arms: gold win rate, RM held-out
accuracy, RM reward, KL, held-out pretraining loss, ...) and writes a PNG with one panel per
curve, both arms on each. The defaults are the settings that showed learning on the starter
model on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from learner.config import LearnerConfig
from learner.efficacy import EfficacyConfig, run_efficacy
from rlhf.local_redis import private_redis
from rlhf.modeling import load_model, resolve_model_name

log = logging.getLogger(__name__)

PANELS = (("gold_win_rate", "gold win rate vs reference"), ("rm_accuracy", "RM held-out accuracy"),
          ("reward", "RM reward (policy, eval prompts)"), ("kl", "KL(policy || reference)"),
          ("ptx_loss", "held-out pretraining loss"))


def learner_config(args: argparse.Namespace, redis_url: str, folder: Path, ptx_coef: float
                   ) -> LearnerConfig:
    return LearnerConfig(
        model=args.model, device=args.device, threads=args.threads, redis_url=redis_url,
        data_dir=str(folder / "data"), adapter_store=str(folder / "store"), seed=args.seed,
        prompts_per_iteration=args.tasks_per_iteration, eval_prompts=args.rm_eval_prompts,
        rm_lr=args.rm_lr, rm_epochs=args.rm_epochs, rm_batch=args.rm_batch,
        rm_max_length=128, rm_heldout_fraction=args.rm_heldout_fraction,
        ppo_steps=args.ppo_steps, ppo_lr=args.ppo_lr, ppo_epochs=args.ppo_epochs,
        ppo_batch_size=args.ppo_batch_size, ppo_minibatch_size=args.ppo_batch_size // 2,
        ppo_kl_coef=args.ppo_kl_coef, ppo_ptx_coef=ptx_coef,
        ppo_max_new_tokens=args.max_new_tokens)


def run_arm(args: argparse.Namespace, name: str, ptx_coef: float, eff: EfficacyConfig,
            redis_url: str) -> dict:
    """One arm on a fresh copy of the base (a Learner wraps its base in place) and its own
    Redis database and data folders."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"efficacy-{name}-") as tmp:
        cfg = learner_config(args, redis_url, Path(tmp), ptx_coef)
        loaded = load_model(cfg.model, device=cfg.device)
        torch.manual_seed(args.seed)
        curve = run_efficacy(eff, cfg, loaded, on_point=lambda p: log.info(
            "%s iteration %d: %s", name, p["iteration"], json.dumps(p)))
    return {"ptx_coef": ptx_coef, "seconds": round(time.perf_counter() - start, 1),
            "curve": curve, "summary": summarize(curve)}


def summarize(curve: Sequence[dict]) -> dict:
    first, last = curve[0], curve[-1]
    return {"gold_win_rate_start": first["gold_win_rate"],
            "gold_win_rate_end": last["gold_win_rate"],
            "gold_win_rate_best": max(p["gold_win_rate"] for p in curve),
            "gold_score_start": first["gold_score"], "gold_score_end": last["gold_score"],
            "rm_accuracy_end": last["rm_accuracy"], "reward_end": last["reward"],
            "kl_end": last["kl"], "ptx_loss_start": first["ptx_loss"],
            "ptx_loss_end": last["ptx_loss"],
            "ptx_loss_rise": last["ptx_loss"] - first["ptx_loss"]}


def plot(arms: dict[str, dict], path: Path, title: str) -> None:
    """One panel per curve, every arm on each (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.6))
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        for name, arm in arms.items():
            points = [(p["iteration"], p[key]) for p in arm["curve"] if p[key] is not None]
            ax.plot(*zip(*points, strict=True), marker="o",
                    label=f"{name} (ptx {arm['ptx_coef']:g})")
        if key == "gold_win_rate":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m learner.efficacy_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model dir or hub id; default: the starter")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: a shared 2-core machine crawls with more)")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--tasks-per-iteration", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="samples ranked per task")
    p.add_argument("--labelers", type=int, default=8)
    p.add_argument("--eval-tasks", type=int, default=200, help="held-out tasks (win rate)")
    p.add_argument("--rm-eval-prompts", type=int, default=16,
                   help="prompts of the learner's own evaluate phase (reward, KL)")
    p.add_argument("--rm-lr", type=float, default=3e-3)
    p.add_argument("--rm-epochs", type=int, default=3)
    p.add_argument("--rm-batch", type=int, default=8)
    p.add_argument("--rm-heldout-fraction", type=float, default=0.25)
    p.add_argument("--ppo-steps", type=int, default=10)
    p.add_argument("--ppo-lr", type=float, default=2e-3)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--ppo-batch-size", type=int, default=16)
    p.add_argument("--ppo-kl-coef", type=float, default=0.2)
    p.add_argument("--ptx-coef", type=float, default=0.03,
                   help="gamma_ptx of the ptx-on arm (0.03: RM reward close to ptx off)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--arms", choices=["both", "off", "on"], default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default="bench-out/efficacy.png", help="where the plot goes")
    return p.parse_args(list(argv))


def _arm_urls(base: str, n: int) -> list[str]:
    root, _, db = base.rpartition("/")
    first = int(db) if db.isdigit() else 0
    return [f"{root}/{first + i}" for i in range(n)]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("learner.reward_model", "learner.ppo", "learner.intake", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    args.model = resolve_model_name(args.model)  # builds the starter on first use
    eff = EfficacyConfig(iterations=args.iterations, tasks_per_iteration=args.tasks_per_iteration,
                         k=args.k, labelers=args.labelers, eval_tasks=args.eval_tasks,
                         seed=args.seed)
    arms = {"ptx_off": 0.0, "ptx_on": args.ptx_coef}
    if args.arms != "both":
        arms = {f"ptx_{args.arms}": arms[f"ptx_{args.arms}"]}
    start = time.perf_counter()
    with private_redis("rlhf-efficacy-") as url:  # a throwaway redis-server for the run
        results = {name: run_arm(args, name, coef, eff, arm_url)
                   for (name, coef), arm_url in zip(arms.items(), _arm_urls(url, len(arms)),
                                                    strict=True)}
    report = {"model": args.model, "threads": args.threads, "efficacy": asdict(eff),
              "learner": {k: v for k, v in vars(args).items() if k not in asdict(eff)},
              "arms": results, "elapsed_s": round(time.perf_counter() - start, 1)}
    if len(results) == 2:
        off, on = results["ptx_off"]["summary"], results["ptx_on"]["summary"]
        report["ablation"] = {
            "ptx_loss_rise_off": off["ptx_loss_rise"], "ptx_loss_rise_on": on["ptx_loss_rise"],
            "ptx_rises_less_with_ptx": on["ptx_loss_rise"] < off["ptx_loss_rise"],
            "gold_win_rate_end_off": off["gold_win_rate_end"],
            "gold_win_rate_end_on": on["gold_win_rate_end"],
            "reward_end_off": off["reward_end"], "reward_end_on": on["reward_end"]}
    png = Path(args.png)
    plot(results, png, f"efficacy on {Path(args.model).name}: gold labelers, "
         f"{args.iterations} iterations, {args.eval_tasks} held-out tasks")
    report["png"] = str(png.resolve())
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
