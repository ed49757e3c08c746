"""Statistics for A/B comparisons: win rates with bootstrap CIs, Bradley–Terry ratings as Chatbot Arena computes them.

A *battle* is `(model_a, model_b, winner)` with winner one of "a", "b", "tie".

- Win rate of X over Y counts a tie as half a win; its 95% CI is the percentile
  bootstrap over that pair's battles (numpy Generator with a fixed seed).
- Ratings are maximum-likelihood Bradley–Terry, the way Chatbot Arena's
  `compute_mle_elo` does it: a logistic regression without intercept on the
  battles, feature +ln(10) for model_a and -ln(10) for model_b, every battle
  duplicated so that a win is two wins and a tie is one win each way; the
  coefficients are scaled by 400 and offset by 1000 (400 points per factor of
  10 in the odds). The duplicated rows are summed into weights per (winner,
  loser) cell, which gives the same likelihood as the duplicated rows.
  scikit-learn's LogisticRegression with a very large C (no effective penalty)
  fits it. Bootstrap CIs resample the battles with replacement (>= 100 rounds)
  and refit; the interval is the 2.5/97.5 percentile of each model's rating.
- A model that wins every battle has no finite maximum-likelihood rating; the
  tiny penalty (C = 1e6) keeps it finite but very large. That is the data
  speaking (no loss observed), not a bug.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

OUTCOMES = ("a", "b", "tie")
SCALE = 400.0
BASE = 10.0
INIT_RATING = 1000.0
MIN_BOOTSTRAP = 100


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


def bootstrap_mean_ci(values: Sequence[float], rounds: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values`."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(rounds)
    chunk = max(1, 2_000_000 // max(1, x.size))  # bound memory for long inputs
    for start in range(0, rounds, chunk):
        k = min(chunk, rounds - start)
        means[start : start + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def pair_stats(battles: Iterable, rounds: int = 1000, seed: int = 0) -> dict[tuple[str, str], dict]:
    """Per unordered pair (first-seen order): wins/losses/ties of the first model, win rate and 95% CI."""
    per_pair: dict[tuple[str, str], list[float]] = {}
    for b in _battles(battles):
        key = (b.model_a, b.model_b)
        if key not in per_pair and (b.model_b, b.model_a) in per_pair:
            key = (b.model_b, b.model_a)
        flipped = key != (b.model_a, b.model_b)
        score = 0.5 if b.winner == "tie" else float((b.winner == "a") != flipped)
        per_pair.setdefault(key, []).append(score)
    out = {}
    for i, (key, scores) in enumerate(per_pair.items()):
        arr = np.asarray(scores)
        lo, hi = bootstrap_mean_ci(arr, rounds, seed + i)
        out[key] = {
            "wins": int((arr == 1.0).sum()),
            "losses": int((arr == 0.0).sum()),
            "ties": int((arr == 0.5).sum()),
            "n": int(arr.size),
            "win_rate": float(arr.mean()),
            "ci_low": lo,
            "ci_high": hi,
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


def _fit_bt(ia: np.ndarray, ib: np.ndarray, w: np.ndarray, p: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Elo-scale Bradley–Terry MLE (Chatbot Arena's compute_mle_elo) from battle arrays; optional per-battle weights."""
    from sklearn.linear_model import LogisticRegression

    weights = np.ones(len(ia)) if weights is None else weights
    # Duplicated battles: a win for a counts twice as (a beats b); a tie once each way.
    win = np.zeros((p, p))  # win[i, j]: weight of rows "i beats j"
    np.add.at(win, (ia[w == 0], ib[w == 0]), 2 * weights[w == 0])
    np.add.at(win, (ib[w == 1], ia[w == 1]), 2 * weights[w == 1])
    np.add.at(win, (ia[w == 2], ib[w == 2]), weights[w == 2])
    np.add.at(win, (ib[w == 2], ia[w == 2]), weights[w == 2])
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
    lr = LogisticRegression(fit_intercept=False, C=1e6, tol=1e-8, max_iter=1000)
    lr.fit(np.array(rows), np.array(ys), sample_weight=np.array(sw))
    return SCALE * lr.coef_[0] + INIT_RATING


def bradley_terry(battles: Iterable) -> dict[str, float]:
    """Elo-scale ratings (400 per factor of 10, centred on 1000) by maximum likelihood."""
    battles = _battles(battles)
    models = _models(battles)
    index = {m: i for i, m in enumerate(models)}
    ratings = _fit_bt(*_counts(battles, index), len(models))
    return {m: float(ratings[index[m]]) for m in models}


def bootstrap_ratings(battles: Iterable, rounds: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Ratings with percentile-bootstrap 95% CIs over battles: {model: {rating, ci_low, ci_high, median}}."""
    if rounds < MIN_BOOTSTRAP:
        raise ValueError(f"bootstrap needs at least {MIN_BOOTSTRAP} rounds, got {rounds}")
    battles = _battles(battles)
    models = _models(battles)
    index = {m: i for i, m in enumerate(models)}
    ia, ib, w = _counts(battles, index)
    p, n = len(models), len(battles)
    point = _fit_bt(ia, ib, w, p)
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, p))
    for r in range(rounds):
        # Resampling battles with replacement = multinomial counts as weights on the originals.
        weights = rng.multinomial(n, np.full(n, 1.0 / n)).astype(float)
        samples[r] = _fit_bt(ia, ib, w, p, weights)
    lo, med, hi = np.quantile(samples, [0.025, 0.5, 0.975], axis=0)
    return {m: {"rating": float(point[index[m]]), "ci_low": float(lo[index[m]]), "ci_high": float(hi[index[m]]),
                "median": float(med[index[m]])} for m in models}


def win_matrix(battles: Iterable, models: Sequence[str] | None = None) -> dict[str, dict[str, float | None]]:
    """matrix[x][y] = win rate of x over y (ties half); None where they never met (and on the diagonal)."""
    battles = _battles(battles)
    models = list(models) if models is not None else _models(battles)
    score = {(x, y): 0.0 for x in models for y in models}
    count = {(x, y): 0 for x in models for y in models}
    for b in battles:
        s = 0.5 if b.winner == "tie" else float(b.winner == "a")
        score[b.model_a, b.model_b] += s
        score[b.model_b, b.model_a] += 1 - s
        count[b.model_a, b.model_b] += 1
        count[b.model_b, b.model_a] += 1
    return {x: {y: (score[x, y] / count[x, y] if count[x, y] else None) for y in models} for x in models}


def expected_win_rate(rating_x: float, rating_y: float) -> float:
    """P(x beats y) under the ratings (400 points per factor of 10)."""
    return 1.0 / (1.0 + BASE ** ((rating_y - rating_x) / SCALE))


def online_elo(battles: Iterable, k: float = 4.0) -> dict[str, float]:
    """Sequential Elo in battle order (Chatbot Arena's compute_online_elo: K=4, scale 400, base 10, init 1000).

    Order-dependent and shown only beside the Bradley–Terry ratings, as the Arena used to.
    """
    rating: dict[str, float] = {}
    for b in _battles(battles):
        ra, rb = rating.setdefault(b.model_a, INIT_RATING), rating.setdefault(b.model_b, INIT_RATING)
        ea = expected_win_rate(ra, rb)
        sa = 0.5 if b.winner == "tie" else float(b.winner == "a")
        rating[b.model_a] = ra + k * (sa - ea)
        rating[b.model_b] = rb + k * ((1 - sa) - (1 - ea))
    return rating
