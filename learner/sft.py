"""Supervised fine-tuning on labeler demonstrations (InstructGPT step 1; docs/design.md §3).

An "sft" LoRA on the learner's one shared base (beside "rm" and "policy"), trained from a
fresh init on every demonstration so far with the LM loss on the demonstrated answer only:
one row per demonstration is the conversation through the chat template, ready to answer
(``rlhf.chat.chat_ids``, as serving and PPO build prompts), then the answer's tokens and the
EOS that ends the assistant's turn (where generation stops); prompt and template tokens are
labelled -100. The iteration then restarts the policy from this adapter, keeps it frozen as
PPO's KL reference and starts the RM's LoRA from it (learner/iteration.py).

Held out like the RM: whole labelers, or by demonstration id when there is only one; the
loss on the held-out answers is reported before (= the base: a fresh LoRA is the identity)
and after training. Not sharded: in a cluster (learner/cluster.py) the phase is shared and
every rank trains on all rows, then holds rank 0's weights (``Reference.train``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import Tensor, nn

from learner.lora import add_adapter
from learner.losses import ptx_loss
from learner.reward_model import split_by_labeler
from rlhf.chat import chat_ids
from rlhf.settings import setting as _f
from rlhf.v1.feedback_pb2 import Demonstration

log = logging.getLogger(__name__)

SFT = "sft"
IGNORE = -100  # label of a token the loss skips (prompt, template, padding)
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SFTConfig:
    """SFT training; one per learner process (docs/design.md §7). Defaults measured on the
    tiny starter model (README "SFT")."""

    lr: float = _f(1e-2, "peak AdamW learning rate of the sft LoRA (cosine to 10%)")
    epochs: int = _f(8, "passes over the demonstrations (InstructGPT 16, on 13k prompts)")
    batch: int = _f(8, "demonstrations per optimizer step")
    max_length: int = _f(512, "tokens per prompt+answer row; the prompt is cut from the left "
                         "first, then the answer from the right; capped at the context")
    heldout_fraction: float = _f(0.1, "share of demonstrations (by whole labelers) held out")
    seed: int = _f(0, "seed of the split, the LoRA init and the shuffling")
    threads: int = _f(0, "torch threads while training; 0 = leave torch's setting")

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.batch < 1:
            raise ValueError("sft: lr > 0, epochs >= 1 and batch >= 1 required")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError("sft: heldout_fraction must be in [0, 1)")
        if self.max_length < 8:
            raise ValueError("sft: max_length >= 8 required")


# -- rows --------------------------------------------------------------------------------------


def sft_row(prompt: Sequence[int], answer: Sequence[int], eos: int, max_length: int
            ) -> tuple[list[int], list[int]]:
    """(input ids, labels) of prompt + answer + EOS: labels are -100 on the prompt and the
    token itself on the answer and its EOS. Too long: the prompt loses its left end first but
    keeps at least a quarter of ``max_length``, then the answer loses its right end (with its
    EOS: a cut answer must not teach stopping there)."""
    target = [*answer, eos]
    keep = min(len(prompt), max(max_length - len(target), max_length // 4))
    target = target[:max_length - keep]
    context = list(prompt[len(prompt) - keep:])
    return context + target, [IGNORE] * len(context) + target


def encode_demonstration(tokenizer, demo: Demonstration, max_length: int
                         ) -> tuple[list[int], list[int]]:
    """One demonstration as a training row (``sft_row`` of its templated conversation)."""
    answer = tokenizer(demo.answer, add_special_tokens=False)["input_ids"]
    return sft_row(chat_ids(tokenizer, demo.messages), answer, tokenizer.eos_token_id,
                   max_length)


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Rows -> (input_ids, attention_mask, labels) [B, T], right-padded (labels -100)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, (row, row_labels) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(row)] = torch.tensor(row_labels)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def answer_loss(peft: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(token-mean NLL of the labelled tokens, their count) under the active adapter."""
    ids, mask, labels = batch
    logits = peft(input_ids=ids, attention_mask=mask, use_cache=False).logits
    loss, stats = ptx_loss(logits, labels, labels != IGNORE)  # the same shifted LM loss
    return loss, stats["tokens"]


@torch.no_grad()
def mean_answer_loss(peft: nn.Module, tokenizer, rows: Sequence, batch: int,
                     device: torch.device) -> float:
    """Token-mean NLL of the answers of ``rows`` (encoded demonstrations); NaN if none."""
    total = tokens = 0.0
    for start in range(0, len(rows), batch):
        loss, n = answer_loss(peft, collate(rows[start:start + batch], _pad(tokenizer), device))
        total, tokens = total + float(loss) * float(n), tokens + float(n)
    return total / tokens if tokens else float("nan")


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


# -- training ----------------------------------------------------------------------------------


def fresh_sft_adapter(peft: nn.Module, lora: LoraConfig, seed: int) -> nn.Module:
    """Replace the "sft" adapter (if any) with a freshly initialised one (seeded)."""
    if SFT in getattr(peft, "peft_config", {}):
        if peft.active_adapter == SFT:
            peft.set_adapter(next(n for n in peft.peft_config if n != SFT))
        peft.delete_adapter(SFT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return add_adapter(peft, SFT, lora)


def fit_sft(peft: nn.Module, tokenizer, demonstrations: Sequence[Demonstration],
            cfg: SFTConfig, lora: LoraConfig, on_step: StepCallback | None = None) -> dict:
    """The SFT phase: split, fresh "sft" adapter, held-out loss before, ``epochs`` of AdamW
    (betas 0.9/0.95, cosine to 10%, clip 1.0) over shuffled batches, held-out loss after.
    ``peft`` is the shared PeftModel; "sft" is left active and frozen afterwards."""
    if not demonstrations:
        raise ValueError("fit_sft needs at least one demonstration")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    train, heldout, info = split_by_labeler(demonstrations, cfg.heldout_fraction, cfg.seed)
    if not train:  # a handful of demonstrations, all held out by id: train on them all
        train, heldout, info = list(demonstrations), [], {**info, "split": "none"}
    peft = fresh_sft_adapter(peft, lora, cfg.seed)
    peft.set_adapter(SFT)  # also marks only "sft" trainable
    peft.eval()  # no dropout (the LoRA has none either): train as it will be sampled
    device = next(peft.parameters()).device
    length = min(cfg.max_length, int(getattr(peft.get_base_model().config,
                                             "max_position_embeddings", 0) or 1 << 30))
    train_rows = [encode_demonstration(tokenizer, d, length) for d in train]
    held_rows = [encode_demonstration(tokenizer, d, length) for d in heldout]
    before = mean_answer_loss(peft, tokenizer, held_rows, cfg.batch, device)
    params = [p for n, p in peft.named_parameters() if f".{SFT}." in n]
    for p in params:
        p.requires_grad_(True)
    steps = math.ceil(len(train_rows) / cfg.batch) * cfg.epochs
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.1 + 0.45 * (
        1.0 + math.cos(math.pi * min(k / max(steps, 1), 1.0))))
    log.info("sft: %d demonstrations (%d held out, split %s), %d steps", len(train),
             len(heldout), info["split"], steps)
    done, last = 0, (0.0, 0.0)
    for epoch in range(cfg.epochs):
        order = list(train_rows)
        random.Random(cfg.seed + epoch).shuffle(order)
        last = (0.0, 0.0)
        for k in range(0, len(order), cfg.batch):
            loss, tokens = answer_loss(peft, collate(order[k:k + cfg.batch], _pad(tokenizer),
                                                     device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            last = (last[0] + loss.item() * float(tokens), last[1] + float(tokens))
            done += 1
            if on_step is not None:
                on_step(done, steps)
    for p in params:  # frozen from here on: the reference and the RM/policy init
        p.requires_grad_(False)
    after = mean_answer_loss(peft, tokenizer, held_rows, cfg.batch, device)
    return {"sft/demonstrations": len(demonstrations), "sft/train_demonstrations": len(train),
            "sft/heldout_demonstrations": len(heldout), "sft/split": info["split"],
            "sft/loss_train": last[0] / last[1] if last[1] else float("nan"),
            "sft/loss_heldout_before": before, "sft/loss_heldout_after": after,
            "sft/steps": steps, "sft/train_seconds": time.perf_counter() - start}
