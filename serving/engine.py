"""The generation engine: continuous batching over one model, tokens streamed as produced.

One thread owns the model. Each iteration it (1) admits waiting requests while batch slots
are free (serving/scheduler.py) and prefills them together (the n alternatives of a request
share one prefill, its cache rows repeated n times; serving/model_step.py), (2) runs one
decode step for every running row, whatever request it belongs to, and (3) detokenizes,
applies stop rules and hands each request its new text (serving/rows.py). Rows leave the
batch the step they finish or their request is cancelled, so a slot is free again at once
(iteration-level scheduling, Orca/vLLM style). A phase that raises is rolled back and run
once per request, so one request's bad data fails only that request (serving/isolation.py).

Asyncio callers talk to it through ``submit`` (raises ``QueueFull`` instead of waiting) and
the returned ``RequestHandle`` (async iterator of event lists; ``cancel``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from serving.adapters import AdapterManager
from serving.batch import Batch
from serving.isolation import run_isolated
from serving.model_step import ModelStep
from serving.requests import (  # also re-exported: callers import them from here
    CONTEXT,
    EOS,
    MAX_TOKENS,
    STOP,
    DeadlineExceeded,
    EngineStats,
    EngineStopped,
    Event,
    QueueFull,
    RequestHandle,
    Sampling,
    deliver,
    push_threadsafe,
)
from serving.rows import Detokenizer, Row
from serving.scheduler import Scheduler, expire_running

__all__ = ["CONTEXT", "EOS", "MAX_TOKENS", "STOP", "DeadlineExceeded", "Engine", "EngineStats",
           "EngineStopped", "Event", "QueueFull", "RequestHandle", "Sampling"]

log = logging.getLogger(__name__)


class Engine:
    """Owns the model and its decode thread."""

    def __init__(self, tokenizer: Any, *, adapters: AdapterManager,
                 eos_token_ids: tuple[int, ...], context_length: int, max_batch_size: int,
                 max_queue: int, threads: int = 0,
                 on_step: Callable[[EngineStats], None] | None = None) -> None:
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.eos = set(eos_token_ids)
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.threads = threads
        self.on_step = on_step
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._model_step = ModelStep(adapters, self.eos, self.pad_id)
        self.device = self._model_step.device
        self._detok = Detokenizer(tokenizer, self.eos, context_length)
        self._sched = Scheduler(max_batch_size, max_queue)
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._cond = threading.Condition()
        self._batch = Batch()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.adapters.model

    @property
    def tokens_generated(self) -> int:
        return self._batch.tokens_generated

    # -- caller side ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def close_intake(self) -> None:
        """Refuse new requests; running and queued ones still finish."""
        with self._cond:
            self._stopping = True

    def stop(self, timeout: float = 10.0) -> None:
        """Finish running and queued requests, then end the decode thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> EngineStats:
        return EngineStats(len(self._batch.rows), len(self._sched.waiting), self.steps,
                           self.tokens_generated)

    def submit(self, request_id: str, prompt_ids: list[int], n: int, sampling: Sampling,
               adapter_version: str | None = None, deadline: float | None = None
               ) -> RequestHandle:
        """Queue a request (call from the event loop that will iterate the handle).

        Raises UnknownAdapter (version not loaded), QueueFull, EngineStopped.
        """
        loop = asyncio.get_running_loop()
        base_seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        seeds = [(base_seed + i) % (1 << 64) for i in range(n)]
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            self._sched.check_room(len(self._batch.rows), self._release)
            adapter = self.adapters.acquire(adapter_version)
            handle = RequestHandle(request_id, n, prompt_ids, sampling, adapter, seeds, loop,
                                   deadline)
            self._sched.waiting.append(handle)
            self._cond.notify_all()
        return handle

    def call_soon(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between two steps (e.g. an adapter load)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    # -- engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        waiting = self._sched.waiting
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or waiting or self._batch.rows or self._calls):
                        self._cond.wait()
                    if self._stopping and not self._batch.rows and not waiting:
                        break
                    calls = list(self._calls)
                    self._calls.clear()
                    admitted = self._sched.take_admissible(len(self._batch.rows), self._release,
                                                           push_threadsafe)
                self._run_calls(calls)
                try:
                    self._step(admitted)
                except Exception as exc:  # not attributable to one request (see _step)
                    log.exception("engine step failed; failing the requests in it")
                    self._fail_all(exc, admitted)
                finally:
                    self._sched.admitting = 0
        self._fail_all(EngineStopped("the engine stopped"), list(waiting))

    def _run_calls(self, calls: list) -> None:
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def _step(self, admitted: list[RequestHandle]) -> None:
        """Prefill the admitted requests, then one decode step of every row.

        Each phase is isolated (serving/isolation.py): when it raises, the state is rolled
        back and the phase runs once per request, so only a request that fails on its own
        gets an error.
        """
        self._drop_expired_and_cancelled()
        if admitted:
            self._isolated(lambda: self._prefill(admitted),
                           lambda: [(h, lambda h=h: self._prefill([h])) for h in admitted])
            self._batch.retire_finished(self._release)
        self._sched.admitting = 0
        if self._batch.rows:
            self._isolated(self._decode, lambda: self._batch.parts(self._decode))
            self._batch.retire_finished(self._release)
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self.stats())

    def _prefill(self, group: list[RequestHandle]) -> None:
        rows, first, lengths = self._model_step.prefill(group, self._batch.kv)
        self._batch.join(rows, first, lengths)
        now = time.monotonic()
        for h in group:
            h.first_token_at = now
        self._emit(rows, first.tolist())

    def _decode(self) -> None:
        b = self._batch
        nxt = self._model_step.decode(b.kv, b.last, b.positions, b.rows)
        b.advance(nxt)
        self._emit(b.rows, nxt.tolist())

    def _emit(self, rows: list[Row], tokens: list[int]) -> None:
        """Advance each row by its new token and send the text deltas."""
        out: dict[RequestHandle, list[Event]] = {}
        self._batch.tokens_generated += len(tokens)
        for row, tok in zip(rows, tokens, strict=True):
            event = self._detok.advance(row, tok)
            if event is not None:
                out.setdefault(row.handle, []).append(event)
        deliver(out)

    # -- isolation and rows leaving ---------------------------------------------------

    def _isolated(self, phase: Callable[[], None],
                  alone: Callable[[], list[tuple[RequestHandle, Callable[[], None]]]]) -> None:
        run_isolated(phase, alone, self._batch.checkpoint, self._batch.rollback,
                     self._fail_one)

    def _fail_one(self, handle: RequestHandle, exc: Exception) -> None:
        self._release(handle)
        push_threadsafe(handle, exc)

    def _drop_expired_and_cancelled(self) -> None:
        expire_running([row.handle for row in self._batch.rows], push_threadsafe)
        for row in self._batch.rows:
            if row.handle.cancelled and row.finish is None:
                row.finish = "cancelled"
        self._batch.retire_finished(self._release)

    def _release(self, handle: RequestHandle) -> None:
        if not handle.released:
            handle.released = True
            self.adapters.release(handle.adapter)

    def _fail_all(self, exc: BaseException, extra: list[RequestHandle]) -> None:
        for h in self._batch.clear() | set(extra):
            self._release(h)
            push_threadsafe(h, exc)
