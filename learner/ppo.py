"""LoRA-PPO on one shared base (docs/design.md §3; InstructGPT, Ouyang et al. 2022 §3.5).

One base in memory: the policy is the frozen base + a trainable "policy" LoRA added beside "rm"
on the same PeftModel; the reference is the base with adapters disabled, or a frozen adapter
named ``ref_adapter`` when the run continues from a trained adapter (then "adapter off" is the
base, not the starting policy: trl#1340); the value function is a Linear(hidden, 1) on the
policy trunk, initialised from the RM head. One PPO step is four named phases:
1. ``rollout`` 2. ``score`` 3. ``advantages`` 4. ``update``; ``ppo_step`` chains them.
Sampling and scoring share temperature, top-p and eval mode (no dropout), else k1 goes
negative (trl#925/#1005/#1161). Only one adapter is active at a time: every forward here sets
its own adapter first (``RewardModel.score`` switches to "rm").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import Tensor, nn

from learner import distributed as dd
from learner.advantages import gae, kl_penalized_rewards
from learner.kl_control import AdaptiveKL, FixedKL
from learner.lora import add_adapter, copy_adapter, lora_config
from learner.losses import (
    entropy_from_logits,
    explained_variance,
    masked_whiten,
    ppo_policy_loss,
    ptx_loss,
    value_loss,
)
from learner.reward_model import RewardModel
from rlhf.chat import chat_ids, user_turn
from rlhf.settings import setting as _f

log = logging.getLogger(__name__)

POLICY = "policy"
Scorer = Callable[[Sequence[str], Sequence[str]], Tensor]
"""(prompts, response texts) -> scores [B]: a stand-in for the RM (tests, rule rewards)."""


@dataclass(frozen=True)
class PPOConfig:
    """LoRA-PPO hyper-parameters; one per learner process (docs/design.md §7)."""

    lr: float = _f(2e-3, "Adam learning rate of the policy LoRA and the value head (1e-4 "
                   "moved no preference in 3 iterations; 2e-3 moved every one tried: "
                   "rlhf bench efficacy)")
    batch_size: int = _f(16, "episodes (prompts) per ppo_step: pass exactly this many")
    minibatch_size: int = _f(8, "episodes per optimizer step inside update")
    epochs: int = _f(4, "passes over each batch (InstructGPT 1 on batches of 512; with 16 "
                     "episodes 4 passes, clipped, learn faster and stayed stable here)")
    clip: float = _f(0.2, "PPO ratio clip epsilon, also used for the value clip")
    vf_coef: float = _f(0.1, "weight of the value loss in the joint loss")
    ptx_coef: float = _f(0.3, "gamma_ptx: weight of the pretraining LM loss in the joint "
                         "loss (paper 27.8 on its loss scale; 0 = PPO without ptx). 0.3 kept "
                         "all of the preference gain on the starter (learner.efficacy_bench, "
                         "README) and held the held-out LM loss down")
    kl_coef: float = _f(0.2, "beta of the per-token KL penalty (InstructGPT 0.02; at this "
                        "learning rate 0.2 keeps the policy near text the RM has seen)")
    target_kl: float = _f(0.0, "per-sequence KL target of the adaptive controller "
                          "(Ziegler et al. 2019); 0 = fixed beta")
    kl_horizon: int = _f(10000, "adaptive KL horizon in episodes")
    temperature: float = _f(1.0, "sampling AND scoring temperature (InstructGPT 1.0)")
    top_p: float = _f(1.0, "nucleus of sampling AND scoring; 1.0 = the full distribution")
    max_new_tokens: int = _f(32, "response length cap; responses stop at EOS (kept)")
    lora_rank: int = _f(8, "rank of the policy LoRA (ignored when copying a ref adapter)")
    seed: int = _f(0, "seed of sampling (step k samples with seed + k)")
    gamma: float = _f(1.0, "GAE discount (InstructGPT 1.0)")
    lam: float = _f(0.95, "GAE lambda")
    max_grad_norm: float = _f(1.0, "gradient clip over the trainable parameters")
    ptx_max_length: int = _f(128, "tokens per pretraining text")
    rollout_groups: int = _f(0, "split each batch into this many groups, each sampled with "
                             "its own seed (a multiple of the process count): the samples "
                             "then do not depend on how many processes share the batch; 0 = "
                             "one group per process")
    ptx_batch_size: int = _f(16, "pretraining texts per ppo_step, spread over its minibatches")

    def __post_init__(self) -> None:
        if self.batch_size % self.minibatch_size or self.minibatch_size < 1:
            raise ValueError("batch_size must be a positive multiple of minibatch_size")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("temperature > 0 and 0 < top_p <= 1 required")
        if self.rollout_groups < 0 or (self.rollout_groups
                                       and self.batch_size % self.rollout_groups):
            raise ValueError("rollout_groups must be 0 or divide batch_size")
        if self.ptx_coef < 0 or self.ptx_batch_size < 1:
            raise ValueError("ptx_coef >= 0 and ptx_batch_size >= 1 required")


@dataclass
class PPOState:
    """Everything one PPO run carries across steps (the base lives in ``peft``)."""

    peft: PeftModel
    tokenizer: object
    cfg: PPOConfig
    value_head: nn.Linear
    optimizer: torch.optim.Optimizer
    kl_ctl: FixedKL | AdaptiveKL
    rm: RewardModel | None = None
    scorer: Scorer | None = None
    ref_adapter: str | None = None
    step: int = 0

    def policy_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.peft.named_parameters() if f".{POLICY}." in n]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.policy_parameters() + list(self.value_head.parameters())


@dataclass
class Rollout:
    """query [B, P] left-padded; response [B, T] right-padded after EOS (EOS included)."""

    prompts: list[str]
    query: Tensor
    query_mask: Tensor
    response: Tensor
    response_mask: Tensor
    texts: list[str]
    sample_logprobs: Tensor | None = None  # [B, T] from generate's processed scores


@dataclass
class Scored:
    """Phase 2 output, all [B, T] except score [B]; detached."""

    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    score: Tensor
    entropy: Tensor


def _add_policy_adapter(base: nn.Module, cfg: PPOConfig, ref_adapter: str | None) -> PeftModel:
    """Add "policy" to the shared PeftModel; with ``ref_adapter`` it starts as a copy of it."""
    if ref_adapter is not None:
        lora = base.peft_config[ref_adapter]
    else:
        lora = lora_config(base, cfg.lora_rank)
    peft = add_adapter(base, POLICY, lora)
    if ref_adapter is not None:
        copy_adapter(peft, ref_adapter, POLICY)
    return peft


def make_ppo_state(base: nn.Module, tokenizer, cfg: PPOConfig, rm: RewardModel | None = None,
                   scorer: Scorer | None = None, ref_adapter: str | None = None) -> PPOState:
    """``base``: a causal LM or the RM's PeftModel (pass ``rm.peft`` to share one base)."""
    if (rm is None) == (scorer is None):
        raise ValueError("give exactly one of rm or scorer")
    peft = _add_policy_adapter(base, cfg, ref_adapter)
    peft.eval()  # dropout off in sampling, scoring and training alike
    hidden = peft.get_base_model().config.hidden_size
    device = next(peft.parameters()).device
    head = nn.Linear(hidden, 1, device=device)
    kl_ctl = (FixedKL(cfg.kl_coef) if not cfg.target_kl
              else AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon))
    state = PPOState(peft, tokenizer, cfg, head, None, kl_ctl, rm, scorer, ref_adapter)  # type: ignore[arg-type]
    _activate(state, POLICY)
    state.optimizer = torch.optim.Adam(state.trainable_parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    if rm is not None:
        value_head_from_rm(state, rm)
    dd.broadcast_params(state.trainable_parameters())  # data-parallel ranks start identical
    return state


@torch.no_grad()
def value_head_from_rm(state: PPOState, rm: RewardModel) -> None:
    """InstructGPT: the value function starts from the RM. Head weight and the calibrated
    offset (``rm.head.bias + rm.bias``), so V starts near the reward the episode will get.
    Called once, when the PPO state is made (later iterations keep the fitted head)."""
    state.value_head.weight.copy_(rm.head.weight)
    state.value_head.bias.copy_(rm.head.bias + rm.bias)


def _activate(state: PPOState, adapter: str) -> None:
    """Set the active adapter; a PEFT switch may freeze "policy", so it is unfrozen here."""
    if state.peft.active_adapter != adapter:
        state.peft.set_adapter(adapter)
    for p in state.policy_parameters():  # others stay as PEFT left them: never in our graph
        p.requires_grad_(True)


def sampling_logits(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The logits generate samples from: divided by temperature, then HF's top-p warper
    (ascending sort, drop tokens whose cumulative mass <= 1 - top_p, keep >= 1)."""
    z = logits.float() / temperature
    if top_p >= 1.0:
        return z
    sorted_z, idx = torch.sort(z, dim=-1)
    drop_sorted = sorted_z.softmax(-1).cumsum(-1) <= 1 - top_p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, idx, drop_sorted)
    return z.masked_fill(drop, float("-inf"))


def token_logprobs(logits: Tensor, tokens: Tensor, cfg: PPOConfig) -> Tensor:
    """log pi(token) under the sampling distribution; logits [B, T, V], tokens [B, T].
    Floored at -1e4: a token outside another model's nucleus stays finite."""
    logp = sampling_logits(logits, cfg.temperature, cfg.top_p).log_softmax(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).clamp_min(-1e4)


def _forward(state: PPOState, ro: Rollout) -> tuple[Tensor, Tensor]:
    """Response logits [B, T, V] and hidden states [B, T, H] for the active adapter state."""
    ids = torch.cat([ro.query, ro.response], 1)
    mask = torch.cat([ro.query_mask, ro.response_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding keeps real positions
    lm = state.peft.get_base_model()
    hidden = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           use_cache=False).last_hidden_state
    p, t = ro.query.size(1), ro.response.size(1)
    h = hidden[:, p - 1:p - 1 + t]  # position p-1+t predicts response token t
    return lm.lm_head(h), h


def _values(state: PPOState, h: Tensor) -> Tensor:
    return state.value_head(h.to(state.value_head.weight.dtype)).squeeze(-1)


def _pad(rows: list[list[int]], pad: int, left: bool, device: torch.device
         ) -> tuple[Tensor, Tensor]:
    """Token rows -> (ids, mask) [B, W], padded on the left (prompts) or right (text)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor(row, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def _query_ids(tokenizer, prompt: str) -> list[int]:
    return chat_ids(tokenizer, user_turn(prompt))


def query_batch(tokenizer, prompts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Each prompt as one user turn through the chat template, left-padded: (ids, mask)."""
    return _pad([_query_ids(tokenizer, p) for p in prompts], tokenizer.pad_token_id, left=True,
                device=device)


def generate(peft: nn.Module, tokenizer, cfg: PPOConfig, query: Tensor, query_mask: Tensor,
             output_scores: bool = False):
    """The learner's one sampling call (PPO's rollout, reference samples, the evaluate phase):
    the active adapter, cfg temperature and top-p, top-k off, cfg length cap, stop at EOS."""
    return peft.generate(
        input_ids=query, attention_mask=query_mask, do_sample=True, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True, output_scores=output_scores)


@torch.no_grad()
def rollout(state: PPOState, prompts: Sequence[str], keep_sample_logprobs: bool = False,
            group: int | None = None) -> Rollout:
    """Sample one response per prompt with the policy adapter (eval mode, cfg temperature and
    top-p, top-k off); the response runs up to and including the first EOS. The seed is
    ``cfg.seed + step`` offset by ``group`` (default: this rank) times ``dd.SEED_STRIDE``."""
    cfg, tok = state.cfg, state.tokenizer
    _activate(state, POLICY)
    pad = tok.pad_token_id
    query, query_mask = query_batch(tok, prompts, state.value_head.weight.device)
    width = query.size(1)
    offset = dd.rank() if group is None else group  # other samples on each rank / group
    torch.manual_seed(cfg.seed + state.step + offset * dd.SEED_STRIDE)
    out = generate(state.peft, tok, cfg, query, query_mask, keep_sample_logprobs)
    response = out.sequences[:, width:]
    is_eos = (response == tok.eos_token_id).long()
    after_eos = is_eos.cumsum(1) - is_eos  # EOS seen strictly before this position
    response_mask = (after_eos == 0).long()
    response = response.masked_fill(response_mask == 0, pad)
    sample_logprobs = None
    if keep_sample_logprobs:
        scores = torch.stack(out.scores, 1).float().log_softmax(-1)  # [B, T, V], processed
        sample_logprobs = scores.gather(-1, response.unsqueeze(-1)).squeeze(-1)
    texts = tok.batch_decode(response * response_mask, skip_special_tokens=True)
    return Rollout(list(prompts), query, query_mask, response, response_mask, texts,
                   sample_logprobs)


@torch.no_grad()
def score(state: PPOState, ro: Rollout) -> Scored:
    """Policy and reference logprobs of the sampled tokens, values, and the RM score, all in
    the sampling setting (same temperature/top-p, eval mode)."""
    _activate(state, POLICY)
    logits, h = _forward(state, ro)
    logprobs, values = token_logprobs(logits, ro.response, state.cfg), _values(state, h)
    entropy = entropy_from_logits(sampling_logits(logits, state.cfg.temperature, 1.0),
                                  ro.response_mask)
    if state.ref_adapter is None:
        with state.peft.disable_adapter():
            ref_logits, _ = _forward(state, ro)
    else:
        _activate(state, state.ref_adapter)
        ref_logits, _ = _forward(state, ro)
        _activate(state, POLICY)
    ref_logprobs = token_logprobs(ref_logits, ro.response, state.cfg)
    if state.rm is not None:  # tokens as sampled (prompt + response + EOS), as the RM trained
        mask = torch.cat([ro.query_mask, ro.response_mask], 1)
        rewards = state.rm.score(torch.cat([ro.query, ro.response], 1), mask)
        _activate(state, POLICY)
    else:
        rewards = state.scorer(ro.prompts, ro.texts)  # type: ignore[misc]
    return Scored(logprobs, ref_logprobs, values, rewards.float().to(values.device), entropy)


def advantages(state: PPOState, ro: Rollout, sc: Scored) -> tuple[Tensor, Tensor, dict]:
    """KL-shaped rewards -> GAE -> whitened advantages over response tokens (over ALL
    data-parallel ranks' tokens: the statistics a single process would use)."""
    rewards, stats = kl_penalized_rewards(sc.score, sc.logprobs, sc.ref_logprobs,
                                          ro.response_mask, state.kl_ctl.value)
    adv, returns = gae(rewards, sc.values, ro.response_mask, state.cfg.gamma, state.cfg.lam)
    stats["reward"] = rewards.sum(1).mean()
    stats["explained_var"] = explained_variance(sc.values, returns, ro.response_mask)
    moments = dd.global_masked_moments(adv, ro.response_mask)
    return masked_whiten(adv, ro.response_mask, moments=moments), returns, stats


def _ptx_batch(state: PPOState, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Pretraining texts -> right-padded (ids, mask) with BOS/EOS, ``ptx_max_length`` long."""
    tok, n = state.tokenizer, state.cfg.ptx_max_length
    rows = [([tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]
             + [tok.eos_token_id])[:n] for t in texts]
    return _pad(rows, tok.pad_token_id, left=False, device=state.value_head.weight.device)


def ptx_forward(state: PPOState, texts: Sequence[str]) -> tuple[Tensor, dict]:
    """LM loss of the policy on pretraining text (InstructGPT's ptx term, before gamma_ptx)."""
    ids, mask = _ptx_batch(state, texts)
    return ptx_loss(state.peft(input_ids=ids, attention_mask=mask).logits, ids, mask)


def join_rollouts(parts: Sequence[Rollout], pad: int) -> Rollout:
    """Rollouts of several groups as one batch: queries left-padded, responses right-padded
    to the widest (padding is masked, and positions come from the mask)."""
    if len(parts) == 1:
        return parts[0]
    p, t = (max(getattr(r, k).size(1) for r in parts) for k in ("query", "response"))

    def widen(x: Tensor, width: int, left: bool, value: int) -> Tensor:
        fill = x.new_full((x.size(0), width - x.size(1)), value)
        return torch.cat([fill, x] if left else [x, fill], 1)

    return Rollout([q for r in parts for q in r.prompts],
                   torch.cat([widen(r.query, p, True, pad) for r in parts]),
                   torch.cat([widen(r.query_mask, p, True, 0) for r in parts]),
                   torch.cat([widen(r.response, t, False, pad) for r in parts]),
                   torch.cat([widen(r.response_mask, t, False, 0) for r in parts]),
                   [x for r in parts for x in r.texts])


def _slice(ro: Rollout, idx: Tensor) -> Rollout:
    return Rollout([ro.prompts[i] for i in idx.tolist()], ro.query[idx], ro.query_mask[idx],
                   ro.response[idx], ro.response_mask[idx], [ro.texts[i] for i in idx.tolist()])


def update(state: PPOState, ro: Rollout, sc: Scored, adv: Tensor, returns: Tensor,
           ptx_texts: Sequence[str]) -> dict[str, float]:
    """``epochs`` passes of minibatches: policy + vf_coef * value + ptx_coef * ptx in ONE
    optimizer step (InstructGPT accumulates both gradients into the same step).

    Data-parallel: ``ro`` is this rank's shard of the batch and ``ptx_texts`` the global
    batch's texts; a global minibatch is ``minibatch_size / world`` rows of each rank. Each
    token-mean loss is weighted by this rank's share of the minibatch's tokens, so the summed
    gradients (clipped after the sum) are those of the single-process minibatch loss."""
    cfg, totals, n = state.cfg, {}, 0
    _activate(state, POLICY)
    gen = torch.Generator().manual_seed(cfg.seed + state.step)
    local_mb = cfg.minibatch_size // dd.world_size()
    n_mb, local_ptx = ro.response.size(0) // local_mb, dd.shard(list(ptx_texts))
    for _ in range(cfg.epochs):
        order = torch.randperm(ro.response.size(0), generator=gen).to(adv.device)
        for k, idx in enumerate(order.split(local_mb)):
            mb, m = _slice(ro, idx), ro.response_mask[idx]
            logits, h = _forward(state, mb)
            pg, pg_stats = ppo_policy_loss(token_logprobs(logits, mb.response, cfg),
                                           sc.logprobs[idx], adv[idx], m, cfg.clip)
            vl, vl_stats = value_loss(_values(state, h), sc.values[idx], returns[idx], m,
                                      cfg.clip)
            ptx, ptx_tokens, texts = torch.zeros(()), 0.0, local_ptx[k::n_mb]
            if cfg.ptx_coef > 0 and texts:
                ptx, ptx_stats = ptx_forward(state, texts)
                ptx_tokens = float(ptx_stats["tokens"])
            tokens = float(m.sum())
            all_tokens, all_ptx = dd.all_reduce_sum([tokens, ptx_tokens]).tolist()
            loss = tokens / max(all_tokens, 1.0) * (pg + cfg.vf_coef * vl)  # x 1.0 alone
            if ptx_tokens:
                loss = loss + ptx_tokens / all_ptx * cfg.ptx_coef * ptx
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dd.all_reduce_grads(state.trainable_parameters())  # sum over ranks, then clip
            norm = torch.nn.utils.clip_grad_norm_(state.trainable_parameters(),
                                                  cfg.max_grad_norm)  # before clipping
            state.optimizer.step()
            for key, v in (("clip_frac", pg_stats["clip_frac"]), ("value_loss", vl_stats["loss"]),
                           ("approx_kl", pg_stats["approx_kl"]), ("ptx_loss", ptx.detach()),
                           ("grad_norm", norm)):
                totals[key] = totals.get(key, 0.0) + float(v)
            n += 1
    return {f"ppo/{k}": v / max(n, 1) for k, v in totals.items()}


def ppo_step(state: PPOState, prompts: Sequence[str], ptx_texts: Sequence[str] = ()
             ) -> dict[str, float]:
    """Phases 1-4 on ``cfg.batch_size`` prompts; returns namespaced stats. Data-parallel:
    every rank passes the same global ``prompts`` and ``ptx_texts``, samples and trains on its
    shard, and returns the stats averaged over ranks (time/ keys stay its own)."""
    cfg, world = state.cfg, dd.world_size()
    if len(prompts) != cfg.batch_size:
        raise ValueError(f"expected {cfg.batch_size} prompts, got {len(prompts)}")
    if cfg.minibatch_size % world:
        raise ValueError(f"minibatch_size {cfg.minibatch_size} must split over {world} ranks")
    groups = cfg.rollout_groups or world
    if groups % world:
        raise ValueError(f"rollout_groups {groups} must be a multiple of {world} ranks")
    t0 = time.perf_counter()
    size = len(prompts) // groups  # this rank samples its groups, each with its own seed
    ro = join_rollouts([rollout(state, prompts[g * size:(g + 1) * size], group=g)
                        for g in dd.shard(range(groups))], state.tokenizer.pad_token_id)  # 1
    t1 = time.perf_counter()
    sc = score(state, ro)  # 2
    adv, returns, adv_stats = advantages(state, ro, sc)  # 3
    t2 = time.perf_counter()
    beta = state.kl_ctl.value
    stats = update(state, ro, sc, adv, returns, ptx_texts)  # 4
    t3 = time.perf_counter()
    m = ro.response_mask
    stats.update({
        "ppo/kl": float(adv_stats["kl"]), "ppo/kl_k3": float(adv_stats["kl_k3"]),
        "ppo/reward": float(adv_stats["reward"]), "ppo/score": float(sc.score.mean()),
        "ppo/entropy": float(sc.entropy), "ppo/explained_var": float(adv_stats["explained_var"]),
        "ppo/beta": beta, "ppo/response_len": float(m.sum(1).float().mean()),
        "time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/train_s": t3 - t2,
        "ppo/samples_per_s": len(prompts) / (t3 - t0)})
    # Equal shards: the mean over ranks of per-row means is the batch mean (KL for the
    # controller included); token means (entropy) are averaged per rank.
    stats = dd.mean_metrics(stats, skip=("time/", "ppo/samples_per_s"))
    state.kl_ctl.update(stats["ppo/kl"], len(prompts))
    state.step += 1
    log.info("ppo step %d: score %.3f kl %.4f beta %.4f", state.step, stats["ppo/score"],
             stats["ppo/kl"], beta)
    return stats
