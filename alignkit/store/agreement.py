"""Inter-annotator agreement and per-annotator statistics over the votes in a store.

- raw agreement: over comparisons with two or more votes, the share of annotator
  pairs that gave the same label, averaged over comparisons;
- Cohen's kappa for every pair of annotators with at least two comparisons in
  common (scikit-learn's `cohen_kappa_score`);
- Fleiss' kappa (statsmodels' `fleiss_kappa`) over the comparisons that share the
  most common number of raters (two or more), since Fleiss needs a fixed count.
Labels are the canonical choices a, b, tie, both_bad. A kappa that is undefined
(every label the same) is reported as None. A ranking task's vote counts once per annotator, as the pairwise
vote its `choice` is (what the ranking says of the task's response_a against response_b, alignkit.store.queue),
not as its C(K, 2) pairs, which would weigh one ranking as many votes; a vote answering criteria counts as its
combined choice.

Votes on arena battles count too: a battle is judged like any comparison (blind,
sides randomised, the same overlap), so its votes say as much about an annotator's
consistency and side bias; `n_arena_votes` says how many there are.

Per annotator, beside the rates: accuracy on gold items (comparisons with a known
answer), Cohen's kappa against the consensus of the *other* annotators on the items
they shared (the plurality of the others' votes, where there is one), and `flags`,
each a reason to look at their work (FLAG_RULES, thresholds named below): too fast,
a side they favour beyond chance, mostly ties or both-bad, little agreement with the
others, low gold accuracy. A flag is a prompt for a person to look, never a verdict;
an admin excludes an annotator's votes from export (`excluded`) by hand.

Disagreement review: `disagreements` lists the ordinary comparisons whose votes split most (the share of
votes outside the plurality), every vote with its rationale; `adjudicate` records an admin's ruling on one,
which export takes over the votes. Ranking tasks are not reviewed: a ruling decides one pair, and export turns
a ranking into many.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from alignkit.errors import UserError
from alignkit.store.db import Store
from alignkit.store.models import CHOICES, Adjudication, Annotator, Comparison, Vote
from alignkit.store.queue import _check_strength, annotator_id, check_choice, check_id
from alignkit.store.settings import scale_in


# Flags: each needs enough votes to mean something, then a threshold.
FAST_MEDIAN_SECONDS, FAST_MIN_VOTES = 3.0, 10  # nobody reads two responses in under 3 s
SIDE_P_VALUE, SIDE_MIN_DECIDED = 0.01, 20  # left-side rate vs 1/2, two-sided binomial test
UNDECIDED_RATE, UNDECIDED_MIN_VOTES = 0.5, 10  # ties and both-bad together
KAPPA_VS_OTHERS, KAPPA_MIN_SHARED = 0.2, 10  # "slight" agreement or less (Landis & Koch)
GOLD_ACCURACY, GOLD_MIN_VOTES = 0.7, 5


@dataclass(frozen=True)
class VoteRow:
    comparison_id: int
    annotator: str
    choice: str  # canonical
    swapped: bool
    seconds: float
    rationale: str | None
    arena: bool = False  # a vote on an arena battle
    gold: str | None = None  # the comparison's known answer, for a gold item
    excluded: bool = False  # the annotator's votes are left out of export


def load_votes(store: Store) -> list[VoteRow]:
    with store.read() as s:
        rows = s.execute(select(Vote.comparison_id, Annotator.name, Vote.choice, Vote.swapped, Vote.seconds,
                                Vote.rationale, Comparison.arena, Comparison.gold, Annotator.excluded)
                         .join(Annotator, Annotator.id == Vote.annotator_id)
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


def kappa_vs_others(votes: list[VoteRow]) -> dict[str, tuple[float | None, int]]:
    """Per annotator: (Cohen's kappa of their labels against the other annotators' plurality, items counted)."""
    from sklearn.metrics import cohen_kappa_score

    by_comparison: dict[int, list[VoteRow]] = defaultdict(list)
    for v in votes:
        by_comparison[v.comparison_id].append(v)
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for vs in by_comparison.values():
        for v in vs:
            counts = Counter(o.choice for o in vs if o.annotator != v.annotator)
            top = counts.most_common(2)
            if top and (len(top) == 1 or top[0][1] > top[1][1]):  # a single plurality among the others
                pairs[v.annotator].append((v.choice, top[0][0]))
    out = {}
    for name in {v.annotator for v in votes}:
        own = pairs.get(name, [])
        labels = {x for pair in own for x in pair}
        kappa = None if len(own) < 2 or len(labels) < 2 else _nan_to_none(
            cohen_kappa_score([p[0] for p in own], [p[1] for p in own], labels=list(CHOICES)))
        out[name] = (kappa, len(own))
    return out


def flags(rates: dict[str, Any]) -> list[str]:
    """The reasons to look at one annotator's work (see the module doc), from their row of the report."""
    from scipy.stats import binomtest

    out = []
    if rates["votes"] >= FAST_MIN_VOTES and rates["median_seconds"] < FAST_MEDIAN_SECONDS:
        out.append(f"fast: median {rates['median_seconds']:.1f} s a vote")
    decided = rates["decided"]
    if decided >= SIDE_MIN_DECIDED and binomtest(rates["left"], decided, 0.5).pvalue < SIDE_P_VALUE:
        out.append(f"side: chose the left response {rates['left_rate']:.0%} of the time")
    if rates["votes"] >= UNDECIDED_MIN_VOTES and rates["tie_rate"] + rates["both_bad_rate"] > UNDECIDED_RATE:
        out.append(f"undecided: {rates['tie_rate'] + rates['both_bad_rate']:.0%} ties or both bad")
    kappa, shared = rates["kappa_vs_others"], rates["shared_with_others"]
    if kappa is not None and shared >= KAPPA_MIN_SHARED and kappa < KAPPA_VS_OTHERS:
        out.append(f"disagrees: kappa {kappa:.2f} against the others on {shared} items")
    if rates["gold_votes"] >= GOLD_MIN_VOTES and rates["gold_accuracy"] < GOLD_ACCURACY:
        out.append(f"gold: {rates['gold_accuracy']:.0%} right on {rates['gold_votes']} gold items")
    return out


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
        gold = [v.choice == v.gold for v in vs if v.gold is not None]
        return {"votes": n, "tie_rate": c["tie"] / n if n else None, "both_bad_rate": c["both_bad"] / n if n else None,
                "left_rate": left / decided if decided else None, "left": left, "decided": decided,
                "median_seconds": statistics.median(v.seconds for v in vs) if vs else None,
                "gold_votes": len(gold), "gold_accuracy": sum(gold) / len(gold) if gold else None}

    vs_others = kappa_vs_others(votes)
    annotators = {}
    for name, vs in sorted(per.items()):
        row = rates(vs)
        row["kappa_vs_others"], row["shared_with_others"] = vs_others[name]
        row["excluded"] = vs[0].excluded
        row["flags"] = flags(row)
        annotators[name] = row
    return {
        "n_votes": len(votes),
        "n_arena_votes": sum(v.arena for v in votes),
        "n_gold_votes": sum(v.gold is not None for v in votes),
        "n_comparisons_voted": len(by_comparison),
        "overall": rates(votes),
        "annotators": annotators,
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


# ---------------------------------------------------------------------------
# Disagreement review and adjudication
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewVote:
    annotator: str
    choice: str  # canonical: a = the comparison's response_a
    strength: int | None
    rationale: str | None
    excluded: bool  # the annotator's votes are left out of export


@dataclass(frozen=True)
class Disagreement:
    """One comparison the annotators split on, with every vote and rationale, for an admin to resolve.

    `disagreement` is the share of its votes outside the plurality label (0: unanimous)."""

    comparison_id: int
    prompt: Any
    response_a: str
    response_b: str
    disagreement: float
    votes: list[ReviewVote]
    adjudication: str | None  # the admin's ruling, canonical, if any


def disagreement_share(labels: list[str]) -> float:
    return 1.0 - max(Counter(labels).values()) / len(labels)


def disagreements(store: Store, *, limit: int = 20) -> list[Disagreement]:
    """The ordinary comparisons with two or more votes that split most (ties broken by more votes, then id), each
    with its votes and any adjudication. Gold items and arena battles are not reviewed: gold has its answer, and
    a battle rates models."""
    with store.read() as s:
        rows = s.execute(select(Vote.comparison_id, Annotator.name, Vote.choice, Vote.strength, Vote.rationale,
                                Annotator.excluded)
                         .join(Annotator, Annotator.id == Vote.annotator_id)
                         .join(Comparison, Comparison.id == Vote.comparison_id)
                         .where(Comparison.arena.is_(False), Comparison.gold.is_(None),
                                Comparison.ranking_json.is_(None))
                         .order_by(Vote.comparison_id, Vote.id)).all()
        votes: dict[int, list[ReviewVote]] = defaultdict(list)
        for cid, *rest in rows:
            votes[cid].append(ReviewVote(*rest))
        split = [(disagreement_share([v.choice for v in vs]), len(vs), cid) for cid, vs in votes.items()
                 if len(vs) >= 2]
        split = sorted((x for x in split if x[0] > 0), key=lambda x: (-x[0], -x[1], x[2]))[:limit]
        ids = [cid for _, _, cid in split]
        comps = {c.id: c for c in s.scalars(select(Comparison).where(Comparison.id.in_(ids)))} if ids else {}
        ruled = dict(s.execute(select(Adjudication.comparison_id, Adjudication.choice)
                               .where(Adjudication.comparison_id.in_(ids))).all()) if ids else {}
        return [Disagreement(cid, json.loads(comps[cid].prompt.content_json), comps[cid].response_a.text,
                             comps[cid].response_b.text, share, votes[cid], ruled.get(cid))
                for share, _, cid in split]


def adjudicate(store: Store, admin: str, comparison_id: int, choice: str, *, strength: int | None = None,
               rationale: str | None = None) -> None:
    """Record `admin`'s ruling on an ordinary comparison (canonical choice: a = its response_a), replacing an
    earlier one; export takes it over the votes (alignkit.store.export). On a scaled store a ruling for a side
    carries its strength, as a vote does."""
    check_choice(choice)
    check_id(comparison_id)

    def run(session) -> None:
        comp = session.get(Comparison, comparison_id)
        if comp is None:
            raise UserError(f"comparison {comparison_id} does not exist")
        if comp.arena or comp.gold is not None or comp.ranking_json is not None:
            what = "an arena battle" if comp.arena else "a gold item" if comp.gold is not None else "a ranking task"
            raise UserError(f"comparison {comparison_id} is {what}: nothing to adjudicate")
        _check_strength(strength, choice, scale_in(session))
        uid = annotator_id(store, session, admin)
        found = session.scalars(select(Adjudication).where(Adjudication.comparison_id == comparison_id)).one_or_none()
        ruling = found or Adjudication(comparison_id=comparison_id)
        ruling.annotator_id, ruling.choice, ruling.strength = uid, choice, strength
        ruling.rationale, ruling.created_at = (rationale or "").strip() or None, time.time()
        session.add(ruling)

    store.write(run)
