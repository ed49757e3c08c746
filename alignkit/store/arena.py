"""Arena battles in the label store: the models behind a vote, revealed after it, and all votes as battles.

An arena comparison (`Comparison.arena`) pairs two models' responses to one prompt; it is
written by `alignkit compare --judge human:DB` and served, leased and voted on by the queue's
arena pool (`next_item(..., arena=True)` and friends) under the same rules as any comparison.
The model names are never part of what the queue serves: `reveal` gives them to an annotator
only for a battle they have already voted on, and records that it did: until then the vote can
be taken back (`undo_last_vote(..., arena=True)`), after it never, since the vote could then
follow the names.

A response's model name is the display name compare sent it with (`model_name` in its
sampling record, from `--model NAME=SPEC`), else its model spec; the leaderboard counts models
by compare's `model_identity` (else the spec), so two models shown under one name stay apart. Responses are stored once
per (prompt, text), so a text first stored by an earlier import or compare keeps the name
it was stored with.

For ratings, every comparison counts once however many people voted on it (each vote weighs
1/(votes on its comparison)), and the bootstrap resamples prompts: one prompt's battles share
its responses, so they are not independent (see alignkit.stats). `arena_battles` reads the votes
and `summarise_votes` rates them, for the app's leaderboard and for `alignkit compare --collect`
alike, so the two agree on the same votes.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Collection, Hashable, Mapping, Sequence

from sqlalchemy import func, select

from alignkit.errors import UserError
from alignkit.store.db import Store
from alignkit.store.models import Annotator, Comparison, Response, Vote
from alignkit.store.queue import _SWAP

UNNAMED = "(unnamed model)"


def _sampling(response: Response) -> dict:
    return json.loads(response.sampling_json) if response.sampling_json else {}


def model_name(response: Response) -> str:
    """The name a response's model is shown under: compare's display name, else the model spec."""
    name = _sampling(response).get("model_name")
    return name if isinstance(name, str) and name else response.model_spec or UNNAMED


def model_key(response: Response) -> str:
    """What the leaderboard counts a model by: compare's model identity (stage config hash or adapter
    fingerprint), else the spec. Display names are not unique: every DPO stage directory is called `dpo`."""
    identity = _sampling(response).get("model_identity")
    return identity if isinstance(identity, str) and identity else f"spec:{response.model_spec or UNNAMED}"


@dataclass(frozen=True)
class Reveal:
    """One annotator's vote on a battle, with the models behind the sides as they saw them once revealed."""

    comparison_id: int
    prompt: Any  # str, or a list of chat messages
    left: str  # the text shown as A
    right: str
    choice: str  # as the annotator saw it (a = left)
    model_left: str | None  # None until revealed: until then the vote can be taken back (undo_last_vote)
    model_right: str | None

    @property
    def revealed(self) -> bool:
        return self.model_left is not None


def _battle_vote(session, annotator: str, comparison_id: int) -> tuple[Vote, Comparison]:
    row = session.execute(select(Vote, Comparison).join(Comparison, Comparison.id == Vote.comparison_id)
                          .join(Annotator, Annotator.id == Vote.annotator_id)
                          .where(Vote.comparison_id == comparison_id, Annotator.name == annotator)).first()
    if row is None:
        if session.scalar(select(Comparison.arena).where(Comparison.id == comparison_id)) is None:
            raise UserError(f"comparison {comparison_id} does not exist")
        raise UserError(f"{annotator} has not voted on comparison {comparison_id}: its models are shown "
                        f"only after the vote")
    if not row[1].arena:
        raise UserError(f"comparison {comparison_id} is not an arena battle")
    return row[0], row[1]


def _as_reveal(vote: Vote, comp: Comparison) -> Reveal:
    left, right = (comp.response_b, comp.response_a) if vote.swapped else (comp.response_a, comp.response_b)
    named = vote.revealed_at is not None
    return Reveal(comp.id, json.loads(comp.prompt.content_json), left.text, right.text,
                  _SWAP[vote.choice] if vote.swapped else vote.choice, model_name(left) if named else None,
                  model_name(right) if named else None)


def battle_vote(store: Store, annotator: str, comparison_id: int) -> Reveal:
    """`annotator`'s vote on an arena battle, its models named only if they were revealed to them already."""
    with store.read() as s:
        return _as_reveal(*_battle_vote(s, annotator, comparison_id))


def reveal(store: Store, annotator: str, comparison_id: int) -> Reveal:
    """The models behind `annotator`'s vote on an arena battle, recorded as shown (from then on the vote cannot
    be taken back); refused before they have voted on it."""
    def run(session) -> Reveal:
        vote, comp = _battle_vote(session, annotator, comparison_id)
        if vote.revealed_at is None:
            vote.revealed_at = time.time()
        return _as_reveal(vote, comp)

    return store.write(run)


@dataclass(frozen=True)
class ArenaBattles:
    """The votes on arena battles as battles between models: what both views of them (the app's leaderboard and
    `alignkit compare --collect`) rate, through `summarise_votes`.

    A *battle* is one arena comparison (two models' responses to one prompt); a *vote* is one annotator's
    verdict on it. Ratings and win rates count each battle once: its votes weigh 1/(votes on it).
    """

    battles: list[tuple[str, str, str]]  # (model_a, model_b, winner a | b | tie), one per rated vote
    comparisons: list[int]  # per vote: its battle (comparison id)
    prompts: list[int]  # per vote: its prompt's id, the bootstrap's cluster
    weights: list[float]  # per vote: 1 / (votes on its comparison), so each comparison counts once
    models: list[str]  # every model in a battle sent, voted on or not, in first-seen order
    without_votes: int  # battles nobody has voted on yet
    same_model_votes: int  # left out: both sides are the same model

    @property
    def votes(self) -> int:
        return len(self.battles)

    @property
    def n_battles(self) -> int:
        return len(set(self.comparisons))


def arena_battles(store: Store, *, comparisons: Collection[int] | None = None,
                  names: Mapping[int, str] | None = None) -> ArenaBattles:
    """Every vote on an arena battle as (model_a, model_b, winner); both_bad is a tie, as Chatbot Arena counts it.

    `comparisons`: only these battles (compare --collect: the ones its run sent), else all. `names`: the model
    name per response id (compare --collect names them as its run did), else the store's, told apart where two
    models share a display name. A prompt on which two models gave the same text has one response in the store
    and no battle between them: neither view can rate what nobody voted on.
    """
    with store.read() as s:
        comps = s.scalars(select(Comparison).where(Comparison.arena.is_(True)).order_by(Comparison.id)).all()
        if comparisons is not None:
            wanted = set(comparisons)
            comps = [c for c in comps if c.id in wanted]
        choices: dict[int, list[str]] = defaultdict(list)
        for cid, choice in s.execute(select(Vote.comparison_id, Vote.choice)
                                     .join(Comparison, Comparison.id == Vote.comparison_id)
                                     .where(Comparison.arena.is_(True)).order_by(Vote.id)).all():
            choices[cid].append(choice)
        if names is None:
            keyed_names, specs = {}, {}
            for comp in comps:
                for response in (comp.response_a, comp.response_b):
                    key = model_key(response)
                    keyed_names.setdefault(key, model_name(response))
                    specs.setdefault(key, response.model_spec or UNNAMED)
            label = _labels(keyed_names, specs)
            side = {r.id: label[model_key(r)] for comp in comps for r in (comp.response_a, comp.response_b)}
        else:
            side = names
        battles, cids, prompts, weights, models, unvoted, same = [], [], [], [], {}, 0, 0
        for comp in comps:
            a, b = side[comp.response_a_id], side[comp.response_b_id]
            votes = choices.get(comp.id, [])
            if a == b:  # the same model on both sides (e.g. under two specs): no battle to rate
                same += len(votes)
                continue
            models.setdefault(a)
            models.setdefault(b)
            unvoted += not votes
            for choice in votes:
                battles.append((a, b, choice if choice in ("a", "b") else "tie"))
                cids.append(comp.id)
                prompts.append(comp.prompt_id)
                weights.append(1.0 / len(votes))
    return ArenaBattles(battles, cids, prompts, weights, list(models), unvoted, same)


def _labels(names: dict[str, str], specs: dict[str, str]) -> dict[str, str]:
    """Model key -> the name shown; a name shared by different models is told apart by spec (or, at one spec, by
    identity)."""
    keys_by_name: dict[str, list[str]] = defaultdict(list)
    for key, name in names.items():
        keys_by_name[name].append(key)
    label = {}
    for name, keys in keys_by_name.items():
        by_spec = len({specs[k] for k in keys}) == len(keys)
        for key in keys:
            label[key] = name if len(keys) == 1 else f"{name} ({specs[key] if by_spec else key.removeprefix('spec:')[:8]})"
    return label


@dataclass(frozen=True)
class VoteSummary:
    """Ratings, win rates and counts from arena votes (`summarise_votes`); the app's leaderboard and compare's
    human judge both report this, so they agree on the same votes."""

    votes: int  # votes rated
    battles: int  # battles (comparisons) with at least one rated vote
    without_votes: int  # battles sent that nobody has voted on yet
    # best first (unrated models last, as listed): model, rating, ci_low, ci_high, median (None if unrated),
    # battles, votes, wins, losses, ties (raw votes)
    models: list[dict[str, Any]]
    # one per pair that met, model_a before model_b in `order`: wins/losses/ties of model_a (raw votes), n (votes),
    # battles, units (prompts), win_rate (each battle once), ci_low, ci_high, ci_method
    pairs: list[dict[str, Any]]
    win_matrix: dict[str, dict[str, float | None]]
    connectivity: dict | None  # stats.Connectivity.as_dict() of the rated votes
    warning: str | None  # no votes yet (for some or all models), and stats.Connectivity.warning


def summarise_votes(ab: ArenaBattles, *, models: Sequence[str] | None = None, bootstrap: int, seed: int = 0,
                    ratings: bool = True) -> VoteSummary:
    """Bradley–Terry ratings with CIs that resample prompts, win rates per pair, counts per model.

    `models`: the models to report (default: every model in a battle sent), and the order pairs are oriented
    in (default: best first). ratings=False skips the bootstrap (compare rates only three or more models).
    """
    from alignkit import stats

    if bootstrap < stats.MIN_BOOTSTRAP:
        raise UserError(f"bootstrap must be >= {stats.MIN_BOOTSTRAP}, got {bootstrap}")
    explicit = models is not None
    models = list(models) if explicit else list(ab.models)
    record: dict[str, Counter] = {m: Counter() for m in models}
    fought: dict[str, set[int]] = {m: set() for m in models}
    for (a, b, winner), cid in zip(ab.battles, ab.comparisons):
        for model, won in ((a, "a"), (b, "b")):
            record[model]["votes"] += 1
            record[model]["ties" if winner == "tie" else "wins" if winner == won else "losses"] += 1
            fought[model].add(cid)
    rated = {} if not (ratings and ab.battles) else stats.bootstrap_ratings(
        ab.battles, rounds=bootstrap, seed=seed, clusters=ab.prompts, weights=ab.weights)
    graph = stats.connectivity(ab.battles, weights=ab.weights) if ab.battles else None
    unrated = [m for m in models if not record[m]["votes"]]
    if ratings:
        order = sorted(rated, key=lambda m: -rated[m]["rating"]) + unrated
    else:
        order = models
    rows = []
    for m in order:
        r = rated.get(m, dict.fromkeys(("rating", "ci_low", "ci_high", "median")))
        rows.append({"model": m, **r, "battles": len(fought[m]),
                     **{k: record[m][k] for k in ("votes", "wins", "losses", "ties")}})
    # Orient every vote as (earlier, later) in the order asked for (else best first), so a pair's wins and win
    # rate are its first model's.
    rank = {m: i for i, m in enumerate(models if explicit else order)}
    flip = {"a": "b", "b": "a", "tie": "tie"}
    oriented = [(a, b, w) if rank[a] < rank[b] else (b, a, flip[w]) for a, b, w in ab.battles]
    pairs = []
    if oriented:
        per_pair = stats.pair_stats(oriented, clusters=ab.prompts, weights=ab.weights)
        battles_of: dict[tuple[str, str], set[int]] = defaultdict(set)
        for (a, b, _), cid in zip(oriented, ab.comparisons):
            battles_of[a, b].add(cid)
        for (a, b) in sorted(per_pair, key=lambda k: (rank[k[0]], rank[k[1]])):
            p = per_pair[a, b]
            pairs.append({"model_a": a, "model_b": b, **{k: p[k] for k in ("wins", "losses", "ties", "n")},
                          "battles": len(battles_of[a, b]),
                          **{k: p[k] for k in ("units", "win_rate", "ci_low", "ci_high", "ci_method")}})
    warnings = []
    if not ab.battles:
        sent = ab.without_votes
        warnings.append(f"No votes yet on the {sent} arena battle{'s' * (sent != 1)} sent: nothing to rate."
                        if sent else "No arena battles yet: nothing to rate.")
    elif unrated:
        warnings.append(f"No votes yet for {', '.join(unrated)}: not rated.")
    if ab.same_model_votes:
        warnings.append(f"{ab.same_model_votes} votes on battles between one model under two names are not rated.")
    if graph is not None and graph.warning:
        warnings.append(graph.warning)
    return VoteSummary(ab.votes, ab.n_battles, ab.without_votes, rows, pairs,
                       stats.win_matrix(ab.battles, models, weights=ab.weights) if ab.battles else {},
                       graph.as_dict() if graph is not None else None, " ".join(warnings) or None)


def arena_vote_state(store: Store) -> tuple:
    """(count, max id, latest time) of the votes on arena battles: changes whenever a vote is cast or undone
    (an undo followed by a new vote can reuse the max id, not the time), so it keys a cached leaderboard."""
    with store.read() as s:
        row = s.execute(select(func.count(Vote.id), func.max(Vote.id), func.max(Vote.created_at))
                        .join(Comparison, Comparison.id == Vote.comparison_id)
                        .where(Comparison.arena.is_(True))).one()
    return tuple(row)


class LeaderboardCache:
    """The last computed leaderboard and the vote state it was computed at.

    A leaderboard is a bootstrap refit per round (seconds for a few thousand votes) and any annotator can
    ask for it; one instance per app, held by the app's context, reuses it until the votes change. The lock
    makes concurrent requests wait for one computation instead of each starting their own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Hashable | None = None
        self._value: Any = None
        self.computed = 0  # how many times compute ran (for tests and the admin's curiosity)

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if self._value is None or self._key != key:
                self._value, self._key = compute(), key
                self.computed += 1
            return self._value
