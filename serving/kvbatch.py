"""The running batch's key/value cache: rows join, leave and stay aligned.

Rows are right-aligned: every row's newest token sits in the last column, older columns of
shorter rows are padding that ``mask`` marks 0. A joining group is left-padded (or the
batch is) until both have the same number of columns, then concatenated along the batch
dimension; finished rows are dropped with ``index_select``; columns that are padding in
every row are trimmed from the left. Tensors are [B, heads, T, head_dim] per layer.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache


def layers_of(cache: DynamicCache) -> list:
    layers = list(cache.layers)
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise NotImplementedError(
                "the batching engine supports full-attention KV caches only; "
                f"this model uses {type(layer).__name__}")
    return layers


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[-2] = n
    return torch.cat([t.new_zeros(shape), t], dim=-2)


class KVBatch:
    """A DynamicCache plus its [B, T] validity mask."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def pad_left(self, n: int) -> None:
        if n <= 0:
            return
        for layer in layers_of(self.cache):
            layer.keys = _pad_left(layer.keys, n)
            layer.values = _pad_left(layer.values, n)
        self.mask = torch.cat([self.mask.new_zeros(self.size, n), self.mask], dim=1)

    def extend(self, other: KVBatch) -> None:
        """Append ``other``'s rows after this batch's rows (other is consumed)."""
        width = max(self.width, other.width)
        self.pad_left(width - self.width)
        other.pad_left(width - other.width)
        for mine, theirs in zip(layers_of(self.cache), layers_of(other.cache), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.mask = torch.cat([self.mask, other.mask], dim=0)

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder to) ``rows``, a 1-D index tensor; may repeat rows."""
        for layer in layers_of(self.cache):
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
        self.mask = self.mask.index_select(0, rows)
        self.trim()

    def take(self, rows: torch.Tensor) -> KVBatch:
        """A new KVBatch holding ``rows`` of this one, which is left as it is."""
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        out = KVBatch(cache, self.mask)
        out.select(rows)
        return out

    def trim(self) -> None:
        """Drop leading columns that are padding in every row."""
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.width
        if first == 0:
            return
        for layer in layers_of(self.cache):
            layer.keys = layer.keys[..., first:, :]
            layer.values = layer.values[..., first:, :]
        self.mask = self.mask[:, first:]

    def grow(self) -> torch.Tensor:
        """The mask for the next decode step (one new valid column); becomes the mask."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        return self.mask
