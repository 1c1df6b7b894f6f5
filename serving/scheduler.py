"""Admission for the engine: the wait queue, its limit, cancellation and deadlines.

Requests wait FIFO; each step admits from the head while the request's n rows fit the
batch's free slots (a request that does not fit blocks the ones behind it). The queue
limit counts only the requests that the next step cannot admit: the ones that fit the free
slots are about to run, whether or not the engine thread has taken them yet. Waiting
requests whose callers went away, or whose deadline passed, leave the queue holding nothing.

Not thread-safe on its own: the engine calls it under its lock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from serving.requests import DeadlineExceeded, QueueFull, RequestHandle

Release = Callable[[RequestHandle], None]
Fail = Callable[[RequestHandle, BaseException], None]


class Scheduler:
    def __init__(self, max_batch_size: int, max_queue: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.waiting: deque[RequestHandle] = deque()
        self.admitting = 0  # rows taken from the queue but not yet prefilled

    def beyond_free_slots(self, running: int) -> int:
        """Waiting requests that the next step cannot admit, with ``running`` rows busy."""
        free = self.max_batch_size - running - self.admitting
        for i, handle in enumerate(self.waiting):
            if handle.n > free:  # FIFO: it and everything behind it wait
                return len(self.waiting) - i
            free -= handle.n
        return 0

    def check_room(self, running: int, release: Release) -> None:
        """Raise QueueFull unless one more request may wait (cancelled ones are purged
        first when the queue looks full)."""
        if self.beyond_free_slots(running) >= self.max_queue:
            self.purge_cancelled(release)
        beyond = self.beyond_free_slots(running)
        if beyond >= self.max_queue:
            raise QueueFull(f"{beyond} requests are already waiting for a free batch slot")

    def purge_cancelled(self, release: Release) -> None:
        """Drop waiting requests whose callers went away: they hold no slot."""
        gone = [h for h in self.waiting if h.cancelled]
        for handle in gone:
            self.waiting.remove(handle)
            release(handle)

    def take_admissible(self, running: int, release: Release, fail: Fail,
                        now: Callable[[], float] = time.monotonic) -> list[RequestHandle]:
        """Pop waiting requests, FIFO, while their rows fit in the batch. A head whose
        deadline passed is cancelled and ``fail``ed; cancelled heads are ``release``d."""
        free = self.max_batch_size - running
        taken = []
        while self.waiting:
            head = self.waiting[0]
            if head.deadline is not None and now() > head.deadline:
                head.cancel()
                fail(head, DeadlineExceeded("deadline passed while queued"))
            if head.cancelled:
                self.waiting.popleft()
                release(head)
                continue
            if head.n > free:
                break
            self.waiting.popleft()
            free -= head.n
            taken.append(head)
        self.admitting = sum(h.n for h in taken)
        return taken


def expire_running(handles: Iterable[RequestHandle], fail: Fail,
                   now: Callable[[], float] = time.monotonic) -> None:
    """Cancel (and ``fail``) each running request whose deadline passed."""
    t = now()
    for h in handles:
        if h.deadline is not None and t > h.deadline and not h.cancelled:
            h.cancel()
            fail(h, DeadlineExceeded("the request's deadline passed"))
