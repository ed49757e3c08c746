"""Store-wide settings: the preference-strength scale and the annotators' guidelines.

- `scale`: how many strength levels each side has. 1 (no setting) is the plain question: A, B, tie or both
  bad. 2 offers "much better / slightly better" per side; 4 Llama 2's "significantly better / better /
  slightly better / negligibly better". A vote for a side then carries its strength, 1 (weakest) .. scale;
  ties and both-bad carry none. The scale is set before the first vote and never changed after, so every
  vote of a store means the same thing.
- `guidelines`: markdown the app shows annotators (escaped like any text it shows).
"""

from __future__ import annotations

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


def set_scale(store: Store, levels: int) -> None:
    if levels not in SCALES:
        raise UserError(f"--scale {levels}: expected one of {', '.join(map(str, SCALES))} strength levels per side")

    def run(session: Session) -> None:
        current = scale_in(session)
        if current == levels:
            return
        votes = session.scalar(select(func.count(Vote.id)))
        if votes:
            raise UserError(f"{store.name} has {votes} votes at scale {current}; its scale cannot change now "
                            f"(every vote of a store means the same thing)")
        session.merge(Setting(key="scale", value=str(levels)))

    store.write(run)


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
