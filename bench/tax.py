"""Alignment-tax bench: ``rlhf bench tax [--preference P] [learner flags]``.

InstructGPT's PPO vs PPO-ptx, plus SFT first, through ``bench.efficacy_loop`` (simulated
labelers with a hidden preference rank the policy's own samples; real ``Learner.run``
iterations), one arm each on a fresh base:

- ``ppo``          ptx off (``--ppo-ptx-coef 0``)
- ``ppo_ptx``      the shipped ptx default
- ``sft_ppo_ptx``  the shipped ptx default, and before iteration 1 the simulated labelers
                   write ``--demonstrations`` demonstrations: for each of as many training
                   prompts, the best of ``--demo-k`` base samples under their hidden
                   preference (``bench.kit.records.best_of_k_demonstrations``). So iteration 1
                   runs its SFT phase on them before RM and PPO.

Best-of-K rather than a hand-written ideal answer: it works for every preference (an ideal
answer needs a writer per preference), and it is what a labeler preferring X can write with
the model's own words, so any speed-up comes from the preference, not from new text.

Per iteration: win rate vs the base under the preference, KL (to the learner's reference:
the base, or the SFT adapter in the SFT arm), and the held-out LM loss on the real corpus
(``ptx/loss_after``, the held-out side of ``learner.ptx_corpus``; the shipped Factbook prose
unless ``--ptx-corpus`` is given, on the starter too, whose own default is synthetic
sentences) as its RISE over the base model's loss. The summary checks the paper's target:
with ptx, the LM-loss rise is at most half of PPO's at >= 90% of PPO's preference gain
(``tax_target``), and whether SFT speeds the gain up (``sft_speedup``). JSON on stdout, PNG
via ``bench.kit.report``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.efficacy import (
    _arm_urls,
    learner_config,
    learner_overrides,
    loop_parser,
    run_arm,
    start_run,
)
from bench.efficacy_loop import EfficacyConfig, draw_items, generate
from bench.kit.records import best_of_k_demonstrations
from bench.kit.report import plot_curves, write_report
from learner.iteration import Learner
from learner.ptx_corpus import FACTBOOK
from rlhf import preferences, settings
from rlhf.local_redis import private_redis

log = logging.getLogger(__name__)

ARMS = ("ppo", "ppo_ptx", "sft_ppo_ptx")
PANELS = (("win_rate", "win rate vs base"), ("kl", "KL(policy || reference)"),
          ("lm_loss_rise", "held-out LM loss rise over the base"))
GAIN_SHARE, RISE_SHARE = 0.9, 0.5  # the paper's target: >= 90% of the gain, <= half the tax


def tax_target(ppo: dict, ptx: dict) -> dict:
    """The target on two arms' ``{"gain", "rise"}`` (win-rate gain over iteration 0, LM-loss
    rise over the base): ptx keeps >= 90% of PPO's gain (PPO must have gained) and its rise
    is at most half of PPO's (when PPO's is <= 0 there is no tax to halve: ptx must not rise
    either)."""
    gain_ok = ppo["gain"] > 0 and ptx["gain"] >= GAIN_SHARE * ppo["gain"]
    rise_ok = ptx["rise"] <= max(RISE_SHARE * ppo["rise"], 0.0)
    return {"ppo_gain": ppo["gain"], "ptx_gain": ptx["gain"], "ppo_rise": ppo["rise"],
            "ptx_rise": ptx["rise"],
            "gain_share": ptx["gain"] / ppo["gain"] if ppo["gain"] else None,
            "rise_share": ptx["rise"] / ppo["rise"] if ppo["rise"] > 0 else None,
            "gain_ok": gain_ok, "rise_ok": rise_ok,
            "verdict": "pass" if gain_ok and rise_ok else "fail"}


def sft_speedup(ptx_gains: Sequence[float], sft_gains: Sequence[float]) -> dict:
    """SFT first speeds the gain up when its mean gain over iterations 1..N is higher (the
    area under the curve: earlier gains count as much as the last); gains per iteration."""
    mean_ptx, mean_sft = (sum(g) / len(g) for g in (ptx_gains, sft_gains))
    return {"ptx_gain_at_1": ptx_gains[0], "sft_gain_at_1": sft_gains[0],
            "ptx_mean_gain": mean_ptx, "sft_mean_gain": mean_sft,
            "sft_speeds_up": mean_sft > mean_ptx}


def with_rise(curve: list[dict], base_loss: float) -> list[dict]:
    """Each point + ``lm_loss_rise`` = its held-out LM loss - the base model's (iteration 0:
    the policy is the base, rise 0)."""
    for p in curve:
        if not p["iteration"]:
            p["ptx_loss"] = base_loss
        loss = p["ptx_loss"]
        p["lm_loss_rise"] = round(loss - base_loss, 4) if loss is not None else None
    return curve


def summarize(arms: dict[str, dict]) -> dict:
    """Per-arm gains and rises at the last iteration, the target, the SFT speed-up."""
    curves = {name: arm["curve"] for name, arm in arms.items()}
    gains = {n: [p["win_rate"] - c[0]["win_rate"] for p in c[1:]] for n, c in curves.items()}
    end = {n: {"gain": gains[n][-1], "rise": c[-1]["lm_loss_rise"], "kl": c[-1]["kl"],
               "win_rate": c[-1]["win_rate"]} for n, c in curves.items()}
    return {"end": end, "target": tax_target(end["ppo"], end["ppo_ptx"]),
            "sft": sft_speedup(gains["ppo_ptx"], gains["sft_ppo_ptx"])}


def demonstration_writer(eff: EfficacyConfig, n: int, k: int):
    """``run_efficacy``'s hook: best-of-``k`` base samples on ``n`` training prompts (drawn
    apart from the iterations' and never held out)."""
    def write(learner: Learner):
        items = draw_items(eff, n, eff.seed + 50, False)
        flat = generate(learner, [it.prompt for it in items for _ in range(k)],
                        eff.seed + 60, False, eff.generate_batch)
        samples = [flat[i * k:(i + 1) * k] for i in range(n)]
        demos = best_of_k_demonstrations(items, samples, eff.labelers, eff.seed,
                                         preferences.get(eff.preference))
        log.info("sft_ppo_ptx: %d demonstrations (best of %d)", len(demos), k)
        return demos
    return write


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, dict]:
    p = loop_parser("rlhf bench tax", __doc__, 3, "bench-out/tax.png")
    p.epilog = "Any other flag is an `rlhf learn` knob, e.g. --ppo-steps 4 (all arms; ppo's "
    p.epilog += "ptx coef stays 0)."
    p.add_argument("--preference", default="concise", help=", ".join(preferences.PREFERENCES))
    p.add_argument("--demonstrations", type=int, default=32,
                   help="demonstrations the SFT arm's labelers write")
    p.add_argument("--demo-k", type=int, default=8, help="base samples a demonstration is "
                   "the best of")
    args, rest = p.parse_known_args(list(argv))
    overrides = learner_overrides(rest, ptx_corpus=str(FACTBOOK))  # real prose, also starter
    preferences.get(args.preference)
    if args.demonstrations < 1 or args.demo_k < 1:
        p.error("--demonstrations and --demo-k must be >= 1")
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    model, prompts = start_run(args)
    eff = EfficacyConfig(iterations=args.iterations, tasks_per_iteration=args.tasks_per_iteration,
                         k=args.k, labelers=args.labelers, eval_tasks=args.eval_tasks,
                         preference=args.preference, prompts=prompts, seed=args.seed)
    ptx = {"ppo": 0.0, "ppo_ptx": None, "sft_ppo_ptx": None}  # None: the shipped default
    writer = demonstration_writer(eff, args.demonstrations, args.demo_k)
    start, results = time.perf_counter(), {}
    with private_redis("rlhf-tax-") as url:
        for arm, arm_url in zip(ARMS, _arm_urls(url, len(ARMS)), strict=True):
            results[arm] = run_arm(
                lambda u, folder, c=ptx[arm]: learner_config(
                    overrides, model, args.device, args.threads, args.seed, u, folder, c),
                arm, eff, arm_url, writer if arm == "sft_ppo_ptx" else None)
    base_loss = results["ppo"]["curve"][0]["ptx_loss"]  # the same texts in every arm
    for arm in results.values():
        with_rise(arm["curve"], base_loss)
    report = {"model": model, "threads": args.threads, "prompts": prompts,
              "preference": args.preference, "demonstrations": args.demonstrations,
              "demo_k": args.demo_k, "learner_overrides": overrides,
              "learner": settings.describe(learner_config(overrides, model, args.device,
                                                          args.threads, args.seed, "", Path(),
                                                          None)),
              "base_lm_loss": base_loss, "arms": results, "summary": summarize(results),
              "elapsed_s": round(time.perf_counter() - start, 1)}
    png = Path(args.png)
    plot_curves({n: a["curve"] for n, a in results.items()}, PANELS, png,
                f"alignment tax on {Path(model).name} ({args.preference}): PPO vs PPO-ptx vs "
                f"SFT + PPO-ptx", lines={"win_rate": 0.5, "lm_loss_rise": 0.0})
    report["png"] = str(png.resolve())
    write_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
