"""The labeling app's handlers: plain functions over a Store, testable without Gradio.

Each returns a dataclass; the Gradio wiring in app.py maps it to component
updates. `user` is the logged-in annotator's name. Errors the annotator can
cause (an unknown choice, a comparison not assigned to them) are UserError.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.errors import UserError
from alignkit.store import Item, Store, next_item, progress, skip, submit_vote, undo_last_vote
from alignkit.store.agreement import agreement_report
from alignkit.store.export import export_dataset


@dataclass(frozen=True)
class ItemView:
    """What the labeling view shows: one comparison (or none left), progress and a status line."""

    comparison_id: int | None
    prompt_markdown: str
    left: str  # model text: shown in a text box, never as HTML
    right: str
    progress: str
    status: str = ""

    @property
    def done(self) -> bool:
        return self.comparison_id is None


@dataclass(frozen=True)
class AdminView:
    summary_markdown: str
    annotators: list[list[Any]] = field(default_factory=list)  # rows for a table
    pairs: list[list[Any]] = field(default_factory=list)


ANNOTATOR_COLUMNS = ["annotator", "votes", "tie rate", "both-bad rate", "left-side rate", "median seconds"]
PAIR_COLUMNS = ["annotator 1", "annotator 2", "shared", "agreement", "Cohen's kappa"]


def _progress_line(store: Store, user: str, overlap: int) -> str:
    p = progress(store, user, overlap=overlap)
    extra = f", {p.skipped} skipped" if p.skipped else ""
    return f"**{html.escape(user)}** — done {p.done}, remaining {p.remaining}{extra}"


def _view(store: Store, user: str, overlap: int, item: Item | None, status: str) -> ItemView:
    line = _progress_line(store, user, overlap)
    if item is None:
        return ItemView(None, "*Nothing left to label for you. Thank you!*", "", "", line, status)
    return ItemView(item.comparison_id, item.prompt_markdown, item.left, item.right, line, status)


def current_view(store: Store, user: str, *, overlap: int, status: str = "") -> ItemView:
    """The annotator's leased comparison (leasing a new one if they hold none)."""
    return _view(store, user, overlap, next_item(store, user, overlap=overlap), status)


def vote(store: Store, user: str, comparison_id: int | None, choice: str, rationale: str | None, *,
         overlap: int) -> ItemView:
    """Record a vote (choice as shown: a = left) and move on to the next comparison."""
    if comparison_id is None:
        return current_view(store, user, overlap=overlap, status="Nothing to vote on.")
    try:
        receipt = submit_vote(store, user, int(comparison_id), choice, rationale, overlap=overlap)
    except UserError as err:
        return current_view(store, user, overlap=overlap, status=f"Not saved: {err}")
    label = {"a": "A better", "b": "B better", "tie": "tie", "both_bad": "both bad"}[choice]
    return current_view(store, user, overlap=overlap,
                        status=f"Saved #{receipt.comparison_id}: {label} ({receipt.seconds:.0f} s).")


def skip_item(store: Store, user: str, comparison_id: int | None, *, overlap: int) -> ItemView:
    if comparison_id is None:
        return current_view(store, user, overlap=overlap)
    try:
        skip(store, user, int(comparison_id))
    except UserError as err:
        return current_view(store, user, overlap=overlap, status=f"Not skipped: {err}")
    return current_view(store, user, overlap=overlap, status=f"Skipped #{comparison_id}.")


def undo(store: Store, user: str, *, overlap: int) -> ItemView:
    item = undo_last_vote(store, user)
    if item is None:
        return current_view(store, user, overlap=overlap, status="No vote to undo.")
    return _view(store, user, overlap, item, f"Undid your vote on #{item.comparison_id}; vote again.")


def _fmt(x: Any, digits: int = 3) -> Any:
    if x is None:
        return "–"
    return round(x, digits) if isinstance(x, float) else x


def admin_view(store: Store) -> AdminView:
    r = agreement_report(store)
    fl = r["fleiss"]
    fleiss_text = (f"{_fmt(fl['kappa'])} over {fl['n_items']} comparisons with {fl['raters_per_item']} votes each"
                   if fl else "– (needs comparisons with 2+ votes)")
    o = r["overall"]
    summary = "\n".join([
        f"**{r['n_votes']}** votes on **{r['n_comparisons_voted']}** comparisons",
        f"- raw agreement: {_fmt(r['raw_agreement'])}",
        f"- Fleiss' kappa: {fleiss_text}",
        f"- tie rate: {_fmt(o['tie_rate'])}, both-bad rate: {_fmt(o['both_bad_rate'])}, "
        f"left-side rate: {_fmt(o['left_rate'])}",
    ])
    annotators = [[name, a["votes"], _fmt(a["tie_rate"]), _fmt(a["both_bad_rate"]), _fmt(a["left_rate"]),
                   _fmt(a["median_seconds"], 1)] for name, a in r["annotators"].items()]
    pairs = [[p["annotators"][0], p["annotators"][1], p["n"], _fmt(p["agreement"]), _fmt(p["kappa"])]
             for p in r["cohen"]]
    return AdminView(summary, annotators, pairs)


def admin_export(store: Store, out_dir: str | Path, *, min_agreement: float, ties: str, both_bad: str) -> str:
    try:
        s = export_dataset(store, out_dir, min_agreement=min_agreement, ties=ties, both_bad=both_bad)
    except UserError as err:
        return f"Export failed: {err}"
    return f"Exported {s['rows']} preference rows to `{s['out']}` (per reason: {s['per_reason']})."
