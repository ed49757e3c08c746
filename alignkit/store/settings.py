"""Store-wide settings: the preference-strength scale, the per-criterion questions and the annotators' guidelines.

- `scale`: how many strength levels each side has. 1 (no setting) is the plain question: A, B, tie or both
  bad. 2 offers "much better / slightly better" per side; 4 Llama 2's "significantly better / better /
  slightly better / negligibly better". A vote for a side then carries its strength, 1 (weakest) .. scale;
  ties and both-bad carry none. The scale is set before the first vote and never changed after, so every
  vote of a store means the same thing.
- `criteria`: optional names of criteria (as Anthropic's HH data separated helpfulness and harmlessness): each
  pairwise item then asks one choice per criterion instead of one overall choice, and the vote's `choice` is
  COMBINE_RULE over its answers. Like the scale, set before the first vote and never changed after; criteria
  and a strength scale above 1 do not go together (an answer per criterion carries no strength).
- `guidelines`: markdown the app shows annotators (escaped like any text it shows).
"""

from __future__ import annotations

import json
import re
from collections import Counter

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from alignkit.errors import UserError
from alignkit.store.db import Store
from alignkit.store.models import Setting, Vote

SCALES = (1, 2, 4)
STRENGTH_LABELS = {1: [], 2: ["slightly", "much"], 4: ["negligibly", "slightly", "", "significantly"]}


def _get(session: Session, key: str) -> str | None:
    row = session.get(Setting, key)
    return None if row is None else row.value


def scale_in(session: Session) -> int:
    """The store's scale, inside a transaction that needs it (submit_vote checks each strength against it)."""
    return int(_get(session, "scale") or 1)


def scale(store: Store) -> int:
    with store.read() as s:
        return scale_in(s)


def _refuse_once_voted(session: Session, store: Store, now: str, setting: str) -> None:
    """A question setting changes only before the first vote: every vote of a store means the same thing."""
    votes = session.scalar(select(func.count(Vote.id)))
    if votes:
        raise UserError(f"{store.name} has {votes} votes {now}; its {setting} cannot change now "
                        f"(every vote of a store means the same thing)")


def set_scale(store: Store, levels: int) -> None:
    if levels not in SCALES:
        raise UserError(f"--scale {levels}: expected one of {', '.join(map(str, SCALES))} strength levels per side")

    def run(session: Session) -> None:
        current = scale_in(session)
        if current == levels:
            return
        _refuse_once_voted(session, store, f"at scale {current}", "scale")
        if levels > 1 and criteria_in(session):
            raise UserError(f"{store.name} asks per-criterion questions, which carry no strength: no scale with them")
        session.merge(Setting(key="scale", value=str(levels)))

    store.write(run)


CRITERION_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_CRITERIA = 8
COMBINE_RULE = ("the side (a or b) more criteria chose; as many for each side, or neither chosen, is a tie (dropped "
                "under the default ties policy); both bad only when every criterion says both bad")


def criteria_in(session: Session) -> list[str]:
    """The store's criteria in the order they are asked ([]: one overall choice per item)."""
    raw = _get(session, "criteria")
    return json.loads(raw) if raw else []


def criteria(store: Store) -> list[str]:
    with store.read() as s:
        return criteria_in(s)


def parse_criteria(text: str) -> list[str]:
    """`helpfulness,harmlessness` as a list; a bad name, a repeat or too many is a UserError naming it."""
    names = [n.strip() for n in text.split(",")]
    for name in names:
        if not CRITERION_NAME.fullmatch(name):
            raise UserError(f"--criteria {text!r}: criterion {name!r} is not a name (lowercase letters, digits and _, "
                            f"starting with a letter, at most 32)")
    repeated = [n for n, k in Counter(names).items() if k > 1]
    if repeated:
        raise UserError(f"--criteria {text!r}: {repeated[0]} is named twice")
    if len(names) > MAX_CRITERIA:
        raise UserError(f"--criteria {text!r}: at most {MAX_CRITERIA} criteria, got {len(names)}")
    return names


def set_criteria(store: Store, names: list[str]) -> None:
    def run(session: Session) -> None:
        current = criteria_in(session)
        if current == names:
            return
        _refuse_once_voted(session, store, f"with criteria {', '.join(current) or '(none)'}", "criteria")
        if names and scale_in(session) > 1:
            raise UserError(f"{store.name} has a strength scale; per-criterion questions carry no strength "
                            f"(use one or the other)")
        session.merge(Setting(key="criteria", value=json.dumps(names)))

    store.write(run)


def combine_criteria(answers: dict[str, str]) -> str:
    """COMBINE_RULE over one vote's canonical answers per criterion."""
    counts = Counter(answers.values())
    if counts["a"] != counts["b"]:
        return "a" if counts["a"] > counts["b"] else "b"
    if counts["both_bad"] == len(answers):
        return "both_bad"
    return "tie"


def guidelines(store: Store) -> str:
    with store.read() as s:
        return _get(s, "guidelines") or ""


def set_guidelines(store: Store, markdown: str) -> None:
    if not isinstance(markdown, str) or "\x00" in markdown:
        raise UserError("guidelines must be text without NUL characters")

    def run(session: Session) -> None:
        session.merge(Setting(key="guidelines", value=markdown))

    store.write(run)


def strength_label(side: str, strength: int, levels: int) -> str:
    """"A much better", "B slightly better", "A better" (the unqualified level of scale 4)."""
    word = STRENGTH_LABELS[levels][strength - 1]
    return f"{side} {word} better".replace("  ", " ")
