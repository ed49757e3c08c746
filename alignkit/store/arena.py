"""Arena battles in the label store: the models behind a vote, revealed after it, and all votes as battles.

An arena comparison (`Comparison.arena`) pairs two models' responses to one prompt; it is
written by `alignkit compare --judge human:DB` and served, leased and voted on by the queue's
arena pool (`next_item(..., arena=True)` and friends) under the same rules as any comparison.
The model names are never part of what the queue serves: `reveal` gives them to an annotator
only for a battle they have already voted on.

A response's model name is the display name compare sent it with (`model_name` in its
sampling record, from `--model NAME=SPEC`), else its model spec; the leaderboard counts models
by compare's `model_identity` (else the spec), so two models shown under one name stay apart. Responses are stored once
per (prompt, text), so a text first stored by an earlier import or compare keeps the name
it was stored with.

For ratings, every comparison counts once however many people voted on it (each vote weighs
1/(votes on its comparison)), and the bootstrap resamples prompts: one prompt's battles share
its responses, so they are not independent (see alignkit.stats).
"""

from __future__ import annotations

import json
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

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
    """One annotator's vote on a battle, with the models behind the sides as they saw them."""

    comparison_id: int
    prompt: Any  # str, or a list of chat messages
    left: str  # the text shown as A
    right: str
    choice: str  # as the annotator saw it (a = left)
    model_left: str
    model_right: str


def reveal(store: Store, annotator: str, comparison_id: int) -> Reveal:
    """The models behind `annotator`'s vote on an arena battle; refused before they have voted on it."""
    with store.read() as s:
        row = s.execute(select(Vote, Comparison).join(Comparison, Comparison.id == Vote.comparison_id)
                        .join(Annotator, Annotator.id == Vote.annotator_id)
                        .where(Vote.comparison_id == comparison_id, Annotator.name == annotator)).first()
        if row is None:
            exists = s.scalar(select(Comparison.arena).where(Comparison.id == comparison_id))
            if exists is None:
                raise UserError(f"comparison {comparison_id} does not exist")
            raise UserError(f"{annotator} has not voted on comparison {comparison_id}: its models are shown "
                            f"only after the vote")
        vote, comp = row
        if not comp.arena:
            raise UserError(f"comparison {comparison_id} is not an arena battle")
        left, right = (comp.response_b, comp.response_a) if vote.swapped else (comp.response_a, comp.response_b)
        return Reveal(comp.id, json.loads(comp.prompt.content_json), left.text, right.text,
                      _SWAP[vote.choice] if vote.swapped else vote.choice, model_name(left), model_name(right))


@dataclass(frozen=True)
class ArenaBattles:
    battles: list[tuple[str, str, str]]  # (model_a, model_b, winner a | b | tie), one per vote
    votes: int  # all votes on arena battles
    same_model_votes: int  # left out: both sides are the same model
    prompts: list[int]  # per battle: its prompt's id, the bootstrap's cluster
    weights: list[float]  # per battle: 1 / (votes on its comparison), so each comparison counts once


def arena_battles(store: Store) -> ArenaBattles:
    """Every vote on an arena battle as (model_a, model_b, winner); both_bad is a tie, as compare counts it."""
    with store.read() as s:
        rows = s.execute(select(Vote.choice, Comparison).join(Comparison, Comparison.id == Vote.comparison_id)
                         .where(Comparison.arena.is_(True)).order_by(Vote.id)).all()
        per_comparison = Counter(comp.id for _, comp in rows)
        keyed, names, specs, same, prompts, weights = [], {}, {}, 0, [], []
        for choice, comp in rows:
            a, b = model_key(comp.response_a), model_key(comp.response_b)
            if a == b:  # the same model on both sides (e.g. under two specs): no battle to rate
                same += 1
                continue
            for key, response in ((a, comp.response_a), (b, comp.response_b)):
                names.setdefault(key, model_name(response))
                specs.setdefault(key, response.model_spec or UNNAMED)
            keyed.append((a, b, choice if choice in ("a", "b") else "tie"))
            prompts.append(comp.prompt_id)
            weights.append(1.0 / per_comparison[comp.id])
    # A name shared by different models is told apart by spec (or, at one spec, by identity).
    keys_by_name: dict[str, list[str]] = defaultdict(list)
    for key, name in names.items():
        keys_by_name[name].append(key)
    label = {}
    for name, keys in keys_by_name.items():
        by_spec = len({specs[k] for k in keys}) == len(keys)
        for key in keys:
            label[key] = name if len(keys) == 1 else f"{name} ({specs[key] if by_spec else key.removeprefix('spec:')[:8]})"
    return ArenaBattles([(label[a], label[b], w) for a, b, w in keyed], len(rows), same, prompts, weights)


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
