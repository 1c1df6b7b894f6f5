"""What callers and the engine exchange: sampling parameters, events, request handles.

The engine thread pushes event lists (or one exception) into a ``RequestHandle``; the
asyncio caller iterates it. Kept apart from the decode loop so that both read in one sitting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

EOS, MAX_TOKENS, STOP, CONTEXT = "eos", "max_tokens", "stop", "context"


class QueueFull(Exception):
    """Too many requests are waiting; the caller should retry later."""


class EngineStopped(Exception):
    """The engine is shutting down or failed; no new work is taken."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it finished."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0


@dataclass(frozen=True)
class Event:
    """What one alternative produced in one step (or its end, when finish_reason is set)."""

    index: int
    text: str
    completion_tokens: int
    finish_reason: str | None = None


@dataclass(frozen=True)
class EngineStats:
    running_rows: int
    waiting_requests: int
    steps: int
    tokens_generated: int


class RequestHandle:
    """The caller's side of one request: iterate for event lists, ``cancel`` to stop it."""

    def __init__(self, request_id: str, n: int, prompt_ids: list[int], sampling: Sampling,
                 adapter: str, seeds: list[int], loop: asyncio.AbstractEventLoop,
                 deadline: float | None) -> None:
        self.request_id = request_id
        self.n = n
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.adapter = adapter
        self.seeds = seeds
        self.deadline = deadline
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self._loop = loop
        self._queue: asyncio.Queue[list[Event] | BaseException] = asyncio.Queue()
        self._open = n
        self.cancelled = False
        self.released = False

    def cancel(self) -> None:
        """Stop generating; the engine frees this request's rows at its next step."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._open == 0

    def _push(self, item: list[Event] | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[list[Event]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[list[Event]]:
        while self._open > 0:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._open = 0
                raise item
            self._open -= sum(1 for e in item if e.finish_reason is not None)
            yield item


def push_threadsafe(handle: RequestHandle, item: BaseException) -> None:
    """Hand ``item`` (an error ending the request) to the handle's loop, from any thread."""
    with contextlib.suppress(RuntimeError):  # the caller's loop is closed
        handle._loop.call_soon_threadsafe(handle._push, item)


def deliver(out: dict[RequestHandle, list[Event]]) -> None:
    """Hand each request its step's events: one callback per caller loop, from any thread.
    A request whose loop is closed (nobody is listening) is cancelled."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for handle, events in out.items():
        by_loop.setdefault(handle._loop, []).append((handle, events))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_push_all, items)
        except RuntimeError:
            for handle, _ in items:
                handle.cancel()


def _push_all(items: list[tuple[RequestHandle, list[Event]]]) -> None:
    for handle, events in items:
        handle._push(events)
