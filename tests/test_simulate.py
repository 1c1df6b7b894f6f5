"""`rlhf simulate`'s own rules: the shared pacer (rate, count, deadline) and how questions are
drawn and ranked. Its run against real serving is in tests/test_full_loop.py."""

from __future__ import annotations

import random
import time

from bench.simulate import PROMPTS, Pacer, questions, ranker
from rlhf import preferences
from rlhf.gold import gold_ranks


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
    gold = preferences.get("gold")
    item = next(questions("gold", "starter", random.Random(0), seed=7))
    task = item.task
    assert task is not None and item.prompt == task.prompt
    texts = [task.answer, "", f"Sure! {task.answer}"]
    assert ranker(gold, item)(texts) == gold_ranks(task, texts)
    assert ranker(gold, item)(texts)[1] == 3  # the empty answer is worst


def test_other_preferences_rank_general_prompts_by_their_rule():
    item = next(questions("length", "starter", random.Random(0), seed=7))
    assert item.task is None and item.prompt in PROMPTS
    assert ranker(preferences.get("length"), item)(["aa", "a", "aa"]) == [1, 3, 1]
    item = next(questions("concise", "general", random.Random(0), seed=7))
    assert item.task is None and item.prompt in preferences.general_prompts()
    concise = ranker(preferences.get("concise"), item)
    assert concise(["It is red.", "Red.", "", "It is red, I think."]) == [2, 1, 4, 3]
