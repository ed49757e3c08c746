"""The label store's tables (SQLAlchemy 2 declarative models).

Timestamps are Unix seconds (float): they compare the same way on SQLite and
PostgreSQL, with no time-zone handling in SQL.

A comparison is an unordered pair of two responses to one prompt, stored with
`response_a_id < response_b_id`. A vote's `choice` is always in those canonical
terms (`a` = response_a won); `swapped` records whether the annotator saw
response_b on the left, so side bias can be measured.

A comparison with `arena` set is a blind battle between two models (sent by
`alignkit compare --judge human:DB`): it is served only in the app's Arena tab,
and its votes rate models rather than become training data.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

CHOICES = ("a", "b", "tie", "both_bad")


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1: a one-row table
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)


class Annotator(Base):
    __tablename__ = "annotators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    # Schema v3: an admin left this annotator's votes out of every export (nothing is deleted).
    excluded: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())


class Prompt(Base):
    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # sha256 of the canonical JSON of the prompt: importing the same prompt twice reuses the row.
    key: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    # JSON: a string (plain prompt) or a list of {"role", "content"} messages.
    content_json: Mapped[str] = mapped_column(Text, nullable=False)
    source: Mapped[str | None] = mapped_column(String(500))  # file:line it came from
    created_at: Mapped[float] = mapped_column(Float, nullable=False)

    @property
    def content(self) -> Any:
        return json.loads(self.content_json)


class Response(Base):
    __tablename__ = "responses"
    __table_args__ = (UniqueConstraint("prompt_id", "key", name="uq_response_prompt_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), nullable=False, index=True)
    key: Mapped[str] = mapped_column(String(64), nullable=False)  # sha256 of the text
    text: Mapped[str] = mapped_column(Text, nullable=False)
    model_spec: Mapped[str | None] = mapped_column(String(1000))  # None: imported with no model named
    sampling_json: Mapped[str | None] = mapped_column(Text)  # SamplingParams.to_dict() as JSON
    created_at: Mapped[float] = mapped_column(Float, nullable=False)


class Comparison(Base):
    """A pair of responses to one prompt.

    `n_votes` is the number of votes on it, kept in the same transaction as every vote
    insert and delete. It is stored only so the queue can skip full comparisons through
    an index instead of counting the votes of every comparison on every request.

    `arena`: a battle between two models (schema v2), served only to the arena pool.
    `gold`: a gold item (schema v3): its known answer, to measure annotators by.
    `loop_round`, `source_stage`, `selection_score` (schema v4): where a round of `alignkit loop` put it.
    """

    __tablename__ = "comparisons"
    __table_args__ = (
        UniqueConstraint("response_a_id", "response_b_id", name="uq_comparison_pair"),
        CheckConstraint("response_a_id < response_b_id", name="ck_comparison_order"),
        # Every queue query picks one pool (arena or not) and skips full comparisons.
        Index("ix_comparison_open", "arena", "n_votes", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), nullable=False, index=True)
    response_a_id: Mapped[int] = mapped_column(ForeignKey("responses.id"), nullable=False)
    response_b_id: Mapped[int] = mapped_column(ForeignKey("responses.id"), nullable=False)
    n_votes: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    # Last, where the v1 -> v2 migration's ALTER TABLE puts it: both stores have one schema.
    arena: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    # Schema v3: a gold item's known answer in canonical terms ("a": response_a is right), None for every other
    # comparison. Gold items are served to every annotator (no overlap) and never exported.
    gold: Mapped[str | None] = mapped_column(String(8))
    # Schema v4: a comparison `alignkit loop` chose for a round: the round, the stage whose samples it pairs, and
    # the selection score it was chosen by (how unsure the reward ensemble was; None where chosen at random).
    loop_round: Mapped[int | None] = mapped_column(Integer)
    source_stage: Mapped[str | None] = mapped_column(String(500))
    selection_score: Mapped[float | None] = mapped_column(Float)
    # Schema v5: a ranking task (`label import --rank`; None for a pair): the JSON list of its K >= 3 response
    # ids, ranked in one vote; response_a / response_b are its two lowest ids.
    ranking_json: Mapped[str | None] = mapped_column(Text)

    prompt: Mapped[Prompt] = relationship(lazy="joined")
    response_a: Mapped[Response] = relationship(foreign_keys=[response_a_id], lazy="joined")
    response_b: Mapped[Response] = relationship(foreign_keys=[response_b_id], lazy="joined")


class Assignment(Base):
    """A lease: comparison C is being labeled by annotator U until expires_at.

    status: `active` (leased, no vote yet; counts toward the overlap while
    unexpired), `done` (voted), `skipped` (the annotator passed; never served to
    them again). One row per (comparison, annotator) ever: an annotator is never
    served the same comparison twice.
    """

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("comparison_id", "annotator_id", name="uq_assignment_once"),
        CheckConstraint("status IN ('active', 'done', 'skipped')", name="ck_assignment_status"),
        Index("ix_assignment_slots", "comparison_id", "status", "expires_at"),
        Index("ix_assignment_annotator", "annotator_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), nullable=False)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    swapped: Mapped[bool] = mapped_column(Boolean, nullable=False)  # response_b shown on the left (as "A")
    served_at: Mapped[float] = mapped_column(Float, nullable=False)
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)


class Vote(Base):
    __tablename__ = "votes"
    __table_args__ = (
        UniqueConstraint("comparison_id", "annotator_id", name="uq_vote_once"),
        CheckConstraint("choice IN ('a', 'b', 'tie', 'both_bad')", name="ck_vote_choice"),
        Index("ix_vote_annotator_created", "annotator_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), nullable=False, index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), nullable=False)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), nullable=False)
    choice: Mapped[str] = mapped_column(String(16), nullable=False)  # canonical: a = comparison.response_a
    swapped: Mapped[bool] = mapped_column(Boolean, nullable=False)  # side order the annotator saw
    rationale: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float] = mapped_column(Float, nullable=False)  # from serving to the vote
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    # Schema v3: how much better the chosen side is, 1..scale, on a store with a preference-strength scale.
    strength: Mapped[int | None] = mapped_column(Integer)
    # Schema v5: when an arena vote's models were shown to its annotator (None: not yet; until then it can be
    # taken back). A ranking vote's order as JSON tie groups of response ids best first (its `choice`: what it
    # says of response_a against response_b); a vote on a store with criteria, its answers as JSON
    # {criterion: canonical choice} (its `choice`: COMBINE_RULE over them). None otherwise.
    revealed_at: Mapped[float | None] = mapped_column(Float)
    ranking_json: Mapped[str | None] = mapped_column(Text)
    criteria_json: Mapped[str | None] = mapped_column(Text)


class Adjudication(Base):
    """Schema v5: an admin's ruling on a comparison the annotators disagreed on; export takes it over the votes."""

    __tablename__ = "adjudications"
    __table_args__ = (CheckConstraint("choice IN ('a', 'b', 'tie', 'both_bad')", name="ck_adjudication_choice"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), nullable=False, unique=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), nullable=False)  # the admin
    choice: Mapped[str] = mapped_column(String(16), nullable=False)  # canonical: a = comparison.response_a
    strength: Mapped[int | None] = mapped_column(Integer)
    rationale: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)


class Setting(Base):
    """Store-wide settings (schema v3): `scale` (preference-strength levels per side; absent: none),
    `criteria` (a JSON list of names; absent: one overall choice), `guidelines` (markdown for annotators)."""

    __tablename__ = "store_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)
