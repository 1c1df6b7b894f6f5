"""The generation engine: continuous batching over one model, tokens streamed as produced.

One thread owns the model. Each iteration it (1) admits waiting requests while batch slots
are free and prefills them together (the n alternatives of a request share one prefill,
its cache rows repeated n times), (2) runs one decode step for every running row, whatever
request it belongs to, and (3) detokenizes, applies stop rules and hands each request its
new text. Rows leave the batch the step they finish or their request is cancelled, so a
slot is free again at once (iteration-level scheduling, Orca/vLLM style). A phase that
raises is rolled back and run once per request, so one request's bad data fails only that
request (serving/isolation.py).

Asyncio callers talk to it through ``submit`` (raises ``QueueFull`` instead of waiting) and
the returned ``RequestHandle`` (async iterator of event lists; ``cancel``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from math import inf
from typing import Any

import torch

from serving.adapters import AdapterManager
from serving.isolation import (
    Checkpoint,
    Running,
    checkpoint,
    merge,
    rollback,
    run_isolated,
    split_by_request,
)
from serving.kvbatch import KVBatch
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
)
from serving.sampling import sample_next, uniform

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """One alternative being decoded."""

    handle: RequestHandle
    index: int
    seed: int
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already handed out
    finish: str | None = None


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
        self.device = next(adapters.model.parameters()).device
        self._waiting: deque[RequestHandle] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._batch: KVBatch | None = None
        self._positions = torch.zeros(0, dtype=torch.long)
        self._last = torch.zeros(0, dtype=torch.long)
        self._stopping = False
        self._admitting = 0  # rows taken from the queue but not yet prefilled
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.tokens_generated = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.adapters.model

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
        return EngineStats(len(self._rows), len(self._waiting), self.steps,
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
            if self._beyond_free_slots() >= self.max_queue:
                self._purge_cancelled_waiting()
            beyond = self._beyond_free_slots()
            if beyond >= self.max_queue:
                raise QueueFull(f"{beyond} requests are already waiting for a free batch slot")
            adapter = self.adapters.acquire(adapter_version)
            handle = RequestHandle(request_id, n, prompt_ids, sampling, adapter, seeds, loop,
                                   deadline)
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def _beyond_free_slots(self) -> int:
        """Waiting requests that the next step cannot admit (lock held).

        The queue limit counts these only: requests that fit the batch's free slots are
        about to run, whether or not the engine thread has taken them yet.
        """
        free = self.max_batch_size - len(self._rows) - self._admitting
        for i, handle in enumerate(self._waiting):
            if handle.n > free:  # FIFO: it and everything behind it wait
                return len(self._waiting) - i
            free -= handle.n
        return 0

    def _purge_cancelled_waiting(self) -> None:
        """Drop waiting requests whose callers went away (lock held): they hold no slot."""
        gone = [h for h in self._waiting if h.cancelled]
        for handle in gone:
            self._waiting.remove(handle)
            self._release(handle)

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
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._rows or self._calls):
                        self._cond.wait()
                    if self._stopping and not self._rows and not self._waiting:
                        break
                    calls = list(self._calls)
                    self._calls.clear()
                    admitted = self._take_admissible()
                self._run_calls(calls)
                try:
                    self._step(admitted)
                except Exception as exc:  # not attributable to one request (see _step)
                    log.exception("engine step failed; failing the requests in it")
                    self._fail_all(exc, admitted)
                finally:
                    self._admitting = 0
        self._fail_all(EngineStopped("the engine stopped"), list(self._waiting))

    def _run_calls(self, calls: list) -> None:
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def _take_admissible(self) -> list[RequestHandle]:
        """Pop waiting requests, FIFO, while their rows fit in the batch (lock held)."""
        free = self.max_batch_size - len(self._rows)
        taken = []
        while self._waiting:
            head = self._waiting[0]
            if head.deadline is not None and time.monotonic() > head.deadline:
                head.cancel()
                _push_threadsafe(head, DeadlineExceeded("deadline passed while queued"))
            if head.cancelled:
                self._waiting.popleft()
                self._release(head)
                continue
            if head.n > free:
                break
            self._waiting.popleft()
            free -= head.n
            taken.append(head)
        self._admitting = sum(h.n for h in taken)
        return taken

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
        self._admitting = 0
        if self._rows:
            self._isolated(self._decode, self._decode_parts)
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self.stats())

    # -- isolation ---------------------------------------------------------------------

    def _running(self) -> Running:
        return Running(self._batch, self._rows, self._positions, self._last)

    def _set_running(self, running: Running) -> None:
        self._batch, self._rows = running.batch, running.rows
        self._positions, self._last = running.positions, running.last

    def _checkpoint(self) -> Checkpoint:
        return checkpoint(self._running(), self.tokens_generated)

    def _rollback(self, cp: Checkpoint) -> None:
        running, self.tokens_generated = rollback(cp)
        self._set_running(running)

    def _isolated(self, phase: Callable[[], None],
                  alone: Callable[[], list[tuple[RequestHandle, Callable[[], None]]]]) -> None:
        run_isolated(phase, alone, self._checkpoint, self._rollback, self._fail_one)

    def _fail_one(self, handle: RequestHandle, exc: Exception) -> None:
        self._release(handle)
        _push_threadsafe(handle, exc)

    def _decode_parts(self) -> list[tuple[RequestHandle, Callable[[], None]]]:
        """One decode step per request, each on its own copy of its cache rows; the parts
        that succeed are merged back into the running batch."""
        parts = split_by_request(self._running())
        self._set_running(self._empty())

        def step(part: Running) -> None:
            others = self._running()
            self._set_running(part)
            try:
                self._decode()
                part = self._running()
            finally:
                self._set_running(others)
            self._set_running(merge([others, part], self._empty()))

        return [(h, lambda part=part: step(part)) for h, part in parts]

    def _empty(self) -> Running:
        return Running(None, [], self._positions[:0], self._last[:0])

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any, versions: list[str]) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=cache,
                         use_cache=True, logits_to_keep=1,
                         **self.adapters.forward_kwargs(versions))
        return out.logits[:, -1, :], out.past_key_values

    def _prefill(self, group: list[RequestHandle]) -> None:
        """One left-padded forward over the group's prompts, rows repeated n times."""
        width = max(len(h.prompt_ids) for h in group)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, h in enumerate(group):
            ids[i, width - len(h.prompt_ids):] = torch.tensor(h.prompt_ids)
            mask[i, width - len(h.prompt_ids):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, None, [h.adapter for h in group])
        repeat = torch.tensor([i for i, h in enumerate(group) for _ in range(h.n)])
        fresh = KVBatch(cache, mask.to(self.device))
        fresh.select(repeat.to(self.device))
        rows = [_Row(h, k, h.seeds[k]) for h in group for k in range(h.n)]
        first = self._sample(logits.index_select(0, repeat.to(logits.device)), rows)
        lengths = torch.tensor([len(h.prompt_ids) for h in group]).index_select(0, repeat)
        if self._batch is None:
            self._batch = fresh
        else:
            self._batch.extend(fresh)
        self._rows.extend(rows)
        self._positions = torch.cat([self._positions, lengths])
        self._last = torch.cat([self._last, first])
        now = time.monotonic()
        for h in group:
            h.first_token_at = now
        self._emit(rows, first.tolist())

    def _decode(self) -> None:
        assert self._batch is not None
        mask = self._batch.grow()
        logits, _ = self._forward(self._last[:, None], mask, self._positions[:, None],
                                  self._batch.cache, [r.handle.adapter for r in self._rows])
        nxt = self._sample(logits, self._rows)
        self._positions = self._positions + 1
        self._last = nxt
        self._emit(self._rows, nxt.tolist())

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
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

    # -- per-row bookkeeping -------------------------------------------------------------

    def _emit(self, rows: list[_Row], tokens: list[int]) -> None:
        """Advance each row by its new token, send text deltas, retire finished rows."""
        out: dict[RequestHandle, list[Event]] = {}
        self.tokens_generated += len(tokens)
        for row, tok in zip(rows, tokens, strict=True):
            event = self._advance(row, tok)
            if event is not None:
                out.setdefault(row.handle, []).append(event)
        self._deliver(out)
        if any(r.finish is not None for r in self._rows):
            self._retire()

    def _advance(self, row: _Row, tok: int) -> Event | None:
        h, s = row.handle, row.handle.sampling
        if tok in self.eos:
            row.finish = EOS
        else:
            row.tokens.append(tok)
            if len(row.tokens) >= s.max_new_tokens:
                row.finish = MAX_TOKENS
            elif len(h.prompt_ids) + len(row.tokens) >= self.context_length:
                row.finish = CONTEXT
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if s.stop:
            cut = min((i for i in (text.find(x, max(0, row.sent - len(x))) for x in s.stop)
                       if i >= 0), default=-1)
            if cut >= 0:
                text, row.finish = text[:cut], STOP
        if row.finish is None:
            # Hold back what could still become a stop sequence or an incomplete character.
            hold = max((len(x) for x in s.stop), default=1) - 1
            upto = len(text) - hold
            if text.endswith("\ufffd"):
                upto = min(upto, len(text) - 1)
            if upto <= row.sent:
                return None
            delta, row.sent = text[row.sent:upto], upto
            return Event(row.index, delta, len(row.tokens))
        delta, row.sent = text[row.sent:], len(text)
        return Event(row.index, delta, len(row.tokens), row.finish)

    def _deliver(self, out: dict[RequestHandle, list[Event]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, events in out.items():
            by_loop.setdefault(handle._loop, []).append((handle, events))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_push_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                for handle, _ in items:
                    handle.cancel()

    def _drop_expired_and_cancelled(self) -> None:
        now = time.monotonic()
        for row in self._rows:
            h = row.handle
            if h.deadline is not None and now > h.deadline and not h.cancelled:
                h.cancel()
                _push_threadsafe(h, DeadlineExceeded("the request's deadline passed"))
            if h.cancelled and row.finish is None:
                row.finish = "cancelled"
        if any(r.finish is not None for r in self._rows):
            self._retire()

    def _retire(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        for r in self._rows:
            if r.finish is not None and r.handle.released is False and all(
                    o.finish is not None for o in self._rows if o.handle is r.handle):
                self._release(r.handle)
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch = None
            self._positions = self._positions[:0]
            self._last = self._last[:0]
            return
        idx = torch.tensor(keep)
        assert self._batch is not None
        self._batch.select(idx.to(self._batch.mask.device))
        self._positions = self._positions.index_select(0, idx)
        self._last = self._last.index_select(0, idx)

    def _release(self, handle: RequestHandle) -> None:
        if not handle.released:
            handle.released = True
            self.adapters.release(handle.adapter)

    def _fail_all(self, exc: BaseException, extra: list[RequestHandle]) -> None:
        handles = {r.handle for r in self._rows} | set(extra)
        self._rows, self._batch = [], None
        self._positions, self._last = self._positions[:0], self._last[:0]
        for h in handles:
            self._release(h)
            _push_threadsafe(h, exc)


def _push_threadsafe(handle: RequestHandle, item: BaseException) -> None:
    with contextlib.suppress(RuntimeError):  # the caller's loop is closed
        handle._loop.call_soon_threadsafe(handle._push, item)


def _push_all(items: list[tuple[RequestHandle, list[Event]]]) -> None:
    for handle, events in items:
        handle._push(events)
