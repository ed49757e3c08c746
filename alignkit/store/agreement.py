"""Inter-annotator agreement and per-annotator statistics over the votes in a store.

- raw agreement: over comparisons with two or more votes, the share of annotator
  pairs that gave the same label, averaged over comparisons;
- Cohen's kappa for every pair of annotators with at least two comparisons in
  common (scikit-learn's `cohen_kappa_score`);
- Fleiss' kappa (statsmodels' `fleiss_kappa`) over the comparisons that share the
  most common number of raters (two or more), since Fleiss needs a fixed count.
Labels are the canonical choices a, b, tie, both_bad. A kappa that is undefined
(every label the same) is reported as None.

Votes on arena battles count too: a battle is judged like any comparison (blind,
sides randomised, the same overlap), so its votes say as much about an annotator's
consistency and side bias; `n_arena_votes` says how many there are.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from alignkit.store.db import Store
from alignkit.store.models import CHOICES, Annotator, Comparison, Vote


@dataclass(frozen=True)
class VoteRow:
    comparison_id: int
    annotator: str
    choice: str  # canonical
    swapped: bool
    seconds: float
    rationale: str | None
    arena: bool = False  # a vote on an arena battle


def load_votes(store: Store) -> list[VoteRow]:
    with store.read() as s:
        rows = s.execute(select(Vote.comparison_id, Annotator.name, Vote.choice, Vote.swapped, Vote.seconds,
                                Vote.rationale, Comparison.arena).join(Annotator, Annotator.id == Vote.annotator_id)
                         .join(Comparison, Comparison.id == Vote.comparison_id)
                         .order_by(Vote.comparison_id, Vote.id)).all()
    return [VoteRow(*r) for r in rows]


def _nan_to_none(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def raw_agreement(by_comparison: dict[int, list[str]]) -> float | None:
    shares = []
    for labels in by_comparison.values():
        if len(labels) < 2:
            continue
        pairs = list(itertools.combinations(labels, 2))
        shares.append(sum(x == y for x, y in pairs) / len(pairs))
    return sum(shares) / len(shares) if shares else None


def cohen_pairs(votes: list[VoteRow], *, min_shared: int = 2) -> list[dict[str, Any]]:
    from sklearn.metrics import cohen_kappa_score

    by_annotator: dict[str, dict[int, str]] = defaultdict(dict)
    for v in votes:
        by_annotator[v.annotator][v.comparison_id] = v.choice
    out = []
    for x, y in itertools.combinations(sorted(by_annotator), 2):
        shared = sorted(set(by_annotator[x]) & set(by_annotator[y]))
        if len(shared) < min_shared:
            continue
        lx = [by_annotator[x][c] for c in shared]
        ly = [by_annotator[y][c] for c in shared]
        if len(set(lx) | set(ly)) < 2:
            kappa = None  # a single label throughout: kappa is undefined
        else:
            kappa = _nan_to_none(cohen_kappa_score(lx, ly, labels=list(CHOICES)))
        out.append({"annotators": [x, y], "n": len(shared), "kappa": kappa,
                    "agreement": sum(a == b for a, b in zip(lx, ly)) / len(shared)})
    return out


def fleiss(by_comparison: dict[int, list[str]]) -> dict[str, Any] | None:
    from statsmodels.stats.inter_rater import fleiss_kappa

    sizes = Counter(len(v) for v in by_comparison.values() if len(v) >= 2)
    if not sizes:
        return None
    raters = max(sizes, key=lambda n: (sizes[n], n))
    items = [labels for labels in by_comparison.values() if len(labels) == raters]
    table = [[labels.count(c) for c in CHOICES] for labels in items]
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = _nan_to_none(fleiss_kappa(np.asarray(table), method="fleiss"))
    return {"kappa": kappa, "n_items": len(items), "raters_per_item": raters}


def agreement_report(store: Store) -> dict[str, Any]:
    """Counts per annotator, tie / both-bad / left-side rates, raw agreement, Cohen's and Fleiss' kappa."""
    votes = load_votes(store)
    by_comparison: dict[int, list[str]] = defaultdict(list)
    per: dict[str, list[VoteRow]] = defaultdict(list)
    for v in votes:
        by_comparison[v.comparison_id].append(v.choice)
        per[v.annotator].append(v)

    def rates(vs: list[VoteRow]) -> dict[str, Any]:
        n = len(vs)
        c = Counter(v.choice for v in vs)
        # "left": the annotator preferred whatever was shown on the left (side-bias check).
        left = sum((v.choice == "a") != v.swapped for v in vs if v.choice in ("a", "b"))
        decided = c["a"] + c["b"]
        return {"votes": n, "tie_rate": c["tie"] / n if n else None, "both_bad_rate": c["both_bad"] / n if n else None,
                "left_rate": left / decided if decided else None,
                "median_seconds": statistics.median(v.seconds for v in vs) if vs else None}

    return {
        "n_votes": len(votes),
        "n_arena_votes": sum(v.arena for v in votes),
        "n_comparisons_voted": len(by_comparison),
        "overall": rates(votes),
        "annotators": {name: rates(vs) for name, vs in sorted(per.items())},
        "raw_agreement": raw_agreement(by_comparison),
        "cohen": cohen_pairs(votes),
        "fleiss": fleiss(by_comparison),
    }


def length_report(store: Store, *, rounds: int = 1000, seed: int = 0) -> dict[str, Any]:
    """How much the response's length sways this store's labels, before anyone trains on them.

    Over the votes on ordinary comparisons that chose a side (not tie / both bad) between responses of
    different lengths (characters):
    - `longer_preferred_rate`: the share of votes for the longer response, with a bootstrap CI over
      comparisons (several votes on one comparison are not independent); 0.5 is no length bias;
    - `length_coef`: the logistic slope of a vote for response A on tanh((len A - len B) / SD), as in
      alignkit.stats' length-controlled win rate (above 0: longer is preferred);
    - `model_pairs`: where both responses name the model that made them, each pair of models' raw and
      length-controlled preference (the first model's win rate at equal length, with its CI).
    """
    from alignkit import stats
    from alignkit.store.arena import model_name

    with store.read() as s:
        comparisons = {c.id: (len(c.response_a.text), len(c.response_b.text), model_name(c.response_a),
                              model_name(c.response_b), c.response_a.model_spec, c.response_b.model_spec)
                       for c in s.scalars(select(Comparison).where(Comparison.arena.is_(False)))}
    votes = [v for v in load_votes(store) if not v.arena and v.choice in ("a", "b")
             and comparisons[v.comparison_id][0] != comparisons[v.comparison_id][1]]
    if not votes:
        return {"votes": 0, "longer_preferred_rate": None, "ci_low": None, "ci_high": None, "length_coef": None,
                "model_pairs": []}
    chose_a = [1.0 if v.choice == "a" else 0.0 for v in votes]
    diff = [comparisons[v.comparison_id][0] - comparisons[v.comparison_id][1] for v in votes]
    longer = [float((c == 1.0) == (d > 0)) for c, d in zip(chose_a, diff)]
    clusters = [v.comparison_id for v in votes]
    lo, hi = stats.bootstrap_mean_ci(longer, rounds=rounds, seed=seed, clusters=clusters)
    fit = stats.length_controlled_win_rate(chose_a, diff, rounds=0, clusters=clusters)
    return {"votes": len(votes), "longer_preferred_rate": sum(longer) / len(longer), "ci_low": lo, "ci_high": hi,
            "length_coef": fit.length_coef,
            "model_pairs": _model_pair_preferences(votes, comparisons, rounds=rounds, seed=seed)}


def _model_pair_preferences(votes: list[VoteRow], comparisons: dict, *, rounds: int, seed: int) -> list[dict]:
    from alignkit import stats

    by_pair: dict[tuple[str, str], list[tuple[float, float, int]]] = defaultdict(list)
    for v in votes:
        len_a, len_b, name_a, name_b, spec_a, spec_b = comparisons[v.comparison_id]
        if not (spec_a and spec_b) or name_a == name_b:
            continue
        first_is_a = name_a < name_b  # every pair oriented one way: the models in name order
        won = (v.choice == "a") == first_is_a
        d = len_a - len_b if first_is_a else len_b - len_a
        by_pair[(name_a, name_b) if first_is_a else (name_b, name_a)].append((float(won), float(d), v.comparison_id))
    out = []
    for (x, y), rows in sorted(by_pair.items()):
        lc = stats.length_controlled_win_rate([r[0] for r in rows], [r[1] for r in rows], rounds=rounds, seed=seed,
                                              clusters=[r[2] for r in rows])
        out.append({"model_a": x, "model_b": y, "votes": len(rows), "win_rate": lc.raw_win_rate,
                    "lc_win_rate": lc.win_rate, "lc_ci_low": lc.ci_low, "lc_ci_high": lc.ci_high,
                    "length_coef": lc.length_coef})
    return out
