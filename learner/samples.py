"""Reference samples and RM scores of (prompt, response) pairs: what the RM calibration and
the evaluate phase of an iteration compare (learner/iteration.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from learner.ppo import PPOConfig
from learner.reward_model import Encoded, RewardModel, RMConfig, collate, encode_sample, prompt_ids


@torch.no_grad()
def reference_samples(rm: RewardModel, tok, cfg: PPOConfig, prompts: Sequence[str], seed: int
                      ) -> list[tuple[str, str]]:
    """(prompt, sample) of the reference policy: the base with every adapter off, sampled
    the way PPO samples (temperature, top-p, no top-k)."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}],
                                     add_generation_prompt=True, tokenize=False)
             for p in prompts]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        batch = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    batch = batch.to(rm.device)
    torch.manual_seed(seed)
    with rm.peft.disable_adapter():
        out = rm.peft.generate(**batch, do_sample=True, temperature=cfg.temperature,
                               top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    answers = tok.batch_decode(out[:, batch["input_ids"].size(1):], skip_special_tokens=True)
    return list(zip(prompts, answers, strict=True))


@torch.no_grad()
def rm_scores(rm: RewardModel, tok, cfg: RMConfig, pairs: Sequence[tuple[str, str]]
              ) -> torch.Tensor:
    """RM scores [N] of (prompt, response) pairs, tokenized as the RM trained."""
    length = min(cfg.max_length, rm.context_length)
    rows = [Encoded((encode_sample(tok, prompt_ids(tok, [{"role": "user", "content": p}]),
                                   text, length),), (1,)) for p, text in pairs]
    ids, mask, _, _ = collate(rows, tok.pad_token_id, rm.device)
    return rm.score(ids, mask).float().cpu()
