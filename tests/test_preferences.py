"""The simulated labelers' preferences (rlhf.preferences): utilities, ranks with ties and win
terms, worked by hand; the held-out prompt bucket never overlaps the training draw."""

from __future__ import annotations

import pytest

from rlhf import preferences
from rlhf.preferences import EMPTY, Item, draw_general, general_prompts, is_heldout
from rlhf.starter_data import make_tasks

ANSWERS = ["Sure! Glad to help: it is red!!", "Red.", "  ", "It is red, thank you, please."]


QUESTION = Item("What colour is a tomato?")


def utilities(name: str, item: Item = QUESTION) -> list[float]:
    return [preferences.get(name).utility(item, text) for text in ANSWERS]


def test_each_preference_scores_by_its_rule_and_empty_is_worst_everywhere():
    # words: 7, 1, 0 (empty), 6; polite phrases: sure+glad = 2 / 0 / - / thank+please = 2
    assert utilities("concise") == [-7.0, -1.0, EMPTY, -6.0]
    assert utilities("detailed") == [7.0, 1.0, EMPTY, 6.0]
    assert utilities("length") == [31.0, 4.0, EMPTY, 29.0]
    assert utilities("polite") == [2.0, 0.0, EMPTY, 2.0]
    assert utilities("enthusiastic") == [3.0, 0.0, EMPTY, 0.0]
    assert preferences.get("detailed").utility(Item("q"), "w " * 100) == 60.0  # capped


def test_ranks_share_ties_and_win_terms():
    assert preferences.ranks([2.0, 0.0, EMPTY, 2.0]) == [1, 3, 4, 1]
    assert preferences.ranks([-7.0, -1.0, EMPTY, -6.0]) == [3, 1, 4, 2]
    assert [preferences.win(a, b) for a, b in ((1, 0), (0, 0), (0, 1))] == [1.0, 0.5, 0.0]


def test_gold_needs_a_task_and_unknown_names_list_the_known_ones():
    task = make_tasks(1, 0)[0]
    gold = preferences.get("gold")
    assert gold.utility(Item(task.prompt, task), task.answer) >= 2.0  # correct = +2
    with pytest.raises(ValueError, match="starter tasks"):
        gold.utility(Item("hello"), "hi")
    with pytest.raises(ValueError, match="known: gold, concise"):
        preferences.get("shortest")


def test_general_prompts_split_into_disjoint_heldout_and_training_buckets():
    pool = general_prompts()
    assert len(pool) == len(set(pool)) == 500
    held = {i.prompt for i in draw_general(50, seed=1, fraction=0.2, heldout=True)}
    train = {i.prompt for i in draw_general(200, seed=2, fraction=0.2, heldout=False)}
    assert held and train and not held & train
    assert all(is_heldout(p, 0.2) for p in held)
    assert 0.1 < sum(is_heldout(p, 0.2) for p in pool) / len(pool) < 0.3
