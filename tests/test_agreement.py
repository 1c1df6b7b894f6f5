"""rlhf.agreement against numbers worked by hand (in the comments)."""

from __future__ import annotations

import pytest

from rlhf.agreement import (
    Golden,
    Rated,
    agreement_by_labeler,
    agreement_by_pair,
    alpha_over_tasks,
    golden_accuracy,
    krippendorff_alpha_ordinal,
    overall_agreement,
    pair_scores,
    pairwise_agreement,
    top1_hit,
)


def test_pairwise_agreement_counts_pairs_ordered_alike():
    # a: A > B > C; b: A > C > B. Pairs: AB both A first (1), AC both A first (1),
    # BC a says B, b says C (0): 2 of 3.
    a, b = {"A": 1, "B": 2, "C": 3}, {"A": 1, "B": 3, "C": 2}
    assert pair_scores(a, b) == (2.0, 3)
    assert pairwise_agreement(a, b) == pytest.approx(2 / 3)
    assert pairwise_agreement(a, a) == 1.0
    # fully reversed: every pair flipped
    assert pairwise_agreement(a, {"A": 3, "B": 2, "C": 1}) == 0.0


def test_a_tie_against_an_order_is_half_and_two_ties_agree():
    # a ties A=B; b orders A > B > C. AB: tie vs order -> 0.5; AC: 1; BC: 1 -> 2.5 / 3.
    a, b = {"A": 1, "B": 1, "C": 2}, {"A": 1, "B": 2, "C": 3}
    assert pair_scores(a, b) == (2.5, 3)
    # both tie everything: every pair agrees (both "no preference")
    assert pairwise_agreement({"A": 1, "B": 1}, {"A": 2, "B": 2}) == 1.0


def test_only_common_candidates_count():
    # C is in one ranking only: the one common pair AB agrees.
    assert pair_scores({"A": 1, "B": 2, "C": 3}, {"A": 1, "B": 2, "D": 1}) == (1.0, 1)
    assert pairwise_agreement({"A": 1}, {"A": 1}) is None


def test_top1_hit_shares_a_tied_top():
    assert top1_hit({"A": 1, "B": 2, "C": 3}, "A") == 1.0
    assert top1_hit({"A": 1, "B": 1, "C": 3}, "A") == 0.5  # A shares the top with B
    assert top1_hit({"A": 1, "B": 1, "C": 3}, "C") == 0.0
    assert top1_hit({"A": 1, "B": 2}, "Z") is None


def test_per_pair_per_labeler_and_overall_pool_the_pairs():
    # t1 (K=3): alice A>B>C, bob A>C>B -> 2 of 3 pairs; carol did not rank t1.
    # t2 (K=2): alice X>Y, bob Y>X -> 0 of 1; carol X>Y -> agrees with alice 1 of 1,
    #   with bob 0 of 1.
    rated = [Rated("t1", "alice", {"A": 1, "B": 2, "C": 3}),
             Rated("t1", "bob", {"A": 1, "B": 3, "C": 2}),
             Rated("t2", "alice", {"X": 1, "Y": 2}), Rated("t2", "bob", {"X": 2, "Y": 1}),
             Rated("t2", "carol", {"X": 1, "Y": 2}),
             Rated("g1", "alice", {"X": 1, "Y": 2}), Rated("g1", "bob", {"X": 2, "Y": 1})]
    by_pair = agreement_by_pair(rated, skip=frozenset({"g1"}))  # golden scored apart
    # alice-bob: (2 + 0) of (3 + 1) pairs; alice-carol 1 of 1; bob-carol 0 of 1
    assert by_pair == {("alice", "bob"): (2.0, 4), ("alice", "carol"): (1.0, 1),
                       ("bob", "carol"): (0.0, 1)}
    # alice: (2 + 1) / (4 + 1) = 0.6; bob: (2 + 0) / 5 = 0.4; carol: 1 / 2
    assert agreement_by_labeler(by_pair) == {"alice": (3.0, 5), "bob": (2.0, 5),
                                             "carol": (1.0, 2)}
    assert overall_agreement(by_pair) == pytest.approx(3 / 6)
    assert overall_agreement({}) is None


def test_golden_accuracy_from_a_known_ranking_or_a_best_answer():
    golden = {"g1": Golden(ranking={"A": 1, "B": 2, "C": 3}), "g2": Golden(best="X")}
    rated = [Rated("g1", "alice", {"A": 1, "B": 2, "C": 3}),   # 3 of 3 pairs
             Rated("g1", "bob", {"A": 3, "B": 2, "C": 1}),     # 0 of 3
             Rated("g2", "alice", {"X": 1, "Y": 1}),           # shares the top: 0.5
             Rated("g2", "bob", {"X": 1, "Y": 2}),             # hit: 1
             Rated("t9", "bob", {"X": 1, "Y": 2})]             # not golden: ignored
    # alice (3 + 0.5) / (3 + 1) = 0.875; bob (0 + 1) / 4 = 0.25
    assert golden_accuracy(rated, golden) == {"alice": (3.5, 4), "bob": (1.0, 4)}


def test_krippendorff_alpha_ordinal_by_hand():
    # Three units, two labelers each: (1, 1), (2, 2), (2, 3).
    # Coincidence matrix (each unit's ordered pairs weigh 1 / (m - 1) = 1):
    #   o11 = 2, o22 = 2, o23 = o32 = 1  ->  n1 = 2, n2 = 3, n3 = 1, n = 6.
    # Ordinal distances d_ck = (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2:
    #   d12 = (5 - 2.5)^2 = 6.25, d23 = (4 - 2)^2 = 4, d13 = (6 - 1.5)^2 = 20.25.
    # Observed: o23 d23 + o32 d32 = 8.
    # Expected: 2 (n1 n2 d12 + n1 n3 d13 + n2 n3 d23) = 2 (37.5 + 40.5 + 12) = 180.
    # alpha = 1 - (n - 1) 8 / 180 = 1 - 40 / 180 = 7 / 9.
    # (The `krippendorff` package 0.9.0 gives 0.7777... on the same data.)
    assert krippendorff_alpha_ordinal([[1, 1], [2, 2], [2, 3]]) == pytest.approx(7 / 9)
    # perfect agreement with variation: 1; a unit with one value is not pairable
    assert krippendorff_alpha_ordinal([[1, 1], [2, 2], [3]]) == pytest.approx(1.0)
    assert krippendorff_alpha_ordinal([[1, 1], [1, 1]]) is None  # no variation
    assert krippendorff_alpha_ordinal([[1], [2]]) is None


def test_alpha_over_tasks_makes_a_unit_per_candidate():
    # One overlapped task; units A: (1, 1), B: (2, 2), C: (2, 3) -> the 7/9 above.
    rated = [Rated("t1", "alice", {"A": 1, "B": 2, "C": 2}),
             Rated("t1", "bob", {"A": 1, "B": 2, "C": 3}),
             Rated("t2", "alice", {"A": 1, "B": 2})]  # ranked once: no unit
    assert alpha_over_tasks(rated) == pytest.approx(7 / 9)
    assert alpha_over_tasks(rated, skip=frozenset({"t1"})) is None
