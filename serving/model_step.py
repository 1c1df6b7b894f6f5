"""The model side of one engine step: a prefill of joining prompts, a decode of every row.

``ModelStep`` runs the forward pass (with the adapters' per-row kwargs and the running
batch's ``SlotKV`` cache, serving/kvcache.py) and samples each row's next token
(serving/sampling.py). It owns no running state: the engine hands it the cache and rows and
keeps what comes back.
"""

from __future__ import annotations

from math import inf
from typing import Any

import torch

from serving.adapters import AdapterManager
from serving.kvcache import SlotKV
from serving.requests import RequestHandle
from serving.rows import Row
from serving.sampling import sample_next, uniform


def left_pad(prompts: list[list[int]], pad_id: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one batch: input ids, attention mask and position ids."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


class ModelStep:
    def __init__(self, adapters: AdapterManager, eos: set[int], pad_id: int) -> None:
        self.adapters = adapters
        self.eos = eos
        self.pad_id = pad_id
        self.device = next(adapters.model.parameters()).device

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                cache: Any, versions: list[str]) -> tuple[torch.Tensor, Any]:
        out = self.adapters.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device), past_key_values=cache, use_cache=True,
            logits_to_keep=1, **self.adapters.forward_kwargs(versions))
        return out.logits[:, -1, :], out.past_key_values

    def prefill(self, group: list[RequestHandle], kv: SlotKV
                ) -> tuple[list[Row], torch.Tensor, torch.Tensor]:
        """One left-padded forward over the group's prompts, rows repeated n times, their
        cache admitted into ``kv``. Returns the new rows, their first tokens and their
        prompt lengths (the next position)."""
        ids, mask, positions = left_pad([h.prompt_ids for h in group], self.pad_id)
        logits, cache = self.forward(ids, mask, positions, None, [h.adapter for h in group])
        repeat = torch.tensor([i for i, h in enumerate(group) for _ in range(h.n)])
        rows = [Row(h, k, h.seeds[k]) for h in group for k in range(h.n)]
        first = self.sample(logits.index_select(0, repeat.to(logits.device)), rows)
        lengths = torch.tensor([len(h.prompt_ids) for h in group]).index_select(0, repeat)
        kv.admit(cache, mask.to(self.device), repeat.to(self.device))
        return rows, first, lengths

    def decode(self, kv: SlotKV, last: torch.Tensor, positions: torch.Tensor,
               rows: list[Row]) -> torch.Tensor:
        """One token for every running row (the cache grows by one column in place)."""
        mask = kv.grow()
        logits, _ = self.forward(last[:, None], mask, positions[:, None], kv.cache,
                                 [r.handle.adapter for r in rows])
        return self.sample(logits, rows)

    def sample(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """Each row's next token under its own sampling parameters; EOS is barred until a
        row has its ``min_new_tokens``."""
        params = [r.handle.sampling for r in rows]
        logits = logits.float().cpu()
        early = [i for i, r in enumerate(rows) if len(r.tokens) < params[i].min_new_tokens]
        if early and self.eos:
            logits[torch.tensor(early)[:, None], torch.tensor(sorted(self.eos))[None, :]] = -inf
        return sample_next(
            logits,
            torch.tensor([p.temperature for p in params]),
            torch.tensor([p.top_k for p in params]),
            torch.tensor([p.top_p for p in params]),
            torch.tensor([uniform(r.seed, len(r.tokens)) for r in rows], dtype=torch.float64))
