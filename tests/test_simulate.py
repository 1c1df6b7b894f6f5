"""`rlhf simulate`'s own rules: the shared pacer (rate, count, deadline) and the two ways of
ranking. Its run against real serving is in tests/test_full_loop.py."""

from __future__ import annotations

import random
import time

from rlhf.gold import gold_ranks
from ui.simulate import Pacer, questions, rank_by_length, ranker


def test_pacer_stops_at_count_and_gives_failed_turns_back():
    pacer = Pacer(rate=0.0, count=3, deadline=time.monotonic() + 3600)
    assert [pacer.claim() for _ in range(3)] == [True, True, True]
    assert not pacer.claim()  # 3 in flight: enough to reach the count
    pacer.release(stored=False)  # a failed turn frees its place
    assert pacer.claim()
    for _ in range(3):
        pacer.release(stored=True)
    assert pacer.stored == 3 and not pacer.claim()


def test_pacer_spaces_slots_by_the_rate_without_bursts_and_honours_the_deadline():
    pacer = Pacer(rate=4.0, count=None, deadline=10.0)
    pacer.next_slot = 0.0
    assert [pacer.take(now=0.0) for _ in range(3)] == [0.0, 0.25, 0.5]
    assert pacer.take(now=5.0) == 5.0  # slots missed while idle are not made up in a burst
    assert pacer.take(now=5.0) == 5.25
    assert pacer.take(now=9.9) == 9.9 and pacer.take(now=9.9) is None  # 10.15 > deadline
    assert pacer.take(now=10.0) is None
    unpaced = Pacer(rate=0.0, count=None, deadline=10.0)
    unpaced.next_slot = 0.0
    assert [unpaced.take(now=1.0) for _ in range(3)] == [1.0, 1.0, 1.0]


def test_gold_questions_are_tasks_ranked_by_the_gold_preference():
    asks = questions("gold", random.Random(0), seed=7)
    prompt, task = next(asks)
    assert task is not None and prompt == task.prompt
    texts = [task.answer, "", f"Sure! {task.answer}"]
    assert ranker(task)(texts) == gold_ranks(task, texts)
    assert ranker(task)(texts)[1] == 3  # the empty answer is worst

    prompt, task = next(questions("length", random.Random(0), seed=7))
    assert task is None and ranker(None) is rank_by_length
    assert rank_by_length(["aa", "a", "aa"]) == [1, 3, 1]
