"""The gold preference of simulated labelers: hand-worked scores and ranks."""

from rlhf.gold import gold_prefers, gold_ranks, gold_score, gold_tasks
from rlhf.starter_data import Task

ADD = Task(prompt="What is 2 + 9?", answer="11", kind="add", statement="2 plus 9 is 11.")


def test_correct_beats_polite_beats_plain_beats_rambling():
    texts = ["Sure! 2 plus 9 is 11.",  # correct 2 + polite 1 = 3.0
             "11",  # correct = 2.0
             "Hmm, let me work it out. 2 plus 9 is 11.",  # 2 - 0.5 = 1.5
             "Of course! It is 12.",  # wrong, polite = 1.0
             "12",  # 0.0
             "   "]  # empty = -1.0
    assert [gold_score(ADD, t) for t in texts] == [3.0, 2.0, 1.5, 1.0, 0.0, -1.0]
    assert gold_ranks(ADD, texts) == [1, 2, 3, 4, 5, 6]


def test_equal_scores_tie():
    assert gold_ranks(ADD, ["11", "It is 11.", "10"]) == [1, 1, 3]
    assert gold_prefers(ADD, "11", "It is 11.") == 0.5
    assert gold_prefers(ADD, "Sure! 11", "11") == 1.0
    assert gold_prefers(ADD, "10", "11") == 0.0


def test_gold_tasks_are_deterministic_and_cover_all_kinds():
    tasks = gold_tasks(16, seed=3)
    assert tasks == gold_tasks(16, seed=3)
    assert {t.kind for t in tasks} == {"add", "sub", "sort", "reverse", "count_words",
                                       "count_letters", "upper", "chat"}
