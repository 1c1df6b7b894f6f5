"""Failure isolation for the engine: one request's bad data fails that request alone.

When a batched phase (the prefill of the admitted requests, or one decode step of every
running row) raises, the engine rolls its running state back to a ``Checkpoint`` taken
before the phase and runs the phase again once per request. Only the requests that also
fail on their own get the error; the others go on as if nothing had happened: their cache
and tokens are rolled back, and the random numbers a row samples with are a pure function
of its seed and token index (serving/sampling.py), so a seed still gives the same text.
A failure every request hits on its own (a broken model, out of memory) is not
attributable to any one of them and so reaches them all.

The rollback is cheap because nothing here is changed in place: the KV cache layers,
the mask, positions and last tokens are replaced by new tensors at each step, so keeping
references to the old ones is enough. What is changed in place (the row list, each row's
tokens, text offset and finish reason) is copied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from serving.kvbatch import KVBatch, layers_of

log = logging.getLogger(__name__)

H = TypeVar("H")
C = TypeVar("C")


@dataclass
class Running:
    """The engine's running batch: KV cache, rows (one per alternative), their positions [B]
    and last sampled tokens [B]."""

    batch: KVBatch | None
    rows: list[Any]
    positions: torch.Tensor
    last: torch.Tensor


@dataclass(frozen=True)
class Checkpoint:
    running: Running
    rows: list[Any]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor | None
    row_state: list[tuple[int, int, str | None]]
    tokens_generated: int


def checkpoint(running: Running, tokens_generated: int) -> Checkpoint:
    batch = running.batch
    kv = [(layer.keys, layer.values) for layer in layers_of(batch.cache)] if batch else []
    return Checkpoint(running, list(running.rows), kv, batch.mask if batch else None,
                      [(len(r.tokens), r.sent, r.finish) for r in running.rows],
                      tokens_generated)


def rollback(cp: Checkpoint) -> tuple[Running, int]:
    """The running state (and tokens_generated count) as it was at ``cp``."""
    batch = cp.running.batch
    if batch is not None:
        for layer, (keys, values) in zip(layers_of(batch.cache), cp.kv, strict=True):
            layer.keys, layer.values = keys, values
        assert cp.mask is not None
        batch.mask = cp.mask
    for row, (n_tokens, sent, finish) in zip(cp.rows, cp.row_state, strict=True):
        del row.tokens[n_tokens:]
        row.sent, row.finish = sent, finish
    running = Running(batch, list(cp.rows), cp.running.positions, cp.running.last)
    return running, cp.tokens_generated


def split_by_request(running: Running) -> list[tuple[Any, Running]]:
    """One independent Running per request (its rows only, copies of its cache rows)."""
    assert running.batch is not None
    groups: dict[Any, list[int]] = {}
    for i, row in enumerate(running.rows):
        groups.setdefault(row.handle, []).append(i)
    parts = []
    for handle, rows in groups.items():
        idx = torch.tensor(rows)
        parts.append((handle, Running(running.batch.take(idx.to(running.batch.mask.device)),
                                      [running.rows[i] for i in rows],
                                      running.positions.index_select(0, idx),
                                      running.last.index_select(0, idx))))
    return parts


def merge(parts: Sequence[Running], empty: Running) -> Running:
    """Concatenate the parts that still have rows (``empty`` when none has)."""
    live = [p for p in parts if p.rows and p.batch is not None]
    if not live:
        return empty
    batch = live[0].batch
    assert batch is not None
    for p in live[1:]:
        assert p.batch is not None
        batch.extend(p.batch)
    return Running(batch, [r for p in live for r in p.rows],
                   torch.cat([p.positions for p in live]), torch.cat([p.last for p in live]))


def run_isolated(phase: Callable[[], None], alone: Callable[[], list[tuple[H, Callable[[], None]]]],
                 save: Callable[[], C], restore: Callable[[C], None],
                 fail: Callable[[H, Exception], None]) -> None:
    """Run ``phase``; if it raises, ``restore`` what ``save`` took and run each request's
    part (``alone()``: (request, run) pairs) by itself, restoring after and handing to
    ``fail`` each one that raises. Only requests that fail on their own get an error."""
    before = save()
    try:
        phase()
        return
    except Exception as exc:
        restore(before)
        log.warning("a batched engine step failed (%r); retrying each request alone", exc)
    for request, run in alone():
        mark = save()
        try:
            run()
        except Exception as exc:
            restore(mark)
            log.exception("a request failed in the engine on its own; failing it alone")
            fail(request, exc)
