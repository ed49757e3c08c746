"""Statistics for A/B comparisons: win rates with CIs, Bradley–Terry ratings as Chatbot Arena computes them.

A *battle* is `(model_a, model_b, winner)` with winner one of "a", "b", "tie".

Every public function takes two optional per-battle sequences beside the battles:

- `clusters`: a hashable key per battle naming the unit that is resampled together. Battles
  that share a key are not independent: in `alignkit compare` every pair of models meets on
  every prompt, so a model's response to a prompt appears in K-1 battles, and with human
  judges one comparison gets several votes. The bootstrap resamples clusters (prompts) with
  replacement, not battles; resampling battles treats correlated battles as independent (on
  the demo's five models that made the rating CIs 25-35% too narrow). Default: every battle its own cluster.
- `weights`: a positive weight per battle (default 1). The human judge weighs each vote
  1/(votes on that comparison), so every (prompt, pair) counts once however many people voted.

Win rates
  X's win rate over Y counts a tie as half a win: sum(weight * score) / sum(weight). Its 95%
  CI is the Wilson score interval with n = the pair's clusters (prompts), Kish's effective n
  when clusters weigh unequally (statsmodels' proportion_confint). A cluster's mean score lies
  in [0, 1], so p(1 - p) bounds its variance: valid with ties and fractional votes (then
  conservative), and unlike the percentile bootstrap it neither collapses to a point (one
  prompt, a clean sweep, all ties) nor narrows as a result moves towards 0 or 1.

Ratings
  Maximum-likelihood Bradley–Terry, the way Chatbot Arena's `compute_mle_elo` does it: a
  logistic regression without intercept, feature +ln(10) for model_a and -ln(10) for model_b,
  every battle duplicated so that a win is two wins and a tie is one win each way; the
  coefficients are scaled by 400 and offset by 1000 (400 points per factor of 10 in the odds).
  The duplicated rows are summed into weights per (winner, loser) cell, which gives the same
  likelihood. scikit-learn's LogisticRegression with a very large C (no effective penalty) fits
  it; the tiny penalty centres the ratings on 1000. Bootstrap CIs resample clusters (>= 100
  rounds) and refit; the interval is the 2.5/97.5 percentile of each model's rating.

  The MLE exists (is finite) iff the directed graph "i beat or tied j at least once" is
  strongly connected (Zermelo 1929, Ford 1957). When it is not — a model that never lost, or
  never won, or groups of models that never lost to another group — the likelihood keeps
  rising as those gaps grow, and the near-zero penalty would put the rating thousands of
  points out and, through the centring, shift every other model too. Then (and only then)
  every pair that met counts PRIOR_TIES extra virtual ties: Coulom's BayesElo remedy (its
  `prior` is virtual draws), a prior written as data in the data's own units, so 15-0 reads as
  15.5 of 16 (about 600 points), not infinity. A bootstrap round is fitted by the same rule
  (MLE where it exists, else the virtual ties). `connectivity()` says when this happened and
  which models are involved; callers must show its warning, because the gaps across the
  groups it names are set by the prior, not by the data. Models in sets that never met at
  all (weakly disconnected) are not comparable at any rating: each set is centred on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

import numpy as np

OUTCOMES = ("a", "b", "tie")
SCALE = 400.0
BASE = 10.0
INIT_RATING = 1000.0
MIN_BOOTSTRAP = 100
PRIOR_TIES = 1.0  # virtual ties per pair that met, added only when the MLE does not exist
LEVEL = 0.95
CI_WILSON = "wilson-over-prompts"


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    winner: str  # "a" | "b" | "tie"


def _battles(battles: Iterable) -> list[Battle]:
    out = []
    for b in battles:
        b = b if isinstance(b, Battle) else Battle(*b)
        if b.winner not in OUTCOMES:
            raise ValueError(f"winner must be one of {OUTCOMES}, got {b.winner!r}")
        if b.model_a == b.model_b:
            raise ValueError(f"a model cannot battle itself ({b.model_a})")
        out.append(b)
    return out


def _units(n: int, clusters: Sequence[Hashable] | None, weights: Sequence[float] | None) -> tuple[np.ndarray, int, np.ndarray]:
    """(cluster code per battle, number of clusters, weight per battle), validated."""
    if clusters is None:
        codes = np.arange(n)
    else:
        if len(clusters) != n:
            raise ValueError(f"clusters: {len(clusters)} keys for {n} battles")
        index: dict = {}
        codes = np.array([index.setdefault(c, len(index)) for c in clusters], dtype=int)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (n,):
        raise ValueError(f"weights: {w.size} values for {n} battles")
    if n and not (np.all(np.isfinite(w)) and np.all(w > 0)):
        raise ValueError("weights must be finite and > 0")
    return codes, (int(codes.max()) + 1 if n else 0), w


def _cluster_means(sums: np.ndarray, wsums: np.ndarray, rounds: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of sum(weighted scores) / sum(weights) with clusters resampled with replacement."""
    rng = np.random.default_rng(seed)
    c = sums.size
    means = np.empty(rounds)
    chunk = max(1, 2_000_000 // max(1, c))  # bound memory for long inputs
    for start in range(0, rounds, chunk):
        k = min(chunk, rounds - start)
        idx = rng.integers(0, c, size=(k, c))
        means[start : start + k] = sums[idx].sum(axis=1) / wsums[idx].sum(axis=1)
    return means


def bootstrap_mean_ci(values: Sequence[float], rounds: int = 1000, seed: int = 0, level: float = LEVEL, *,
                      clusters: Sequence[Hashable] | None = None,
                      weights: Sequence[float] | None = None) -> tuple[float, float]:
    """Percentile bootstrap CI of the (weighted) mean of `values`, resampling clusters (default: each value)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    codes, c, w = _units(x.size, clusters, weights)
    means = _cluster_means(np.bincount(codes, w * x, c), np.bincount(codes, w, c), rounds, seed)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def wilson_interval(p: float, n: float, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion p over n (possibly effective, fractional) trials."""
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(p * n, n, alpha=1 - level, method="wilson")
    return float(lo), float(hi)


def _win_rate_ci(scores: np.ndarray, w: np.ndarray, codes: np.ndarray, level: float = LEVEL) -> tuple[float, float, str]:
    """Wilson score interval of a pair's weighted win rate, n = its clusters (Kish's effective n when they weigh unequally).

    A cluster's mean score lies in [0, 1], so its variance is at most p(1 - p), the binomial's: the
    interval is valid for ties and fractional human votes too (conservative when there are ties), never
    collapses to a point (one prompt, a clean sweep, all ties), and moves monotonically with the data.
    """
    cluster_weight = np.bincount(codes, w, int(codes.max()) + 1)
    n = cluster_weight.sum() ** 2 / (cluster_weight**2).sum()
    p = float((w * scores).sum() / w.sum())
    return (*wilson_interval(p, n, level), CI_WILSON)


def pair_stats(battles: Iterable, *, clusters: Sequence[Hashable] | None = None,
               weights: Sequence[float] | None = None) -> dict[tuple[str, str], dict]:
    """Per unordered pair (first-seen order): the first model's raw wins/losses/ties and battles `n`, the
    number of clusters `units`, the weighted win rate and its 95% CI with `ci_method`."""
    battles = _battles(battles)
    codes, _, w = _units(len(battles), clusters, weights)
    per_pair: dict[tuple[str, str], list[int]] = {}
    scores = np.empty(len(battles))
    for k, b in enumerate(battles):
        key = (b.model_a, b.model_b)
        if key not in per_pair and (b.model_b, b.model_a) in per_pair:
            key = (b.model_b, b.model_a)
        flipped = key != (b.model_a, b.model_b)
        scores[k] = 0.5 if b.winner == "tie" else float((b.winner == "a") != flipped)
        per_pair.setdefault(key, []).append(k)
    out = {}
    for key, rows in per_pair.items():
        s, pw = scores[rows], w[rows]
        _, local = np.unique(codes[rows], return_inverse=True)  # the pair's clusters, numbered from 0
        lo, hi, method = _win_rate_ci(s, pw, local)
        out[key] = {
            "wins": int((s == 1.0).sum()),
            "losses": int((s == 0.0).sum()),
            "ties": int((s == 0.5).sum()),
            "n": int(s.size),
            "units": int(local.max()) + 1,
            "win_rate": float((pw * s).sum() / pw.sum()),
            "ci_low": lo,
            "ci_high": hi,
            "ci_method": method,
        }
    return out


def _models(battles: list[Battle]) -> list[str]:
    seen: dict[str, None] = {}
    for b in battles:
        seen.setdefault(b.model_a)
        seen.setdefault(b.model_b)
    return list(seen)


def _counts(battles: list[Battle], index: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Battle arrays (i_a, i_b, winner code 0=a, 1=b, 2=tie)."""
    ia = np.array([index[b.model_a] for b in battles], dtype=int)
    ib = np.array([index[b.model_b] for b in battles], dtype=int)
    w = np.array([OUTCOMES.index(b.winner) for b in battles], dtype=int)
    return ia, ib, w


def _win_weights(ia: np.ndarray, ib: np.ndarray, w: np.ndarray, p: int, weights: np.ndarray) -> np.ndarray:
    """win[i, j]: weight of the duplicated rows "i beats j" (a win counts twice, a tie once each way)."""
    win = np.zeros((p, p))
    np.add.at(win, (ia[w == 0], ib[w == 0]), 2 * weights[w == 0])
    np.add.at(win, (ib[w == 1], ia[w == 1]), 2 * weights[w == 1])
    np.add.at(win, (ia[w == 2], ib[w == 2]), weights[w == 2])
    np.add.at(win, (ib[w == 2], ia[w == 2]), weights[w == 2])
    return win


def _components(edges: np.ndarray):
    """(graph, (count, labels) of strongly connected components, (count, labels) of weakly connected ones)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    graph = csr_matrix(edges)
    return (graph, connected_components(graph, directed=True, connection="strong"),
            connected_components(graph, directed=True, connection="weak"))


def _separated(win: np.ndarray) -> bool:
    """Whether some set of models never lost (beat-or-tie graph not strongly connected within a component).

    Among the models with a battle: a bootstrap round can miss one, and it gets no rating there.
    """
    present = (win.sum(axis=0) + win.sum(axis=1)) > 0
    _, (n_strong, _), (n_weak, _) = _components(win[np.ix_(present, present)] > 0)
    return n_strong > n_weak


def _fit_win(win: np.ndarray) -> np.ndarray:
    """Elo-scale ratings maximising the likelihood of the duplicated-row weights `win`."""
    from sklearn.linear_model import LogisticRegression

    p = win.shape[0]
    rows, ys, sw = [], [], []
    for i in range(p):
        for j in range(i + 1, p):
            for y, weight in ((1.0, win[i, j]), (0.0, win[j, i])):
                if weight > 0:
                    x = np.zeros(p)
                    x[i], x[j] = math.log(BASE), -math.log(BASE)
                    rows.append(x)
                    ys.append(y)
                    sw.append(weight)
    if len(set(ys)) < 2:
        # Every observed pair went the same way: the regression needs both classes. The mirrored
        # row (-x, 1-y) has exactly the same likelihood as (x, y), so adding it changes nothing else.
        mirrored = [-r for r in rows]
        rows, ys, sw = rows + mirrored, ys + [1.0 - y for y in ys], sw + sw
    if not rows:
        return np.full(p, INIT_RATING)
    lr = LogisticRegression(C=1e6, fit_intercept=False, tol=1e-8, max_iter=1000)
    lr.fit(np.array(rows), np.array(ys), sample_weight=np.array(sw))
    return SCALE * lr.coef_[0] + INIT_RATING


def _fit_bt(ia: np.ndarray, ib: np.ndarray, w: np.ndarray, p: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Ratings from battle arrays (optional per-battle weights): the Bradley–Terry MLE (Chatbot Arena's
    compute_mle_elo) when it exists, else the fit with PRIOR_TIES virtual ties per pair that met."""
    win = _win_weights(ia, ib, w, p, np.ones(len(ia)) if weights is None else np.asarray(weights, dtype=float))
    if _separated(win):
        met = (win + win.T) > 0
        win = win + PRIOR_TIES * met  # a virtual tie is one row each way in the duplicated scheme
    return _fit_win(win)


def bradley_terry(battles: Iterable, *, weights: Sequence[float] | None = None) -> dict[str, float]:
    """Elo-scale ratings (400 per factor of 10, centred on 1000): the MLE, or the virtual-tie fit where none exists."""
    battles = _battles(battles)
    models = _models(battles)
    index = {m: i for i, m in enumerate(models)}
    _, _, w = _units(len(battles), None, weights)
    ratings = _fit_bt(*_counts(battles, index), len(models), w)
    return {m: float(ratings[index[m]]) for m in models}


@dataclass(frozen=True)
class RatingSamples:
    """The Bradley–Terry fit on all battles and on each bootstrap round (`bootstrap_rating_samples`)."""

    models: list[str]  # column order of `point` and `samples`: first-seen order in the battles
    point: np.ndarray  # the fit on every battle
    samples: np.ndarray  # rounds x models; NaN where a round had no battle of that model
    units: int  # clusters resampled (battles when there was only one cluster); < 2: no spread to estimate


def bootstrap_rating_samples(battles: Iterable, rounds: int = 1000, seed: int = 0, *,
                             clusters: Sequence[Hashable] | None = None,
                             weights: Sequence[float] | None = None) -> RatingSamples:
    """Ratings refitted on `rounds` resamples of the clusters (`bootstrap_ratings`' rounds, before percentiles).

    With a single cluster there is nothing to resample at that level, and every round would equal the
    point estimate: then battles are resampled instead (their dependence ignored, but not a zero spread).
    """
    if rounds < MIN_BOOTSTRAP:
        raise ValueError(f"bootstrap needs at least {MIN_BOOTSTRAP} rounds, got {rounds}")
    battles = _battles(battles)
    models = _models(battles)
    index = {m: i for i, m in enumerate(models)}
    ia, ib, w = _counts(battles, index)
    codes, c, base_w = _units(len(battles), clusters, weights)
    if c < 2:
        codes, c, base_w = _units(len(battles), None, weights)
    p = len(models)
    point = _fit_bt(ia, ib, w, p, base_w)
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, p))
    for r in range(rounds):
        # Resampling clusters with replacement = each cluster's multiplicity as a weight on its battles.
        mult = np.bincount(rng.integers(0, c, size=c), minlength=c)[codes]
        samples[r] = _fit_bt(ia, ib, w, p, base_w * mult)
        present = np.bincount(ia, mult, p) + np.bincount(ib, mult, p) > 0
        samples[r, ~present] = np.nan
    return RatingSamples(models, point, samples, c)


def bootstrap_ratings(battles: Iterable, rounds: int = 1000, seed: int = 0, *,
                      clusters: Sequence[Hashable] | None = None,
                      weights: Sequence[float] | None = None) -> dict[str, dict]:
    """Ratings with 95% percentile-bootstrap CIs over clusters: {model: {rating, ci_low, ci_high, median}}.

    A round in which a model has no battle gives it no rating (it is left out of that model's percentiles).
    The rounds are `bootstrap_rating_samples`' (battles resampled when there is a single cluster).
    A single battle (one vote) has no spread to resample at all: its CI is None (not estimable), not a point.
    """
    fit = bootstrap_rating_samples(battles, rounds, seed, clusters=clusters, weights=weights)
    lo, med, hi = np.nanquantile(fit.samples, [0.025, 0.5, 0.975], axis=0)
    if fit.units < 2:
        lo = hi = [None] * len(fit.models)
    return {m: {"rating": float(fit.point[i]), "ci_low": _float_or_none(lo[i]),
                "ci_high": _float_or_none(hi[i]), "median": float(med[i])} for i, m in enumerate(fit.models)}


def _float_or_none(x) -> float | None:
    return None if x is None else float(x)


@dataclass(frozen=True)
class Connectivity:
    """Whether the Bradley–Terry MLE exists, and which models stand in the way when it does not."""

    # Strongly connected components of "i beat or tied j", in a topological order: no model in a
    # later group ever beat or tied a model in an earlier group. One group: the MLE exists (and is finite).
    groups: list[list[str]]
    # Models linked by any battle; across these, ratings are not comparable at all.
    components: list[list[str]]
    never_lost: list[str]  # no other model ever beat or tied them
    never_won: list[str]  # they never beat or tied any other model

    @property
    def separated(self) -> bool:
        """Some models never lost (or never won) against the rest of their component: no finite MLE there."""
        return len(self.groups) > len(self.components)

    @property
    def connected(self) -> bool:
        return len(self.components) <= 1

    @property
    def warning(self) -> str | None:
        """A sentence or two for reports; None when the ratings are plain MLE on one connected set of models."""
        parts = []
        if not self.connected:
            parts.append("The models form groups that never met: " + " | ".join(
                "{" + ", ".join(c) + "}" for c in self.components)
                + "; ratings are comparable only within a group (each group is centred on its own).")
        # Within a component the groups are ordered; across components there is no order to state.
        chains = [[g for g in self.groups if g[0] in c] for c in self.components]
        chains = [" > ".join("{" + ", ".join(g) + "}" for g in chain) for chain in chains if len(chain) > 1]
        if chains:  # == self.separated
            who = [f"{', '.join(m)} {what}" for m, what in ((self.never_lost, "never lost or tied"),
                                                           (self.never_won, "never won or tied")) if m]
            parts.append(
                "No finite maximum-likelihood ratings" + (f" ({'; '.join(who)})" if who else "") + ": in the order "
                + "; ".join(chains) + " no model of a later group ever beat or tied one of an earlier group. "
                f"Ratings are fitted with {PRIOR_TIES:g} virtual tie per pair that met (a BayesElo-style prior) so "
                "they stay finite; the gaps between these groups reflect that prior, not the data.")
        return " ".join(parts) or None

    def as_dict(self) -> dict:
        return {"separated": self.separated, "connected": self.connected, "groups": self.groups,
                "components": self.components, "never_lost": self.never_lost, "never_won": self.never_won}


def connectivity(battles: Iterable, *, weights: Sequence[float] | None = None) -> Connectivity:
    """The comparison graph's strongly connected groups (Ford/Zermelo: the MLE exists iff there is one)."""
    from scipy.sparse.csgraph import shortest_path

    battles = _battles(battles)
    models = _models(battles)
    if not models:
        return Connectivity([], [], [], [])
    index = {m: i for i, m in enumerate(models)}
    ia, ib, w = _counts(battles, index)
    _, _, bw = _units(len(battles), None, weights)
    edges = _win_weights(ia, ib, w, len(models), bw) > 0
    graph, (n_strong, strong), (n_weak, weak) = _components(edges)
    # Between groups the graph is acyclic, and a group reaches strictly more models than any group it
    # beats, so sorting by how many models each reaches is a topological order (winners first).
    reach = np.isfinite(shortest_path(graph, unweighted=True)).sum(axis=1)
    groups = sorted(([models[i] for i in np.flatnonzero(strong == g)] for g in range(n_strong)),
                    key=lambda g: (-reach[index[g[0]]], index[g[0]]))
    components = [[models[i] for i in np.flatnonzero(weak == g)] for g in range(n_weak)]
    never_lost = [m for i, m in enumerate(models) if not edges[:, i].any()]
    never_won = [m for i, m in enumerate(models) if not edges[i, :].any()]
    return Connectivity(groups, components, never_lost, never_won)


def win_matrix(battles: Iterable, models: Sequence[str] | None = None, *,
               weights: Sequence[float] | None = None) -> dict[str, dict[str, float | None]]:
    """matrix[x][y] = weighted win rate of x over y (ties half); None where they never met (and on the diagonal)."""
    battles = _battles(battles)
    _, _, bw = _units(len(battles), None, weights)
    models = list(models) if models is not None else _models(battles)
    score = {(x, y): 0.0 for x in models for y in models}
    total = {(x, y): 0.0 for x in models for y in models}
    for b, wt in zip(battles, bw):
        s = 0.5 if b.winner == "tie" else float(b.winner == "a")
        score[b.model_a, b.model_b] += wt * s
        score[b.model_b, b.model_a] += wt * (1 - s)
        total[b.model_a, b.model_b] += wt
        total[b.model_b, b.model_a] += wt
    return {x: {y: (score[x, y] / total[x, y] if total[x, y] else None) for y in models} for x in models}


def expected_win_rate(rating_x: float, rating_y: float) -> float:
    """P(x beats y) under the ratings (400 points per factor of 10)."""
    return 1.0 / (1.0 + BASE ** ((rating_y - rating_x) / SCALE))


# ---------------------------------------------------------------------------
# Length control
# ---------------------------------------------------------------------------
#
# Judges, people included, prefer longer answers; a policy trained on their preferences learns to be long.
# Length control asks what a judge would prefer at equal length.
#
# Win rate (AlpacaEval 2): a logistic model of the judge's verdict on one pair,
#     logit P(X wins) = theta + gamma * tanh(d / sd(d)),   d = len(X's response) - len(Y's),
# fitted on the pair's battles (a tie is half a win: one row each way at half the weight); the
# length-controlled win rate is sigmoid(theta), the model read off at zero length difference. Its CI is the
# percentile bootstrap over prompts (clusters), refitting each round.
#
# Ratings (Chatbot Arena's style control): the Bradley–Terry regression above with one more column, the
# length difference normalised as (len_a - len_b) / (len_a + len_b) and scaled by its spread; the model coefficients
# are the ratings with length held equal, the extra one how much length sways the judge.


@dataclass(frozen=True)
class LengthControlled:
    win_rate: float  # sigmoid(theta): the win rate at zero length difference
    ci_low: float | None
    ci_high: float | None
    length_coef: float  # gamma: log-odds per unit of tanh(d / sd(d))
    raw_win_rate: float


def length_feature(diff: Sequence[float]) -> np.ndarray:
    """AlpacaEval 2's feature: tanh of the length difference in units of its standard deviation (all 0 when
    every difference is the same, so that a constant offset is left to the intercept)."""
    d = np.asarray(diff, dtype=float)
    sd = d.std()
    return np.tanh(d / sd) if sd > 0 else np.zeros_like(d)


def _fit_logistic(x: np.ndarray, scores: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of the weighted logistic regression of scores in [0, 1] on one feature."""
    from sklearn.linear_model import LogisticRegression

    wins, losses = w * scores, w * (1 - scores)
    if wins.sum() <= 0 or losses.sum() <= 0:  # every verdict one way: theta is +-infinity, gamma undefined
        return (math.inf if losses.sum() <= 0 else -math.inf), 0.0
    keep_w, keep_l = wins > 0, losses > 0
    features = np.concatenate([x[keep_w], x[keep_l]])[:, None]
    y = np.concatenate([np.ones(keep_w.sum()), np.zeros(keep_l.sum())])
    lr = LogisticRegression(C=1e6, tol=1e-8, max_iter=1000)
    lr.fit(features, y, sample_weight=np.concatenate([wins[keep_w], losses[keep_l]]))
    return float(lr.intercept_[0]), float(lr.coef_[0, 0])


def _sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t)) if math.isfinite(t) else float(t > 0)


def length_controlled_win_rate(scores: Sequence[float], length_diff: Sequence[float], *, rounds: int = 1000,
                               seed: int = 0, clusters: Sequence[Hashable] | None = None,
                               weights: Sequence[float] | None = None, level: float = LEVEL) -> LengthControlled:
    """X's win rate over Y at zero length difference, with a bootstrap CI over clusters.

    scores: X's score per battle (1 win, 0.5 tie, 0 loss); length_diff: len(X's response) - len(Y's)."""
    s = np.asarray(scores, dtype=float)
    x = length_feature(length_diff)
    codes, c, w = _units(s.size, clusters, weights)
    theta, gamma = _fit_logistic(x, s, w)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(rounds if c >= 2 else 0):
        mult = np.bincount(rng.integers(0, c, size=c), minlength=c)[codes]
        boot.append(_sigmoid(_fit_logistic(x, s, w * mult)[0]))
    alpha = (1 - level) / 2
    lo, hi = (float(q) for q in np.quantile(boot, [alpha, 1 - alpha])) if boot else (None, None)
    return LengthControlled(_sigmoid(theta), lo, hi, gamma, float((w * s).sum() / w.sum()))


def style_controlled_ratings(battles: Iterable, len_a: Sequence[float], len_b: Sequence[float], *,
                             rounds: int = 1000, seed: int = 0, clusters: Sequence[Hashable] | None = None,
                             weights: Sequence[float] | None = None) -> dict | None:
    """Bradley–Terry ratings with a length term, as Chatbot Arena's style control: {"ratings": {model:
    {rating, ci_low, ci_high}}, "length_coef"}. None where the plain MLE does not exist (a model that never
    lost or never won): there the virtual-tie prior, not the data, would set the gaps, and a length term on
    top of it would only restate the prior."""
    battles = _battles(battles)
    models = _models(battles)
    index = {m: i for i, m in enumerate(models)}
    ia, ib, outcome = _counts(battles, index)
    codes, c, w = _units(len(battles), clusters, weights)
    if len(models) < 2 or _separated(_win_weights(ia, ib, outcome, len(models), w)):
        return None
    la, lb = np.asarray(len_a, dtype=float), np.asarray(len_b, dtype=float)
    style = (la - lb) / np.maximum(la + lb, 1.0)
    # Scaled, not centred: 0 must stay "equal length", since the ratings are read off there (and a and b are
    # not randomised in every caller, so the mean difference need not be 0).
    style = style / style.std() if style.std() > 0 else np.zeros_like(style)
    design = np.zeros((len(battles), len(models) + 1))
    design[np.arange(len(battles)), ia] = math.log(BASE)
    design[np.arange(len(battles)), ib] = -math.log(BASE)
    design[:, -1] = style
    score = np.where(outcome == 0, 1.0, np.where(outcome == 1, 0.0, 0.5))
    point = _fit_style(design, score, w)
    rng = np.random.default_rng(seed)
    samples = np.full((rounds if c >= 2 else 0, len(models) + 1), np.nan)
    for r in range(len(samples)):
        mult = np.bincount(rng.integers(0, c, size=c), minlength=c)[codes]
        samples[r] = _fit_style(design, score, w * mult)
        present = np.bincount(ia, mult, len(models)) + np.bincount(ib, mult, len(models)) > 0
        samples[r, :-1][~present] = np.nan  # a model without a battle in this round has no rating in it
    out = {}
    for m, i in index.items():
        lo, hi = (float(q) for q in np.nanquantile(samples[:, i], [0.025, 0.975])) if len(samples) else (None, None)
        out[m] = {"rating": float(point[i]), "ci_low": lo, "ci_high": hi}
    return {"ratings": out, "length_coef": float(point[-1])}


def _fit_style(design: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Elo-scale model ratings and the raw length coefficient (last) of the duplicated-row regression."""
    from sklearn.linear_model import LogisticRegression

    rows = np.concatenate([design, design])
    y = np.concatenate([np.ones(len(score)), np.zeros(len(score))])
    sw = np.concatenate([w * score, w * (1 - score)])
    keep = sw > 0
    if len(set(y[keep])) < 2:  # a bootstrap round where every verdict went one way: nothing to fit
        return np.full(design.shape[1], np.nan)
    lr = LogisticRegression(C=1e6, fit_intercept=False, tol=1e-8, max_iter=1000)
    lr.fit(rows[keep], y[keep], sample_weight=sw[keep])
    coef = lr.coef_[0]
    return np.concatenate([SCALE * coef[:-1] + INIT_RATING, coef[-1:]])
