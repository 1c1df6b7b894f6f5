"""The engine's parts on their own: admission and the queue limit (serving/scheduler.py), a
row's text with stop strings held back and cut (serving/rows.py), prompt padding
(serving/model_step.py)."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from transformers import AutoTokenizer

from serving.model_step import left_pad
from serving.requests import DeadlineExceeded, QueueFull, RequestHandle, Sampling
from serving.rows import Detokenizer, Row, releasable, stop_cut
from serving.scheduler import Scheduler, expire_running

_ids = itertools.count()


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _handle(loop, n: int = 1, sampling: Sampling | None = None, prompt: list[int] | None = None,
            deadline: float | None = None) -> RequestHandle:
    return RequestHandle(f"r{next(_ids)}", n, prompt or [1, 2, 3],
                         sampling or Sampling(8), "base", [0] * n, loop, deadline)


# -- scheduler -----------------------------------------------------------------------


def test_queue_limit_counts_only_requests_beyond_the_free_slots(loop):
    sched = Scheduler(max_batch_size=4, max_queue=1)
    released = []
    # 2 rows running, 2 free: two waiting n=1 requests are about to run, not queued.
    for _ in range(2):
        sched.check_room(2, released.append)
        sched.waiting.append(_handle(loop))
    assert sched.beyond_free_slots(2) == 0
    sched.check_room(2, released.append)  # a third may still wait (it is the one queued)
    sched.waiting.append(_handle(loop))
    assert sched.beyond_free_slots(2) == 1
    with pytest.raises(QueueFull):
        sched.check_room(2, released.append)
    # Rows taken from the queue but not yet prefilled hold their slots too.
    assert sched.beyond_free_slots(0) == 0
    sched.admitting = 4
    assert sched.beyond_free_slots(0) == 3
    assert released == []


def test_a_request_that_does_not_fit_blocks_the_ones_behind_it(loop):
    sched = Scheduler(max_batch_size=4, max_queue=8)
    big, small = _handle(loop, n=3), _handle(loop, n=1)
    sched.waiting.extend([big, small])
    assert sched.beyond_free_slots(2) == 2  # FIFO: small waits behind big though it fits
    assert sched.take_admissible(2, lambda h: None, lambda h, e: None) == []
    assert sched.take_admissible(1, lambda h: None, lambda h, e: None) == [big]
    assert sched.admitting == 3 and list(sched.waiting) == [small]


def test_cancelled_waiting_requests_free_their_queue_place(loop):
    sched = Scheduler(max_batch_size=1, max_queue=1)
    gone, kept = _handle(loop), _handle(loop)
    sched.waiting.extend([gone, kept])  # 1 running row: both are beyond the free slots
    with pytest.raises(QueueFull):
        sched.check_room(1, lambda h: None)
    gone.cancel()
    released: list[RequestHandle] = []
    with pytest.raises(QueueFull):  # one place was freed; kept still fills the queue
        sched.check_room(1, released.append)
    assert released == [gone] and list(sched.waiting) == [kept]


def test_a_queued_request_past_its_deadline_fails_and_is_not_admitted(loop):
    sched = Scheduler(max_batch_size=4, max_queue=4)
    late, on_time = _handle(loop, deadline=10.0), _handle(loop, deadline=30.0)
    sched.waiting.extend([late, on_time])
    released, failed = [], []
    taken = sched.take_admissible(0, released.append, lambda h, e: failed.append((h, e)),
                                  now=lambda: 20.0)
    assert taken == [on_time] and released == [late] and late.cancelled
    assert [(h, type(e)) for h, e in failed] == [(late, DeadlineExceeded)]
    failed.clear()
    expire_running([on_time, on_time], lambda h, e: failed.append(h), now=lambda: 31.0)
    assert failed == [on_time] and on_time.cancelled  # failed once, not per row


# -- rows: text, stop strings, finish reasons ----------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _run_row(tokenizer, loop, tokens, sampling, context_length=10_000, eos=()):
    detok = Detokenizer(tokenizer, set(eos), context_length)
    row = Row(_handle(loop, sampling=sampling), 0, 0)
    seen, events = "", []
    for tok in tokens:
        event = detok.advance(row, tok)
        if event is not None:
            events.append(event)
            seen += event.text
            if event.finish_reason is not None:
                break
    return seen, events, row


def test_a_stop_string_split_across_tokens_is_held_back_and_cut(tokenizer, loop):
    stop = "<<END>>"
    tokens = tokenizer.encode("Hello there <<END>> and more", add_special_tokens=False)
    texts = [tokenizer.decode([t]) for t in tokens]
    assert not any(stop in t for t in texts)  # no single token holds the whole stop string
    seen, events, row = _run_row(tokenizer, loop, tokens, Sampling(100, stop=(stop,)))
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    want = full[:full.index(stop)]
    assert seen == want  # nothing of the stop string, nor what follows, was handed out
    assert events[-1].finish_reason == "stop" and row.finish == "stop"
    # Every step's text so far is a prefix of the final text: nothing was taken back.
    sofar = ""
    for e in events:
        sofar += e.text
        assert want.startswith(sofar)
    # The stop string was found before the tokens after it were consumed.
    assert events[-1].completion_tokens < len(tokens)


def test_a_partial_stop_string_is_released_once_it_cannot_match(tokenizer, loop):
    tokens = tokenizer.encode("one <<EN two <<END", add_special_tokens=False)
    seen, events, row = _run_row(tokenizer, loop, tokens,
                                 Sampling(len(tokens), stop=("<<END>>",)))
    assert seen == tokenizer.decode(tokens, skip_special_tokens=True)
    assert row.finish == "max_tokens" and events[-1].completion_tokens == len(tokens)


def test_eos_and_context_finish_reasons(tokenizer, loop):
    tokens = tokenizer.encode("a b c d e", add_special_tokens=False)
    eos = tokens[2]
    seen, events, row = _run_row(tokenizer, loop, tokens, Sampling(100), eos=(eos,))
    assert row.finish == "eos" and row.tokens == tokens[:2]  # EOS is not part of the text
    assert seen == tokenizer.decode(tokens[:2], skip_special_tokens=True)
    assert events[-1].completion_tokens == 2
    # prompt of 3 tokens, context 5: the row ends after its 2nd token
    seen, events, row = _run_row(tokenizer, loop, tokens, Sampling(100), context_length=5)
    assert row.finish == "context" and row.tokens == tokens[:2]


def test_stop_and_hold_back_by_hand():
    assert stop_cut("abc STOP def", ("STOP", "de"), 0) == 4
    assert stop_cut("abc STOP", ("STOP",), 8) == 4  # a match ending after what was sent
    assert stop_cut("abc", ("x",), 0) == -1
    assert releasable("hello <<", ("<<END>>",)) == len("hello <<") - 6
    assert releasable("ab\ufffd", ()) == 2  # an incomplete character waits
    assert releasable("abc", ()) == 3


def test_left_pad_by_hand():
    ids, mask, positions = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
