"""Reward-model bench: ``rlhf bench rm [--hh-limit N] ...`` prints JSON.

(a) Real human preferences: Anthropic HH-RLHF harmless-base test pairs (parsed with
    ``rlhf.data``; the texts are offensive by design and are never printed), split by line
    (first ``--hh-train-fraction`` train, rest held out), RM trained for one epoch on the
    starter model; held-out pair accuracy against chance 0.5.
(b) K-wise vs pairwise: the same K = 4 synthetic comparisons trained K-wise (each
    completion forwarded once per step, InstructGPT) and expanded into C(4,2) = 6 shuffled
    K = 2 pairs (each completion forwarded 3 times, like TRL's RewardTrainer), same model,
    same number of steps and comparisons per step: seconds per epoch and held-out accuracy.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import sys
import time
from collections.abc import Sequence

import torch

from bench.kit.records import expand_pairs, synthetic_k4
from bench.kit.report import write_report
from learner.reward_model import RewardModel, RMConfig, evaluate_rm, train_reward_model
from rlhf.data import Malformed, pair_record
from rlhf.modeling import load_model, resolve_model_name
from rlhf.v1 import feedback_pb2 as fb

log = logging.getLogger(__name__)

HH_PATH = "/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz"


def hh_comparisons(path: str, limit: int) -> tuple[list[fb.Comparison], int]:
    """(K = 2 comparisons in file order, malformed lines skipped); ``limit`` 0 = all lines."""
    out, bad = [], 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit and line_no > limit:
                break
            try:
                out.append(pair_record(line, "hh-rlhf", "base"))
            except Malformed:
                bad += 1
    return out, bad


def _fresh_rm(model_dir: str, cfg: RMConfig) -> tuple[RewardModel, object]:
    loaded = load_model(model_dir, device="cpu")
    torch.manual_seed(cfg.seed)
    return RewardModel(loaded.model, cfg), loaded.tokenizer


def bench_hh(args: argparse.Namespace, model_dir: str) -> dict:
    data, bad = hh_comparisons(args.hh_path, args.hh_limit)
    cut = int(len(data) * args.hh_train_fraction)
    train, test = data[:cut], data[cut:]
    cfg = RMConfig(lr=args.lr, max_length=args.hh_max_length, seed=args.seed,
                   batch=args.batch, threads=args.threads,
                   epochs=args.hh_epochs, lora_rank=args.hh_lora_rank,
                   lora_targets=tuple(args.hh_lora_targets.split(",")))
    rm, tok = _fresh_rm(model_dir, cfg)
    before = evaluate_rm(rm, tok, test, cfg)
    metrics = train_reward_model(rm, tok, train, cfg)
    after = evaluate_rm(rm, tok, test, cfg)
    return {"pairs_read": len(data), "malformed": bad, "train": len(train), "test": len(test),
            "max_length": cfg.max_length, "lr": cfg.lr, "epochs": cfg.epochs,
            "lora_rank": cfg.lora_rank, "lora_targets": list(cfg.lora_targets), "chance": 0.5,
            "accuracy_before": before["rm/accuracy"], "accuracy": after["rm/accuracy"],
            "loss_before": before["rm/loss"], "loss": after["rm/loss"],
            "train_seconds": round(metrics["rm/train_seconds"], 2)}


def bench_kwise_vs_pairwise(args: argparse.Namespace, model_dir: str) -> dict:
    train = synthetic_k4(args.syn_train, seed=args.seed + 1)
    test = synthetic_k4(args.syn_test, seed=args.seed + 2)
    pairs = expand_pairs(train)  # 6 per comparison, shuffled across prompts by the trainer
    per_prompt = len(pairs) // len(train)
    results = {}
    for name, data, per_step in (("kwise", train, args.batch),
                                 ("pairwise", pairs, args.batch * per_prompt)):
        cfg = RMConfig(lr=args.lr, max_length=128, seed=args.seed, threads=args.threads,
                       batch=per_step)
        rm, tok = _fresh_rm(model_dir, cfg)
        metrics = train_reward_model(rm, tok, data, cfg)
        held = evaluate_rm(rm, tok, test, cfg)
        results[name] = {"steps": metrics["rm/steps"],
                         "rows_forwarded": metrics["rm/rows_forwarded"],
                         "seconds_per_epoch": round(metrics["rm/seconds_per_epoch"], 2),
                         "heldout_accuracy": held["rm/accuracy"], "heldout_loss": held["rm/loss"]}
    results["speedup_kwise_over_pairwise"] = round(
        results["pairwise"]["seconds_per_epoch"] / results["kwise"]["seconds_per_epoch"], 2)
    results.update({"train_comparisons": len(train), "test_comparisons": len(test), "K": 4})
    return results


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf bench rm", description=__doc__)
    p.add_argument("--model", default="", help="a name of `rlhf models list`, a directory or "
                   "a hub id; default: the starter")
    p.add_argument("--hh-path", default=HH_PATH)
    p.add_argument("--hh-limit", type=int, default=0, help="read the first N lines; 0 = all")
    p.add_argument("--hh-train-fraction", type=float, default=0.8)
    p.add_argument("--hh-max-length", type=int, default=256)
    p.add_argument("--hh-epochs", type=int, default=3,
                   help="3: one epoch does not beat chance on this data with the starter model")
    p.add_argument("--hh-lora-rank", type=int, default=8)
    p.add_argument("--hh-lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated module names the RM LoRA adapts")
    p.add_argument("--syn-train", type=int, default=400)
    p.add_argument("--syn-test", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=16, help="comparisons per step (K-wise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", choices=["hh", "kwise"], action="append", default=[])
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model_dir = resolve_model_name(args.model)
    start = time.perf_counter()
    report: dict = {"model": model_dir, "threads": args.threads}
    if "kwise" not in args.skip:
        report["kwise_vs_pairwise"] = bench_kwise_vs_pairwise(args, model_dir)
    if "hh" not in args.skip:
        report["hh_rlhf_harmless"] = bench_hh(args, model_dir)
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    write_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
