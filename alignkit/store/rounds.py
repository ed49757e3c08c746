"""Where a round of `alignkit loop` stands in the label store: its comparisons and their votes.

Comparisons carry the round that imported them (`Comparison.loop_round`, schema v4). A round's comparison
"has its votes" once it has `overlap` of them, the labeling server's rule for taking it out of the queue.
One read per function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import func, select

from alignkit.store.db import Store
from alignkit.store.models import Comparison, Response, Vote


@dataclass(frozen=True)
class RoundProgress:
    round: int
    comparisons: int  # the round's comparisons in the store (0: not imported yet)
    with_votes: int  # of them, those with `overlap` votes
    votes: int  # votes on the round's comparisons

    def needed(self, min_votes: float) -> int:
        """Comparisons with their votes the round needs before it trains: min_votes of them, rounded up."""
        return math.ceil(self.comparisons * min_votes - 1e-9)

    def has_its_votes(self, min_votes: float) -> bool:
        return self.comparisons > 0 and self.with_votes >= self.needed(min_votes)


def round_progress(store: Store, loop_round: int, overlap: int) -> RoundProgress:
    in_round = Comparison.loop_round == loop_round
    with store.read() as s:
        comparisons = s.scalar(select(func.count(Comparison.id)).where(in_round)) or 0
        with_votes = s.scalar(select(func.count(Comparison.id)).where(in_round, Comparison.n_votes >= overlap)) or 0
        votes = s.scalar(select(func.count(Vote.id)).join(Comparison, Comparison.id == Vote.comparison_id)
                         .where(in_round)) or 0
    return RoundProgress(loop_round, comparisons, with_votes, votes)


def round_models(store: Store, loop_round: int) -> set[str | None]:
    """The model specs that sampled a round's comparisons (a loop's are its own stage directories)."""
    with store.read() as s:
        return set(s.scalars(select(Response.model_spec).join(Comparison, Comparison.response_a_id == Response.id)
                             .where(Comparison.loop_round == loop_round).distinct()))


def imported_rounds(store: Store) -> set[int]:
    """The rounds that have comparisons in the store (an import is one transaction: all of a round or none)."""
    with store.read() as s:
        return set(s.scalars(select(Comparison.loop_round).where(Comparison.loop_round.is_not(None)).distinct()))
