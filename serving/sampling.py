"""Pure next-token sampling for a batch whose rows each have their own parameters.

Randomness comes in as one uniform number per row, ``uniform(seed, step)``: a pure function
of the alternative's seed and the index of the token being sampled. So a row's tokens
depend on its seed and its logits only, never on which other requests share the batch,
and a step that is rolled back and run again (serving/isolation.py) draws the same numbers.
"""

from __future__ import annotations

import torch

CANDIDATES = (128, 4096)
"""Widths of the partial sorts tried in turn; rows whose answer lies beyond the last one
sort the whole vocabulary."""


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, uniform: torch.Tensor,
                candidates: tuple[int, ...] = CANDIDATES) -> torch.Tensor:
    """Pick one token per row.

    logits [B, V]; temperature [B] (0 = greedy); top_k [B] (0 = all); top_p [B] in (0, 1];
    uniform [B] in [0, 1). Returns token ids [B] (int64).

    Inverse-CDF sampling over the vocabulary sorted by probability: keep the top_k most
    likely tokens and the smallest prefix whose mass reaches top_p (the most likely token
    is always kept), renormalise, and take the first token whose cumulative mass exceeds
    ``uniform``. Only the most likely tokens are sorted (a partial top-k of each width in
    ``candidates`` in turn); a row whose kept set or whose uniform reaches past them tries
    the next width, at last a full sort, so the answer is the full sort's either way.
    """
    logits = logits.float()
    greedy = temperature <= 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    scaled = logits / safe_t[:, None]
    sampled = logits.argmax(dim=-1)
    rows = (~greedy).nonzero().squeeze(-1)
    if rows.numel() == 0:
        return sampled
    probs = torch.softmax(scaled[rows], dim=-1)
    top_k, top_p, uniform = top_k[rows], top_p[rows], uniform[rows].float()
    for width in candidates:
        if width >= probs.shape[-1] or rows.numel() == 0:
            break
        width = max(width, int(top_k.max()))
        done, tokens = _sample_partial(probs, top_k, top_p, uniform, width)
        sampled[rows[done]] = tokens[done]
        rest = ~done
        rows, probs = rows[rest], probs[rest]
        top_k, top_p, uniform = top_k[rest], top_p[rest], uniform[rest]
    if rows.numel():
        sampled[rows] = _sample_sorted(scaled[rows], top_k, top_p, uniform)
    return sampled


def _sample_partial(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    uniform: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from the ``width`` most likely tokens; ``done`` says for which rows that is
    the full sort's answer (the kept set ends inside them, or the uniform lands inside)."""
    vocab = probs.shape[-1]
    width = min(width, vocab)
    top_probs, top_ids = probs.topk(width, dim=-1)
    cdf, keep = _kept_cdf(top_probs, top_k, top_p, vocab)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    inside = (k <= width) | ~keep[:, -1] | (width == vocab)
    total = torch.where(inside, cdf[:, -1], probs.sum(dim=-1))
    target = uniform * total
    pos = torch.searchsorted(cdf, target[:, None], right=True).clamp(max=width - 1)
    done = inside | ((top_p >= 1) & (target < cdf[:, -1]))
    return done, top_ids.gather(-1, pos).squeeze(-1)


def _kept_cdf(sorted_probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
              vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative kept mass over probabilities sorted descending, and the kept mask."""
    rank = torch.arange(sorted_probs.shape[-1], device=sorted_probs.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    keep = rank < k[:, None]
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep &= mass_before < top_p[:, None].float()
    keep[:, 0] = True
    return torch.cumsum(sorted_probs * keep, dim=-1), keep


def _sample_sorted(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   uniform: torch.Tensor) -> torch.Tensor:
    """The same rule over the fully sorted vocabulary (temperature already applied)."""
    vocab = scaled.shape[-1]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    cdf, _ = _kept_cdf(torch.softmax(sorted_logits, dim=-1), top_k, top_p, vocab)
    target = uniform.float()[:, None] * cdf[:, -1:]
    pos = torch.searchsorted(cdf, target, right=True).clamp(max=vocab - 1)
    # A uniform that lands on a dropped token's (zero-width) step cannot happen: searchsorted
    # with right=True returns the first index whose cdf exceeds the target, which has p > 0.
    return order.gather(-1, pos).squeeze(-1)


_MASK64 = (1 << 64) - 1


def uniform(seed: int, step: int) -> float:
    """The uniform in [0, 1) for token ``step`` (0, 1, ...) of an alternative sampled with
    ``seed``: output ``step + 1`` of SplitMix64 seeded with ``seed`` (Steele et al. 2014),
    computed directly, its top 53 bits as a double."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((z ^ (z >> 31)) >> 11) / (1 << 53)
