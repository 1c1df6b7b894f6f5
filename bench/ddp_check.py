"""Data-parallel smoke check: the RM phase and PPO steps under ``torchrun`` (gloo or NCCL).

    torchrun --standalone --nproc_per_node=2 -m bench.ddp_check --model DIR --out DIR
    python -m bench.ddp_check --model DIR --out DIR     # the single-process reference

Phases, each ending in a snapshot ``OUT/rank{r}_{name}.pt`` of every trained tensor (the rm and
policy LoRA, RM head and bias, value head) plus metrics:
1. init     the RM right after construction, from a per-rank seed (so ranks differ here and
            ``broadcast_params`` has to make them equal)
2. rm       ``fit_reward_model`` on deterministic K-wise comparisons (uneven shards: 5 per
            global batch over 2 ranks, held-out labeler, bias calibration)
3. replay   (after ``ppo_init``: the fresh policy LoRA and value head) one PPO score /
            advantages / update on ONE rollout of the whole batch made by rank 0 (broadcast;
            each rank takes its rows): the same data as a single process, so whitening,
            loss weighting and the gradient sum can be compared with it
4. final    two ``ppo_step`` calls with per-rank sampling and the adaptive KL controller
Prints one JSON line (rank 0). tests/test_learner_ddp.py compares ranks and a single run.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch

from bench.kit.records import tied_k4
from learner import distributed as dd
from learner.ppo import (
    POLICY,
    PPOConfig,
    PPOState,
    _slice,
    advantages,
    make_ppo_state,
    ppo_step,
    rollout,
    score,
    update,
)
from learner.reward_model import ADAPTER, RewardModel, RMConfig, fit_reward_model
from rlhf.modeling import load_model
from rlhf.starter_data import make_tasks, pretraining_corpus, render_answer

log = logging.getLogger(__name__)


def snapshot(rm: RewardModel, ppo: PPOState | None) -> dict[str, torch.Tensor]:
    """Every tensor the phases train, copied to CPU, by name, and as ``grad.<name>`` the
    gradient the last optimizer step used (summed over ranks, clipped): the phases leave it
    in ``.grad``."""
    params = {n: p for n, p in rm.peft.named_parameters()
              if f".{ADAPTER}." in n or f".{POLICY}." in n}
    params.update({f"rm_head.{n}": p for n, p in rm.named_parameters()})
    if ppo is not None:
        params.update({f"value_head.{n}": p for n, p in ppo.value_head.named_parameters()})
    out = {n: p.detach().cpu().clone() for n, p in params.items()}
    out["rm_head.bias"] = rm.bias.detach().cpu().clone()
    out.update({f"grad.{n}": p.grad.detach().cpu().clone() for n, p in params.items()
                if p.grad is not None})
    return out


def run(model_dir: str, out: Path) -> dict:
    device = dd.init_from_env()
    rank, world = dd.rank(), dd.world_size()
    loaded = load_model(model_dir, device=str(device))
    tok = loaded.tokenizer

    def save(name: str, ppo: PPOState | None, metrics: dict) -> None:
        torch.save({"tensors": snapshot(rm, ppo), "metrics": metrics},
                   out / f"rank{rank}_{name}.pt")

    torch.manual_seed(1234 + rank)  # 1: ranks start different on purpose
    rm_cfg = RMConfig(lr=3e-3, batch=5, max_length=96, lora_rank=4,
                      heldout_fraction=0.25, seed=0)
    rm = RewardModel(loaded.model, rm_cfg)
    save("init", None, {"world": world})

    data = tied_k4(20, seed=3)  # 2
    reference = [([{"role": "user", "content": t.prompt}], render_answer(t, "plain",
                                                                          random.Random(i)))
                 for i, t in enumerate(make_tasks(7, seed=4))]
    start = time.perf_counter()
    rm_metrics = fit_reward_model(rm, tok, data, rm_cfg, reference)
    save("rm", None, rm_metrics)

    ppo_cfg = PPOConfig(lr=1e-2, batch_size=8, minibatch_size=8, max_new_tokens=16,
                        ptx_coef=0.5, target_kl=0.01, kl_horizon=100, lora_rank=4)
    ppo = make_ppo_state(rm.peft, tok, ppo_cfg, rm=rm)  # 3
    save("ppo_init", ppo, {})
    prompts = [t.prompt for t in make_tasks(8, seed=5)]
    whole = dd.broadcast_object(rollout(ppo, prompts) if dd.is_leader() else None)
    start_row, stop_row = dd.shard_bounds(len(prompts))
    ro = _slice(whole, torch.arange(start_row, stop_row))
    sc = score(ppo, ro)
    adv, returns, _ = advantages(ppo, ro, sc)
    replay = update(ppo, ro, sc, adv, returns, pretraining_corpus(8, 3))  # 52 + 33 tokens
    replay["adv_abs_sum"] = float(dd.all_reduce_sum([float(adv.abs().sum())])[0])
    # this rank's response tokens: uneven across ranks exercises the loss weighting
    save("replay", ppo, {**dd.mean_metrics(replay), "tokens": float(ro.response_mask.sum())})

    steps = [ppo_step(ppo, [t.prompt for t in make_tasks(8, seed=6 + i)],
                      pretraining_corpus(8, 1 + i)) for i in range(2)]  # 4
    save("final", ppo, {"steps": steps, "beta": ppo.kl_ctl.value})
    summary = {"rank": rank, "world": world, "backend": "none" if world == 1 else
               torch.distributed.get_backend(), "seconds": time.perf_counter() - start,
               "rm/train_loss": rm_metrics["rm/train_loss"], "beta": ppo.kl_ctl.value}
    dd.close()
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory (tiny starter)")
    parser.add_argument("--out", required=True, help="folder for the per-rank snapshots")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = run(args.model, out)
    if summary["rank"] == 0:
        print(json.dumps(summary))  # CLI output


if __name__ == "__main__":
    main()
