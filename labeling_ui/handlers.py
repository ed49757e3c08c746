"""The labeling app's handlers: plain functions over a Store, testable without Gradio.

Each returns a dataclass; the Gradio wiring in app.py maps it to component
updates. `user` is the logged-in annotator's name. Errors the annotator can
cause (an unknown choice, a comparison not assigned to them) are UserError.
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit import stats
from alignkit.errors import UserError
from alignkit.store import (Item, Store, next_item, progress, skip, skipped, submit_ranking, submit_vote,
                            undo_last_vote, unskip)
from alignkit.store.agreement import adjudicate, agreement_report, disagreements
from alignkit.store.arena import (LeaderboardCache, arena_battles, arena_vote_state, battle_vote, reveal,
                                  summarise_votes)
from alignkit.store.export import excluded_annotators, export_dataset, set_excluded
from alignkit.store.queue import prompt_as_markdown, team_progress
from labeling_ui.users import UsersFile, add_user, check_name, is_disabled, set_user

CHOICE_LABELS = {"a": "A better", "b": "B better", "tie": "tie", "both_bad": "both bad"}


@dataclass(frozen=True)
class VoteOption:
    """One vote button: the choice as shown (a = left), its strength on a scaled store, its label."""

    choice: str
    strength: int | None
    label: str

    @property
    def elem_suffix(self) -> str:
        return self.choice.replace("_", "-") + (f"-{self.strength}" if self.strength else "")


def vote_options(levels: int) -> list[VoteOption]:
    """The Label tab's buttons, left to right: A strongest .. weakest, tie, B weakest .. strongest, both bad;
    on an unscaled store (levels 1) A better, B better, tie, both bad."""
    from alignkit.store.settings import strength_label

    if levels == 1:
        return [VoteOption(c, None, text) for c, text in
                (("a", "A better"), ("b", "B better"), ("tie", "Tie"), ("both_bad", "Both bad"))]
    a_side = [VoteOption("a", k, strength_label("A", k, levels)) for k in range(levels, 0, -1)]
    b_side = [VoteOption("b", k, strength_label("B", k, levels)) for k in range(1, levels + 1)]
    return [*a_side, VoteOption("tie", None, "Tie"), *b_side, VoteOption("both_bad", None, "Both bad")]


def key_of(position: int) -> str:
    """Keys 1..9, then 0, for the buttons in order."""
    return str((position + 1) % 10)
LEADERBOARD_BOOTSTRAP = 200  # rounds: a refit per round, so a click costs a fraction of a second


@dataclass(frozen=True)
class ItemView:
    """What the labeling view shows: one comparison (or none left), progress and a status line.

    `prompt`, `left` and `right` are the texts as stored (the prompt a string or chat messages); the app
    renders them with labeling_ui.render, which never interprets them. `refused`: the action was not
    carried out, so what the annotator typed (the rationale, ranks, answers) stays. `ranking`: a ranking
    task's responses in the order shown (left and right are its first two)."""

    comparison_id: int | None
    prompt: Any
    left: str
    right: str
    progress: str
    status: str = ""
    refused: bool = False
    ranking: tuple[str, ...] = ()

    @property
    def is_ranking(self) -> bool:
        return bool(self.ranking)

    @property
    def done(self) -> bool:
        return self.comparison_id is None

    @property
    def prompt_markdown(self) -> str:
        """The prompt as markdown source, or the notice when nothing is left."""
        return prompt_as_markdown(self.prompt)


@dataclass(frozen=True)
class AdminView:
    summary_markdown: str
    annotators: list[list[Any]] = field(default_factory=list)  # rows for a table
    pairs: list[list[Any]] = field(default_factory=list)


ANNOTATOR_COLUMNS = ["annotator", "votes", "tie rate", "both-bad rate", "left-side rate", "median seconds",
                     "gold accuracy", "kappa vs others", "in exports", "flags"]
PAIR_COLUMNS = ["annotator 1", "annotator 2", "shared", "agreement", "Cohen's kappa"]


def progress_html(user: str, done: int, remaining: int, extra: str = "", *, unit: str = "done") -> str:
    """A progress bar with its counts (escaped: the user name is the only text from outside)."""
    total = done + remaining
    return (f'<div class="ak-progress"><b>{html.escape(user)}</b> — {unit} {done}, remaining {remaining}{extra}'
            f'<progress value="{done}" max="{max(total, 1)}" aria-label="progress"></progress></div>')


def _progress_line(store: Store, user: str, overlap: int) -> str:
    p = progress(store, user, overlap=overlap)
    return progress_html(user, p.done, p.remaining, f", {p.skipped} skipped" if p.skipped else "")


def skipped_choices(store: Store, user: str) -> list[tuple[str, int]]:
    """(label, comparison id) of the items this annotator skipped, for a picker: the prompt's first words."""
    out = []
    for item in skipped(store, user):
        words = " ".join(item.prompt_text.split())
        out.append((f"#{item.comparison_id}: {words[:60]}{'…' if len(words) > 60 else ''}", item.comparison_id))
    return out


def unskip_item(store: Store, user: str, comparison_id: int | None, *, overlap: int) -> ItemView:
    """Bring back a skipped item: it is the one on screen from now on."""
    if comparison_id is None:
        return current_view(store, user, overlap=overlap, status="Choose a skipped item first.", refused=True)
    try:
        item = unskip(store, user, int(comparison_id), overlap=overlap)
    except UserError as err:
        return current_view(store, user, overlap=overlap, status=f"Not brought back: {err}", refused=True)
    return _view(store, user, overlap, item, f"Brought back #{item.comparison_id}.")


NOTHING_LEFT = "Nothing left to label for you. Thank you!"
NO_BATTLES_LEFT = "No battles left for you. Thank you!"


def _view(store: Store, user: str, overlap: int, item: Item | None, status: str, refused: bool = False) -> ItemView:
    line = _progress_line(store, user, overlap)
    if item is None:
        return ItemView(None, NOTHING_LEFT, "", "", line, status, refused)
    return ItemView(item.comparison_id, item.prompt, item.left, item.right, line, status, refused, item.ranking)


def current_view(store: Store, user: str, *, overlap: int, status: str = "", refused: bool = False) -> ItemView:
    """The annotator's leased comparison (leasing a new one if they hold none)."""
    return _view(store, user, overlap, next_item(store, user, overlap=overlap), status, refused)


def shown_id(value: Any) -> int | None:
    """The comparison id the page had on screen, as its hidden field sends it ("" when none)."""
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"comparison id must be an integer, got {value!r}") from None


def vote(store: Store, user: str, comparison_id: int | None, choice: str, rationale: str | None, *,
         overlap: int, min_display_seconds: float = 0.0, strength: int | None = None) -> ItemView:
    """Record a vote on the comparison that was on screen (choice as shown: a = left), then show the next.

    A refused vote (too soon, already voted, not leased) changes nothing and keeps the rationale."""
    if comparison_id is None:
        return current_view(store, user, overlap=overlap, status="Nothing to vote on.", refused=True)
    try:
        receipt = submit_vote(store, user, int(comparison_id), choice, rationale, overlap=overlap,
                              min_display_seconds=min_display_seconds, strength=strength)
    except UserError as err:
        return current_view(store, user, overlap=overlap, status=f"Not saved: {err}", refused=True)
    label = CHOICE_LABELS[choice] + (f" (strength {strength})" if strength else "")
    return current_view(store, user, overlap=overlap,
                        status=f"Saved #{receipt.comparison_id}: {label} ({receipt.seconds:.0f} s).")


def _unanswered(values: list[Any]) -> list[int]:
    """The 1-based positions of the questions on screen with no answer picked."""
    return [i + 1 for i, v in enumerate(values) if v is None or v == ""]


def ranking_vote(store: Store, user: str, comparison_id: int | None, ranks: list[Any], rationale: str | None, *,
                 overlap: int, min_display_seconds: float = 0.0) -> ItemView:
    """Record the ranking on screen: the rank picked for each response as shown (1 = best, equal ranks tie), then
    show the next item. A response with no rank, or a refused vote, changes nothing and keeps the ranks."""
    if comparison_id is None:
        return current_view(store, user, overlap=overlap, status="Nothing to rank.", refused=True)
    missing = _unanswered(ranks)
    if missing:
        return current_view(store, user, overlap=overlap, refused=True,
                            status=f"Not saved: give response {', '.join(map(str, missing))} a rank first.")
    try:
        receipt = submit_ranking(store, user, int(comparison_id), [int(r) for r in ranks], rationale,
                                 overlap=overlap, min_display_seconds=min_display_seconds)
    except (UserError, ValueError) as err:
        return current_view(store, user, overlap=overlap, status=f"Not saved: {err}", refused=True)
    shown = ", ".join(f"{i + 1}→{r}" for i, r in enumerate(ranks))
    return current_view(store, user, overlap=overlap,
                        status=f"Saved #{receipt.comparison_id}: ranks {shown} ({receipt.seconds:.0f} s).")


def answers_vote(store: Store, user: str, comparison_id: int | None, criteria: list[str], answers: list[Any],
                 rationale: str | None, *, overlap: int, min_display_seconds: float = 0.0) -> ItemView:
    """Record one choice per criterion (as shown: a = left) on the pair on screen, then show the next."""
    if comparison_id is None:
        return current_view(store, user, overlap=overlap, status="Nothing to vote on.", refused=True)
    missing = _unanswered(answers)
    if missing:
        names = ", ".join(criteria[i - 1] for i in missing)
        return current_view(store, user, overlap=overlap, refused=True, status=f"Not saved: answer {names} first.")
    try:
        receipt = submit_vote(store, user, int(comparison_id), None, rationale, overlap=overlap,
                              min_display_seconds=min_display_seconds, answers=dict(zip(criteria, answers)))
    except UserError as err:
        return current_view(store, user, overlap=overlap, status=f"Not saved: {err}", refused=True)
    shown = ", ".join(f"{name} {CHOICE_LABELS[a]}" for name, a in zip(criteria, answers))
    return current_view(store, user, overlap=overlap,
                        status=f"Saved #{receipt.comparison_id}: {shown} ({receipt.seconds:.0f} s).")


def skip_item(store: Store, user: str, comparison_id: int | None, *, overlap: int) -> ItemView:
    if comparison_id is None:
        return current_view(store, user, overlap=overlap)
    try:
        skip(store, user, int(comparison_id))
    except UserError as err:
        return current_view(store, user, overlap=overlap, status=f"Not skipped: {err}", refused=True)
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
    arena = f" ({r['n_arena_votes']} of them on arena battles)" if r["n_arena_votes"] else ""
    summary = "\n".join([
        f"**{r['n_votes']}** votes on **{r['n_comparisons_voted']}** comparisons{arena}",
        f"- raw agreement: {_fmt(r['raw_agreement'])}",
        f"- Fleiss' kappa: {fleiss_text}",
        f"- tie rate: {_fmt(o['tie_rate'])}, both-bad rate: {_fmt(o['both_bad_rate'])}, "
        f"left-side rate: {_fmt(o['left_rate'])}",
    ])
    annotators = [[name, a["votes"], _fmt(a["tie_rate"]), _fmt(a["both_bad_rate"]), _fmt(a["left_rate"]),
                   _fmt(a["median_seconds"], 1),
                   "–" if a["gold_accuracy"] is None else f"{a['gold_accuracy']:.2f} of {a['gold_votes']}",
                   _fmt(a["kappa_vs_others"]), "no (excluded)" if a["excluded"] else "yes",
                   "; ".join(a["flags"]) or "–"] for name, a in r["annotators"].items()]
    pairs = [[p["annotators"][0], p["annotators"][1], p["n"], _fmt(p["agreement"]), _fmt(p["kappa"])]
             for p in r["cohen"]]
    return AdminView(summary, annotators, pairs)


def admin_exclude(store: Store, name: str | None, excluded: bool) -> str:
    """Leave an annotator's votes out of exports (or take them in again): the admin tab's status line."""
    if not name:
        return "Choose an annotator first."
    try:
        set_excluded(store, name, excluded)
    except UserError as err:
        return f"Not changed: {err}"
    now = excluded_annotators(store)
    what = "left out of exports" if excluded else "in exports again"
    return f"{html.escape(name)}: votes {what}. Excluded now: {html.escape(', '.join(now)) or 'nobody'}."


def admin_export(store: Store, out_dir: str | Path, *, min_agreement: float, ties: str, both_bad: str,
                 min_votes: Any = 1) -> str:
    """Export (the admin tab's button): the status line, with the policy used; the zip is then downloadable."""
    try:
        s = export_as_admin(store, out_dir, min_agreement=min_agreement, ties=ties, both_bad=both_bad,
                            min_votes=min_votes)
    except UserError as err:
        return f"Export failed: {err}"
    p = s["policy"]
    return (f"Exported {s['rows']} preference rows (comparisons per reason: {s['per_reason']}). Policy: minimum "
            f"agreement {p['min_agreement']}, ties {p['ties']}, both bad {p['both_bad']}, minimum votes "
            f"{p['min_votes']}; excluded: {', '.join(p['excluded_annotators']) or 'nobody'}. "
            f"Download it below (a zip of the dataset directory, preferences.jsonl and export.json).")


def export_as_admin(store: Store, out_dir: str | Path, *, min_agreement: Any, ties: str, both_bad: str,
                    min_votes: Any = 1) -> dict[str, Any]:
    """export_dataset with the values an admin's form sends (a Number box sends floats)."""
    if isinstance(min_votes, float) and min_votes.is_integer():
        min_votes = int(min_votes)
    return export_dataset(store, out_dir, min_agreement=min_agreement, ties=ties, both_bad=both_bad,
                          min_votes=min_votes)


DOWNLOAD_HTML = ('<a class="ak-download" href="alignkit/export.zip" download>'
                 'Download the latest export (zip)</a>')


def download_html(out_dir: str | Path) -> str:
    """The download link, once there is an export to download (our own markup: nothing from outside)."""
    return DOWNLOAD_HTML if (Path(out_dir) / "export.json").is_file() else ""


# ---------------------------------------------------------------------------
# Admin: progress per annotator, user management
# ---------------------------------------------------------------------------


PROGRESS_COLUMNS = ["annotator", "votes", "gold votes", "arena votes", "skipped", "on lease", "last vote"]


@dataclass(frozen=True)
class ProgressTable:
    columns: list[str]
    rows: list[list[Any]]


def progress_table(store: Store, *, now: float | None = None) -> ProgressTable:
    """Work per annotator; with a column per loop round (votes in it) once any voted comparison carries one."""
    team = team_progress(store, now=now)
    rounds = sorted({r for p in team for r in p.per_round})
    t = time.time() if now is None else now
    rows = [[p.annotator, p.votes, p.gold_votes, p.arena_votes, p.skipped, p.on_lease, _ago(p.last_vote_at, t),
             *(p.per_round.get(r, 0) for r in rounds)] for p in team]
    return ProgressTable([*PROGRESS_COLUMNS, *(f"round {r}" for r in rounds)], rows)


def _ago(at: float | None, now: float) -> str:
    if at is None:
        return "–"
    s = max(0, int(now - at))
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago" if s < 7200 else f"{s // 3600} h ago"


USER_COLUMNS = ["user", "admin", "can log in"]
USER_ACTIONS = ("add", "reset_password", "disable", "enable", "make_admin", "remove_admin")


def user_rows(auth: UsersFile | None) -> list[list[Any]]:
    if auth is None:
        return []
    return [[name, "yes" if rec.get("admin") else "no", "no (disabled)" if is_disabled(rec) else "yes"]
            for name, rec in sorted(auth.everyone().items())]


def manage_user(auth: UsersFile | None, actor: str, action: str, name: str, password: str = "", *,
                admin: bool = False) -> str:
    """One change to the users file by an admin (`actor`); what was done, as a line. UserError when refused.

    The file is written as `alignkit label add-user` writes it (locked, atomically); the server reads it again
    at once, so a disabled or re-passworded user's sessions end now. An admin cannot disable or demote
    themselves: another admin must, so a server never loses its last admin by a slip."""
    if auth is None:
        raise UserError("this server runs with --no-auth: there is no users file to change")
    if action not in USER_ACTIONS:
        raise UserError(f"unknown action {action!r}: expected one of {', '.join(USER_ACTIONS)}")
    name = check_name((name or "").strip())
    known = name in auth.everyone()
    if action == "add" and known:
        raise UserError(f"{name} already exists: reset their password instead")
    if action != "add" and not known:
        raise UserError(f"no user {name!r}")
    if name == actor and action in ("disable", "remove_admin"):
        raise UserError("you cannot disable yourself or remove your own admin role: another admin can")
    if action in ("add", "reset_password"):
        add_user(auth.path, name, password or "", admin=bool(admin) if action == "add" else None)
    else:
        set_user(auth.path, name, disabled={"disable": True, "enable": False}.get(action),
                 admin={"make_admin": True, "remove_admin": False}.get(action))
    auth.users()  # read the new file now: ends the sessions it revokes
    done = {"add": "added" + (" (admin)" if admin else ""), "reset_password": "has a new password",
            "disable": "disabled: cannot log in, sessions ended", "enable": "can log in again",
            "make_admin": "is an admin", "remove_admin": "is no longer an admin"}[action]
    return f"{name} {done}."


# ---------------------------------------------------------------------------
# Arena: blind battles between models, names revealed after the vote
# ---------------------------------------------------------------------------


def markdown_text(s: str) -> str:
    """`s` shown literally inside markdown: every ASCII punctuation mark backslash-escaped (no HTML, no
    formatting), for text we do not control, such as model names."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", s)


@dataclass(frozen=True)
class ArenaView(ItemView):
    """The Arena tab: one battle (or none left); after a vote, the vote (which can be taken back until the reveal),
    then the models behind A and B."""

    choice: str | None = None  # this annotator's vote, as shown (a = left), once they voted on this battle
    model_left: str | None = None  # None until the models were revealed to this annotator
    model_right: str | None = None

    @property
    def revealed(self) -> bool:
        return self.model_left is not None

    @property
    def voted(self) -> bool:
        return self.choice is not None

    @property
    def reveal_markdown(self) -> str:
        if not self.voted:
            return ""
        if not self.revealed:
            return (f"You voted: **{CHOICE_LABELS[self.choice]}**. You can take it back (**Undo vote**, `u`) "
                    f"until you reveal the models (**Reveal models**, `r`).")
        return (f"A was **{markdown_text(self.model_left)}**, B was **{markdown_text(self.model_right)}** "
                f"(you voted: {CHOICE_LABELS[self.choice]}).")


def _arena_progress(store: Store, user: str, overlap: int) -> str:
    p = progress(store, user, overlap=overlap, arena=True)
    return progress_html(user, p.done, p.remaining, unit="battles judged")


def arena_skip(store: Store, user: str, comparison_id: int | None, *, overlap: int) -> ArenaView:
    """Pass on the battle on screen (never served to this annotator again), then show the next."""
    if comparison_id is None:
        return arena_view(store, user, overlap=overlap)
    try:
        skip(store, user, int(comparison_id), arena=True)
    except UserError as err:
        return arena_view(store, user, overlap=overlap, status=f"Not skipped: {err}", refused=True)
    return arena_view(store, user, overlap=overlap, status=f"Skipped #{comparison_id}.")


def arena_view(store: Store, user: str, *, overlap: int, status: str = "", refused: bool = False) -> ArenaView:
    """The annotator's leased battle (leasing a new one if they hold none), without model names."""
    item = next_item(store, user, overlap=overlap, arena=True)
    line = _arena_progress(store, user, overlap)
    if item is None:
        return ArenaView(None, NO_BATTLES_LEFT, "", "", line, status, refused)
    return ArenaView(item.comparison_id, item.prompt, item.left, item.right, line, status, refused)


def _voted(store: Store, user: str, comparison_id: int, overlap: int, status: str) -> ArenaView | None:
    """The battle with `user`'s vote (and its models, once revealed to them); None before they voted on it."""
    try:
        r = battle_vote(store, user, comparison_id)
    except UserError:
        return None
    return _arena_vote_view(store, user, overlap, r, status)


def _arena_vote_view(store: Store, user: str, overlap: int, r, status: str) -> ArenaView:
    return ArenaView(r.comparison_id, r.prompt, r.left, r.right, _arena_progress(store, user, overlap), status,
                     False, choice=r.choice, model_left=r.model_left, model_right=r.model_right)


def arena_vote(store: Store, user: str, comparison_id: int | None, choice: str, *, overlap: int,
               min_display_seconds: float = 0.0) -> ArenaView:
    """Record a vote on the battle that was on screen (choice as shown: a = left), then show the same battle with
    the vote, not yet the models: it can be taken back until the annotator reveals them. A refused vote on a
    battle already voted shows that battle's state again."""
    if comparison_id is None:
        return arena_view(store, user, overlap=overlap, status="Nothing to vote on.", refused=True)
    try:
        submit_vote(store, user, int(comparison_id), choice, overlap=overlap, arena=True,
                    min_display_seconds=min_display_seconds)
    except UserError as err:
        return (_voted(store, user, int(comparison_id), overlap, f"Not saved: {err}")
                or arena_view(store, user, overlap=overlap, status=f"Not saved: {err}", refused=True))
    return _voted(store, user, int(comparison_id), overlap, f"Saved #{comparison_id}.")


def arena_reveal(store: Store, user: str, comparison_id: int | None, *, overlap: int) -> ArenaView:
    """Name the models of the battle on screen, which this annotator voted on; from now on the vote stays."""
    if comparison_id is None:
        return arena_view(store, user, overlap=overlap, status="Vote first.", refused=True)
    try:
        r = reveal(store, user, int(comparison_id))
    except UserError as err:
        return arena_view(store, user, overlap=overlap, status=f"Not revealed: {err}", refused=True)
    return _arena_vote_view(store, user, overlap, r, "")


def arena_undo(store: Store, user: str, *, overlap: int) -> ArenaView:
    """Take back this annotator's latest battle vote (before its reveal): the battle is theirs to vote on again."""
    try:
        item = undo_last_vote(store, user, arena=True)
    except UserError as err:
        return arena_view(store, user, overlap=overlap, status=f"Not undone: {err}", refused=True)
    if item is None:
        return arena_view(store, user, overlap=overlap, status="No battle vote to undo.")
    return ArenaView(item.comparison_id, item.prompt, item.left, item.right, _arena_progress(store, user, overlap),
                     f"Undid your vote on #{item.comparison_id}; vote again.")


def arena_redisplay(store: Store, user: str, comparison_id: int | None, *, overlap: int) -> ArenaView:
    """The battle on screen again (after the display mode changed): its vote once voted, else the lease."""
    shown = None if comparison_id is None else _voted(store, user, comparison_id, overlap, "")
    return shown or arena_view(store, user, overlap=overlap)


@dataclass(frozen=True)
class Leaderboard:
    """Ratings from every vote on an arena battle: Bradley–Terry on the Elo scale with bootstrap CIs.

    Computed by alignkit.store.arena.summarise_votes, as `alignkit compare --collect` computes its results,
    so both agree on the same votes. A battle is one comparison of two models' responses; each counts once
    however many people voted on it (a vote weighs 1/(votes on it)), and the bootstrap resamples prompts.
    `votes`, `wins`, `losses` and `ties` count raw votes.
    """

    votes: int  # votes rated
    battles: int  # battles with at least one rated vote
    models: list[dict[str, Any]]  # rated models best first: model, rating, ci_low, ci_high, battles, votes, wins, ...
    pairs: list[dict[str, Any]]  # model_a, model_b, wins/losses/ties of model_a, n (votes), battles, units, win_rate, CI
    bootstrap: int
    warning: str | None = None  # no votes yet, models not rated yet, stats.Connectivity.warning
    without_votes: int = 0  # battles sent that nobody has voted on yet

    def model_rows(self) -> list[list[Any]]:
        return [[i + 1, m["model"], round(m["rating"], 1), "[–]" if m["ci_low"] is None else f"[{m['ci_low']:.1f}, {m['ci_high']:.1f}]", m["battles"],
                 m["votes"], m["wins"], m["losses"], m["ties"]] for i, m in enumerate(self.models)]

    def pair_rows(self) -> list[list[Any]]:
        return [[p["model_a"], p["model_b"], p["battles"], p["n"], round(p["win_rate"], 3),
                 f"[{p['ci_low']:.3f}, {p['ci_high']:.3f}]"] for p in self.pairs]

    @property
    def summary_markdown(self) -> str:
        if not self.models:
            waiting = f" ({self.without_votes} waiting)" if self.without_votes else ""
            return f"*No votes on arena battles yet{waiting}.*"
        text = (f"**{self.votes}** votes on **{self.battles}** arena battles, **{len(self.models)}** models rated. "
                f"Bradley–Terry ratings on the Elo scale (1000 = average) with 95% CIs that resample prompts "
                f"({self.bootstrap} rounds); each battle counts once however many people voted on it (win rates "
                f"too); ties and both-bad count as ties.")
        if self.without_votes:
            text += f" {self.without_votes} battles have no vote yet."
        if self.warning:
            text += f"\n\n**Warning:** {markdown_text(self.warning)}"
        return text


LEADERBOARD_COLUMNS = ["rank", "model", "rating", "95% CI", "battles", "votes", "wins", "losses", "ties"]
LEADERBOARD_PAIR_COLUMNS = ["model A", "model B", "battles", "votes", "win rate of A", "95% CI"]


def leaderboard(store: Store, *, bootstrap: int = LEADERBOARD_BOOTSTRAP, seed: int = 0,
                cache: LeaderboardCache | None = None) -> Leaderboard:
    """Ratings, CIs, counts per model and win rates per pair, from all votes on arena battles.

    With `cache` (one per app), the result is reused until an arena vote is cast or undone: the
    bootstrap refits take seconds, and every annotator can ask.
    """
    if bootstrap < stats.MIN_BOOTSTRAP:
        raise UserError(f"bootstrap must be >= {stats.MIN_BOOTSTRAP}, got {bootstrap}")
    if cache is not None:
        key = (arena_vote_state(store), bootstrap, seed)
        return cache.get(key, lambda: leaderboard(store, bootstrap=bootstrap, seed=seed))
    s = summarise_votes(arena_battles(store), bootstrap=bootstrap, seed=seed)
    # Models nobody has voted on yet have no rating to rank; the warning names them.
    rated = [m for m in s.models if m["rating"] is not None]
    return Leaderboard(s.votes, s.battles, rated, s.pairs, bootstrap, s.warning, s.without_votes)


# ---------------------------------------------------------------------------
# Admin: disagreement review
# ---------------------------------------------------------------------------


def disagreement_choices(store: Store) -> list[tuple[str, int]]:
    """(label, comparison id) of the comparisons that split most, for the review's picker."""
    out = []
    for d in disagreements(store):
        words = " ".join(prompt_as_markdown(d.prompt).split())
        ruled = f", ruled {CHOICE_LABELS[d.adjudication]}" if d.adjudication else ""
        out.append((f"#{d.comparison_id}: {d.disagreement:.0%} split, {len(d.votes)} votes{ruled} — "
                    f"{words[:50]}{'…' if len(words) > 50 else ''}", d.comparison_id))
    return out


def review_html(store: Store, comparison_id: int | None) -> str:
    """One comparison under review: prompt, responses A and B (as stored, not as any annotator saw them) and every
    vote with its rationale. Our markup around text from outside, which render.py shows as text."""
    from labeling_ui.render import notice_html, prompt_html, verbatim_html

    found = [d for d in disagreements(store) if d.comparison_id == comparison_id]
    if not found:
        return notice_html("Choose a comparison to review." if comparison_id is None
                           else f"Comparison {comparison_id} is not among the most disputed now.")
    d = found[0]
    votes = "".join(
        f"<tr><td>{html.escape(v.annotator)}{' (excluded)' if v.excluded else ''}</td>"
        f"<td>{html.escape(CHOICE_LABELS[v.choice])}{f' ({v.strength})' if v.strength else ''}</td>"
        f"<td>{verbatim_html(v.rationale) if v.rationale else '–'}</td></tr>" for v in d.votes)
    ruled = (f'<p class="ak-ruled">Ruled: <b>{html.escape(CHOICE_LABELS[d.adjudication])}</b> '
             f'(export follows it)</p>' if d.adjudication else "")
    return (f'<div class="ak-review"><div class="ak-side">Prompt (#{d.comparison_id})</div>'
            f'{prompt_html(d.prompt, markdown=False)}'
            f'<div class="ak-side">A</div><div class="ak-response ak-review-response">{verbatim_html(d.response_a)}</div>'
            f'<div class="ak-side">B</div><div class="ak-response ak-review-response">{verbatim_html(d.response_b)}</div>'
            f'<table class="ak-votes"><tr><th>annotator</th><th>vote</th><th>rationale</th></tr>{votes}</table>'
            f'{ruled}</div>')


def admin_adjudicate(store: Store, admin: str, comparison_id: int | None, option: VoteOption,
                     rationale: str | None) -> str:
    """The admin's ruling on the comparison under review (A = its first response as shown there)."""
    if comparison_id is None:
        return "Choose a comparison first."
    try:
        adjudicate(store, admin, int(comparison_id), option.choice, strength=option.strength, rationale=rationale)
    except UserError as err:
        return f"Not ruled: {markdown_text(str(err))}"
    return f"Ruled #{comparison_id}: {option.label}. Export follows the ruling from now on."
