"""Choosing labels: selection scores worked by hand, the per-prompt cap, and the arena allocator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignkit.selection import (CandidatePair, PairSpread, allocate_battles, member_preferences, rating_spreads,
                                select_pairs, uncertainty)


def pair(prompt, ra, rb, a=0, b=1):
    return CandidatePair(prompt, a, b, ra, rb)


def test_member_preferences_are_bradley_terry_probabilities():
    p = member_preferences(pair("p", [0.0, math.log(3.0)], [0.0, 0.0]))
    assert p == pytest.approx([0.5, 0.75])  # sigmoid(0), sigmoid(ln 3) = 3 / 4


def test_selection_scores_by_hand():
    # Members say P(A) = 0.5 and 0.75: std 0.125, mean 0.625 -> margin 1 - |1.25 - 1| = 0.75.
    c = pair("p", [0.0, math.log(3.0)], [0.0, 0.0])
    assert uncertainty(c, "disagreement") == pytest.approx(0.125)
    assert uncertainty(c, "margin") == pytest.approx(0.75)
    h = lambda q: -(q * math.log(q) + (1 - q) * math.log(1 - q))  # noqa: E731
    assert uncertainty(c, "bald") == pytest.approx(h(0.625) - (h(0.5) + h(0.75)) / 2)
    # Members that agree on a coin flip: no disagreement, full margin, no mutual information.
    coin = pair("p", [1.0, 2.0], [1.0, 2.0])
    assert uncertainty(coin, "disagreement") == 0 and uncertainty(coin, "margin") == 1
    assert uncertainty(coin, "bald") == pytest.approx(0.0, abs=1e-12)


def test_select_picks_what_the_ensemble_is_least_sure_of_one_per_prompt():
    sure = pair("p1", [5.0, 5.1, 4.9], [0.0, 0.1, -0.1])  # every member: A, clearly
    split = pair("p2", [3.0, -3.0, 0.0], [0.0, 0.0, 0.0])  # members disagree
    split_twin = pair("p2", [2.5, -2.5, 0.0], [0.0, 0.0, 0.0], a=2, b=3)  # same prompt, nearly as split
    mild = pair("p3", [1.0, -0.5, 0.2], [0.0, 0.0, 0.0])
    chosen = select_pairs([sure, split, split_twin, mild], 2, rule="disagreement")
    assert [s.pair for s in chosen] == [split, mild]  # the twin loses to the per-prompt cap, sure is last
    assert chosen[0].score > chosen[1].score > uncertainty(sure, "disagreement")
    both = select_pairs([sure, split, split_twin, mild], 3, rule="disagreement", per_prompt=2)
    assert [s.pair for s in both] == [split, split_twin, mild]


def test_random_selection_is_seeded_and_keeps_the_cap():
    cands = [pair(f"p{i // 2}", [0.0], [0.0], a=i, b=i + 1) for i in range(10)]
    first = select_pairs(cands, 4, rule="random", seed=3)
    assert first == select_pairs(cands, 4, rule="random", seed=3) != select_pairs(cands, 4, rule="random", seed=4)
    assert len({s.pair.prompt for s in first}) == 4
    with pytest.raises(ValueError, match="ensemble of 2 or more"):
        select_pairs(cands, 2, rule="bald")


def test_the_allocator_prefers_the_least_certain_pair():
    spreads = [PairSpread(("a", "b"), 40, 30.0), PairSpread(("a", "c"), 40, 120.0), PairSpread(("b", "c"), 40, 60.0)]
    given = allocate_battles(spreads, 10)
    assert max(given, key=given.get) == ("a", "c") and sum(given.values()) == 10
    # After enough battles the most uncertain pair's spread falls to the next one's and both share.
    assert given.get(("b", "c"), 0) <= given[("a", "c")]
    never_met = allocate_battles([PairSpread(("a", "b"), 0, math.inf), PairSpread(("a", "c"), 500, 200.0)], 1)
    assert never_met == {("a", "b"): 1}


def test_rating_spreads_from_bootstrap_samples():
    samples = np.array([[1000.0, 1010.0, 900.0], [1002.0, 1008.0, 950.0], [998.0, 1012.0, 850.0]])
    spreads = {s.models: s for s in rating_spreads(samples, ["a", "b", "c"], {("a", "b"): 5, ("c", "a"): 3})}
    assert spreads[("a", "b")].spread == pytest.approx(np.std([-10.0, -6.0, -14.0]))
    assert spreads[("a", "c")].battles == 3 and spreads[("b", "c")].spread == math.inf  # b and c never met
