"""SlotKV: the batch's preallocated K/V buffers stay right-aligned and row-exact as rows join
(shorter, longer, repeated), grow, leave and buffers reallocate."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from serving.kvcache import SlotKV

LAYERS, HEADS, DIM = 2, 2, 3


def _prefill(rows: list[list[float]]) -> tuple[DynamicCache, torch.Tensor]:
    """A left-padded group cache whose cells hold each token's own id (per layer offset)."""
    width = max(len(r) for r in rows)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    vals = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        vals[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    cache = DynamicCache()
    for layer in range(LAYERS):
        k = (vals + 1000 * layer)[:, None, :, None].expand(-1, HEADS, -1, DIM).contiguous()
        cache.update(k, -k, layer)
    return cache, mask


def _step(kv: SlotKV, new: list[float]) -> None:
    """What one decode forward does: grow, then every layer writes its new column."""
    mask = kv.grow()
    assert mask.shape == (kv.rows, kv.width)
    col = torch.tensor(new)
    for layer_idx, layer in enumerate(kv.layers):
        k = (col + 1000 * layer_idx)[:, None, None, None].expand(-1, HEADS, 1, DIM)
        keys, values = layer.update(k, -k)
        assert keys.shape[-2] == kv.width and torch.equal(values, -keys)


def _check(kv: SlotKV, expected: list[list[float]]) -> None:
    assert kv.rows == len(expected) and kv.mask.shape == (kv.rows, kv.width)
    assert kv.width == max((len(e) for e in expected), default=0)  # fully trimmed
    for layer_idx, layer in enumerate(kv.layers):
        assert layer.keys.shape[-2] == kv.width
        for i, want in enumerate(expected):
            real = kv.mask[i].bool()
            got = layer.keys[i, 0, real, 0] - 1000 * layer_idx
            assert got.tolist() == want, (layer_idx, i)
            assert real[-len(want):].all() if want else True  # right-aligned
            assert torch.equal(layer.keys[i, :, real], -layer.values[i, :, real])


def test_rows_join_grow_and_leave_with_their_own_tokens():
    kv = SlotKV()
    cache, mask = _prefill([[1, 2, 3], [4, 5]])
    kv.admit(cache, mask, torch.tensor([0, 1, 1]))  # the second prompt's row repeated (n=2)
    rows = [[1, 2, 3], [4, 5], [4, 5]]
    _check(kv, rows)
    for t in range(3):
        new = [100 + 10 * i + t for i in range(len(rows))]
        _step(kv, new)
        rows = [[*r, x] for r, x in zip(rows, new, strict=True)]
        _check(kv, rows)
    # A much longer prompt joins: start moves left (or the buffers reallocate).
    long_prompt = list(range(200, 290))
    cache, mask = _prefill([long_prompt, [7]])
    kv.admit(cache, mask, torch.tensor([0, 1]))
    rows += [long_prompt, [7]]
    _check(kv, rows)
    _step(kv, [1, 2, 3, 4, 5])
    rows = [[*r, x] for r, x in zip(rows, [1, 2, 3, 4, 5], strict=True)]
    # Rows 0 and 2 leave: the last rows fill their slots, the order says who is where.
    order = kv.remove([0, 2])
    rows = [rows[i] for i in order]
    assert sorted(order) == [1, 3, 4] and order != [1, 3, 4]
    _check(kv, rows)
    # The long row leaves too: the columns only it used are trimmed away.
    order = kv.remove([rows.index([*long_prompt, 4])])
    rows = [rows[i] for i in order]
    _check(kv, rows)
    for t in range(150):  # past the column capacity: buffers reallocate, rows stay exact
        new = [float(t * 7 + i) for i in range(len(rows))]
        _step(kv, new)
        rows = [[*r, x] for r, x in zip(rows, new, strict=True)]
    _check(kv, rows)


def test_an_emptied_batch_takes_new_rows_from_scratch():
    kv = SlotKV()
    cache, mask = _prefill([[1, 2]])
    kv.admit(cache, mask, torch.tensor([0]))
    _step(kv, [3])
    assert kv.remove([0]) == [] and kv.rows == 0 and kv.width == 0
    cache, mask = _prefill([[9, 8, 7, 6], [5]])
    kv.admit(cache, mask, torch.tensor([1, 0]))
    _check(kv, [[5], [9, 8, 7, 6]])
    kv.clear()
    assert kv.rows == 0 and kv.width == 0


def test_take_extend_and_restore_keep_rows_exact():
    kv = SlotKV()
    cache, mask = _prefill([[1, 2, 3], [4], [5, 6]])
    kv.admit(cache, mask, torch.tensor([0, 1, 2]))
    _step(kv, [7, 8, 9])
    rows = [[1, 2, 3, 7], [4, 8], [5, 6, 9]]
    part = kv.take(torch.tensor([2, 0]))  # copies: kv itself is unchanged
    _check(part, [rows[2], rows[0]])
    _check(kv, rows)
    state = kv.snapshot()
    _step(kv, [10, 11, 12])
    cache, mask = _prefill([list(range(20, 120))])
    kv.admit(cache, mask, torch.tensor([0]))  # long: the buffers reallocate
    kv.restore(state)  # as if neither had happened
    _check(kv, rows)
    _step(part, [13, 14])
    kv.extend(part)
    _check(kv, [*rows, rows[2] + [13], rows[0] + [14]])
