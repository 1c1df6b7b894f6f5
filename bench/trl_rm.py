"""RM training: our K-wise batching vs TRL's ``RewardTrainer`` on the same data as pairs.

Data: the K = 4 synthetic comparisons of ``bench.rm`` (``bench.kit.records``; train and
held-out sets from different seeds). Ours trains on them K-wise (every candidate forwarded
once per step, InstructGPT); TRL trains on every comparison expanded into its C(4,2) = 6
(chosen, rejected) pairs, shuffled across prompts by its sampler (each candidate forwarded 3
times per epoch).
Rows are tokenized once, by our code, and handed to TRL pre-tokenized (``chosen_ids`` /
``rejected_ids``), so both sides see byte-identical token rows (prompt through the chat
template + answer + EOS; the score is read at the EOS on both sides).

Held-out accuracy: the same K = 4 comparisons, scored by each trained model, pair accuracy
(r_win > r_lose over all untied pairs) from the same ``kwise_rm_loss`` stats on both sides.
TRL is imported inside the functions only (see ``bench.trl``).
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence

import torch
from peft import LoraConfig
from torch import Tensor

from bench.kit.records import expand_pairs, synthetic_k4
from bench.kit.stats import ratio_spread, spread_runs
from learner.losses import kwise_rm_loss
from learner.reward_model import (
    Encoded,
    RewardModel,
    RMConfig,
    collate,
    encode_comparison,
    train_reward_model,
)
from rlhf.modeling import load_model

log = logging.getLogger(__name__)

MAX_LENGTH = 128  # tokens per row, both sides (the synthetic rows are far shorter)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # RMConfig's default LoRA targets
ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _rm_config(args: argparse.Namespace, seed: int, batch: int) -> RMConfig:
    return RMConfig(lr=args.rm_lr, epochs=args.epochs, max_length=MAX_LENGTH,
                    batch=batch, lora_rank=args.lora_rank,
                    lora_targets=TARGETS, seed=seed, threads=args.threads)


@torch.no_grad()
def heldout_accuracy(score: ScoreFn, encoded: Sequence[Encoded], pad_id: int,
                     batch: int) -> float:
    """Pair accuracy over all untied pairs of the held-out comparisons (ties count wrong)."""
    correct = pairs = 0.0
    for i in range(0, len(encoded), batch):
        ids, mask, group, rank = collate(encoded[i:i + batch], pad_id, torch.device("cpu"))
        _, stats = kwise_rm_loss(score(ids, mask).float(), group, rank)
        correct += (stats["accuracy"] * stats["n_pairs"]).item()
        pairs += stats["n_pairs"].item()
    return correct / pairs


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_ours(args: argparse.Namespace, model_dir: str, train, test: list[Encoded], seed: int,
             batch: int) -> dict:
    """Fresh starter base + "rm" LoRA + head; ``train_reward_model`` timed end to end
    (its own encoding of the comparisons included)."""
    cfg = _rm_config(args, seed, batch)
    loaded = load_model(model_dir, device="cpu", dtype="float32")
    torch.manual_seed(seed)
    rm = RewardModel(loaded.model, cfg)
    trainable = sum(p.numel() for p in rm.trainable_parameters())
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = train_reward_model(rm, loaded.tokenizer, train, cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    pad = loaded.tokenizer.pad_token_id
    return {"seconds_per_epoch": wall / args.epochs, "cpu_seconds_per_epoch": cpu / args.epochs,
            "steps": int(metrics["rm/steps"]),
            "rows_forwarded": int(metrics["rm/rows_forwarded"]),
            "heldout_accuracy": heldout_accuracy(rm.score, test, pad, 4 * args.batch),
            "train_accuracy": metrics["rm/train_accuracy"], "trainable_params": trainable}


def _trl_dataset(pairs: list[Encoded]):
    from datasets import Dataset  # bench env only

    return Dataset.from_dict({"chosen_ids": [list(e.rows[0]) for e in pairs],
                              "rejected_ids": [list(e.rows[1]) for e in pairs]})


def _trl_config(args: argparse.Namespace, out_dir: str, pairs_per_step: int, seed: int):
    """RewardConfig matched to RMConfig: AdamW betas (0.9, 0.95), no weight decay, cosine
    to 10% with no warmup, grad-norm clip 1.0, fp32, no gradient checkpointing (TRL's own
    defaults are bf16 + gradient checkpointing, both slower on CPU: turned off here)."""
    from trl import RewardConfig

    return RewardConfig(
        output_dir=out_dir, per_device_train_batch_size=pairs_per_step,
        num_train_epochs=args.epochs, learning_rate=args.rm_lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=10, disable_tqdm=True, dataloader_num_workers=0, seed=seed,
        data_seed=seed, max_length=MAX_LENGTH, disable_dropout=True)


def run_trl(args: argparse.Namespace, model_dir: str, pairs: list[Encoded],
            test: list[Encoded], pairs_per_step: int, seed: int) -> dict:
    """Fresh ``AutoModelForSequenceClassification(num_labels=1)`` from the same directory,
    the same LoRA (rank, alpha 2r, no dropout, same modules) plus its trainable ``score``
    head (PEFT's SEQ_CLS task saves it), ``RewardTrainer.train()`` timed end to end."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    hidden = model.config.hidden_size
    torch.nn.init.normal_(model.score.weight, std=1.0 / math.sqrt(hidden + 1))  # as ours
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                      target_modules=list(TARGETS), bias="none", task_type="SEQ_CLS")
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        trainer = RewardTrainer(model=model, args=_trl_config(args, out, pairs_per_step, seed),
                                train_dataset=_trl_dataset(pairs), processing_class=tok,
                                peft_config=lora)
        setup = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        result = trainer.train()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    net = trainer.model.eval()

    def score(ids: Tensor, mask: Tensor) -> Tensor:
        return net(input_ids=ids, attention_mask=mask).logits.squeeze(-1)

    return {"seconds_per_epoch": wall / args.epochs, "cpu_seconds_per_epoch": cpu / args.epochs,
            "steps": int(result.global_step),
            "rows_forwarded": 2 * len(pairs) * args.epochs,
            "trainer_train_runtime_s": float(result.metrics["train_runtime"]),
            "setup_s_not_timed": setup, "torch_threads_after_train": torch.get_num_threads(),
            "heldout_accuracy": heldout_accuracy(score, test, tok.pad_token_id,
                                                 4 * args.batch),
            "trainable_params": _trainable(net)}


def run(args: argparse.Namespace, model_dir: str) -> dict:
    """Phases: 1. data (shared, from ``--seed``), 2. alternate ours / TRL ``repeats`` times,
    repeat i training with seed ``--seed + i`` (init and shuffling) on both sides, 3. summary."""
    train = synthetic_k4(args.train, seed=args.seed + 1)  # 1
    test_cmp = synthetic_k4(args.test, seed=args.seed + 2)
    tok = load_model(model_dir, device="cpu").tokenizer
    test = [encode_comparison(tok, c, MAX_LENGTH) for c in test_cmp]
    pairs = [encode_comparison(tok, c, MAX_LENGTH) for c in expand_pairs(train)]
    per_prompt = len(pairs) // len(train)
    ours, theirs, extra = [], [], []
    for i in range(args.repeats):  # 2
        seed = args.seed + i
        log.info("rm bench repeat %d/%d (seed %d): ours, trl", i + 1, args.repeats, seed)
        ours.append(run_ours(args, model_dir, train, test, seed, args.batch))
        theirs.append(run_trl(args, model_dir, pairs, test, args.batch * per_prompt, seed))
        if args.also_batch:
            extra.append(run_ours(args, model_dir, train, test, seed, args.also_batch))
    mine, trl = spread_runs(ours), spread_runs(theirs)  # 3
    report = {"kwise_ours": mine, "pairwise_trl": trl,
              "speedup_ours_over_trl": ratio_spread(theirs, ours, "seconds_per_epoch"),
              "speedup_ours_over_trl_cpu_time": ratio_spread(theirs, ours, "cpu_seconds_per_epoch"),
              "heldout_accuracy_delta": round(mine["heldout_accuracy"]["median"]
                                              - trl["heldout_accuracy"]["median"], 4),
              "target": "seconds/epoch >= 2x fewer at equal or better held-out accuracy",
              "data": {"K": 4, "train_comparisons": len(train), "train_pairs_trl": len(pairs),
                       "heldout_comparisons": len(test), "heldout_pairs": 6 * len(test),
                       "comparisons_per_step": args.batch,
                       "pairs_per_step_trl": args.batch * per_prompt, "epochs": args.epochs,
                       "training_seeds": [args.seed + i for i in range(args.repeats)]},
              "matched": [
                  "model: the same directory via from_pretrained, fp32, eval mode (no dropout)",
                  f"LoRA r={args.lora_rank} alpha={2 * args.lora_rank} dropout 0 on "
                  f"{', '.join(TARGETS)} + a trainable scalar head",
                  "head init N(0, 1/sqrt(H+1)) (TRL's score head re-initialised like ours; "
                  "its missing bias cancels in r_w - r_l)",
                  "token rows byte-identical (our encoding; score read at the final EOS)",
                  "optimizer AdamW(0.9, 0.95) wd 0, lr cosine to 10%, no warmup, clip 1.0",
                  f"steps per epoch and comparisons per step ({args.batch} K=4 = "
                  f"{args.batch * per_prompt} pairs)",
                  "held-out set and accuracy metric", "torch threads", "training seeds"],
              "not_matched": [
                  "ours times its own tokenization inside the epoch; TRL gets rows "
                  "pre-tokenized (its dataset prep is setup_s_not_timed)",
                  "batch composition: ours 16 whole prompts per step (InstructGPT), TRL 96 "
                  "pairs drawn from up to 96 prompts (lower-variance steps)"]}
    if extra:
        report[f"kwise_ours_batch_{args.also_batch}"] = {
            **spread_runs(extra),
            "speedup_over_trl": ratio_spread(theirs, extra, "seconds_per_epoch"),
            "speedup_over_trl_cpu_time": ratio_spread(theirs, extra, "cpu_seconds_per_epoch")}
    return report
