"""Pure next-token sampling for a batch whose rows each have their own parameters.

Randomness comes in as one uniform number per row, ``uniform(seed, step)``: a pure function
of the alternative's seed and the index of the token being sampled. So a row's tokens
depend on its seed and its logits only, never on which other requests share the batch,
and a step that is rolled back and run again (serving/isolation.py) draws the same numbers.
"""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Pick one token per row.

    logits [B, V]; temperature [B] (0 = greedy); top_k [B] (0 = all); top_p [B] in (0, 1];
    uniform [B] in [0, 1). Returns token ids [B] (int64).

    Inverse-CDF sampling over the vocabulary sorted by probability: keep the top_k most
    likely tokens and the smallest prefix whose mass reaches top_p (the most likely token
    is always kept), renormalise, and take the first token whose cumulative mass exceeds
    ``uniform``.
    """
    logits = logits.float()
    greedy = temperature <= 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    sorted_logits, order = torch.sort(logits / safe_t[:, None], dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    keep = rank < k[:, None]
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep &= mass_before < top_p[:, None].float()
    keep[:, 0] = True
    probs = probs * keep
    cdf = torch.cumsum(probs, dim=-1)
    target = uniform.float()[:, None] * cdf[:, -1:]
    pos = torch.searchsorted(cdf, target, right=True).clamp(max=vocab - 1)
    # A uniform that lands on a dropped token's (zero-width) step cannot happen: searchsorted
    # with right=True returns the first index whose cdf exceeds the target, which has p > 0.
    sampled = order.gather(-1, pos).squeeze(-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


_MASK64 = (1 << 64) - 1


def uniform(seed: int, step: int) -> float:
    """The uniform in [0, 1) for token ``step`` (0, 1, ...) of an alternative sampled with
    ``seed``: output ``step + 1`` of SplitMix64 seeded with ``seed`` (Steele et al. 2014),
    computed directly, its top 53 bits as a double."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) / (1 << 53)
