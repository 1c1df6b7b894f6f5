"""The canary: a few greedy tokens on a fixed prompt before an adapter version goes live.

Weights can pass every static check (checksums, shapes, finite values within bounds) and
still wreck every answer; the canary runs the real forward pass once, with and without the
adapter, and refuses a version whose logits are not finite or whose output collapses to
one repeated token where the base model's does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CANARY_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, there"
CANARY_TOKENS = 6


def greedy_probe(model: torch.nn.Module, prompt_ids: Sequence[int], tokens: int = CANARY_TOKENS,
                 **forward_kwargs: object) -> tuple[list[int], bool]:
    """``tokens`` greedy tokens after ``prompt_ids`` (one row, no cache) and whether every
    logit on the way was finite (it stops at the first non-finite step)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(tokens):
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1,
                           **forward_kwargs).logits[0, -1].float()
            if not bool(torch.isfinite(logits).all()):
                return out, False
            token = int(logits.argmax())
            out.append(token)
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return out, True


def canary_problem(tokens: Sequence[int], finite: bool, base_tokens: Sequence[int]) -> str | None:
    """Why an adapter's canary output must not go live, or None (pure)."""
    if not finite:
        return f"non-finite logits on the canary prompt after {len(tokens)} token(s)"
    if len(tokens) > 1 and len(set(tokens)) == 1 and len(set(base_tokens)) > 1:
        return (f"degenerate canary output: token {tokens[0]} repeated {len(tokens)} times "
                "(the base model's output varies)")
    return None
