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
    ps = stats.pair_stats([("A", "B", "a")] * 50 + [("A", "B", "tie")] * 50)
    assert ps[("A", "B")]["win_rate"] == pytest.approx(0.75)
    assert (ps[("A", "B")]["wins"], ps[("A", "B")]["losses"], ps[("A", "B")]["ties"]) == (50, 0, 50)


def test_all_ties_give_half_and_equal_ratings():
    battles = [("A", "B", "tie"), ("B", "C", "tie"), ("A", "C", "tie")] * 20
    r = stats.bootstrap_ratings(battles, rounds=100, seed=0)
    for m in "ABC":
        assert r[m]["rating"] == pytest.approx(1000.0, abs=1e-6)
        assert r[m]["ci_low"] == pytest.approx(1000.0, abs=1e-6) and r[m]["ci_high"] == pytest.approx(1000.0, abs=1e-6)
    ps = stats.pair_stats(battles)
    for v in ps.values():
        assert v["win_rate"] == 0.5 and v["ci_low"] < 0.5 < v["ci_high"] and v["ties"] == 20  # 20 ties: not certainty
    m = stats.win_matrix(battles)
    assert m["A"]["B"] == 0.5 and m["A"]["A"] is None


def test_pair_stats_orient_swapped_sides():
    # (B, A, "b") is a win for A: results are reported for the first-seen orientation (A, B).
    ps = stats.pair_stats([("A", "B", "a"), ("B", "A", "b"), ("B", "A", "a"), ("A", "B", "tie")])
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
    with pytest.raises(ValueError, match="clusters"):
        stats.pair_stats([("A", "B", "a")] * 3, clusters=[0, 1])
    with pytest.raises(ValueError, match="weights"):
        stats.bootstrap_ratings([("A", "B", "a"), ("A", "B", "b")], rounds=100, weights=[1.0, 0.0])


def _prompt_correlated_battles(seed: int = 0, n_prompts: int = 80) -> tuple[list, list[int]]:
    """Every pair of four models on every prompt, as compare judges them: a model's response to a prompt
    has one quality that decides all K-1 of its battles there, so battles sharing a prompt are correlated."""
    rng = np.random.default_rng(seed)
    strength = {"A": 0.6, "B": 0.3, "C": 0.0, "D": -0.3}
    battles, prompts = [], []
    for p in range(n_prompts):
        # A prompt-level effect shared by all models (easy / hard prompt) and a per-response draw.
        quality = {m: s + rng.normal(0, 1.0) for m, s in strength.items()}
        for x, y in [("A", "B"), ("A", "C"), ("A", "D"), ("B", "C"), ("B", "D"), ("C", "D")]:
            battles.append((x, y, "a" if quality[x] > quality[y] else "b"))
            prompts.append(p)
    return battles, prompts


def test_cluster_bootstrap_is_wider_than_the_battle_bootstrap_on_prompt_correlated_battles():
    battles, prompts = _prompt_correlated_battles()
    by_battle = stats.bootstrap_ratings(battles, rounds=200, seed=0)
    by_prompt = stats.bootstrap_ratings(battles, rounds=200, seed=0, clusters=prompts)
    width = {name: np.mean([r[m]["ci_high"] - r[m]["ci_low"] for m in r]) for name, r in
             (("battle", by_battle), ("prompt", by_prompt))}
    assert width["prompt"] > 1.1 * width["battle"], width
    # Same point estimate: clustering changes only the uncertainty.
    for m in by_battle:
        assert by_prompt[m]["rating"] == pytest.approx(by_battle[m]["rating"])
    # The default (every battle its own cluster) is the same as naming one cluster per battle.
    explicit = stats.bootstrap_ratings(battles, rounds=200, seed=0, clusters=list(range(len(battles))))
    assert explicit == by_battle


def test_pair_ci_resamples_clusters_of_overlapping_votes():
    """Two votes per prompt that mostly agree: the votes are not independent, the prompts are."""
    rng = np.random.default_rng(0)
    base = rng.random(80) < 0.62
    votes, prompts = [], []
    for p, b in enumerate(base):
        for _ in range(2):
            agree = rng.random() < 0.9
            votes.append(("x", "y", "a" if b == agree else "b"))
            prompts.append(p)
    naive = stats.pair_stats(votes)[("x", "y")]
    clustered = stats.pair_stats(votes, clusters=prompts, weights=[0.5] * len(votes))[("x", "y")]
    assert clustered["win_rate"] == pytest.approx(naive["win_rate"])  # equal weights within a cluster
    assert clustered["ci_high"] - clustered["ci_low"] > 1.15 * (naive["ci_high"] - naive["ci_low"])
    assert (clustered["n"], clustered["units"], naive["units"]) == (160, 80, 160)
    # Raw counts are votes whatever the weights.
    assert clustered["wins"] + clustered["losses"] == 160


def test_weights_make_every_comparison_count_once():
    # Prompt 0: three votes (2 for x, 1 for y); prompt 1: one vote for y. Per comparison: 2/3 and 0.
    battles = [("x", "y", "a"), ("x", "y", "a"), ("x", "y", "b"), ("x", "y", "b")]
    weights = [1 / 3, 1 / 3, 1 / 3, 1.0]
    ps = stats.pair_stats(battles, clusters=[0, 0, 0, 1], weights=weights)[("x", "y")]
    assert ps["win_rate"] == pytest.approx((2 / 3 + 0) / 2)
    assert (ps["wins"], ps["losses"], ps["n"], ps["units"]) == (2, 2, 4, 2)
    assert stats.win_matrix(battles, weights=weights)["x"]["y"] == pytest.approx(1 / 3)
    assert stats.pair_stats(battles)[("x", "y")]["win_rate"] == 0.5  # unweighted: one vote, one unit
    lo, hi = stats.bootstrap_mean_ci([1, 1, 0, 0], rounds=200, clusters=[0, 0, 0, 1], weights=weights)
    assert 0 <= lo <= 1 / 3 <= hi <= 2 / 3 + 1e-9


def test_win_rate_cis_never_collapse_and_move_monotonically():
    from statsmodels.stats.proportion import proportion_confint

    sweep = stats.pair_stats([("x", "y", "a")] * 15)[("x", "y")]
    assert sweep["win_rate"] == 1.0 and sweep["ci_method"] == "wilson-over-prompts"
    assert (sweep["ci_low"], sweep["ci_high"]) == pytest.approx(proportion_confint(15, 15, method="wilson"))
    assert sweep["ci_low"] < 0.85 and sweep["ci_high"] == pytest.approx(1.0)
    lost = stats.pair_stats([("x", "y", "b")] * 15)[("x", "y")]
    assert lost["ci_high"] == pytest.approx(1 - sweep["ci_low"])
    # Counted over clusters: 15 wins on 5 prompts are 5 of 5, a wider interval.
    clustered = stats.pair_stats([("x", "y", "a")] * 15, clusters=[i // 3 for i in range(15)])[("x", "y")]
    assert clustered["ci_low"] == pytest.approx(proportion_confint(5, 5, method="wilson")[0])
    assert clustered["ci_low"] < sweep["ci_low"]
    # A weaker record never gets a tighter lower bound than a perfect one (the percentile bootstrap did).
    lows = [stats.pair_stats([("x", "y", "a")] * 9 + [("x", "y", w)])[("x", "y")]["ci_low"] for w in ("a", "tie", "b")]
    assert lows[0] > lows[1] > lows[2]
    # One prompt, or all ties: an honest width, not a point.
    for battles, clusters in (([("x", "y", "a")] * 2 + [("x", "y", "b")], [0, 0, 0]), ([("x", "y", "tie")] * 10, None)):
        one = stats.pair_stats(battles, clusters=clusters)[("x", "y")]
        assert one["ci_high"] - one["ci_low"] > 0.3
    cyclic = stats.bootstrap_ratings([("A", "B", "a"), ("B", "C", "a"), ("C", "A", "a")], rounds=100, clusters=[0, 0, 0])
    assert all(r["ci_high"] > r["ci_low"] for r in cyclic.values())
    # A single battle has nothing to resample: no CI (None), not the point [1095, 1095] the leaderboard showed.
    single = stats.bootstrap_ratings([("A", "B", "a")], rounds=100)
    assert single["A"]["rating"] > single["B"]["rating"]
    assert all(r["ci_low"] is None and r["ci_high"] is None for r in single.values())

def test_a_model_that_never_loses_is_flagged_and_gets_a_finite_rating():
    rest = [("B", "C", "a")] * 12 + [("B", "C", "b")] * 8
    battles = [("A", "B", "a")] * 20 + [("A", "C", "a")] * 20 + rest
    graph = stats.connectivity(battles)
    assert graph.separated and graph.connected and graph.never_lost == ["A"] and graph.never_won == []
    assert graph.groups == [["A"], ["B", "C"]]
    assert "A never lost or tied" in graph.warning and "{A} > {B, C}" in graph.warning
    r = stats.bootstrap_ratings(battles, rounds=100, seed=0)
    # Finite and modest: with one virtual tie per pair, 20-0 reads as 20.5 of 21 (about 650 points), where the
    # near-unpenalised fit put A thousands of points out and dragged B and C far below 1000.
    assert 400 < r["A"]["rating"] - r["B"]["rating"] < 800
    assert r["A"]["ci_high"] - r["A"]["ci_low"] < 200
    # B vs C is still (close to) its own data's answer, 12-8.
    assert r["B"]["rating"] - r["C"]["rating"] == pytest.approx(400 * np.log10(12 / 8), abs=40)
    # Where every model won and lost somewhere, nothing is flagged and the fit is the plain MLE.
    ok = stats.connectivity(battles + [("B", "A", "a")])
    assert not ok.separated and ok.warning is None
    assert stats.connectivity(rest).warning is None


def test_models_that_never_met_are_flagged_as_separate_groups():
    battles = [("A", "B", "a"), ("B", "A", "a"), ("C", "D", "a"), ("D", "C", "tie")]
    graph = stats.connectivity(battles)
    assert not graph.connected and not graph.separated
    assert graph.components == [["A", "B"], ["C", "D"]]
    assert "never met" in graph.warning and "{A, B} | {C, D}" in graph.warning
    assert "No finite" not in graph.warning


def test_online_elo_is_gone():
    # It was computed in pair-sorted order, so it meant nothing and contradicted the Bradley–Terry ratings.
    assert not hasattr(stats, "online_elo")


def _length_biased_battles(n: int, seed: int, *, models=("x", "y"), mean_len=(150.0, 100.0)):
    """Equally good models whose responses differ in length only; the judge prefers the longer by construction:
    P(first shown wins) = sigmoid(2 * tanh(d / sd(d))), d = its length minus the other's."""
    rng = np.random.default_rng(seed)
    battles, len_a, len_b, prompts = [], [], [], []
    for i in range(n):
        for j, k in [(0, 1)] if len(models) == 2 else [(0, 1), (0, 2), (1, 2)]:
            la, lb = rng.normal(mean_len[j], 40.0), rng.normal(mean_len[k], 40.0)
            battles.append((models[j], models[k], la - lb))
            len_a.append(la), len_b.append(lb), prompts.append(i)
    d = np.array([b[2] for b in battles])
    p_a = 1 / (1 + np.exp(-2.0 * np.tanh(d / d.std())))
    u = rng.random(len(battles))
    winners = np.where(u < p_a, "a", "b")
    return [(a, b, w) for (a, b, _), w in zip(battles, winners)], np.array(len_a), np.array(len_b), prompts


def test_length_controlled_win_rate_sees_through_a_judge_that_prefers_length():
    battles, la, lb, prompts = _length_biased_battles(400, seed=11)
    scores = [1.0 if w == "a" else 0.0 for _, _, w in battles]
    lc = stats.length_controlled_win_rate(scores, la - lb, clusters=prompts, rounds=300, seed=0)
    assert lc.raw_win_rate > 0.7  # raw: far from a coin flip, though neither model is better
    assert lc.ci_low < 0.5 < lc.ci_high and abs(lc.win_rate - 0.5) < 0.08  # controlled: a coin flip
    assert lc.length_coef > 1.0  # and the judge's taste for length is what the model found


def test_length_control_changes_nothing_when_lengths_do_not_differ():
    # d constant: the feature is 0 everywhere, the model is intercept-only, sigmoid(theta) = the raw rate.
    scores = [1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.5]  # 5 of 8: (4 + 2 * 0.5) / 8 = 0.625
    lc = stats.length_controlled_win_rate(scores, [3.0] * 8, rounds=200, seed=1)
    assert lc.raw_win_rate == 0.625 and abs(lc.win_rate - 0.625) < 1e-6 and lc.length_coef == 0.0
    sweep = stats.length_controlled_win_rate([1.0] * 5, [1, 2, 3, 4, 5], rounds=100)
    assert sweep.win_rate == 1.0 and sweep.raw_win_rate == 1.0  # every verdict one way: no fit, no NaN


def test_style_controlled_ratings_undo_a_length_advantage():
    battles, la, lb, prompts = _length_biased_battles(250, seed=5, models=("short", "mid", "long"),
                                                      mean_len=(80.0, 120.0, 160.0))
    plain = stats.bradley_terry(battles)
    assert plain["long"] - plain["short"] > 100  # plain ratings reward length
    styled = stats.style_controlled_ratings(battles, la, lb, clusters=prompts, rounds=150, seed=0)
    r = styled["ratings"]
    assert abs(r["long"]["rating"] - r["short"]["rating"]) < 40 and styled["length_coef"] > 0.5
    assert all(v["ci_low"] < 1000 < v["ci_high"] for v in r.values())  # none is better at equal length
    one_way = [("a", "b", "a"), ("a", "c", "a"), ("b", "c", "tie")]  # a never lost: no MLE
    assert stats.style_controlled_ratings(one_way, [1, 2, 3], [3, 2, 1]) is None
