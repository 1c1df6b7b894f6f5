"""The engine's running batch: rows, their KV cache, positions and last tokens.

Rows join after a prefill, advance one token per decode step and leave when finished (the
last rows move into the freed cache slots, serving/kvcache.py). The checkpoint / rollback
and split / merge that failure isolation needs (serving/isolation.py) act on it too; every
change replaces ``positions`` and ``last`` with new tensors, so a checkpoint's references
stay valid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from serving.isolation import Checkpoint, Running, checkpoint, merge, rollback, split_by_request
from serving.kvcache import SlotKV
from serving.requests import RequestHandle
from serving.rows import Row


class Batch:
    def __init__(self) -> None:
        self.kv = SlotKV()
        self.rows: list[Row] = []
        self.positions = torch.zeros(0, dtype=torch.long)
        self.last = torch.zeros(0, dtype=torch.long)
        self.tokens_generated = 0

    def join(self, rows: list[Row], first: torch.Tensor, lengths: torch.Tensor) -> None:
        """Rows whose cache was just admitted into ``kv``: their first tokens and positions."""
        self.rows.extend(rows)
        self.positions = torch.cat([self.positions, lengths])
        self.last = torch.cat([self.last, first])

    def advance(self, nxt: torch.Tensor) -> None:
        """Every row took one more token."""
        self.positions = self.positions + 1
        self.last = nxt

    def retire_finished(self, release: Callable[[RequestHandle], None]) -> None:
        """Finished rows leave; a request is ``release``d once all its rows have finished.
        (Between the step's phases, never inside one that may be rolled back: leaving
        moves cache rows in place.)"""
        if not any(r.finish is not None for r in self.rows):
            return
        gone = [i for i, r in enumerate(self.rows) if r.finish is not None]
        for r in self.rows:
            if r.finish is not None and r.handle.released is False and all(
                    o.finish is not None for o in self.rows if o.handle is r.handle):
                release(r.handle)
        order = self.kv.remove(gone)  # the last rows move into the freed slots
        self.rows = [self.rows[i] for i in order]
        idx = torch.tensor(order, dtype=torch.long)
        self.positions = self.positions.index_select(0, idx)
        self.last = self.last.index_select(0, idx)

    def clear(self) -> set[RequestHandle]:
        """Drop every row; the requests they belonged to."""
        handles = {r.handle for r in self.rows}
        self.rows, self.kv = [], SlotKV()
        self.positions, self.last = self.positions[:0], self.last[:0]
        return handles

    # -- isolation ---------------------------------------------------------------------

    def running(self) -> Running:
        return Running(self.kv, self.rows, self.positions, self.last)

    def set_running(self, running: Running) -> None:
        self.kv, self.rows = running.batch, running.rows
        self.positions, self.last = running.positions, running.last

    def checkpoint(self) -> Checkpoint:
        return checkpoint(self.running(), self.tokens_generated)

    def rollback(self, cp: Checkpoint) -> None:
        running, self.tokens_generated = rollback(cp)
        self.set_running(running)

    def empty(self) -> Running:
        return Running(SlotKV(), [], self.positions[:0], self.last[:0])

    def parts(self, decode: Callable[[], None]
              ) -> list[tuple[RequestHandle, Callable[[], None]]]:
        """``decode`` once per request, each on its own copy of its cache rows; the parts
        that succeed are merged back into the batch."""
        parts = split_by_request(self.running())
        self.set_running(self.empty())

        def step(part: Running) -> None:
            others = self.running()
            self.set_running(part)
            try:
                decode()
                part = self.running()
            finally:
                self.set_running(others)
            self.set_running(merge([others, part], self.empty()))

        return [(h, lambda part=part: step(part)) for h, part in parts]
