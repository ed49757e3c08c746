"""Votes -> preference rows (prompt / chosen / rejected), with an explicit aggregation policy.

Per comparison, the votes are aggregated by plurality:
  - ties="drop" (default): a comparison whose plurality label is `tie` is dropped;
    ties="ignore": tie votes are left out before the plurality is taken;
  - both_bad="drop" (default): a comparison whose plurality label is `both_bad` is
    dropped; both_bad="ignore": both-bad votes are left out first;
    both_bad="undesirable" (unpaired rows only, for KTO): such a comparison gives both
    responses as undesirable examples;
  - no single plurality label (e.g. one vote a, one vote b): dropped;
  - agreement = votes for the winner / votes considered; rows under
    `min_agreement` are dropped, and so are comparisons with fewer than
    `min_votes` votes in all;
  - agreement needs two votes: with `min_agreement` above 0, a comparison with a
    single vote considered (agreement 1.0 by itself) is dropped as `single_vote`.
A kept row has prompt (str, or a messages list, as imported), chosen, rejected,
n_annotators (all votes on the comparison), agreement, comparison_id and the
vote counts. On a store with a strength scale (alignkit.store.settings) it has a
`margin` too, which the reward stage hands to TRL's RewardTrainer (the loss becomes
-log sigmoid(r_chosen - r_rejected - margin), as Llama 2's reward model was trained):
MARGIN_RULE, the mean over the votes for the chosen response of (strength - 1), so
0 (slightly / negligibly better) .. scale - 1 (much / significantly better); votes
for the other side and ties add nothing (they already lowered the agreement).

A ranking task (`label import --rank`) exports as its C(K, 2) pairs, each aggregated as a comparison of its
own from what every ranking says of that pair (the better-ranked response wins it, equal ranks tie), with
RANK_MARGIN_RULE for its `margin`: MARGIN_RULE with the rank distance as strength. Every row then has a
`margin` (0 for ordinary comparisons of an unscaled store) and `ranking` (whether it is a ranking's pair).
On a store with criteria (alignkit.store.settings), a vote's label is COMBINE_RULE over its answers, or with
`criterion` that criterion's answer alone (ranking tasks, which ask no criteria, are then left out). Unpaired rows (unpaired_rows, for KTO) are two per kept comparison:
prompt, completion, label (true for the chosen response, false for the rejected
one or for both of a both-bad comparison), and the same bookkeeping.

Arena battles (`alignkit compare --judge human:DB`) are left out: their prompts are
evaluation prompts, and training on their votes would contaminate every later
comparison on them. Their votes are read by `alignkit compare --collect` and the
app's leaderboard instead. Gold items (`label import --gold`) are left out too: they
measure annotators, and their answers were never anyone's vote. The votes of
annotators an admin excluded (`label exclude`) are left out before aggregation;
export.json names them. A comparison an admin adjudicated (the admin tab's
disagreement review) follows the ruling, ADJUDICATION_RULE, whatever its votes say;
its rows say `adjudicated`, and export.json counts them.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from sqlalchemy import func, select, true

from alignkit.data.formats import consistent_pairs, consistent_unpaired
from alignkit.errors import UserError
from alignkit.store.db import Store, open_store
from alignkit.store.models import CHOICES, Adjudication, Annotator, Comparison, Response, Vote
from alignkit.store.queue import pair_choice
from alignkit.store.settings import COMBINE_RULE, criteria, criteria_in, scale, scale_in

POLICIES = ("drop", "ignore")
ADJUDICATION_RULE = ("an admin's ruling replaces the plurality and the agreement and vote minimums: a side is "
                     "kept, a tie or both bad dropped (both bad kept under both_bad=undesirable)")
MARGIN_RULE = "mean over the votes for the chosen response of (strength - 1)"
RANK_MARGIN_RULE = ("a ranking task's pair: mean over the votes for the chosen response of (rank distance - 1), a tie "
                    "group sharing one rank, so 0 (adjacent ranks) .. K - 2 (first against last)")
BOTH_BAD_POLICIES = POLICIES + ("undesirable",)  # undesirable: unpaired rows only


def _check_policy(min_agreement: float, ties: str, both_bad: str, min_votes: int, unpaired: bool = False) -> None:
    if ties not in POLICIES:
        raise UserError(f"ties policy {ties!r}: expected one of {', '.join(POLICIES)}")
    allowed = BOTH_BAD_POLICIES if unpaired else POLICIES
    if both_bad not in allowed:
        hint = (" ('undesirable' makes unpaired rows: a kto stage, or label export --unpaired)"
                if both_bad == "undesirable" else "")
        raise UserError(f"both_bad policy {both_bad!r}: expected one of {', '.join(allowed)}{hint}")
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) \
            or not 0.0 <= min_agreement <= 1.0:
        raise UserError(f"min agreement must be a number between 0 and 1, got {min_agreement!r}")
    if isinstance(min_votes, bool) or not isinstance(min_votes, int) or min_votes < 1:
        raise UserError(f"min votes must be an integer of at least 1, got {min_votes!r}")


def aggregate(labels: list[str], *, ties: str = "drop", both_bad: str = "drop",
              min_agreement: float = 0.0, min_votes: int = 1) -> tuple[str | None, float, str]:
    """(winner a|b — or both_bad, under both_bad="undesirable" — or None, agreement, reason) for one
    comparison's canonical labels."""
    counts = Counter(labels)
    if len(labels) < min_votes:
        return None, 0.0, "too_few_votes"
    if ties == "ignore":
        counts.pop("tie", None)
    if both_bad == "ignore":
        counts.pop("both_bad", None)
    considered = sum(counts.values())
    if considered == 0:
        return None, 0.0, "no_usable_votes"
    top = max(counts.values())
    winners = [c for c in CHOICES if counts.get(c) == top]
    agreement = top / considered
    if len(winners) > 1:
        return None, agreement, "no_majority"
    if winners[0] == "tie" or (winners[0] == "both_bad" and both_bad != "undesirable"):
        return None, agreement, winners[0]
    if min_agreement > 0 and considered < 2:  # one vote agrees with itself: no evidence of agreement
        return None, agreement, "single_vote"
    if agreement < min_agreement:
        return None, agreement, "below_min_agreement"
    return winners[0], agreement, "kept"


@dataclass
class _Unit:
    """One pair to aggregate: an ordinary comparison, or one pair of a ranking task's responses (RANK_MARGIN_RULE:
    a ranking vote's strength for a pair is the rank distance, so vote_margin gives the margin of both)."""

    comparison_id: int
    prompt_json: str
    first: Response  # the pair's "a"
    second: Response
    votes: list[tuple[str, int | None]]  # canonical (choice, strength) per vote
    ruling: Adjudication | None = None
    ranking: bool = False


def _vote_label(choice: str, criteria_json: str | None, criterion: str | None) -> str | None:
    """The label a vote gives under the export's criterion (None: all criteria combined, the vote's choice)."""
    if criterion is None:
        return choice
    return json.loads(criteria_json)[criterion] if criteria_json else None


def _ranking_units(c: Comparison, rankings: list[str], responses: dict[int, Response]) -> list[_Unit]:
    """A ranking task's C(K, 2) pairs, each with every vote's choice for it and the rank distance as strength."""
    ids = sorted(json.loads(c.ranking_json))
    units = [_Unit(c.id, c.prompt.content_json, responses[x], responses[y], [], ranking=True) for x, y in itertools.combinations(ids, 2)]
    for groups in map(json.loads, rankings):
        place = {rid: i for i, group in enumerate(groups) for rid in group}
        for unit in units:
            choice = pair_choice(groups, unit.first.id, unit.second.id)
            unit.votes.append((choice, abs(place[unit.first.id] - place[unit.second.id]) or None))
    return units


def _units(s, *, in_rounds, criterion: str | None) -> tuple[list[_Unit], Counter]:
    """Every pair to aggregate from the votes on ordinary comparisons and ranking tasks (not arena, not gold, no
    excluded annotator); with a criterion, ranking tasks (which ask none) are counted and left out."""
    votes: dict[int, list[tuple[str, int | None]]] = defaultdict(list)
    rankings: dict[int, list[str]] = defaultdict(list)
    for cid, choice, strength, ranking, answers in s.execute(
            select(Vote.comparison_id, Vote.choice, Vote.strength, Vote.ranking_json, Vote.criteria_json)
            .join(Comparison, Comparison.id == Vote.comparison_id).join(Annotator, Annotator.id == Vote.annotator_id)
            .where(Comparison.arena.is_(False), Comparison.gold.is_(None), Annotator.excluded.is_(False), in_rounds)
            .order_by(Vote.comparison_id, Vote.id)):
        if ranking is not None:
            rankings[cid].append(ranking)
        elif (label := _vote_label(choice, answers, criterion)) is not None:
            votes[cid].append((label, strength))
    skipped = Counter({"ranking_asks_no_criteria": len(rankings)}) if criterion and rankings else Counter()
    if criterion:
        rankings.clear()
    ids = sorted({*votes, *rankings})
    comps = {c.id: c for c in s.scalars(select(Comparison).where(Comparison.id.in_(ids)))} if ids else {}
    rulings = {a.comparison_id: a for a in s.scalars(select(Adjudication).where(
        Adjudication.comparison_id.in_(ids)))} if ids else {}
    ranked = [rid for cid in rankings for rid in json.loads(comps[cid].ranking_json)]
    responses = {r.id: r for r in s.scalars(select(Response).where(Response.id.in_(ranked)))} if ranked else {}
    units = []
    for cid in ids:
        c = comps[cid]
        if cid in rankings:
            units += _ranking_units(c, rankings[cid], responses)
        else:
            units.append(_Unit(cid, c.prompt.content_json, c.response_a, c.response_b, votes[cid], rulings.get(cid)))
    return units, skipped


def aggregate_store(store: Store, *, min_agreement: float = 0.0, ties: str = "drop", both_bad: str = "drop",
                    min_votes: int = 1, unpaired: bool = False, rounds: Sequence[int] | None = None,
                    criterion: str | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(rows, counts of kept / dropped-by-reason) for every non-arena comparison with at least one vote (a ranking
    task: each of its pairs): preference rows, or with `unpaired` two prompt / completion / label rows per pair.
    `rounds`: only the comparisons `alignkit loop` imported in those rounds. `criterion`: on a store with criteria,
    that criterion's answers instead of all combined (COMBINE_RULE)."""
    _check_policy(min_agreement, ties, both_bad, min_votes, unpaired)
    in_rounds = Comparison.loop_round.in_(list(rounds)) if rounds is not None else true()
    with store.read() as s:
        levels = scale_in(s)
        check_criterion(criterion, criteria_in(s), store.name)
        units, reasons = _units(s, in_rounds=in_rounds, criterion=criterion)
        has_ranking = any(u.ranking for u in units)
        rows = []
        for u in units:
            labels = [choice for choice, _ in u.votes]
            winner, agreement, reason = aggregate(labels, ties=ties, both_bad=both_bad,
                                                  min_agreement=min_agreement, min_votes=min_votes)
            if u.ruling is not None:
                winner, reason = adjudicated(u.ruling.choice, both_bad)
            reasons[reason] += 1
            if winner is None:
                continue
            chosen, rejected = (u.first, u.second) if winner != "b" else (u.second, u.first)
            counts = Counter(labels)
            prompt = json.loads(u.prompt_json)
            about = {"n_annotators": len(labels), "agreement": agreement, "comparison_id": u.comparison_id,
                     "votes": {k: counts.get(k, 0) for k in CHOICES}, "adjudicated": u.ruling is not None,
                     **({"ranking": u.ranking} if has_ranking else {})}
            if unpaired:
                rows += [{"prompt": prompt, "completion": response.text, "label": label, "model": response.model_spec,
                          **about} for response, label in ((chosen, winner != "both_bad"), (rejected, False))]
            else:
                decided_by = [(u.ruling.choice, u.ruling.strength)] if u.ruling is not None else u.votes
                margin = {"margin": vote_margin(decided_by, winner)} if levels > 1 or has_ranking else {}
                rows.append({"prompt": prompt, "chosen": chosen.text, "rejected": rejected.text,
                             "chosen_model": chosen.model_spec, "rejected_model": rejected.model_spec, **margin,
                             **about})
    return rows, dict(reasons)


def adjudicated(choice: str, both_bad: str) -> tuple[str | None, str]:
    """ADJUDICATION_RULE: (winner or None, reason) of a comparison an admin ruled on."""
    if choice == "tie" or (choice == "both_bad" and both_bad != "undesirable"):
        return None, f"adjudicated_{choice}"
    return choice, "adjudicated"


def check_criterion(criterion: str | None, asked: list[str], name: str) -> None:
    """An export's `criterion` must be one the store asks."""
    if criterion is None:
        return
    if not asked:
        raise UserError(f"--criterion {criterion}: {name} asks no per-criterion questions (import with --criteria)")
    if criterion not in asked:
        raise UserError(f"--criterion {criterion}: unknown criterion; {name} asks {', '.join(asked)}")


def vote_margin(votes: list[tuple[str, int | None]], winner: str) -> float:
    """MARGIN_RULE over one comparison's (canonical choice, strength) votes, and RANK_MARGIN_RULE over a ranking
    pair's (choice, rank distance) votes: one rule, as a rank distance of 1 is the weakest preference."""
    levels = [strength - 1 for choice, strength in votes if choice == winner and strength is not None]
    return sum(levels) / len(levels) if levels else 0.0


def excluded_annotators(store: Store) -> list[str]:
    with store.read() as s:
        return list(s.scalars(select(Annotator.name).where(Annotator.excluded.is_(True)).order_by(Annotator.name)))


def set_excluded(store: Store, name: str, excluded: bool) -> None:
    """Leave an annotator's votes out of every export (or take them in again); nothing is deleted."""
    def run(session) -> None:
        annotator = session.scalars(select(Annotator).where(Annotator.name == name)).one_or_none()
        if annotator is None:
            raise UserError(f"no annotator {name!r} in {store.name} (annotators appear with their first request)")
        annotator.excluded = excluded

    store.write(run)


def _arena_votes(store: Store) -> int:
    with store.read() as s:
        return s.scalar(select(func.count(Vote.id)).join(Comparison, Comparison.id == Vote.comparison_id)
                        .where(Comparison.arena.is_(True))) or 0


def _aggregate(db: str | Store, **policy) -> list[dict[str, Any]]:
    if isinstance(db, Store):
        return aggregate_store(db, **policy)[0]
    store = open_store(db, create=False)
    try:
        return aggregate_store(store, **policy)[0]
    finally:
        store.close()


def preference_rows(db: str | Store, *, min_agreement: float = 0.0, ties: str = "drop", both_bad: str = "drop",
                    min_votes: int = 1, rounds: Sequence[int] | None = None,
                    criterion: str | None = None) -> list[dict[str, Any]]:
    """Preference rows for the reward / DPO stages: prompt (str or messages), chosen, rejected, and more.

    `db` is a label store path or URL (or an open Store). See the module doc for the policy.
    """
    return _aggregate(db, min_agreement=min_agreement, ties=ties, both_bad=both_bad, min_votes=min_votes,
                      rounds=rounds, criterion=criterion)


def unpaired_rows(db: str | Store, *, min_agreement: float = 0.0, ties: str = "drop", both_bad: str = "drop",
                  min_votes: int = 1, rounds: Sequence[int] | None = None,
                  criterion: str | None = None) -> list[dict[str, Any]]:
    """Unpaired rows for a KTO stage: prompt, completion, label (desirable or not), two per kept comparison;
    both_bad="undesirable" keeps both-bad comparisons as two undesirable rows. See the module doc."""
    return _aggregate(db, min_agreement=min_agreement, ties=ties, both_bad=both_bad, min_votes=min_votes,
                      unpaired=True, rounds=rounds, criterion=criterion)


def export_dataset(store: Store, out_dir: str | Path, *, min_agreement: float = 0.0, ties: str = "drop",
                   both_bad: str = "drop", min_votes: int = 1, unpaired: bool = False,
                   criterion: str | None = None) -> dict[str, Any]:
    """Write DIR as a HF dataset (datasets.load_from_disk(DIR)) plus DIR/preferences.jsonl and DIR/export.json.

    unpaired: prompt / completion / label rows (TRL's unpaired preference format, for KTO), two per comparison;
    with both_bad="undesirable" a both-bad comparison gives two undesirable rows."""
    import datasets

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"export target {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / "export.json").exists():
        raise UserError(f"export target {out} is a non-empty directory that is not an earlier export; "
                        "choose a new directory")
    rows, reasons = aggregate_store(store, min_agreement=min_agreement, ties=ties, both_bad=both_bad,
                                    min_votes=min_votes, unpaired=unpaired, criterion=criterion)
    levels = scale(store)
    asked = criteria(store)
    if not rows:
        why = f"comparisons per reason: {reasons}" if reasons else "no votes on labeling comparisons yet"
        arena_votes = _arena_votes(store)
        if arena_votes:  # votes on arena battles rate models (alignkit compare); they are not training data
            why += f"; {arena_votes} votes are on arena battles, which are not exported"
        raise UserError(f"nothing to export from {store.name}: no comparison passes the policy ({why})")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build everything in a sibling temp dir (a unique name per export), then swap it in, so a failed
    # export leaves DIR as it was and leaves no temp dir behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # The dataset in the one shape TRL trains on (prompt and responses all text, or all messages);
        # preferences.jsonl keeps each row as imported.
        shaped = consistent_unpaired(rows, store.name)[0] if unpaired else consistent_pairs(rows, store.name)[0]
        ds = datasets.Dataset.from_list(shaped)
        ds.save_to_disk(str(tmp))
        with open(tmp / "preferences.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        summary = {"store": store.name, "rows": len(rows), "per_reason": reasons,
                   "adjudicated": sum(n for reason, n in reasons.items() if reason.startswith("adjudicated")),
                   "policy": {"aggregation": "plurality", "adjudication": ADJUDICATION_RULE, "ties": ties,
                              "both_bad": both_bad,
                              "min_agreement": min_agreement, "min_votes": min_votes,
                              "excluded_annotators": excluded_annotators(store), "gold_items": "left out",
                              **({"margin": MARGIN_RULE, "scale": levels} if levels > 1 else {}),
                              **({"ranking_margin": RANK_MARGIN_RULE} if any(r.get("ranking") for r in rows) else {}),
                              **({"criteria": asked, "criterion": criterion or "all combined",
                                  "combined_by": COMBINE_RULE} if asked else {})},
                   "format": "unpaired (prompt, completion, label)" if unpaired else "pairs (prompt, chosen, rejected)"}
        (tmp / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
        with _locked(out.parent):
            _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["out"] = str(out)
    return summary


def export_zip(out_dir: str | Path) -> bytes:
    """The export at `out_dir` as one zip: the `save_to_disk` dataset files, preferences.jsonl and export.json
    (the policy it used), under a folder named after it. Read under the lock the swap takes, so a concurrent
    export is either wholly in it or not at all."""
    import io
    import zipfile

    out = Path(out_dir)
    buffer = io.BytesIO()
    if not out.parent.is_dir():
        raise UserError(f"no export at {out} yet: export first")
    with _locked(out.parent):
        if not (out / "export.json").is_file():
            raise UserError(f"no export at {out} yet: export first")
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(out.rglob("*")):
                if f.is_file():
                    z.write(f, f"{out.name}/{f.relative_to(out)}")
    return buffer.getvalue()


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Exclusive lock on a directory (flock on its descriptor, across threads and processes, no lock file
    left behind): two exports to one target take turns at the swap instead of racing between its renames."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _swap_in(new: Path, out: Path) -> None:
    """Put directory `new` at `out`, replacing an earlier export there. Two renames: POSIX has no atomic
    exchange of directories, so `out` is missing for the instant between them, never half-written."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    try:
        os.replace(out, old / "x")
        try:
            os.replace(new, out)
        except BaseException:
            os.replace(old / "x", out)  # the earlier export goes back
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
