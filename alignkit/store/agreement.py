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
