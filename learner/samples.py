"""Reference samples and RM scores of (prompt, response) pairs: what the RM calibration and
the evaluate phase of an iteration compare (learner/iteration.py)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

from learner.ppo import PPOConfig, generate, query_batch
from learner.reward_model import Encoded, RewardModel, RMConfig, collate, encode_sample, prompt_ids
from rlhf.chat import user_turn


@torch.no_grad()
def sample(rm: RewardModel, tok, cfg: PPOConfig, prompts: Sequence[str], seed: int,
           adapter: str | None = None, batch: int = 64) -> list[str]:
    """One sample per prompt (one user turn each), sampled the way PPO samples (temperature,
    top-p, no top-k, its length cap), ``batch`` prompts per generate call: from ``adapter``
    on the shared base, or with ``adapter`` None from the reference (every adapter off)."""
    peft = rm.peft
    if adapter is not None:
        peft.set_adapter(adapter)  # every forward of the learner sets its own adapter again
    torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prompts), batch):
        query, mask = query_batch(tok, prompts[start:start + batch], rm.device)
        with nullcontext() if adapter is not None else peft.disable_adapter():
            ids = generate(peft, tok, cfg, query, mask).sequences
        out += tok.batch_decode(ids[:, query.size(1):], skip_special_tokens=True)
    return out


def reference_samples(rm: RewardModel, tok, cfg: PPOConfig, prompts: Sequence[str], seed: int,
                      adapter: str | None = None) -> list[tuple[str, str]]:
    """(prompt, sample) of the reference policy: the base with every adapter off, or the
    frozen reference adapter PPO's KL is measured to (the SFT adapter once there is one)."""
    return list(zip(prompts, sample(rm, tok, cfg, prompts, seed, adapter), strict=True))


@torch.no_grad()
def rm_scores(rm: RewardModel, tok, cfg: RMConfig, pairs: Sequence[tuple[str, str]]
              ) -> torch.Tensor:
    """RM scores [N] of (prompt, response) pairs, tokenized as the RM trained."""
    length = min(cfg.max_length, rm.context_length)
    rows = [Encoded((encode_sample(tok, prompt_ids(tok, user_turn(p)),
                                   text, length),), (1,)) for p, text in pairs]
    ids, mask, _, _ = collate(rows, tok.pad_token_id, rm.device)
    return rm.score(ids, mask).float().cpu()
