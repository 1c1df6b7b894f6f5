"""Reward model: the shared frozen base + an "rm" LoRA adapter + a scalar head (docs/design.md §3).

InstructGPT (Ouyang et al. 2022 §3.5): a labeler ranks K completions of one prompt; the loss
is the mean over its C(K,2) untied pairs of -log σ(r_w - r_l), with all pairs of a prompt in
ONE batch element, so each completion is forwarded once (not K-1 times as with shuffled
pairs, which also overfit). One epoch, Adam betas (0.9, 0.95), cosine LR to 10%. Afterwards a
bias makes reference samples score mean 0. Accuracy is reported on held-out labelers.

The base model is shared with the policy/reference/value (one base in memory), so it is NOT
a submodule here: ``rm.state_dict()`` is head + bias, ``rm.to()`` never moves the base, and
the rm LoRA weights live in the PEFT model (``rm.peft``; save with
``rm.peft.save_pretrained(dir, selected_adapters=["rm"])``). One adapter is active at a time
on a shared base: ``score`` activates "rm"; whoever forwards next activates its own. The base
stays in eval mode (no dropout): scoring must match training.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from torch import Tensor, nn

from learner import distributed as dd
from learner.labeler_filter import exclude_labelers
from learner.lora import add_adapter, lora_config
from learner.losses import kwise_rm_loss
from rlhf.chat import chat_ids
from rlhf.settings import setting as _f
from rlhf.v1.feedback_pb2 import Comparison

log = logging.getLogger(__name__)

ADAPTER = "rm"
StepCallback = Callable[[int, int], None]
"""``on_step(steps_done, steps_total)`` after each training step (progress bars)."""


@dataclass(frozen=True)
class RMConfig:
    """Reward-model training; one per learner process (docs/design.md §7)."""

    lr: float = _f(3e-3, "peak AdamW learning rate of the rm LoRA + head (cosine to 10%); "
                   "with 3 epochs the RM reaches 0.8-0.9 held-out accuracy on 64-192 "
                   "comparisons of unseen preferences (rlhf bench efficacy), where 1e-3 x "
                   "1 epoch stayed near chance")
    epochs: int = _f(3, "passes over the comparisons per iteration (InstructGPT: 1, on 33k "
                     "prompts; an online loop starts from dozens)")
    max_length: int = _f(512, "tokens per prompt+completion row; the prompt is cut from the "
                         "left; capped at the model's context length")
    batch: int = _f(8, "comparisons (all K candidates each) per step")
    micro_batch: int = _f(4, "comparisons per forward/backward inside a step; the gradients "
                          "add up to the same step, with a quarter of the activation memory "
                          "at the default; 0 = the whole step at once")
    lora_rank: int = _f(8, "rank of the rm LoRA adapter on the attention projections")
    lora_targets: tuple[str, ...] = _f(("q_proj", "k_proj", "v_proj", "o_proj"),
                                       "module names to adapt; none found = PEFT's default")
    heldout_fraction: float = _f(0.1, "share of comparisons (by whole labelers) held out")
    seed: int = _f(0, "seed of the split and the shuffling")
    threads: int = _f(0, "torch threads while training; 0 = leave torch's setting")
    log_every: int = _f(20, "log progress every N steps")
    min_golden_accuracy: float = _f(0.0, "leave out of the RM's data each labeler whose "
                                    "golden accuracy (rlhf.agreement) is below this, once "
                                    "they ranked --rm-min-scored golden items; 0 = keep all")
    min_agreement: float = _f(0.0, "the same for pairwise agreement with other labelers on "
                              "overlapped tasks (after --rm-min-scored pairs); 0 = keep all")
    min_scored: int = _f(3, "golden items / overlapped pairs a labeler needs before a "
                         "threshold above can leave them out")

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.batch < 1:
            raise ValueError("lr > 0, epochs >= 1 and batch >= 1 required")
        if self.micro_batch < 0:
            raise ValueError("micro_batch must be >= 0 (0 = the whole step at once)")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError("heldout_fraction must be in [0, 1)")
        if not (0 <= self.min_golden_accuracy <= 1 and 0 <= self.min_agreement <= 1
                and self.min_scored >= 1):
            raise ValueError("min_golden_accuracy and min_agreement in [0, 1], min_scored "
                             ">= 1 required")
        if self.max_length < 8 or self.lora_rank < 1:
            raise ValueError("max_length >= 8 and lora_rank >= 1 required")


# -- model -----------------------------------------------------------------------------------


def _attach_adapter(base: nn.Module, cfg: RMConfig) -> PeftModel:
    """Add the "rm" LoRA to ``base`` in place (a PeftModel gains one more adapter)."""
    return add_adapter(base, ADAPTER, lora_config(base, cfg.lora_rank, cfg.lora_targets))


class RewardModel(nn.Module):
    """r(x, y): scalar head on the final hidden state of the last real token, plus ``bias``."""

    def __init__(self, base: nn.Module, cfg: RMConfig = RMConfig()) -> None:
        super().__init__()
        object.__setattr__(self, "peft", _attach_adapter(base, cfg))  # shared: not a submodule
        config = self.peft.get_base_model().config
        hidden = config.hidden_size
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        device = next(self.peft.parameters()).device
        self.head = nn.Linear(hidden, 1, device=device)  # float32 even on a bf16/4-bit base
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.head.bias)
        # The K-wise loss only sees score differences: a trained head bias would drift on
        # gradient noise alone (Adam normalises it); ``bias`` below sets the offset instead.
        self.head.bias.requires_grad_(False)
        self.register_buffer("bias", torch.zeros((), device=device))

    @property
    def trunk(self) -> nn.Module:
        """The transformer without its LM head (hidden states only: no [B, T, vocab] logits)."""
        return self.peft.get_base_model().base_model

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        lora = [p for n, p in self.peft.named_parameters() if f".{ADAPTER}." in n]
        return [*lora, self.head.weight]

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask [B, T] (right or left padded) -> rewards [B]."""
        if self.peft.active_adapter != ADAPTER:
            self.peft.set_adapter(ADAPTER)
        mask = attention_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding keeps real positions
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions, use_cache=False).last_hidden_state
        # Last real token: the largest index where the mask is 1, whatever the padding side.
        last = (mask * torch.arange(mask.size(1), device=mask.device)).argmax(-1)  # [B]
        h = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # [B, H]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1) + self.bias

    forward = score


# -- encoding --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """The K candidate rows of one comparison (prompt + candidate + EOS) and their ranks."""

    rows: tuple[tuple[int, ...], ...]
    ranks: tuple[int, ...]


def prompt_ids(tokenizer, messages: Sequence) -> list[int]:
    """Messages (protobuf ChatMessage or dicts) through the chat template, ready to answer."""
    return chat_ids(tokenizer, messages)


def join_row(prompt: list[int], completion: list[int], eos: int, max_length: int) -> list[int]:
    """prompt + completion + EOS in ``max_length``: the prompt loses its left end first, but
    keeps at least a quarter of the row; a completion too long for the rest loses its right
    end (the EOS stays last, where the score is read)."""
    answer = [*completion, eos]
    keep = min(len(prompt), max(max_length - len(answer), max_length // 4))
    answer = answer[:max_length - keep]
    answer[-1] = eos
    return prompt[len(prompt) - keep:] + answer


def encode_sample(tokenizer, prompt: list[int], text: str, max_length: int) -> tuple[int, ...]:
    """One row: prompt ids (from ``prompt_ids``) + the tokens of ``text`` + EOS, truncated."""
    completion = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tuple(join_row(prompt, completion, tokenizer.eos_token_id, max_length))


def encode_comparison(tokenizer, comparison: Comparison, max_length: int) -> Encoded:
    prompt = prompt_ids(tokenizer, comparison.messages)  # tokenized once for all K rows
    return Encoded(tuple(encode_sample(tokenizer, prompt, c.text, max_length)
                         for c in comparison.candidates),
                   tuple(c.rank for c in comparison.candidates))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def collate(batch: Sequence[Encoded], pad_id: int, device: torch.device
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Comparisons -> (input_ids [N, T] right-padded, attention_mask [N, T], group [N],
    rank [N]); N = sum of K: every candidate is one row, forwarded once."""
    rows = [row for enc in batch for row in enc.rows]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    group = torch.tensor([g for g, enc in enumerate(batch) for _ in enc.rows])
    rank = torch.tensor([r for enc in batch for r in enc.ranks])
    return ids.to(device), mask.to(device), group.to(device), rank.to(device)


def _encode_all(rm: RewardModel, tokenizer, comparisons: Sequence[Comparison],
                cfg: RMConfig) -> list[Encoded]:
    """Encode, dropping comparisons whose candidates are all tied (no pair to learn from)."""
    max_length = min(cfg.max_length, rm.context_length)
    encoded = [encode_comparison(tokenizer, c, max_length) for c in comparisons]
    return [e for e in encoded if len(set(e.ranks)) > 1]


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# -- split -----------------------------------------------------------------------------------


def _bucket(seed: int, key: str) -> float:
    """A deterministic number in [0, 1) for ``key`` (independent of PYTHONHASHSEED)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16 ** 12


def split_by_labeler(comparisons: Sequence[Comparison], heldout_fraction: float, seed: int
                     ) -> tuple[list[Comparison], list[Comparison], dict]:
    """(train, heldout, info): whole labelers are held out, about ``heldout_fraction`` of the
    comparisons, so accuracy measures generalisation to new people (InstructGPT). With one
    labeler that is impossible: then a deterministic split by comparison id (info says so)."""
    by_labeler: dict[str, list[Comparison]] = {}
    for c in comparisons:
        by_labeler.setdefault(c.labeler_id, []).append(c)
    if heldout_fraction <= 0 or not comparisons:
        return list(comparisons), [], {"split": "none", "heldout_labelers": []}
    if len(by_labeler) == 1:
        held_ids = {c.id for c in comparisons if _bucket(seed, c.id) < heldout_fraction}
        info = {"split": "comparison_id", "heldout_labelers": [],
                "reason": "only one labeler: held out comparisons by id, not by labeler"}
    else:
        labelers = sorted(by_labeler)
        random.Random(seed).shuffle(labelers)
        target, held, chosen = heldout_fraction * len(comparisons), 0, []
        for name in labelers[:-1]:  # at least one labeler stays in train
            n = len(by_labeler[name])
            if abs(held + n - target) < abs(held - target):
                chosen.append(name)
                held += n
        if not chosen:  # every labeler overshoots: hold out the smallest one
            chosen = [min(labelers, key=lambda name: len(by_labeler[name]))]
        held_ids = {c.id for name in chosen for c in by_labeler[name]}
        info = {"split": "labeler", "heldout_labelers": sorted(chosen)}
    train = [c for c in comparisons if c.id not in held_ids]
    heldout = [c for c in comparisons if c.id in held_ids]
    return train, heldout, {**info, "train": len(train), "heldout": len(heldout)}


# -- training --------------------------------------------------------------------------------


def _optimizer(rm: RewardModel, cfg: RMConfig, steps: int
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW betas (0.9, 0.95), cosine from ``lr`` down to 10% of it (InstructGPT RM)."""
    opt = torch.optim.AdamW(rm.trainable_parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)

    def factor(step: int) -> float:
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(step / max(steps, 1), 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class _Tally:
    """Sums over batches, float64 [K-wise loss x prompts, prompts, correct pairs, pairs, rows]:
    sums, so the data-parallel ranks' tallies add up in one all-reduce."""

    total: Tensor = field(default_factory=lambda: torch.zeros(5, dtype=torch.float64))

    @staticmethod
    def of(loss: Tensor, stats: dict, rows: int) -> Tensor:
        """One batch's sums."""
        n = stats["n_prompts"].item()
        return torch.tensor([loss.item() * n, n, (stats["accuracy"] * stats["n_pairs"]).item(),
                             stats["n_pairs"].item(), rows], dtype=torch.float64)

    def reduced(self) -> _Tally:
        """The tally over all data-parallel ranks (itself with one process)."""
        return self if dd.world_size() == 1 else _Tally(dd.all_reduce_sum(self.total))

    def means(self) -> tuple[float, float]:
        """(mean loss per prompt, pair accuracy); NaN when there was nothing to count."""
        loss, prompts, correct, pairs, _ = self.total.tolist()
        return (loss / prompts if prompts else float("nan"),
                correct / pairs if pairs else float("nan"))


def _train_epoch(rm: RewardModel, batches: list[list[Encoded]], opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, pad_id: int, cfg: RMConfig,
                 epoch: int, on_step: StepCallback | None = None) -> _Tally:
    """One pass; each step forwards every candidate of its comparisons once. Data-parallel:
    each rank forwards its shard of the global batch, ``micro_batch`` comparisons at a time;
    each micro-batch's loss is weighted by its share of the batch's prompts (every encoded
    comparison has an untied pair, so the global loss is the mean over ``len(batch)``
    prompts) and the summed gradient is the global one."""
    params, tally = rm.trainable_parameters(), _Tally()
    for step, batch in enumerate(batches):
        local = dd.shard(batch)  # all of it with one process
        opt.zero_grad(set_to_none=True)
        sums = torch.zeros(5, dtype=torch.float64)  # an empty shard adds zero gradients
        for micro in _batches(local, cfg.micro_batch or len(local)) if local else []:
            ids, mask, group, rank = collate(micro, pad_id, rm.device)
            loss, stats = kwise_rm_loss(rm.score(ids, mask), group, rank)
            (loss * (len(micro) / len(batch))).backward()  # micro mean -> batch mean
            sums += _Tally.of(loss, stats, ids.size(0))
        sums = dd.all_reduce_grads(params, sums)  # global grads and batch stats
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        tally.total += sums
        if on_step is not None:  # (steps done, steps in all epochs): progress bars
            on_step(epoch * len(batches) + step + 1, len(batches) * cfg.epochs)
        if dd.is_leader() and (step % cfg.log_every == 0 or step == len(batches) - 1):
            step_loss, step_accuracy = _Tally(sums).means()
            log.info("rm epoch %d step %d/%d loss %.4f acc %.3f", epoch, step + 1,
                     len(batches), step_loss, step_accuracy)
    return tally


def train_reward_model(rm: RewardModel, tokenizer, train: Sequence[Comparison],
                       cfg: RMConfig, on_step: StepCallback | None = None
                       ) -> dict[str, float]:
    """Phases: 1. encode, 2. optimizer + schedule, 3. epochs over shuffled comparisons in
    batches of ``batch`` -> ``rm/...`` training metrics."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    encoded = _encode_all(rm, tokenizer, train, cfg)  # 1
    steps = math.ceil(len(encoded) / cfg.batch) * cfg.epochs
    opt, sched = _optimizer(rm, cfg, steps)  # 2
    dd.broadcast_params(rm.trainable_parameters())  # data-parallel ranks start identical
    log.info("rm: training on %d comparisons (%d all-tied skipped), %d steps", len(encoded),
             len(train) - len(encoded), steps)
    rm.peft.eval()  # no dropout: training must score the way inference does
    pad_id = _pad_id(tokenizer)
    last, rows = _Tally(), 0
    for epoch in range(cfg.epochs):  # 3
        order = list(encoded)
        random.Random(cfg.seed + epoch).shuffle(order)
        last = _train_epoch(rm, _batches(order, cfg.batch), opt, sched, pad_id,
                            cfg, epoch, on_step)
        rows += round(last.total[4].item())
    seconds = time.perf_counter() - start
    loss, accuracy = last.means()  # of the last epoch
    return {"rm/train_loss": loss, "rm/train_accuracy": accuracy,
            "rm/train_comparisons": float(len(encoded)), "rm/steps": float(steps),
            "rm/rows_forwarded": float(rows), "rm/train_seconds": seconds,
            "rm/seconds_per_epoch": seconds / cfg.epochs}


# -- evaluation and calibration --------------------------------------------------------------


@torch.no_grad()
def evaluate_rm(rm: RewardModel, tokenizer, comparisons: Sequence[Comparison],
                cfg: RMConfig = RMConfig()) -> dict[str, float]:
    """Pair accuracy (r_win > r_lose over untied pairs), K-wise loss (mean over prompts);
    data-parallel ranks each score their shard and the tallies are summed."""
    tally = _Tally()
    for batch in _batches(dd.shard(_encode_all(rm, tokenizer, comparisons, cfg)),
                          cfg.micro_batch or cfg.batch):
        ids, mask, group, rank = collate(batch, _pad_id(tokenizer), rm.device)
        tally.total += _Tally.of(*kwise_rm_loss(rm.score(ids, mask), group, rank), ids.size(0))
    tally = tally.reduced()
    loss, accuracy = tally.means()
    return {"rm/accuracy": accuracy, "rm/loss": loss, "rm/pairs": tally.total[3].item()}


@torch.no_grad()
def calibrate_bias(rm: RewardModel, tokenizer,
                   prompts_and_reference_samples: Sequence[tuple[Sequence, str]],
                   cfg: RMConfig = RMConfig()) -> dict[str, float]:
    """Set ``rm.bias`` so the reference samples score mean 0 (InstructGPT normalises the RM
    so demonstrations score 0; PPO's advantages then start centred). Data-parallel ranks
    score their shard; mean and spread are over all ranks' samples."""
    if not prompts_and_reference_samples:
        raise ValueError("calibrate_bias needs at least one (messages, sample) pair")
    max_length = min(cfg.max_length, rm.context_length)
    rows = [Encoded((encode_sample(tokenizer, prompt_ids(tokenizer, messages), text,
                                   max_length),), (1,))
            for messages, text in dd.shard(prompts_and_reference_samples)]
    raw = torch.cat([rm.score(*collate(batch, _pad_id(tokenizer), rm.device)[:2]) - rm.bias
                     for batch in _batches(rows, 4 * (cfg.micro_batch
                                                      or cfg.batch))]
                    + [rm.bias.new_zeros(0)]).float()
    mean, var = dd.global_masked_moments(raw, torch.ones_like(raw))
    n = len(prompts_and_reference_samples)
    rm.bias.fill_(-mean.item())
    log.info("rm: bias %.4f from %d reference samples", rm.bias.item(), n)
    return {"rm/bias": rm.bias.item(),  # unbiased std, as torch.std
            "rm/reference_std": math.sqrt(var.item() * n / (n - 1)) if n > 1 else 0.0,
            "rm/reference_samples": float(n)}


def fit_reward_model(rm: RewardModel, tokenizer, comparisons: Sequence[Comparison],
                     cfg: RMConfig, reference: Sequence[tuple[Sequence, str]] = (),
                     on_step: StepCallback | None = None,
                     golden: Mapping[str, object] | None = None) -> dict:
    """The RM phase of one learner iteration: leave out labelers below the quality
    thresholds (``golden``: the task queue's known answers), split by labeler, train,
    evaluate on the held-out labelers, calibrate the bias on reference samples (when given)."""
    comparisons, quality = exclude_labelers(comparisons, golden or {}, cfg.min_golden_accuracy,
                                            cfg.min_agreement, cfg.min_scored)
    train, heldout, info = split_by_labeler(comparisons, cfg.heldout_fraction, cfg.seed)
    log.info("rm split: %s", info)
    metrics: dict = {"rm/split": info["split"], "rm/heldout_comparisons": len(heldout),
                     **quality}
    metrics.update(train_reward_model(rm, tokenizer, train, cfg, on_step))
    if heldout:
        metrics.update(evaluate_rm(rm, tokenizer, heldout, cfg))
    if reference:
        metrics.update(calibrate_bias(rm, tokenizer, reference, cfg))
    return metrics
