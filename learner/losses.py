"""Pure loss functions for the reward model and LoRA-PPO (docs/design.md §3).

Tensors in, ``(loss, stats)`` out. ``loss`` is a 0-d tensor carrying the graph; ``stats``
values are detached 0-d tensors (call ``.item()`` when logging, so the hot path does not
force a device sync). Stat keys are bare (``accuracy``); the caller namespaces them
(``rm/accuracy``). Masks are 0/1 (or bool) tensors over response tokens, right-padded.
Only torch is imported here (tests/test_contracts.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1; 0 where nothing is valid.

    ``x`` and ``mask`` broadcast together; ``dim=None`` reduces over everything.
    """
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of ``x`` over valid positions (scalar).

    Population variance by default, so whitened values have std exactly 1 over the valid
    positions; ``unbiased=True`` applies Bessel's n/(n-1) as TRL does.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp_min(1.0)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Whiten ``x`` [B, T] with the mean/std of its valid (response) positions only.

    Used on PPO advantages (docs/design.md §3): padded positions neither enter the statistics nor
    keep a value (they come back as 0). ``shift_mean=False`` rescales but keeps the mean,
    as for rewards in TRL. ``moments``: a precomputed (mean, population variance) to use
    instead, e.g. over the whole batch when each data-parallel rank holds a slice of it.
    """
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over valid tokens: 1 is a perfect value head, 0 is a constant.

    Returns 0 when the returns have no variance (nothing to explain).
    """
    var_r = masked_var(returns, mask)
    ev = 1.0 - masked_var(returns - values, mask) / var_r.clamp_min(1e-12)
    return torch.where(var_r > 0, ev, torch.zeros_like(ev))


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean token entropy of ``softmax(logits)``; logits [B, T, V], mask [B, T] -> scalar.

    Computed in float32 (bf16 logits lose the tail) as ``logsumexp(z) - sum p z``.
    """
    z = logits.float()
    ent = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    return masked_mean(ent, mask)


def kwise_rm_loss(rewards: Tensor, group: Tensor, rank: Tensor) -> tuple[Tensor, dict]:
    """K-wise reward-model loss (InstructGPT eq. 1, Ouyang et al. 2022 §3.5).

    rewards [N]: the RM score of each completion, forwarded once.
    group [N] long: which prompt each completion answers (any ids, any order).
    rank [N] long: the labeler's rank within its prompt; lower is better, equal is a tie.

    Per prompt: mean over its ordered untied pairs (rank_i < rank_j, so i wins) of
    ``-log sigmoid(r_i - r_j)``, i.e. the paper's -1/C(K,2) E[log σ(r_w − r_l)] with ties
    dropped from the count. All pairs of a prompt are one batch element (the paper's footnote:
    shuffled pairs overfit), so the batch loss is the mean over prompts that have at least one
    untied pair, not over pairs. Vectorised with an [N, N] pair mask; N is a batch of
    prompts x K (<= 9), so the matrix is small.
    Stats: accuracy (fraction of pairs with r_win > r_lose), n_pairs, n_prompts, margin
    (mean r_win - r_lose).
    """
    # pairs[i, j] = 1 where i and j answer the same prompt and i was ranked strictly better.
    same = group[:, None] == group[None, :]
    pairs = (same & (rank[:, None] < rank[None, :])).to(rewards.dtype)  # [N, N]
    diff = rewards[:, None] - rewards[None, :]  # [N, N], r_win - r_lose where pairs == 1
    pair_loss = F.softplus(-diff)  # = -log sigmoid(diff), stable for large |diff|

    # Sum rows into their prompt: per-prompt loss total and pair count.
    ids, gid = torch.unique(group, return_inverse=True)
    n_groups = ids.numel()
    g_loss = rewards.new_zeros(n_groups).index_add(0, gid, (pair_loss * pairs).sum(1))
    g_count = rewards.new_zeros(n_groups).index_add(0, gid, pairs.sum(1))
    has_pairs = g_count > 0
    per_prompt = g_loss[has_pairs] / g_count[has_pairs]
    # No untied pair at all: a zero that still carries the graph, so backward() works.
    loss = per_prompt.mean() if per_prompt.numel() else rewards.sum() * 0.0

    with torch.no_grad():
        n_pairs = pairs.sum()
        stats = {
            "loss": loss.detach(),
            "accuracy": ((diff > 0).to(rewards.dtype) * pairs).sum() / n_pairs.clamp_min(1),
            "margin": (diff * pairs).sum() / n_pairs.clamp_min(1),
            "n_pairs": n_pairs,
            "n_prompts": has_pairs.sum().to(rewards.dtype),
        }
    return loss, stats


def ppo_policy_loss(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor,
                    clip_eps: float = 0.2) -> tuple[Tensor, dict]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), masked token mean.

    logp_new, logp_old, advantages, mask: [B, T] on the sampled response tokens.
    Loss per token: ``max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps))`` (the negative of the
    pessimistic min of the paper's objective). Stats: clip_frac (tokens where the clipped
    branch was taken, so the gradient is cut), approx_kl (k3 estimate of KL(old || new),
    from samples of the old policy), ratio_mean.
    """
    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            # k3 with r = p_new / p_old and samples from p_old: (r - 1) - log r >= 0.
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values_new: Tensor, values_old: Tensor, returns: Tensor, mask: Tensor,
               clip_eps: float = 0.2) -> tuple[Tensor, dict]:
    """Clipped value loss ``0.5 * max((v - R)^2, (v_clip - R)^2)``, masked mean.

    All tensors [B, T]. ``v_clip = v_old + clip(v - v_old, -eps, eps)`` keeps the value head
    near the rollout's values, as the policy is kept near its old log-probs (the PPO baselines
    / TRL form). Stats: clip_frac (tokens where the clipped error was larger), explained_var
    (of the current values against the returns), value_mean.
    """
    v_clipped = values_old + torch.clamp(values_new - values_old, -clip_eps, clip_eps)
    err = (values_new - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "clip_frac": masked_mean((err_clipped > err).to(err.dtype), mask),
            "explained_var": explained_variance(values_new.detach(), returns, mask),
            "value_mean": masked_mean(values_new.detach(), mask),
        }
    return loss, stats


def ptx_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
    """LM cross-entropy on pretraining text: InstructGPT's ptx term (gamma_ptx * this).

    logits [B, T, V] from the policy on the text ``labels`` [B, T]; mask [B, T] marks real
    tokens. The shift is done here: position t predicts token t+1, counted where
    ``mask[:, t+1]`` is 1. Float32 for the softmax. Stats: tokens, perplexity.
    """
    logits = logits[:, :-1].float()
    keep = mask[:, 1:]
    target = torch.where(keep.bool(), labels[:, 1:], 0)  # pad ids (even -100) never index
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                         reduction="none").view_as(target)  # [B, T-1]
    loss = masked_mean(ce, keep)
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "tokens": keep.to(ce.dtype).sum(),
            "perplexity": torch.exp(loss.detach()),
        }
    return loss, stats
