"""The labeling queue: leases (assignments) with overlap, votes exactly once, skip and undo.

Rules, all enforced inside one database transaction each:
- a comparison is handed to at most `overlap` distinct annotators at a time;
  an assignment occupies a slot while it is voted or its lease is unexpired, so an
  abandoned item is served again once its lease runs out;
- an annotator gets at most one assignment per comparison (one row per
  (comparison, annotator), a unique constraint) and votes on it at most once
  (a unique constraint on votes); a skipped or voted comparison never comes back
  unless they ask for it (`unskip`, while it has a free slot; `undo_last_vote`, for
  a battle only until its models were revealed to them);
- an annotator's own lease that ran out is not lost to them: while its slot is
  still free it is renewed and served to them again (before anything new), so a
  reload after a long break brings back the item they were reading;
- a vote is accepted only on a comparison assigned to that annotator, and never
  beyond the overlap: a late vote on an expired lease whose slot went to
  someone else is refused;
- a vote names its comparison (the one the annotator had on screen), and one sooner
  than `min_display_seconds` after that comparison was served to them is refused;
- gold items (comparisons with a known answer, `label import --gold`) are served to
  every annotator once, outside the overlap, at `gold_rate` of their requests while
  ordinary work remains (never once it is done); they look like any other item;
- arena battles: an annotator is served at most one battle per prompt. compare puts
  every pair of models on a prompt in the store, so a second battle of the same
  prompt repeats a response whose model the first reveal named. Battles are served
  fewest votes first, so annotators spread over a prompt's pairs.

Concurrency: on SQLite every write transaction holds the database write lock from
its start (BEGIN IMMEDIATE, see db.py), so these read-then-write steps are
serialized. On PostgreSQL `next_item` and `undo_last_vote` first lock the
annotator's row, so one annotator's calls take turns (without it, simultaneous
calls of one annotator each see no lease held and lease several comparisons);
`next_item` then picks a comparison with `SELECT ... FOR UPDATE SKIP LOCKED` (two
annotators asking at once get different rows) and re-counts its slots after the
lock, in a fresh snapshot; `submit_vote` locks the comparison row (`FOR UPDATE`)
before counting, so simultaneous votes on one comparison are serialized.

Choices arrive as the annotator saw them (`a` = the left response); votes are
stored in canonical terms (`a` = comparison.response_a) with the side order shown.

A ranking task (a comparison with `ranking_json`, `label import --rank`) is leased, skipped and undone like any
comparison and takes one vote per annotator: `submit_ranking` with a rank per response as shown (1 = best,
ties repeat a rank). Each annotator sees its responses in an order of their own (display_order, a shuffle
seeded by the task and the annotator, so it is the same on every reload and needs no column); the vote stores
the order as tie groups of response ids best first (`ranking_json`), and its `choice` is what the ranking says
of response_a against response_b, with `swapped` as that pair was shown, so agreement and side-bias statistics
count a ranking once, as one pairwise vote.

On a store with criteria (alignkit.store.settings) a vote on an ordinary comparison answers every criterion
(`answers`, each choice as shown); its `choice` is COMBINE_RULE over them and `criteria_json` keeps them.

Two pools share these rules: ordinary preference comparisons (`arena=False`, the
Label tab) and arena battles between models (`arena=True`, the Arena tab). Every
function here works on one pool: it serves, counts, votes on, skips and undoes
only comparisons of that pool, so an annotator may hold one lease in each.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, object_session

from alignkit.errors import UserError
from alignkit.store.db import Store
from alignkit.store.importer import storable_text
from alignkit.store.models import CHOICES, Annotator, Assignment, Comparison, Response, Vote
from alignkit.store.settings import combine_criteria, criteria_in, scale_in

MAX_RATIONALE_CHARS = 10_000
_SWAP = {"a": "b", "b": "a", "tie": "tie", "both_bad": "both_bad"}


@dataclass(frozen=True)
class Item:
    """One comparison as served to one annotator: `left`/`right` are what is shown as A/B."""

    comparison_id: int
    prompt: Any  # str, or a list of chat messages, as imported
    left: str
    right: str
    swapped: bool  # response_b of the comparison is shown on the left
    served_at: float
    expires_at: float
    ranking: tuple[str, ...] = ()  # a ranking task: its responses in the order shown (left, right: the first two)

    @property
    def is_ranking(self) -> bool:
        return bool(self.ranking)

    @property
    def prompt_text(self) -> str:
        return prompt_as_text(self.prompt)


@dataclass(frozen=True)
class VoteReceipt:
    vote_id: int
    comparison_id: int
    choice: str  # as the annotator saw it (a = left)
    canonical_choice: str  # a = comparison.response_a
    seconds: float


@dataclass(frozen=True)
class Progress:
    done: int  # votes by this annotator
    remaining: int  # comparisons this annotator could still be served (including one on lease now)
    skipped: int


def prompt_as_text(prompt: Any) -> str:
    """A plain-text rendering of a prompt: the string itself, or `role: content` per message."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


def prompt_as_markdown(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"**{m.get('role', '?')}**\n\n{m.get('content', '')}" for m in prompt)


def check_choice(choice: Any) -> str:
    if choice not in CHOICES:
        raise UserError(f"unknown choice {choice!r}: expected one of {', '.join(CHOICES)}")
    return choice


def check_id(comparison_id: Any) -> int:
    if not isinstance(comparison_id, int) or isinstance(comparison_id, bool):
        raise UserError(f"comparison id must be an integer, got {comparison_id!r}")
    if not 0 < comparison_id < 2**63:  # the databases' BIGINT: larger ids overflow in the driver, not here
        raise UserError(f"comparison {comparison_id} does not exist")
    return comparison_id


def annotator_id(store: Store, session: Session, name: str) -> int:
    """The annotator's id, created on first sight (safe under concurrent first sights)."""
    if not name or not isinstance(name, str):
        raise UserError("no annotator: log in first")
    found = session.scalar(select(Annotator.id).where(Annotator.name == name))
    if found is None:
        if store.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        session.execute(insert(Annotator).values(name=name, created_at=time.time()).on_conflict_do_nothing())
        found = session.scalar(select(Annotator.id).where(Annotator.name == name))
    return found


def _lock_annotator(store: Store, session: Session, uid: int) -> None:
    """PostgreSQL: make this annotator's concurrent calls take turns (SQLite's writers already do).
    FOR NO KEY UPDATE, not FOR UPDATE: votes and assignments referencing the row (foreign-key
    checks take KEY SHARE) are not held up by it."""
    if store.dialect == "postgresql":
        session.execute(select(Annotator.id).where(Annotator.id == uid).with_for_update(key_share=True))


def _occupied(now: float, *, exclude_annotator: int | None = None):
    """SQL count of the slots a comparison's assignments hold (correlated on Comparison.id)."""
    cond = [Assignment.comparison_id == Comparison.id,
            or_(Assignment.status == "done", and_(Assignment.status == "active", Assignment.expires_at > now))]
    if exclude_annotator is not None:
        cond.append(Assignment.annotator_id != exclude_annotator)
    return select(func.count(Assignment.id)).where(*cond).correlate(Comparison).scalar_subquery()


def _eligible(uid: int, overlap: int, now: float, arena: bool, *, gold: bool = False):
    # Any assignment of theirs bars a comparison, except an expired lease: that one is theirs to be
    # served again while its slot is free (an unexpired one is returned as held before this is asked).
    mine = exists().where(Assignment.comparison_id == Comparison.id, Assignment.annotator_id == uid,
                          or_(Assignment.status != "active", Assignment.expires_at > now))
    if gold:  # every annotator is measured on every gold item: no overlap, no slots
        return and_(Comparison.arena.is_(False), Comparison.gold.is_not(None), ~mine)
    # pool and n_votes < overlap first: full comparisons drop out through an index, so the slot
    # count below runs only over comparisons that still take votes.
    cond = [Comparison.arena == arena, Comparison.gold.is_(None), Comparison.n_votes < overlap, ~mine,
            _occupied(now) < overlap]
    if arena:
        cond.append(~_other_battle_of_prompt(uid))
    return and_(*cond)


def _other_battle_of_prompt(uid: int):
    """The annotator holds, skipped or voted another battle of this comparison's prompt: after a vote the
    models are named, and every other battle of the prompt repeats one of those responses."""
    other = aliased(Comparison)
    return exists().where(Assignment.annotator_id == uid, Assignment.comparison_id == other.id,
                          other.prompt_id == Comparison.prompt_id, other.arena.is_(True), other.id != Comparison.id)


def _check_pool(store: Store, session: Session, comparison_id: int, arena: bool, *, lock: bool = False) -> bool:
    """Refuse a comparison that does not exist or is of the other pool: the Arena reveals model names
    after its own votes only, and must not reveal an ordinary comparison's models. Returns whether it is
    a gold item.

    lock: on PostgreSQL, lock the comparison row (serializes votes and leases on it)."""
    q = select(Comparison.arena, Comparison.gold).where(Comparison.id == comparison_id)
    if lock and store.dialect == "postgresql":
        q = q.with_for_update()
    found = session.execute(q).first()
    if found is None:
        raise UserError(f"comparison {comparison_id} does not exist")
    if found.arena and not arena:
        raise UserError(f"comparison {comparison_id} is an arena battle, served in the Arena tab")
    if arena and not found.arena:
        raise UserError(f"comparison {comparison_id} is not an arena battle")
    return found.gold is not None


def display_order(comparison_id: int, annotator_id: int, response_ids: list[int]) -> list[int]:
    """A ranking task's response ids in the order this annotator is shown them (the same on every call)."""
    order = list(response_ids)
    random.Random(f"{comparison_id}:{annotator_id}").shuffle(order)
    return order


def _shown_swapped(comp: Comparison, annotator_id: int, coin: bool) -> bool:
    """Whether response_b is shown before response_a: a coin for a pair, the display order for a ranking."""
    if comp.ranking_json is None:
        return coin
    order = display_order(comp.id, annotator_id, json.loads(comp.ranking_json))
    return order.index(comp.response_b_id) < order.index(comp.response_a_id)


def _to_item(comp: Comparison, a: Assignment) -> Item:
    prompt = json.loads(comp.prompt.content_json)
    if comp.ranking_json is not None:
        session = object_session(comp)
        order = display_order(comp.id, a.annotator_id, json.loads(comp.ranking_json))
        texts = tuple(session.get(Response, rid).text for rid in order)
        return Item(comp.id, prompt, texts[0], texts[1], a.swapped, a.served_at, a.expires_at, texts)
    first, second = (comp.response_b, comp.response_a) if a.swapped else (comp.response_a, comp.response_b)
    return Item(comp.id, prompt, first.text, second.text, a.swapped, a.served_at, a.expires_at)


def _pick(store: Store, session: Session, uid: int, overlap: int, t: float, arena: bool, *, only=None,
          gold: bool = False) -> int | None:
    """The id of the next comparison the annotator may be served (locked on PostgreSQL), or None."""
    # Battles fewest votes first: annotators then spread over each prompt's pairs of models instead of
    # all judging its first pair (each sees one battle per prompt). Label comparisons in import order.
    order = (Comparison.n_votes, Comparison.id) if arena else (Comparison.id,)
    eligible = _eligible(uid, overlap, t, arena, gold=gold)
    tried: list[int] = []
    while True:
        q = select(Comparison.id).where(eligible)
        if only is not None:
            q = q.where(only)
        if tried:
            q = q.where(Comparison.id.not_in(tried))
        q = q.order_by(*order).limit(1)
        if store.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True, of=Comparison)
        cid = session.scalar(q)
        if cid is None or store.dialect != "postgresql":
            return cid
        # The row is locked now; re-check in a fresh snapshot (READ COMMITTED) that sees
        # every assignment committed before we got the lock.
        if session.scalar(select(Comparison.id).where(Comparison.id == cid, eligible)):
            return cid
        tried.append(cid)


def next_item(store: Store, annotator: str, *, overlap: int | None = None, now: float | None = None,
              rng: random.Random | None = None, arena: bool = False, gold_rate: float | None = None) -> Item | None:
    """Lease the next comparison of the pool to `annotator` (or return the one they hold); None when none is left.

    `gold_rate` (default: the store's) of new leases is a gold item they have not seen, while ordinary work remains."""
    overlap = store.overlap if overlap is None else overlap
    gold_rate = store.gold_rate if gold_rate is None else gold_rate
    coin = (rng or random).random() < 0.5
    gold_first = not arena and (rng or random).random() < gold_rate

    def run(session: Session) -> Item | None:
        t = time.time() if now is None else now
        uid = annotator_id(store, session, annotator)
        _lock_annotator(store, session, uid)
        held = session.scalars(
            select(Assignment).join(Comparison, Comparison.id == Assignment.comparison_id)
            .where(Assignment.annotator_id == uid, Assignment.status == "active", Assignment.expires_at > t,
                   Comparison.arena == arena).order_by(Assignment.served_at.desc()).limit(1)
        ).first()
        if held is not None:
            return _to_item(session.get(Comparison, held.comparison_id), held)
        expired = Comparison.id.in_(select(Assignment.comparison_id).where(
            Assignment.annotator_id == uid, Assignment.status == "active", Assignment.expires_at <= t))
        cid = _pick(store, session, uid, overlap, t, arena, only=expired) \
            or _pick(store, session, uid, overlap, t, arena, only=expired, gold=True)
        if cid is None:
            ordinary = _pick(store, session, uid, overlap, t, arena)
            gold = _pick(store, session, uid, overlap, t, arena, gold=True) if gold_first and ordinary else None
            cid = gold or ordinary
        if cid is None:
            return None
        a = session.scalars(select(Assignment).where(Assignment.comparison_id == cid,
                                                     Assignment.annotator_id == uid)).one_or_none()
        if a is None:
            a = Assignment(comparison_id=cid, annotator_id=uid, status="active",
                           swapped=_shown_swapped(session.get(Comparison, cid), uid, coin), served_at=t,
                           expires_at=t + store.lease_seconds)
            session.add(a)
        else:  # their own expired lease, renewed; the sides stay as they were shown
            a.served_at, a.expires_at = t, t + store.lease_seconds
        session.flush()
        return _to_item(session.get(Comparison, cid), a)

    return store.write(run)


def _checked_rationale(rationale: Any) -> str | None:
    if rationale is not None and not isinstance(rationale, str):
        raise UserError(f"rationale must be a string, got {type(rationale).__name__}")
    rationale = storable_text(rationale or "").strip() or None  # a pasted NUL: as for responses
    if rationale is not None and len(rationale) > MAX_RATIONALE_CHARS:
        raise UserError(f"rationale is longer than {MAX_RATIONALE_CHARS} characters")
    return rationale


@dataclass(frozen=True)
class _Ballot:
    """One vote's content in canonical terms, as submit_vote and submit_ranking hand it to _cast."""

    choice: str  # canonical: a = comparison.response_a
    strength: int | None = None
    ranking_json: str | None = None
    criteria_json: str | None = None


def _cast(store: Store, session: Session, annotator: str, comparison_id: int, t: float, *, overlap: int,
          arena: bool, min_display_seconds: float, rationale: str | None, ballot) -> VoteReceipt:
    """Record a vote on a comparison leased to `annotator`: `ballot(comparison, assignment)` gives its _Ballot
    (raising UserError for content this comparison does not take). Refused: not assigned, voted, skipped, the
    slot gone to others, or sooner than `min_display_seconds` after serving."""
    uid = annotator_id(store, session, annotator)
    gold = _check_pool(store, session, comparison_id, arena, lock=True)  # serializes votes (and leases) on it
    a = session.scalars(select(Assignment).where(Assignment.comparison_id == comparison_id,
                                                 Assignment.annotator_id == uid)).one_or_none()
    if a is None:
        raise UserError(f"comparison {comparison_id} is not assigned to {annotator}")
    b = ballot(session.get(Comparison, comparison_id), a)
    if a.status == "done":
        raise UserError(f"{annotator} already voted on comparison {comparison_id}")
    if a.status == "skipped":
        raise UserError(f"{annotator} skipped comparison {comparison_id}")
    others = session.scalar(select(_occupied(t, exclude_annotator=uid)).select_from(Comparison)
                            .where(Comparison.id == comparison_id))
    if others >= overlap and not gold:
        raise UserError(f"the lease on comparison {comparison_id} expired and it went to other annotators")
    if _shown_too_briefly(t, a, min_display_seconds):
        raise UserError(f"comparison {comparison_id} was on screen for {max(0.0, t - a.served_at):.2f} s; "
                        f"votes need at least {min_display_seconds:g} s")
    vote = Vote(comparison_id=comparison_id, annotator_id=uid, assignment_id=a.id, choice=b.choice,
                swapped=a.swapped, rationale=rationale, seconds=max(0.0, t - a.served_at), created_at=t,
                strength=b.strength, ranking_json=b.ranking_json, criteria_json=b.criteria_json)
    session.add(vote)
    a.status = "done"
    session.execute(update(Comparison).where(Comparison.id == comparison_id).values(n_votes=Comparison.n_votes + 1))
    session.flush()
    shown = _SWAP[b.choice] if a.swapped else b.choice
    return VoteReceipt(vote.id, comparison_id, shown, b.choice, vote.seconds)


def _write_vote(store: Store, annotator: str, comparison_id: int, now: float | None, **kwargs) -> VoteReceipt:
    try:
        return store.write(lambda session: _cast(store, session, annotator, comparison_id,
                                                 time.time() if now is None else now, **kwargs))
    except IntegrityError:
        raise UserError(f"{annotator} already voted on comparison {comparison_id}") from None


def submit_vote(store: Store, annotator: str, comparison_id: int, choice: str | None, rationale: str | None = None,
                *, overlap: int | None = None, now: float | None = None, arena: bool = False,
                min_display_seconds: float = 0.0, strength: int | None = None,
                answers: dict[str, str] | None = None) -> VoteReceipt:
    """Record `annotator`'s vote on a comparison of the pool assigned to them; `choice` is as shown (a = left).

    A vote sooner than `min_display_seconds` after the comparison was served to them is refused (nothing
    changes): nobody judges two responses that fast, and a double key press lands there. On a store with a
    strength scale (alignkit.store.settings) a vote for a side carries its `strength`, 1..scale; arena
    votes, ties and both-bad carry none. On a store with criteria, an ordinary comparison's vote gives
    `answers` (one choice as shown per criterion) and no `choice`. A ranking task takes submit_ranking."""
    if answers is None:
        check_choice(choice)
    check_id(comparison_id)
    rationale = _checked_rationale(rationale)

    def ballot(comp: Comparison, a: Assignment) -> _Ballot:
        if comp.ranking_json is not None:
            raise UserError(f"comparison {comp.id} is a ranking task: send a rank per response (submit_ranking)")
        asked = [] if arena else criteria_in(object_session(comp))
        if asked or answers is not None:
            return _criteria_ballot(comp.id, asked, answers, choice, strength, a.swapped)
        _check_strength(strength, choice, 1 if arena else scale_in(object_session(comp)))
        return _Ballot(_SWAP[choice] if a.swapped else choice, strength)

    return _write_vote(store, annotator, comparison_id, now, overlap=store.overlap if overlap is None else overlap,
                       arena=arena, min_display_seconds=min_display_seconds, rationale=rationale, ballot=ballot)


def _criteria_ballot(comparison_id: int, asked: list[str], answers: Any, choice: Any, strength: Any,
                     swapped: bool) -> _Ballot:
    """A vote answering every criterion of the store (answers as shown), canonical, with COMBINE_RULE's choice."""
    if not asked:
        raise UserError(f"comparison {comparison_id}: this store asks one overall choice, not per-criterion answers")
    if choice is not None or strength is not None:
        raise UserError(f"this store asks one choice per criterion ({', '.join(asked)}): send answers, not a choice")
    if not isinstance(answers, dict) or sorted(answers) != sorted(asked):
        given = ", ".join(map(str, answers)) if isinstance(answers, dict) else repr(answers)
        raise UserError(f"answers must give one choice for each criterion: {', '.join(asked)} (got {given or 'none'})")
    canonical = {name: _SWAP[check_choice(answers[name])] if swapped else answers[name] for name in asked}
    return _Ballot(combine_criteria(canonical), criteria_json=json.dumps(canonical))


def submit_ranking(store: Store, annotator: str, comparison_id: int, ranks: Any, rationale: str | None = None, *,
                   overlap: int | None = None, now: float | None = None,
                   min_display_seconds: float = 0.0) -> VoteReceipt:
    """Record `annotator`'s ranking of a ranking task leased to them: `ranks[i]` is the rank (1 = best; equal
    ranks are ties) of the i-th response as shown. Refused as submit_vote refuses a vote."""
    check_id(comparison_id)
    rationale = _checked_rationale(rationale)

    def ballot(comp: Comparison, a: Assignment) -> _Ballot:
        if comp.ranking_json is None:
            raise UserError(f"comparison {comp.id} is a pair, not a ranking task: send a choice (submit_vote)")
        order = display_order(comp.id, a.annotator_id, json.loads(comp.ranking_json))
        groups = ranking_groups(order, _checked_ranks(ranks, len(order)))
        return _Ballot(pair_choice(groups, comp.response_a_id, comp.response_b_id), ranking_json=json.dumps(groups))

    return _write_vote(store, annotator, comparison_id, now, overlap=store.overlap if overlap is None else overlap,
                       arena=False, min_display_seconds=min_display_seconds, rationale=rationale, ballot=ballot)


def _checked_ranks(ranks: Any, k: int) -> list[int]:
    if not isinstance(ranks, (list, tuple)) or len(ranks) != k or \
            not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= k for r in ranks):
        raise UserError(f"a ranking of {k} responses needs {k} ranks, each 1..{k} (1 = best, equal ranks tie), "
                        f"got {ranks!r}")
    return list(ranks)


def ranking_groups(order: list[int], ranks: list[int]) -> list[list[int]]:
    """Response ids (in `order`, as shown) grouped by their rank, best first: [[3], [1, 4], [2]]."""
    return [[rid for rid, r in zip(order, ranks) if r == value] for value in sorted(set(ranks))]


def pair_choice(groups: list[list[int]], x: int, y: int) -> str:
    """What a ranking (tie groups best first) says of response x against response y: a (x better), b or tie."""
    place = {rid: i for i, group in enumerate(groups) for rid in group}
    return "tie" if place[x] == place[y] else "a" if place[x] < place[y] else "b"


def _check_strength(strength: Any, choice: str, levels: int) -> None:
    if levels == 1 or choice in ("tie", "both_bad"):
        if strength is not None:
            raise UserError(f"a {choice} vote on this store carries no strength, got {strength!r}")
        return
    if isinstance(strength, bool) or not isinstance(strength, int) or not 1 <= strength <= levels:
        raise UserError(f"this store asks how much better (strength 1..{levels} with choice a or b), got {strength!r}")


def _shown_too_briefly(now: float, a: Assignment, min_display_seconds: float) -> bool:
    return now - a.served_at < min_display_seconds


def skip(store: Store, annotator: str, comparison_id: int, *, arena: bool = False) -> None:
    """Pass on a leased comparison: its slot is freed and it is never served to this annotator again."""
    check_id(comparison_id)

    def run(session: Session) -> None:
        uid = annotator_id(store, session, annotator)
        _check_pool(store, session, comparison_id, arena)
        a = session.scalars(select(Assignment).where(Assignment.comparison_id == comparison_id,
                                                     Assignment.annotator_id == uid)).one_or_none()
        if a is None or a.status != "active":
            raise UserError(f"comparison {comparison_id} is not on lease to {annotator}")
        a.status = "skipped"

    store.write(run)


def skipped(store: Store, annotator: str, *, arena: bool = False) -> list[Item]:
    """The comparisons of the pool this annotator skipped, most recent first (as they were shown)."""
    with store.read() as session:
        rows = session.execute(select(Assignment, Comparison).join(Comparison, Comparison.id == Assignment.comparison_id)
                               .join(Annotator, Annotator.id == Assignment.annotator_id)
                               .where(Annotator.name == annotator, Assignment.status == "skipped",
                                      Comparison.arena == arena)
                               .order_by(Assignment.served_at.desc(), Assignment.id.desc())).all()
        return [_to_item(c, a) for a, c in rows]


def unskip(store: Store, annotator: str, comparison_id: int, *, overlap: int | None = None, now: float | None = None,
           arena: bool = False) -> Item:
    """Lease a comparison this annotator skipped to them again, sides as they saw them, while it still has a free
    slot (a gold item always has one); it is the item they hold from then on."""
    overlap = store.overlap if overlap is None else overlap
    check_id(comparison_id)

    def run(session: Session) -> Item:
        t = time.time() if now is None else now
        uid = annotator_id(store, session, annotator)
        _lock_annotator(store, session, uid)
        gold = _check_pool(store, session, comparison_id, arena, lock=True)
        a = session.scalars(select(Assignment).where(Assignment.comparison_id == comparison_id,
                                                     Assignment.annotator_id == uid)).one_or_none()
        if a is None or a.status != "skipped":
            raise UserError(f"comparison {comparison_id} is not one {annotator} skipped")
        taken = session.scalar(select(_occupied(t)).select_from(Comparison).where(Comparison.id == comparison_id))
        if taken >= overlap and not gold:
            raise UserError(f"comparison {comparison_id} has gone to other annotators since it was skipped")
        a.status, a.served_at, a.expires_at = "active", t, t + store.lease_seconds
        session.flush()
        return _to_item(session.get(Comparison, comparison_id), a)

    return store.write(run)


def undo_last_vote(store: Store, annotator: str, *, now: float | None = None, arena: bool = False) -> Item | None:
    """Delete the annotator's latest vote in the pool and lease that comparison to them again; None if none.
    A battle vote whose models were revealed to them (arena.reveal) is refused: it could follow the names."""

    def run(session: Session) -> Item | None:
        t = time.time() if now is None else now
        uid = annotator_id(store, session, annotator)
        _lock_annotator(store, session, uid)
        vote = session.scalars(select(Vote).join(Comparison, Comparison.id == Vote.comparison_id)
                               .where(Vote.annotator_id == uid, Comparison.arena == arena)
                               .order_by(Vote.created_at.desc(), Vote.id.desc()).limit(1)).first()
        if vote is None:
            return None
        if vote.revealed_at is not None:
            raise UserError(f"the models of battle {vote.comparison_id} were shown to {annotator}: "
                            f"a vote cannot be taken back after the reveal")
        a = session.get(Assignment, vote.assignment_id)
        session.execute(delete(Vote).where(Vote.id == vote.id))
        session.execute(update(Comparison).where(Comparison.id == vote.comparison_id)
                        .values(n_votes=Comparison.n_votes - 1))
        a.status, a.served_at, a.expires_at = "active", t, t + store.lease_seconds
        session.flush()
        return _to_item(session.get(Comparison, a.comparison_id), a)

    return store.write(run)


def progress(store: Store, annotator: str, *, overlap: int | None = None, now: float | None = None,
             arena: bool = False) -> Progress:
    """In the pool: votes done, comparisons this annotator could still be served (including one on lease), skips."""
    overlap = store.overlap if overlap is None else overlap
    t = time.time() if now is None else now
    # Battles: one per prompt can be served to them, so the prompts with an open battle are what remains.
    counted = func.count(func.distinct(Comparison.prompt_id)) if arena else func.count(Comparison.id)
    with store.read() as session:
        uid = session.scalar(select(Annotator.id).where(Annotator.name == annotator))
        if uid is None:  # never seen: nothing done, everything not yet full is open to them
            return Progress(0, session.scalar(select(counted).where(
                Comparison.arena == arena, Comparison.gold.is_(None), Comparison.n_votes < overlap,
                _occupied(t) < overlap)), 0)
        pool = Comparison.arena == arena
        done = session.scalar(select(func.count(Vote.id)).join(Comparison, Comparison.id == Vote.comparison_id)
                              .where(Vote.annotator_id == uid, pool))
        mine = select(func.count(Assignment.id)).join(Comparison, Comparison.id == Assignment.comparison_id) \
            .where(Assignment.annotator_id == uid, pool)
        skipped = session.scalar(mine.where(Assignment.status == "skipped"))
        held = session.scalar(mine.where(Assignment.status == "active", Assignment.expires_at > t))
        open_ = session.scalar(select(counted).where(_eligible(uid, overlap, t, arena)))
        return Progress(done, held + open_, skipped)


@dataclass(frozen=True)
class AnnotatorProgress:
    """One annotator's work so far, for the admin: votes per pool, skips, leases held now, the last vote."""

    annotator: str
    votes: int  # on ordinary comparisons, gold items not counted
    gold_votes: int
    arena_votes: int
    skipped: int
    on_lease: int  # unexpired leases now (at most one per pool)
    last_vote_at: float | None
    per_round: dict[int, int]  # votes on ordinary comparisons per loop round, where comparisons carry one


def team_progress(store: Store, *, now: float | None = None) -> list[AnnotatorProgress]:
    """Every annotator's progress (AnnotatorProgress), by name: one read of the votes and the assignments."""
    t = time.time() if now is None else now
    with store.read() as session:
        names = dict(session.execute(select(Annotator.id, Annotator.name)).all())
        votes = session.execute(select(Vote.annotator_id, Comparison.arena, Comparison.gold.is_not(None),
                                       Comparison.loop_round, func.count(Vote.id), func.max(Vote.created_at))
                                .join(Comparison, Comparison.id == Vote.comparison_id)
                                .group_by(Vote.annotator_id, Comparison.arena, Comparison.gold.is_not(None),
                                          Comparison.loop_round)).all()
        held = session.execute(select(Assignment.annotator_id, Assignment.status, func.count(Assignment.id))
                               .where(or_(Assignment.status == "skipped",
                                          and_(Assignment.status == "active", Assignment.expires_at > t)))
                               .group_by(Assignment.annotator_id, Assignment.status)).all()
    counts: dict[int, dict[str, Any]] = {uid: {"votes": 0, "gold_votes": 0, "arena_votes": 0, "skipped": 0,
                                              "on_lease": 0, "last_vote_at": None, "per_round": {}}
                                        for uid in names}
    for uid, arena, gold, round_, n, last in votes:
        c = counts[uid]
        pool = "arena_votes" if arena else "gold_votes" if gold else "votes"
        c[pool] += n
        c["last_vote_at"] = max(last, c["last_vote_at"] or last)
        if pool == "votes" and round_ is not None:
            c["per_round"][int(round_)] = c["per_round"].get(int(round_), 0) + n
    for uid, status, n in held:
        counts[uid]["skipped" if status == "skipped" else "on_lease"] += n
    return sorted((AnnotatorProgress(names[uid], **c) for uid, c in counts.items()), key=lambda p: p.annotator)
