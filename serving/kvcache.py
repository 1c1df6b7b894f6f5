"""The running batch's key/value cache in preallocated buffers: rows join, leave, stay aligned.

Per layer one key and one value buffer [row capacity, heads, column capacity, head_dim];
the live cache is the view ``[:rows, :, start:end]`` and ``mask`` marks which of its cells
are real tokens (1) or padding (0). Rows are right-aligned: every row's newest token sits in
column ``end - 1``. A decode step writes its new column in place (no ``torch.cat`` of the
whole cache per layer and step, as ``DynamicCache`` does); a joining group is copied once
into free rows, its prompt ending at ``end`` (a longer prompt moves ``start`` left over
columns the running rows mark as padding); a leaving row's slot is refilled by moving the
last row into it (one row copied, not the whole batch). Buffers grow by doubling, so
reallocation is amortised. Columns that are padding in every row are skipped (``start``
moves right).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

ROOM = 64
"""Free columns kept left of ``start`` when buffers are (re)allocated, so most longer
prompts that join fit without moving the running rows."""


class SlotLayer(DynamicLayer):
    """One layer of a ``SlotKV``: writes the step's new columns in place, returns views."""

    def __init__(self, owner: SlotKV) -> None:
        super().__init__()
        self.owner = owner
        self.kbuf: torch.Tensor | None = None
        self.vbuf: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("SlotKV layers are filled by SlotKV.admit, not by a prefill")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.owner
        assert self.kbuf is not None and self.vbuf is not None
        n = key_states.shape[-2]
        self.kbuf[:o.rows, :, o.end - n:o.end] = key_states
        self.vbuf[:o.rows, :, o.end - n:o.end] = value_states
        self.refresh(o.end)
        return self.keys, self.values

    def refresh(self, end: int) -> None:
        """Views up to column ``end`` (what the model sees as already cached)."""
        o = self.owner
        assert self.kbuf is not None and self.vbuf is not None
        self.keys = self.kbuf[:o.rows, :, o.start:end]
        self.values = self.vbuf[:o.rows, :, o.start:end]
        self.is_initialized = True


def _layers(cache: Cache) -> list:
    layers = list(cache.layers)
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise NotImplementedError(
                "the batching engine supports full-attention KV caches only; "
                f"this model uses {type(layer).__name__}")
    return layers


class SlotKV:
    """The batch's K/V buffers, its [rows, width] mask and the ``Cache`` the model reads."""

    def __init__(self) -> None:
        self.rows = self.start = self.end = 0
        self.layers: list[SlotLayer] = []
        self.cache: Cache | None = None
        self._mask: torch.Tensor | None = None  # [row capacity, column capacity]

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def mask(self) -> torch.Tensor:
        assert self._mask is not None
        return self._mask[:self.rows, self.start:self.end]

    def _allocate(self, rows: int, cols: int, offset: int, like: list) -> None:
        """New buffers of at least rows x cols; live columns land at ``offset``."""
        first = like[0].keys
        device, dtype = first.device, first.dtype
        new_mask = torch.zeros(rows, cols, dtype=torch.long, device=device)
        if self._mask is not None and self.rows:
            new_mask[:self.rows, offset:offset + self.width] = self.mask
        if not self.layers:
            self.layers = [SlotLayer(self) for _ in like]
            self.cache = Cache(layers=self.layers)
        for layer, src in zip(self.layers, like, strict=True):
            heads, dim = src.keys.shape[1], src.keys.shape[-1]
            k = torch.zeros(rows, heads, cols, dim, dtype=dtype, device=device)
            v = torch.zeros_like(k)
            if layer.kbuf is not None and self.rows:
                k[:self.rows, :, offset:offset + self.width] = layer.keys
                v[:self.rows, :, offset:offset + self.width] = layer.values
            layer.kbuf, layer.vbuf = k, v
        self._mask = new_mask
        self.start, self.end = offset, offset + self.width
        self._refresh()

    def _refresh(self, pending: int = 0) -> None:
        for layer in self.layers:
            layer.refresh(self.end - pending)

    def _ensure(self, rows: int, left: int, right: int, like: list) -> None:
        """Capacity for ``rows`` rows, ``left`` columns before ``start`` and ``right`` after
        ``end`` (reallocating, doubled, when short)."""
        cap_rows, cap_cols = (self._mask.shape if self._mask is not None else (0, 0))
        if rows <= cap_rows and self.start >= left and self.end + right <= cap_cols:
            return
        new_rows = max(rows, 2 * cap_rows if rows > cap_rows else cap_rows, 1)
        need = left + self.width + right
        new_cols = max(need + ROOM, 2 * cap_cols if need + ROOM > cap_cols else cap_cols)
        self._allocate(new_rows, new_cols, max(left, ROOM), like)

    def admit(self, cache: Cache, mask: torch.Tensor, repeat: torch.Tensor) -> None:
        """Append rows ``repeat`` (indices into a prefill's [g, w] cache and mask, repeats
        allowed) after the running rows, right-aligned with them."""
        fresh = _layers(cache)
        group_width = mask.shape[1]
        extra = max(0, group_width - self.width)
        if self.rows == 0:
            self.start = self.end  # an empty batch has no width
            extra = group_width
        self._ensure(self.rows + len(repeat), extra, 0, fresh)
        assert self._mask is not None
        self.start -= extra
        lo, hi, first = self.rows, self.rows + len(repeat), self.end - group_width
        if extra:  # columns now live for the running rows: padding to them
            self._mask[:lo, self.start:self.start + extra] = 0
        self._mask[lo:hi, self.start:self.end] = 0
        self._mask[lo:hi, first:self.end] = mask.index_select(0, repeat)
        for layer, src in zip(self.layers, fresh, strict=True):
            assert layer.kbuf is not None and layer.vbuf is not None
            layer.kbuf[lo:hi, :, first:self.end] = src.keys.index_select(0, repeat)
            layer.vbuf[lo:hi, :, first:self.end] = src.values.index_select(0, repeat)
        self.rows = hi
        self._refresh()

    def grow(self) -> torch.Tensor:
        """Room for one more column (the next decode step's); returns the new mask."""
        self._ensure(self.rows, 0, 1, self.layers)
        assert self._mask is not None
        self.end += 1
        self._mask[:self.rows, self.end - 1] = 1
        self._refresh(pending=1)  # the forward's update writes that column
        return self.mask

    def remove(self, gone: list[int]) -> list[int]:
        """Drop rows ``gone``; the last rows move into their slots. Returns the new order
        (position i now holds the row that was at ``order[i]``)."""
        assert self._mask is not None
        left = self.rows - len(gone)
        dead = set(gone)
        holes = [i for i in sorted(dead) if i < left]
        movers = [i for i in range(left, self.rows) if i not in dead]
        order = list(range(left))
        if holes:
            dst = torch.tensor(holes, device=self._mask.device)
            src = torch.tensor(movers, device=self._mask.device)
            cols = slice(self.start, self.end)
            self._mask[dst, cols] = self._mask[src, cols]
            for layer in self.layers:
                assert layer.kbuf is not None and layer.vbuf is not None
                layer.kbuf[dst, :, cols] = layer.kbuf[src, :, cols]
                layer.vbuf[dst, :, cols] = layer.vbuf[src, :, cols]
            for h, m in zip(holes, movers, strict=True):
                order[h] = m
        self.rows = left
        self._trim()
        self._refresh()
        return order

    def _trim(self) -> None:
        """Skip leading columns that are padding in every row."""
        if self.rows == 0:
            self.start = self.end
            return
        used = self.mask.any(dim=0).nonzero()
        self.start += int(used[0]) if used.numel() else self.width

    def snapshot(self) -> tuple:
        """What ``restore`` needs to undo later ``admit``/``grow``/forward writes: they only
        write outside the live view (or into new buffers). ``remove`` moves rows inside it,
        so the engine retires rows outside the phases it may roll back."""
        return (self.rows, self.start, self.end, self._mask,
                [(layer.kbuf, layer.vbuf) for layer in self.layers])

    def restore(self, state: tuple) -> None:
        self.rows, self.start, self.end, self._mask, bufs = state
        for layer, (k, v) in zip(self.layers, bufs, strict=False):
            layer.kbuf, layer.vbuf = k, v
        self.layers = self.layers[:len(bufs)]
        self.cache = Cache(layers=self.layers) if self.layers else None
        self._refresh()

    def take(self, rows: torch.Tensor) -> SlotKV:
        """A new SlotKV holding copies of ``rows`` (this one is unchanged)."""
        out = SlotKV()
        if self.rows and len(rows):
            out.admit(_View(self.layers), self.mask, rows)
        return out

    def extend(self, other: SlotKV) -> None:
        """Append ``other``'s rows after these (copied; ``other`` is unchanged)."""
        if other.rows:
            self.admit(_View(other.layers), other.mask,
                       torch.arange(other.rows, device=other.mask.device))

    def clear(self) -> None:
        self.rows = 0
        self.start = self.end
        if self.layers:
            self._refresh()


class _View:
    """The live K/V views of some SlotKV layers, shaped like a prefill cache for ``admit``."""

    def __init__(self, layers: list[SlotLayer]) -> None:
        self.layers = layers
