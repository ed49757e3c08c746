"""Win rates, bootstrap CIs and Bradley–Terry ratings (alignkit.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from alignkit import stats


def _battles_from_matrix(wins: dict[tuple[str, str], int]) -> list[tuple[str, str, str]]:
    """wins[(x, y)] = how many times x beat y; alternate sides so position carries no information."""
    out = []
    for (x, y), n in wins.items():
        for k in range(n):
            out.append((x, y, "a") if k % 2 == 0 else (y, x, "b"))
    return out


def test_bradley_terry_recovers_order_from_synthetic_win_matrix():
    # A beats everyone most of the time, D loses most of the time: a strict order A > B > C > D.
    wins = {
        ("A", "B"): 70, ("B", "A"): 30,
        ("A", "C"): 80, ("C", "A"): 20,
        ("A", "D"): 90, ("D", "A"): 10,
        ("B", "C"): 65, ("C", "B"): 35,
        ("B", "D"): 75, ("D", "B"): 25,
        ("C", "D"): 60, ("D", "C"): 40,
    }
    ratings = stats.bradley_terry(_battles_from_matrix(wins))
    assert sorted(ratings, key=ratings.get, reverse=True) == ["A", "B", "C", "D"]
    # Centred on 1000 (no intercept, near-zero penalty: coefficients sum to 0).
    assert np.mean(list(ratings.values())) == pytest.approx(1000.0, abs=1e-3)


def test_bradley_terry_recovers_known_ratings_on_the_elo_scale():
    # Two models, p(A beats B) = 0.75 exactly: MLE gives 400*log10(3) = 190.85 points apart.
    battles = [("A", "B", "a")] * 75 + [("A", "B", "b")] * 25
    r = stats.bradley_terry(battles)
    assert r["A"] - r["B"] == pytest.approx(400 * np.log10(3), abs=0.5)
    assert stats.expected_win_rate(r["A"], r["B"]) == pytest.approx(0.75, abs=1e-3)


def test_ties_count_half_a_win_each_way():
    # 50 wins + 50 ties for A over B: A's score is 0.75, the same as 75 wins / 25 losses.
    r = stats.bradley_terry([("A", "B", "a")] * 50 + [("A", "B", "tie")] * 50)
    assert r["A"] - r["B"] == pytest.approx(400 * np.log10(3), abs=0.5)
    ps = stats.pair_stats([("A", "B", "a")] * 50 + [("A", "B", "tie")] * 50, rounds=200)
    assert ps[("A", "B")]["win_rate"] == pytest.approx(0.75)
    assert (ps[("A", "B")]["wins"], ps[("A", "B")]["losses"], ps[("A", "B")]["ties"]) == (50, 0, 50)


def test_all_ties_give_half_and_equal_ratings():
    battles = [("A", "B", "tie"), ("B", "C", "tie"), ("A", "C", "tie")] * 20
    r = stats.bootstrap_ratings(battles, rounds=100, seed=0)
    for m in "ABC":
        assert r[m]["rating"] == pytest.approx(1000.0, abs=1e-6)
        assert r[m]["ci_low"] == pytest.approx(1000.0, abs=1e-6) and r[m]["ci_high"] == pytest.approx(1000.0, abs=1e-6)
    ps = stats.pair_stats(battles, rounds=100)
    for v in ps.values():
        assert v["win_rate"] == 0.5 and v["ci_low"] == 0.5 and v["ci_high"] == 0.5 and v["ties"] == 20
    m = stats.win_matrix(battles)
    assert m["A"]["B"] == 0.5 and m["A"]["A"] is None


def test_pair_stats_orient_swapped_sides():
    # (B, A, "b") is a win for A: results are reported for the first-seen orientation (A, B).
    ps = stats.pair_stats([("A", "B", "a"), ("B", "A", "b"), ("B", "A", "a"), ("A", "B", "tie")], rounds=100)
    assert list(ps) == [("A", "B")]
    assert (ps[("A", "B")]["wins"], ps[("A", "B")]["losses"], ps[("A", "B")]["ties"]) == (2, 1, 1)
    assert ps[("A", "B")]["win_rate"] == pytest.approx(2.5 / 4)


def test_win_matrix_is_complementary():
    battles = [("A", "B", "a"), ("A", "B", "b"), ("B", "A", "a"), ("A", "C", "tie")]
    m = stats.win_matrix(battles)
    assert m["A"]["B"] == pytest.approx(1 / 3) and m["B"]["A"] == pytest.approx(2 / 3)
    assert m["A"]["C"] == 0.5 and m["B"]["C"] is None


def test_bootstrap_ci_covers_true_win_rate_at_about_the_stated_rate():
    """Over 200 independent samples, the 95% percentile CI contains the true win rate about 95% of the time."""
    p_win, p_tie, n, reps = 0.55, 0.1, 200, 200
    true_rate = p_win + p_tie / 2
    data = np.random.default_rng(12345)
    covered = 0
    for rep in range(reps):
        u = data.random(n)
        outcomes = np.where(u < p_win, 1.0, np.where(u < p_win + p_tie, 0.5, 0.0))
        lo, hi = stats.bootstrap_mean_ci(outcomes, rounds=1000, seed=rep)
        covered += lo <= true_rate <= hi
    coverage = covered / reps
    assert 0.88 <= coverage <= 0.99, coverage


def test_rating_bootstrap_ci_contains_point_and_orders_models():
    rng = np.random.default_rng(0)
    true = {"A": 1150.0, "B": 1000.0, "C": 850.0}
    names = list(true)
    battles = []
    for _ in range(600):
        i, j = rng.choice(3, 2, replace=False)
        x, y = names[i], names[j]
        battles.append((x, y, "a" if rng.random() < stats.expected_win_rate(true[x], true[y]) else "b"))
    r = stats.bootstrap_ratings(battles, rounds=100, seed=1)
    for m in names:
        assert r[m]["ci_low"] <= r[m]["rating"] <= r[m]["ci_high"]
        # The true gap to the mean lies inside the CI (ratings are centred on 1000 like the truth here).
        assert r[m]["ci_low"] - 60 <= true[m] <= r[m]["ci_high"] + 60
    assert r["A"]["ci_low"] > r["B"]["ci_high"] and r["B"]["ci_low"] > r["C"]["ci_high"]


def test_bootstrap_needs_100_rounds_and_valid_outcomes():
    with pytest.raises(ValueError):
        stats.bootstrap_ratings([("A", "B", "a")], rounds=50)
    with pytest.raises(ValueError):
        stats.pair_stats([("A", "B", "both")])
