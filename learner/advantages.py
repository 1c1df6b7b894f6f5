"""KL-shaped per-token rewards and GAE for LoRA-PPO (docs/design.md §3).

Shapes: B rows (episodes), T response positions, right-padded; ``mask`` [B, T] is 1 on the
response tokens. Only torch is imported here (tests/test_contracts.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k1 estimate of KL(policy || ref): ``logp - ref_logp`` on the sampled token.

    Unbiased under samples from the policy, but any single token can be negative
    (Schulman, "Approximating KL divergence", 2020). Shapes: any, elementwise.
    """
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate: ``(r - 1) - log r`` with ``r = exp(ref_logp - logp)``.

    Unbiased and never negative (log r <= r - 1), lower variance than k1; logged beside k1
    so a negative mean k1 (the sampling/scoring mismatch bug, trl#925) stands out.
    ``expm1`` keeps precision when r is close to 1.
    """
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def _last_index(mask: Tensor) -> Tensor:
    """Index of the last valid position of each row of ``mask`` [B, T]; -1 for an empty row."""
    pos = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values


def kl_penalized_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor,
                         beta: float) -> tuple[Tensor, dict]:
    """InstructGPT per-token reward: ``r_t = -beta * kl_t`` plus the RM score on the last token.

    score [B]: the reward model's scalar for each episode. logp, ref_logp [B, T]: log-probs of
    the sampled tokens under the policy and the frozen reference. mask [B, T].
    kl_t is k1 (the estimator whose sum is the sequence log-ratio the paper penalises). The
    score goes on the LAST valid response token, as OpenRLHF and DeepSpeed-Chat do (TRL puts
    it one position later); empty rows get no score. Padded positions are 0.
    Returns rewards [B, T] and stats: kl (k1 summed over tokens, mean over rows), kl_k3
    (same for k3), non_score_reward (``-beta * kl`` per row, mean), score_mean.
    """
    m = mask.to(logp.dtype)
    k1 = kl_k1(logp, ref_logp) * m
    rewards = -beta * k1
    last = _last_index(mask)  # [B]
    has_tokens = (last >= 0).to(rewards.dtype)
    rewards = rewards.scatter_add(1, last.clamp_min(0)[:, None],
                                  (score.to(rewards.dtype) * has_tokens)[:, None])
    with torch.no_grad():
        kl_seq = k1.sum(1)  # [B]
        stats = {
            "kl": kl_seq.mean(),
            "kl_k3": (kl_k3(logp, ref_logp) * m).sum(1).mean(),
            "non_score_reward": (-beta * kl_seq).mean(),
            "score_mean": score.float().mean(),
        }
    return rewards, stats


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    rewards, values, mask: [B, T]. ``delta_t = r_t + gamma * V_{t+1} - V_t`` with
    ``V_{t+1} = 0`` after the last valid token (the episode ends there: nothing to bootstrap),
    ``A_t = delta_t + gamma * lam * A_{t+1}``. Vectorised over rows, a loop over time only.
    Returns (advantages, returns = advantages + values), both [B, T], detached (they are
    targets), 0 at padded positions. Defaults are InstructGPT's (gamma 1) and lambda 0.95.
    """
    m = mask.to(values.dtype)
    r = rewards.detach() * m
    v = values.detach() * m  # padded values read as 0, which is the bootstrap past the end
    adv = torch.zeros_like(v)
    next_adv = torch.zeros_like(v[:, 0])
    next_value = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.size(1))):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = next_adv
        next_value = v[:, t]
    return adv, (adv + v) * m
