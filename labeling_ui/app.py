"""The labeling app: Gradio Blocks wiring over the handlers in handlers.py.

One function per tab (`labeling_tab`, `arena_tab`, `leaderboard_tab`, `admin_tab`), each
taking the AppContext and the Blocks, so a new tab is one more function and one more line
in `build_app`.

- Label: ordinary preference comparisons (from `alignkit label import`), voted blind.
- Arena: battles between models (from `alignkit compare --judge human:DB`): a prompt and
  two anonymous responses; after the vote the buttons lock and the models behind A and B
  are named. Battles are never served in the Label tab, nor comparisons in the Arena.
- Leaderboard: Bradley–Terry ratings with bootstrap CIs from every vote on a battle.
- Admin (admins only): progress per annotator (and loop round), agreement statistics, gold accuracy and
  flags per annotator (recomputed whenever the tab is opened or refreshed), leaving an annotator's votes out
  of exports, user management (add, disable, new password, admin or not, through the users file), the
  guidelines, and the export with its download (a zip, served by guard.py to admins only).

Named API endpoints (gradio_client: `Client(url, auth=(name, password))`), acting
as the logged-in annotator:
  /next_item                                   -> (comparison_id | None, prompt, response_a, response_b)
  /submit_vote(comparison_id, choice, rationale="", strength=None) -> {"vote_id", "comparison_id", "choice", "seconds"}
  /skip(comparison_id)                         -> {"skipped": comparison_id}
  /undo_last_vote                              -> (comparison_id | None, prompt, response_a, response_b)
  /progress                                    -> {"done", "remaining", "skipped"}
  /item                                        -> {"comparison_id" (None when done), "kind": "pair" | "ranking",
                                                  "prompt", "responses" (as shown), "criteria" (a pair's questions)}
  /submit_ranking(comparison_id, ranks, rationale="") -> {"vote_id", "comparison_id", "seconds"}: ranks[i] is the
                                                  rank of responses[i] (1 = best, equal ranks tie)
  /submit_answers(comparison_id, answers, rationale="") -> the same: answers {criterion: a | b | tie | both_bad}
                                                  on a store with criteria (then /submit_vote is refused)
  /arena_next                                  -> (comparison_id | None, prompt, response_a, response_b), no names
  /arena_vote(comparison_id, choice, reveal=True) -> {"comparison_id", "choice", "model_a", "model_b"}
                                                  (reveal=False: model_a/b None, the vote can be undone)
  /arena_reveal(comparison_id)                 -> the same, named; the vote stays from then on
  /arena_undo                                  -> (comparison_id | None, prompt, response_a, response_b)
  /leaderboard                                 -> {"votes", "battles", "without_votes", "models": [...], "pairs": [...],
                                                  "bootstrap", "warning"}
  /admin_exclude(annotator, excluded=True)     -> {"annotator", "excluded", "excluded_now"}   (admins only)
  /admin_stats                                 -> the agreement report, flags per annotator    (admins only)
  /admin_progress                              -> {"columns", "rows"}: work per annotator (and loop round)
  /admin_users                                 -> [[name, admin, can log in], ...]              (admins only)
  /admin_user(action, name, password="", admin=False) -> {"done", "users"}: add | reset_password | disable |
                                                  enable | make_admin | remove_admin              (admins only)
  /admin_export(min_agreement=0, ties="drop", both_bad="drop", min_votes=1) -> {"rows", "per_reason", "policy",
                                                  "download"}: then GET /alignkit/export.zip     (admins only)
  /admin_disagreements(limit=20)               -> [{comparison_id, prompt, response_a, response_b, disagreement,
                                                  votes: [{annotator, choice, strength, rationale, excluded}],
                                                  adjudication}]                                  (admins only)
  /admin_adjudicate(comparison_id, choice, strength=None, rationale="") -> {"comparison_id", "choice"}
`choice` is a | b | tie | both_bad as shown (a = the response returned first / shown on
the left; model_a is the model behind it). /next_item and /undo_last_vote give a ranking task's first two
responses as shown; /item gives all. The Label tab's endpoints serve ordinary comparisons (and ranking tasks)
only, the arena ones battles only. Errors come back as gradio_client AppError with a
one-line message.

Concurrency: Gradio runs one call of an event at a time unless told otherwise
(default_concurrency_limit=1), which queues every annotator behind every other.
The limit is set to DEFAULT_CONCURRENCY_LIMIT: each handler is a short database
transaction (a few ms), SQLite serializes writers anyway, and PostgreSQL locks only
per comparison, so a handful of worker threads keeps the database busy while
bounding threads and pooled connections (the store's pool is sized above it).
"""

# No `from __future__ import annotations` here: gr.api derives the endpoints' inputs and
# outputs from these functions' real type hints (a tuple return = one output per element),
# and Gradio resolves string hints again on every call.
import errno
import html
import ipaddress
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from alignkit.errors import UserError
from alignkit.store import Store, next_item as store_next_item, progress as store_progress
from alignkit.store import skip as store_skip, submit_ranking as store_submit_ranking
from alignkit.store import submit_vote as store_submit_vote, undo_last_vote
from alignkit.store.importer import MAX_RANK
from alignkit.store.agreement import adjudicate, agreement_report, disagreements
from alignkit.store.arena import LeaderboardCache, Reveal, battle_vote, reveal as reveal_battle
from alignkit.store.export import excluded_annotators, export_zip, set_excluded
from alignkit.store.queue import MAX_RATIONALE_CHARS
from labeling_ui import handlers
from labeling_ui.guard import (EXPORT_PATH, DeviceCookies, ExportDownload, ExportMissing, Guard, GuardSettings,
                               LoginThrottle, Sessions)
from alignkit.store import settings as store_settings
from labeling_ui.render import PAGE_CSS, markdown_html, notice_html, prompt_html, text_html
from labeling_ui.users import UsersFile

DEFAULT_CONCURRENCY_LIMIT = 8
# Every event of the app is in one concurrency group, so the limit bounds all handler calls
# together (Gradio's limit is otherwise per event: 8 for each of two dozen events, ~200 at once).
CONCURRENCY_ID = "store"
LOCAL_USER = "local"  # the annotator's name with --no-auth (loopback only)

# Keyboard shortcuts, the guard against votes on an item not yet seen, the session-ended notice and the
# rationale counter live in page.js, which guard.py serves and adds to every page with its nonce.
# The two responses sit in boxes of one fixed height that scroll together (page.js), so a long response
# never pushes the vote buttons below the fold; on a narrow screen they stack instead of two thin columns.
CSS = """
#ak-prompt, #ak-arena-prompt { max-height: 16em; overflow-y: auto; }
.ak-response { height: min(22em, 40vh); overflow-y: auto; padding: 0.5em 0.7em;
               border: 1px solid var(--border-color-primary); border-radius: 6px; }
.ak-side { font-weight: 600; font-size: 0.85em; margin-bottom: 0.3em; }
.ak-len { font-weight: 400; opacity: 0.7; }
.ak-progress { display: flex; gap: 0.8em; align-items: center; flex-wrap: wrap; }
.ak-progress progress { flex: 1; min-width: 8em; height: 0.7em; }
.ak-review-response { height: auto; max-height: 12em; margin-bottom: 0.5em; }
.ak-rank-row { flex-wrap: wrap !important; }
.ak-rank-col .ak-response, .ak-short .ak-response { height: min(12em, 24vh); }
.ak-votes { width: 100%; border-collapse: collapse; margin-top: 0.5em; }
.ak-votes td, .ak-votes th { border-top: 1px solid var(--border-color-primary); padding: 0.3em 0.5em;
                             text-align: left; vertical-align: top; }
@media (max-width: 640px) {
  .ak-pair, #ak-header { flex-direction: column !important; }
  #ak-header > * { width: 100% !important; min-width: 0 !important; }
  .ak-pair > * { width: 100% !important; min-width: 0 !important; }
  .ak-response { height: 14em; }
  .ak-rank-col .ak-response, .ak-short .ak-response { height: 8em; }
}
""" + PAGE_CSS

# System fonts: the default theme fetches Google Fonts, a third-party connection the page's policy refuses.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])
DEFAULT_MIN_DISPLAY_SECONDS = 0.3


def refused(message: str) -> gr.Error:
    """A refusal the caller caused (bad choice, second vote, not logged in): a one-line message to the client, and
    no traceback in the server log, where Gradio prints one for every gr.Error unless told not to. Any other
    exception is a real server error, and Gradio still prints its traceback."""
    return gr.Error(message, print_exception=False)


@dataclass
class AppContext:
    store: Store
    overlap: int
    auth: UsersFile | None  # None: --no-auth (loopback only), everyone is LOCAL_USER and admin
    export_dir: Path
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT
    min_display_seconds: float = DEFAULT_MIN_DISPLAY_SECONDS  # a vote sooner after serving is refused
    guard: GuardSettings = field(default_factory=GuardSettings)
    scale: int = 1  # the store's strength levels per side (alignkit.store.settings), read when the app is built
    criteria: list[str] = field(default_factory=list)  # the store's per-criterion questions, read then too
    # Ratings are refit (with bootstrap) only when arena votes changed: every annotator may open the tab.
    leaderboard_cache: LeaderboardCache = field(default_factory=LeaderboardCache)

    def user(self, request: gr.Request | None) -> str:
        """The logged-in annotator; refused when the users file no longer has them or their session
        was ended (password changed), not only at the next login."""
        name = getattr(request, "username", None) if request is not None else None
        if self.auth is None:
            return name or LOCAL_USER
        if not name:
            raise refused("log in first")
        # users() re-reads a changed file and ends the sessions of removed or re-passworded users first.
        if name not in self.auth.users() or not _session_alive(request):
            raise refused("your login is no longer valid: reload the page and log in again")
        return name

    def is_admin(self, request: gr.Request | None) -> bool:
        if self.auth is None:
            return True
        try:
            return self.auth.is_admin(self.user(request))
        except gr.Error:
            return False


def _session_tokens(request: gr.Request | None) -> tuple[dict | None, str | None]:
    """(Gradio's login-token table, this request's token); (None, None) off a Gradio server (tests, mounts).
    Gradio keeps logins as `app.tokens[token] = username`, the token in an access-token cookie."""
    req = getattr(request, "request", None)
    app = getattr(req, "app", None)
    tokens = getattr(app, "tokens", None)
    if not isinstance(tokens, dict):
        return None, None
    cookies = getattr(req, "cookies", {}) or {}
    cid = getattr(app, "cookie_id", "")
    return tokens, cookies.get(f"access-token-{cid}") or cookies.get(f"access-token-unsecure-{cid}")


def _session_alive(request: gr.Request | None) -> bool:
    """A call already past Gradio's login check when its session was ended (its token deleted) is refused too."""
    tokens, token = _session_tokens(request)
    return tokens is None or tokens.get(token) == request.username


def end_sessions(demo: gr.Blocks, names: set[str]) -> None:
    """Log `names` out everywhere: drop their tokens, as Gradio's own /logout does (later calls get 401)."""
    tokens = getattr(getattr(demo, "server_app", None), "tokens", None)
    if isinstance(tokens, dict):
        for token, user in list(tokens.items()):
            if user in names:
                tokens.pop(token, None)


def _item_tuple(item) -> tuple[int | None, str, str, str]:
    if item is None:
        return None, "", "", ""
    return item.comparison_id, item.prompt_text, item.left, item.right


def _battle_dict(r: Reveal) -> dict:
    return {"comparison_id": r.comparison_id, "choice": r.choice, "model_a": r.model_left, "model_b": r.model_right}


def _api(fn):
    """Turn UserError into a refusal (gr.Error) so the client sees a one-line message."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise refused(str(err)) from None

    return wrapper


def api_endpoints(ctx: AppContext) -> None:
    """The named endpoints scripts and simulated annotators use (see the module doc)."""

    def require_admin(request: gr.Request) -> None:
        if not ctx.is_admin(request):
            raise refused("admins only")

    @_api
    def next_item(request: gr.Request) -> tuple[int | None, str, str, str]:
        """Lease the next comparison to the logged-in annotator (or return the one they hold)."""
        return _item_tuple(store_next_item(ctx.store, ctx.user(request), overlap=ctx.overlap))

    @_api
    def submit_vote(comparison_id: int, choice: str, rationale: str = "", strength: int | None = None,
                    request: gr.Request = None) -> dict:
        """Vote on a leased comparison: choice a | b | tie | both_bad, as shown (a = first/left); on a store with a
        strength scale, strength 1..scale for a or b."""
        r = store_submit_vote(ctx.store, ctx.user(request), comparison_id, choice, rationale or None,
                              overlap=ctx.overlap, min_display_seconds=ctx.min_display_seconds, strength=strength)
        return {"vote_id": r.vote_id, "comparison_id": r.comparison_id, "choice": r.choice, "seconds": r.seconds}

    @_api
    def item(request: gr.Request) -> dict:
        """The leased item (leasing one if none is held): a pair or a ranking task, its responses as shown."""
        it = store_next_item(ctx.store, ctx.user(request), overlap=ctx.overlap)
        if it is None:
            return {"comparison_id": None, "kind": None, "prompt": None, "responses": [], "criteria": []}
        return {"comparison_id": it.comparison_id, "kind": "ranking" if it.is_ranking else "pair",
                "prompt": it.prompt, "responses": list(it.ranking or (it.left, it.right)),
                "criteria": [] if it.is_ranking else ctx.criteria}

    @_api
    def submit_ranking(comparison_id: int, ranks: list, rationale: str = "", request: gr.Request = None) -> dict:
        """Rank a leased ranking task: ranks[i] is the rank of the i-th response as shown (1 = best; ties repeat)."""
        r = store_submit_ranking(ctx.store, ctx.user(request), comparison_id, ranks, rationale or None,
                                 overlap=ctx.overlap, min_display_seconds=ctx.min_display_seconds)
        return {"vote_id": r.vote_id, "comparison_id": r.comparison_id, "seconds": r.seconds}

    @_api
    def submit_answers(comparison_id: int, answers: dict, rationale: str = "", request: gr.Request = None) -> dict:
        """On a store with criteria: one choice per criterion (a | b | tie | both_bad as shown) on a leased pair."""
        r = store_submit_vote(ctx.store, ctx.user(request), comparison_id, None, rationale or None,
                              overlap=ctx.overlap, min_display_seconds=ctx.min_display_seconds, answers=answers)
        return {"vote_id": r.vote_id, "comparison_id": r.comparison_id, "seconds": r.seconds}

    @_api
    def skip(comparison_id: int, request: gr.Request = None) -> dict:
        """Pass on a leased comparison; it is not served to this annotator again."""
        store_skip(ctx.store, ctx.user(request), comparison_id)
        return {"skipped": comparison_id}

    @_api
    def undo_last(request: gr.Request) -> tuple[int | None, str, str, str]:
        """Delete this annotator's latest vote and lease that comparison to them again."""
        return _item_tuple(undo_last_vote(ctx.store, ctx.user(request)))

    @_api
    def my_progress(request: gr.Request) -> dict:
        """Votes done and comparisons remaining for the logged-in annotator."""
        return asdict(store_progress(ctx.store, ctx.user(request), overlap=ctx.overlap))

    @_api
    def arena_next(request: gr.Request) -> tuple[int | None, str, str, str]:
        """Lease the next arena battle (or return the one held); the models stay unnamed until the vote."""
        return _item_tuple(store_next_item(ctx.store, ctx.user(request), overlap=ctx.overlap, arena=True))

    @_api
    def arena_vote(comparison_id: int, choice: str, reveal: bool = True, request: gr.Request = None) -> dict:
        """Vote on a leased battle (a | b | tie | both_bad, a = first/left); with reveal (the default), returns the
        models behind A and B, and the vote stays; reveal=False leaves them unnamed (None) and the vote can be
        taken back with /arena_undo until /arena_reveal."""
        user = ctx.user(request)
        store_submit_vote(ctx.store, user, comparison_id, choice, overlap=ctx.overlap, arena=True,
                          min_display_seconds=ctx.min_display_seconds)
        return _battle_dict(reveal_battle(ctx.store, user, comparison_id) if reveal
                            else battle_vote(ctx.store, user, comparison_id))

    @_api
    def arena_reveal(comparison_id: int, request: gr.Request = None) -> dict:
        """The models behind the caller's vote on a battle; from now on that vote cannot be taken back."""
        return _battle_dict(reveal_battle(ctx.store, ctx.user(request), comparison_id))

    @_api
    def arena_undo(request: gr.Request) -> tuple[int | None, str, str, str]:
        """Take back the caller's latest battle vote before its models were revealed; the battle is leased again."""
        return _item_tuple(undo_last_vote(ctx.store, ctx.user(request), arena=True))

    @_api
    def admin_exclude(annotator: str, excluded: bool = True, request: gr.Request = None) -> dict:
        """Admins only: leave an annotator's votes out of every export (excluded=False takes them in again)."""
        require_admin(request)
        set_excluded(ctx.store, annotator, bool(excluded))
        return {"annotator": annotator, "excluded": bool(excluded), "excluded_now": excluded_annotators(ctx.store)}

    @_api
    def admin_stats(request: gr.Request) -> dict:
        """Admins only: the agreement report with per-annotator gold accuracy, kappa against the others and flags."""
        require_admin(request)
        return agreement_report(ctx.store)

    @_api
    def admin_progress(request: gr.Request) -> dict:
        """Admins only: work per annotator (with votes per loop round where comparisons carry one)."""
        require_admin(request)
        table = handlers.progress_table(ctx.store)
        return {"columns": table.columns, "rows": table.rows}

    @_api
    def admin_users(request: gr.Request) -> list:
        """Admins only: every user of the users file: [name, admin, can log in]."""
        require_admin(request)
        return handlers.user_rows(ctx.auth)

    @_api
    def admin_user(action: str, name: str, password: str = "", admin: bool = False,
                   request: gr.Request = None) -> dict:
        """Admins only: add | reset_password | disable | enable | make_admin | remove_admin a user."""
        require_admin(request)
        line = handlers.manage_user(ctx.auth, ctx.user(request), action, name, password, admin=bool(admin))
        return {"done": line, "users": handlers.user_rows(ctx.auth)}

    @_api
    def admin_export(min_agreement: float = 0.0, ties: str = "drop", both_bad: str = "drop", min_votes: int = 1,
                     request: gr.Request = None) -> dict:
        """Admins only: export to the server's export directory; the zip is then at GET /alignkit/export.zip."""
        require_admin(request)
        summary = handlers.export_as_admin(ctx.store, ctx.export_dir, min_agreement=min_agreement, ties=ties,
                                           both_bad=both_bad, min_votes=min_votes)
        return {"rows": summary["rows"], "per_reason": summary["per_reason"], "policy": summary["policy"],
                "download": EXPORT_PATH}

    @_api
    def admin_disagreements(limit: int = 20, request: gr.Request = None) -> list:
        """Admins only: the comparisons whose votes split most, each with every vote, rationale and ruling."""
        require_admin(request)
        return [asdict(d) for d in disagreements(ctx.store, limit=int(limit))]

    @_api
    def admin_adjudicate(comparison_id: int, choice: str, strength: int | None = None, rationale: str = "",
                         request: gr.Request = None) -> dict:
        """Admins only: rule on a comparison (choice a | b | tie | both_bad, a = its response_a); export follows."""
        require_admin(request)
        adjudicate(ctx.store, ctx.user(request), comparison_id, choice, strength=strength, rationale=rationale)
        return {"comparison_id": comparison_id, "choice": choice}

    @_api
    def arena_leaderboard() -> dict:
        """Bradley–Terry ratings with bootstrap CIs, votes per model and win rates per pair, from all battles."""
        return asdict(handlers.leaderboard(ctx.store, cache=ctx.leaderboard_cache))

    group = dict(concurrency_id=CONCURRENCY_ID)
    gr.api(next_item, api_name="next_item", **group)
    gr.api(submit_vote, api_name="submit_vote", **group)
    gr.api(item, api_name="item", **group)
    gr.api(submit_ranking, api_name="submit_ranking", **group)
    gr.api(submit_answers, api_name="submit_answers", **group)
    gr.api(skip, api_name="skip", **group)
    gr.api(undo_last, api_name="undo_last_vote", **group)
    gr.api(my_progress, api_name="progress", **group)
    gr.api(arena_next, api_name="arena_next", **group)
    gr.api(arena_vote, api_name="arena_vote", **group)
    gr.api(arena_reveal, api_name="arena_reveal", **group)
    gr.api(arena_undo, api_name="arena_undo", **group)
    gr.api(arena_leaderboard, api_name="leaderboard", **group)
    gr.api(admin_exclude, api_name="admin_exclude", **group)
    gr.api(admin_stats, api_name="admin_stats", **group)
    gr.api(admin_progress, api_name="admin_progress", **group)
    gr.api(admin_users, api_name="admin_users", **group)
    gr.api(admin_user, api_name="admin_user", **group)
    gr.api(admin_export, api_name="admin_export", **group)
    gr.api(admin_disagreements, api_name="admin_disagreements", **group)
    gr.api(admin_adjudicate, api_name="admin_adjudicate", **group)


@dataclass
class PairWidgets:
    """A prompt, two responses side by side and the four vote buttons (by choice: a, b, tie, both_bad), plus
    the hidden field holding the id of the comparison on screen: votes send it, so a vote names what the
    annotator saw, not whatever the server moved on to."""

    prompt: gr.HTML
    left: gr.HTML
    right: gr.HTML
    shown: gr.Textbox
    votes: dict[handlers.VoteOption, gr.Button]
    sides: tuple[str, str]


def _html(elem_id: str) -> gr.HTML:
    # js_on_load=None: the component's default script is a click listener we do not need.
    return gr.HTML(elem_id=elem_id, js_on_load=None, container=True, padding=True)


def pair_widgets(elem_prefix: str, vote_prefix: str, side_labels: tuple[str, str],
                 options: list[handlers.VoteOption], *, short: bool = False) -> PairWidgets:
    """short: lower response boxes, so questions below them (criteria) stay in view with them."""
    prompt = _html(f"{elem_prefix}-prompt")
    with gr.Row(equal_height=True, elem_classes=["ak-pair", "ak-short"] if short else ["ak-pair"]):
        left, right = _html(f"{elem_prefix}-left"), _html(f"{elem_prefix}-right")
    shown = gr.Textbox(visible="hidden", elem_id=f"{elem_prefix}-shown")
    with gr.Row():
        # page.js presses the button whose label ends with the key's hint: the hints are the key map.
        votes = {o: gr.Button(f"{o.label}  [{handlers.key_of(i)}]",
                              variant="primary" if o.choice in ("a", "b") else "secondary",
                              elem_id=f"{vote_prefix}-{o.elem_suffix}", min_width=90)
                 for i, o in enumerate(options)}
    return PairWidgets(prompt, left, right, shown, votes, side_labels)


def pair_update(ctx: AppContext, pair: PairWidgets, view: handlers.ItemView, markdown: bool) -> dict:
    """The three text blocks and the hidden id for `view`. Every update carries a fresh render mark, so the
    page sees each answer of the server, even one that shows the same item again."""
    marks = f'data-ak-render="{time.monotonic_ns()}" data-ak-min-ms="{round(ctx.min_display_seconds * 1000)}"'
    if view.done:
        prompt = f'<div {marks} data-ak-item="">{notice_html(view.prompt)}</div>'
        left = right = ""
    else:
        prompt = (f'<div {marks} data-ak-item="{view.comparison_id}"><div class="ak-side">Prompt</div>'
                  f'{prompt_html(view.prompt, markdown=markdown)}</div>')
        left, right = (_response_html(side, text, markdown) for side, text in zip(pair.sides, (view.left, view.right)))
    # With nothing left the two response boxes go (empty boxes would look like a page still loading).
    return {pair.prompt: prompt, pair.left: gr.HTML(left, visible=not view.done),
            pair.right: gr.HTML(right, visible=not view.done), pair.shown: "" if view.done else str(view.comparison_id)}


def _response_html(side: str, text: str, markdown: bool) -> str:
    return (f'<div class="ak-side">{html.escape(side)} <span class="ak-len">({len(text):,} characters)</span></div>'
            f'<div class="ak-response">{text_html(text, markdown=markdown)}</div>')


@dataclass
class AskWidgets:
    """Questions answered by picking one option each, then one submit: a rank per response of a ranking task
    (`responses` above each), or a choice per criterion of a pair. page.js gives the keys: a digit picks that
    option of the first unanswered question, Backspace clears them all, Enter submits."""

    box: gr.Column
    questions: list[gr.Radio]
    submit: gr.Button
    clear: gr.Button
    columns: list[gr.Column] = field(default_factory=list)  # a ranking: one per response, hidden beyond K
    responses: list[gr.HTML] = field(default_factory=list)


CHOICE_OPTIONS = [("A better", "a"), ("B better", "b"), ("Tie", "tie"), ("Both bad", "both_bad")]


def ranking_widgets() -> AskWidgets:
    with gr.Column(visible=False, elem_id="ak-ranking") as box:
        gr.Markdown("**Rank the responses: 1 = best.** Give two responses the same rank for a tie. Keys: type a "
                    "rank for each response in turn, Backspace clears, Enter submits.", elem_id="ak-ranking-help")
        columns, responses, questions = [], [], []
        with gr.Row(elem_classes=["ak-rank-row"]):
            for i in range(MAX_RANK):
                with gr.Column(visible=False, min_width=260, elem_classes=["ak-rank-col"]) as col:
                    responses.append(_html(f"ak-rank-response-{i + 1}"))
                    questions.append(gr.Radio([], label=f"Rank of response {i + 1}", elem_id=f"ak-rank-{i + 1}",
                                              elem_classes=["ak-ask"]))
                columns.append(col)
        with gr.Row():
            submit = gr.Button("Submit ranking  [Enter]", variant="primary", elem_id="ak-submit-ranking")
            clear = gr.Button("Clear ranks  [Backspace]", size="sm", elem_id="ak-clear-ranks")
    return AskWidgets(box, questions, submit, clear, columns, responses)


def criteria_widgets(criteria: list[str]) -> AskWidgets:
    with gr.Column(visible=bool(criteria), elem_id="ak-criteria") as box:
        gr.Markdown("**Answer each question.** Keys: 1 A better, 2 B better, 3 tie, 4 both bad, for each question "
                    "in turn; Backspace clears, Enter submits.", elem_id="ak-criteria-help")
        with gr.Row(elem_classes=["ak-rank-row"]):
            questions = [gr.Radio(CHOICE_OPTIONS, label=f"{name.replace('_', ' ').capitalize()}: which is better?",
                                  elem_id=f"ak-criterion-{name}", elem_classes=["ak-ask"], min_width=300)
                         for name in criteria]
        with gr.Row():
            submit = gr.Button("Submit answers  [Enter]", variant="primary", elem_id="ak-submit-answers")
            clear = gr.Button("Clear answers  [Backspace]", size="sm", elem_id="ak-clear-answers")
    return AskWidgets(box, questions, submit, clear)


def ask_update(ctx: AppContext, rank: AskWidgets, ask: AskWidgets, view: handlers.ItemView, markdown: bool, *,
               keep: bool) -> dict:
    """The ranking and criteria blocks for `view`: which one shows, the ranking's responses, and the answers
    cleared for a new item (kept as picked after a refusal)."""
    k = len(view.ranking)
    update = {rank.box: gr.Column(visible=view.is_ranking),
              ask.box: gr.Column(visible=bool(ctx.criteria) and not view.is_ranking and not view.done),
              **{col: gr.Column(visible=i < k) for i, col in enumerate(rank.columns)}}
    for i, (box, radio) in enumerate(zip(rank.responses, rank.questions)):
        text = view.ranking[i] if i < k else ""
        update[box] = _response_html(f"Response {i + 1}", text, markdown) if i < k else ""
        choices = [str(r) for r in range(1, k + 1)]
        update[radio] = gr.skip() if keep else gr.Radio(choices=choices, value=None)
    for radio in ask.questions:
        update[radio] = gr.skip() if keep else gr.Radio(value=None)
    return update


def labeling_tab(ctx: AppContext, demo: gr.Blocks, markdown: gr.Checkbox) -> None:
    with gr.Tab("Label", id="label"):
        progress = gr.HTML(elem_id="ak-progress", js_on_load=None)
        guide = gr.Accordion("Guidelines", open=False, visible=False, elem_id="ak-guidelines")
        with guide:
            guide_text = gr.HTML(js_on_load=None, elem_id="ak-guidelines-text")
        # Inside the tab: a component made beside the tabs would become a tab of its own to Gradio's tab bar.
        seen = gr.BrowserState(False, storage_key="alignkit-guidelines-seen")
        pair = pair_widgets("ak", "ak-vote", ("A", "B"), handlers.vote_options(ctx.scale), short=bool(ctx.criteria))
        rank = ranking_widgets()
        ask = criteria_widgets(ctx.criteria)
        rationale = gr.Textbox(label="Rationale (optional)", lines=2, max_lines=6, elem_id="ak-rationale",
                               max_length=MAX_RATIONALE_CHARS)
        with gr.Row():
            btn_skip = gr.Button("Skip  [s]", size="sm", elem_id="ak-skip")
            btn_undo = gr.Button("Undo last vote  [u]", size="sm", elem_id="ak-undo")
        status = gr.Markdown(elem_id="ak-status")
        with gr.Accordion("Skipped items", open=False, elem_id="ak-skipped"):
            with gr.Row():
                skipped = gr.Dropdown([], label="Skipped", elem_id="ak-skipped-pick", scale=3)
                btn_unskip = gr.Button("Bring it back", size="sm", elem_id="ak-unskip", scale=1)

    item_buttons = [*pair.votes.values(), btn_skip, rank.submit, ask.submit]
    asked = [rank.box, ask.box, *rank.columns, *rank.responses, *rank.questions, *ask.questions]
    shown_item = [pair.prompt, pair.left, pair.right, pair.shown, progress, *asked]
    outputs = [*shown_item, status, rationale, skipped, *item_buttons]

    def item_update(view: handlers.ItemView, as_markdown: bool, *, keep: bool) -> dict:
        # A ranking task shows its K responses with a rank each instead of the pair and its buttons; on a store
        # with criteria a pair asks its questions instead of the vote buttons.
        update = {**pair_update(ctx, pair, view, as_markdown), progress: view.progress,
                  **ask_update(ctx, rank, ask, view, as_markdown, keep=keep)}
        if view.is_ranking:
            update[pair.left], update[pair.right] = gr.HTML("", visible=False), gr.HTML("", visible=False)
        return update

    def render(view: handlers.ItemView, as_markdown: bool, user: str, *, skips_changed: bool = True) -> dict:
        # A refused action keeps what the annotator typed; a vote that went through clears it. With nothing
        # left, the buttons that act on an item are disabled. A vote leaves the skipped list as it was, so
        # the list is read again only when it can have changed (not once per vote).
        choices = gr.Dropdown(choices=handlers.skipped_choices(ctx.store, user), value=None) if skips_changed \
            else gr.skip()
        buttons = {b: gr.Button(interactive=not view.done) for b in item_buttons}
        for b in pair.votes.values():
            buttons[b] = gr.Button(interactive=not view.done, visible=not view.is_ranking and not ctx.criteria)
        return {**item_update(view, as_markdown, keep=view.refused), status: view.status,
                rationale: gr.skip() if view.refused else "", skipped: choices, **buttons}

    def show(as_markdown, request: gr.Request):
        user = ctx.user(request)
        return render(handlers.current_view(ctx.store, user, overlap=ctx.overlap), as_markdown, user)

    def redisplay(as_markdown, request: gr.Request):
        view = handlers.current_view(ctx.store, ctx.user(request), overlap=ctx.overlap)
        return item_update(view, as_markdown, keep=True)

    # The request first: Gradio puts it at its parameter's position, and the answers are a variable count.
    def on_rank(request: gr.Request, shown, why, as_markdown, *ranks):
        user = ctx.user(request)
        held = store_next_item(ctx.store, user, overlap=ctx.overlap)  # its K: the radios beyond it are hidden
        k = len(held.ranking) if held is not None else 0
        return render(handlers.ranking_vote(ctx.store, user, handlers.shown_id(shown), list(ranks[:k]), why,
                                            overlap=ctx.overlap, min_display_seconds=ctx.min_display_seconds),
                      as_markdown, user, skips_changed=False)

    def on_answers(request: gr.Request, shown, why, as_markdown, *answers):
        user = ctx.user(request)
        return render(handlers.answers_vote(ctx.store, user, handlers.shown_id(shown), ctx.criteria, list(answers),
                                            why, overlap=ctx.overlap, min_display_seconds=ctx.min_display_seconds),
                      as_markdown, user, skips_changed=False)

    def on_vote(option: handlers.VoteOption):
        def fn(shown, why, as_markdown, request: gr.Request):
            user = ctx.user(request)
            return render(handlers.vote(ctx.store, user, handlers.shown_id(shown), option.choice, why,
                                        overlap=ctx.overlap, min_display_seconds=ctx.min_display_seconds,
                                        strength=option.strength), as_markdown, user, skips_changed=False)

        return fn

    def on_skip(shown, as_markdown, request: gr.Request):
        user = ctx.user(request)
        return render(handlers.skip_item(ctx.store, user, handlers.shown_id(shown), overlap=ctx.overlap),
                      as_markdown, user)

    def on_undo(as_markdown, request: gr.Request):
        user = ctx.user(request)
        return render(handlers.undo(ctx.store, user, overlap=ctx.overlap), as_markdown, user)

    def on_unskip(pick, as_markdown, request: gr.Request):
        user = ctx.user(request)
        return render(handlers.unskip_item(ctx.store, user, handlers.shown_id(pick), overlap=ctx.overlap),
                      as_markdown, user)

    ui = dict(api_visibility="private", show_progress="hidden", concurrency_id=CONCURRENCY_ID)
    demo.load(show, inputs=[markdown], outputs=outputs, **ui)
    btn_unskip.click(on_unskip, inputs=[skipped, markdown], outputs=outputs, **ui)
    markdown.change(redisplay, inputs=[markdown], outputs=shown_item, **ui)
    rank.submit.click(on_rank, inputs=[pair.shown, rationale, markdown, *rank.questions], outputs=outputs, **ui)
    ask.submit.click(on_answers, inputs=[pair.shown, rationale, markdown, *ask.questions], outputs=outputs, **ui)
    rank.clear.click(lambda: [gr.Radio(value=None)] * len(rank.questions), outputs=rank.questions, **ui)
    if ask.questions:
        ask.clear.click(lambda: [gr.Radio(value=None)] * len(ask.questions), outputs=ask.questions, **ui)
    for option, button in pair.votes.items():
        button.click(on_vote(option), inputs=[pair.shown, rationale, markdown], outputs=outputs, **ui)
    # The guidelines (as the admin last saved them) open by themselves on an annotator's first visit,
    # remembered in their browser.

    def show_guidelines(was_seen):
        text = store_settings.guidelines(ctx.store)
        return gr.Accordion(visible=bool(text), open=bool(text) and not was_seen), markdown_html(text), bool(text)

    demo.load(show_guidelines, inputs=[seen], outputs=[guide, guide_text, seen], **ui)
    btn_skip.click(on_skip, inputs=[pair.shown, markdown], outputs=outputs, **ui)
    btn_undo.click(on_undo, inputs=[markdown], outputs=outputs, **ui)


def arena_tab(ctx: AppContext, demo: gr.Blocks, markdown: gr.Checkbox) -> None:
    with gr.Tab("Arena", id="arena") as tab:
        gr.Markdown("Two anonymous models answer the same prompt. Vote for the better answer; "
                    "you can take your vote back until you reveal which models they were.")
        progress = gr.HTML(elem_id="ak-arena-progress", js_on_load=None)
        pair = pair_widgets("ak-arena", "ak-arena", ("Model A", "Model B"), [
            handlers.VoteOption(c, None, text) for c, text in
            (("a", "A is better"), ("b", "B is better"), ("tie", "Tie"), ("both_bad", "Both are bad"))])
        reveal_md = gr.Markdown(elem_id="ak-arena-reveal")
        with gr.Row():
            btn_skip = gr.Button("Skip battle  [s]", size="sm", elem_id="ak-arena-skip")
            btn_undo = gr.Button("Undo vote  [u]", size="sm", visible=False, elem_id="ak-arena-undo")
            btn_reveal = gr.Button("Reveal models  [r]", visible=False, variant="primary",
                                   elem_id="ak-arena-show-models")
            btn_next = gr.Button("Next battle  [n]", visible=False, elem_id="ak-arena-next")
        status = gr.Markdown(elem_id="ak-arena-status")

    vote_buttons = [*pair.votes.values(), btn_skip]
    outputs = [pair.prompt, pair.left, pair.right, pair.shown, progress, status, reveal_md, btn_undo, btn_reveal,
               btn_next, *vote_buttons]

    def render(view: handlers.ArenaView, as_markdown: bool) -> dict:
        # Vote and skip buttons: hidden when nothing is left, locked once this battle is voted. A vote not yet
        # revealed can be undone; after the reveal only the next battle is left to press.
        buttons = {b: gr.Button(visible=not view.done, interactive=not view.voted) for b in vote_buttons}
        pending = view.voted and not view.revealed
        return {**pair_update(ctx, pair, view, as_markdown), progress: view.progress, status: view.status,
                reveal_md: view.reveal_markdown, btn_undo: gr.Button(visible=pending),
                btn_reveal: gr.Button(visible=pending), btn_next: gr.Button(visible=view.revealed), **buttons}

    def show(as_markdown, request: gr.Request):
        return render(handlers.arena_view(ctx.store, ctx.user(request), overlap=ctx.overlap), as_markdown)

    def redisplay(shown, as_markdown, request: gr.Request):
        if handlers.shown_id(shown) is None:  # the Arena was not opened: nothing to lease yet
            return {}
        return render(handlers.arena_redisplay(ctx.store, ctx.user(request), handlers.shown_id(shown),
                                               overlap=ctx.overlap), as_markdown)

    def on_vote(choice: str):
        def fn(shown, as_markdown, request: gr.Request):
            return render(handlers.arena_vote(ctx.store, ctx.user(request), handlers.shown_id(shown), choice,
                                              overlap=ctx.overlap, min_display_seconds=ctx.min_display_seconds),
                          as_markdown)

        return fn

    ui = dict(api_visibility="private", show_progress="hidden", concurrency_id=CONCURRENCY_ID)
    # Leased when the tab is opened, not on page load: most visitors label, and a lease holds a slot.
    tab.select(show, inputs=[markdown], outputs=outputs, **ui)
    btn_next.click(show, inputs=[markdown], outputs=outputs, **ui)
    markdown.change(redisplay, inputs=[pair.shown, markdown], outputs=outputs, **ui)
    for option, button in pair.votes.items():
        button.click(on_vote(option.choice), inputs=[pair.shown, markdown], outputs=outputs, **ui)

    def on_skip(shown, as_markdown, request: gr.Request):
        return render(handlers.arena_skip(ctx.store, ctx.user(request), handlers.shown_id(shown), overlap=ctx.overlap),
                      as_markdown)

    btn_skip.click(on_skip, inputs=[pair.shown, markdown], outputs=outputs, **ui)

    def on_reveal(shown, as_markdown, request: gr.Request):
        return render(handlers.arena_reveal(ctx.store, ctx.user(request), handlers.shown_id(shown),
                                            overlap=ctx.overlap), as_markdown)

    def on_undo(as_markdown, request: gr.Request):
        return render(handlers.arena_undo(ctx.store, ctx.user(request), overlap=ctx.overlap), as_markdown)

    btn_reveal.click(on_reveal, inputs=[pair.shown, markdown], outputs=outputs, **ui)
    btn_undo.click(on_undo, inputs=[markdown], outputs=outputs, **ui)


def leaderboard_tab(ctx: AppContext, demo: gr.Blocks) -> None:
    with gr.Tab("Leaderboard", id="leaderboard") as tab:
        summary = gr.Markdown(elem_id="ak-leaderboard-summary")
        models = gr.Dataframe(headers=handlers.LEADERBOARD_COLUMNS, interactive=False, label="Models",
                              elem_id="ak-leaderboard")
        pairs = gr.Dataframe(headers=handlers.LEADERBOARD_PAIR_COLUMNS, interactive=False, label="Pairs")
        refresh = gr.Button("Refresh", size="sm")

    def show():
        board = handlers.leaderboard(ctx.store, cache=ctx.leaderboard_cache)
        return {summary: board.summary_markdown, models: board.model_rows(), pairs: board.pair_rows()}

    ui = dict(api_visibility="private", show_progress="hidden", concurrency_id=CONCURRENCY_ID)
    # Computed when looked at (a bootstrap refit per round), not on every page load.
    tab.select(show, outputs=[summary, models, pairs], **ui)
    refresh.click(show, outputs=[summary, models, pairs], **ui)


def admin_tab(ctx: AppContext, demo: gr.Blocks) -> None:
    with gr.Tab("Admin", id="admin", visible=False) as tab:
        with gr.Row():
            summary = gr.Markdown()
            refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100, elem_id="ak-admin-refresh")
        progress = gr.Dataframe(headers=handlers.PROGRESS_COLUMNS, interactive=False, label="Progress per annotator",
                                elem_id="ak-admin-progress")
        annotators = gr.Dataframe(headers=handlers.ANNOTATOR_COLUMNS, interactive=False, label="Annotators",
                                  elem_id="ak-admin-annotators")
        pairs = gr.Dataframe(headers=handlers.PAIR_COLUMNS, interactive=False, label="Annotator pairs")
        with gr.Row():
            who = gr.Dropdown([], label="Annotator", elem_id="ak-admin-annotator", allow_custom_value=False)
            leave_out = gr.Button("Leave their votes out of exports", size="sm", elem_id="ak-admin-exclude")
            take_in = gr.Button("Take their votes in again", size="sm", elem_id="ak-admin-include")
        exclude_status = gr.Markdown(elem_id="ak-admin-exclude-status")
        users = user_widgets(ctx)
        review = review_widgets(ctx)
        with gr.Accordion("Guidelines for annotators (markdown)", open=False):
            guidelines_box = gr.Textbox(lines=8, max_lines=30, show_label=False, elem_id="ak-admin-guidelines")
            save_guidelines = gr.Button("Save guidelines", size="sm", elem_id="ak-admin-save-guidelines")
            guidelines_status = gr.Markdown()
        with gr.Accordion("Export the preference dataset", open=True):
            with gr.Row():
                min_agreement = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Minimum agreement")
                ties = gr.Dropdown(["drop", "ignore"], value="drop", label="Ties")
                both_bad = gr.Dropdown(["drop", "ignore"], value="drop", label="Both bad")
                min_votes = gr.Number(1, minimum=1, precision=0, label="Minimum votes")
            gr.Markdown("With a minimum agreement above 0, comparisons with a single vote are dropped: "
                        "one vote agrees with itself.")
            export = gr.Button("Export preference dataset", elem_id="ak-admin-export")
            export_status = gr.Markdown(elem_id="ak-admin-export-status")
            download = gr.HTML(elem_id="ak-admin-download", js_on_load=None)

    def require_admin(request: gr.Request) -> None:
        if not ctx.is_admin(request):
            raise refused("admins only")

    def show(request: gr.Request):
        if not ctx.is_admin(request):
            return {tab: gr.Tab(visible=False)}
        view = handlers.admin_view(ctx.store)
        table = handlers.progress_table(ctx.store)
        return {tab: gr.Tab(visible=True), summary: view.summary_markdown, annotators: view.annotators,
                pairs: view.pairs, who: gr.Dropdown(choices=[row[0] for row in view.annotators]),
                progress: gr.Dataframe(value=table.rows, headers=table.columns),
                users.table: handlers.user_rows(ctx.auth), download: handlers.download_html(ctx.export_dir),
                review.pick: gr.Dropdown(choices=handlers.disagreement_choices(ctx.store))}

    def exclude(excluded: bool):
        def fn(name, request: gr.Request):
            require_admin(request)
            status = handlers.admin_exclude(ctx.store, name, excluded)
            return {**show(request), exclude_status: status}

        return fn

    def do_export(x, t, b, v, request: gr.Request):
        require_admin(request)
        return {export_status: handlers.admin_export(ctx.store, ctx.export_dir, min_agreement=x, ties=t,
                                                     both_bad=b, min_votes=v),
                download: handlers.download_html(ctx.export_dir)}

    ui = dict(api_visibility="private", show_progress="hidden", concurrency_id=CONCURRENCY_ID)

    def do_save_guidelines(text, request: gr.Request):
        require_admin(request)
        store_settings.set_guidelines(ctx.store, text or "")
        return "Saved: annotators see them at their next page load."

    save_guidelines.click(do_save_guidelines, inputs=[guidelines_box], outputs=[guidelines_status], **ui)

    def current_guidelines(request: gr.Request) -> str:
        return store_settings.guidelines(ctx.store) if ctx.is_admin(request) else ""

    demo.load(current_guidelines, outputs=[guidelines_box], **ui)
    shown = [tab, summary, annotators, pairs, who, progress, users.table, download, review.pick]
    demo.load(show, outputs=shown, **ui)
    tab.select(show, outputs=shown, **ui)  # recomputed when opened, not the page-load snapshot
    refresh.click(show, outputs=shown, **ui)
    leave_out.click(exclude(True), inputs=[who], outputs=[*shown, exclude_status], **ui)
    take_in.click(exclude(False), inputs=[who], outputs=[*shown, exclude_status], **ui)
    export.click(do_export, inputs=[min_agreement, ties, both_bad, min_votes], outputs=[export_status, download],
                 **ui)
    wire_users(ctx, users, require_admin)
    wire_review(ctx, review, require_admin)


@dataclass
class ReviewWidgets:
    pick: gr.Dropdown
    shown: gr.HTML
    rationale: gr.Textbox
    rulings: dict[handlers.VoteOption, gr.Button]
    status: gr.Markdown


def review_widgets(ctx: AppContext) -> ReviewWidgets:
    with gr.Accordion("Disagreements", open=False, elem_id="ak-admin-review"):
        gr.Markdown("The comparisons whose votes split most, with every vote and rationale. A ruling replaces "
                    "the votes in every export (A and B as shown here).")
        pick = gr.Dropdown([], label="Comparison", elem_id="ak-admin-review-pick")
        shown = gr.HTML(elem_id="ak-admin-review-item", js_on_load=None)
        rationale = gr.Textbox(label="Why (optional)", lines=1, max_length=MAX_RATIONALE_CHARS,
                               elem_id="ak-admin-review-why")
        with gr.Row():
            rulings = {o: gr.Button(f"Rule: {o.label}", size="sm", elem_id=f"ak-admin-rule-{o.elem_suffix}")
                       for o in handlers.vote_options(ctx.scale)}
        status = gr.Markdown(elem_id="ak-admin-review-status")
    return ReviewWidgets(pick, shown, rationale, rulings, status)


def wire_review(ctx: AppContext, w: ReviewWidgets, require_admin) -> None:
    ui = dict(api_visibility="private", show_progress="hidden", concurrency_id=CONCURRENCY_ID)

    def look(pick, request: gr.Request):
        require_admin(request)
        return handlers.review_html(ctx.store, handlers.shown_id(pick))

    def rule(option: handlers.VoteOption):
        def fn(pick, why, request: gr.Request):
            require_admin(request)
            line = handlers.admin_adjudicate(ctx.store, ctx.user(request), handlers.shown_id(pick), option, why)
            return {w.status: line, w.shown: handlers.review_html(ctx.store, handlers.shown_id(pick)),
                    w.pick: gr.Dropdown(choices=handlers.disagreement_choices(ctx.store), value=pick)}

        return fn

    w.pick.change(look, inputs=[w.pick], outputs=[w.shown], **ui)
    for option, button in w.rulings.items():
        button.click(rule(option), inputs=[w.pick, w.rationale], outputs=[w.status, w.shown, w.pick], **ui)


@dataclass
class UserWidgets:
    table: gr.Dataframe
    name: gr.Textbox
    password: gr.Textbox
    admin: gr.Checkbox
    actions: dict[str, gr.Button]
    status: gr.Markdown


USER_BUTTONS = {"add": "Add user", "reset_password": "Set this password", "disable": "Disable",
                "enable": "Enable", "make_admin": "Make admin", "remove_admin": "Remove admin"}


def user_widgets(ctx: AppContext) -> UserWidgets:
    where = "the users file" if ctx.auth is None else f"`{ctx.auth.path.name}`"
    with gr.Accordion("Users", open=False, elem_id="ak-admin-users"):
        gr.Markdown(f"Changes are written to {where} as `alignkit label add-user` writes it. A disabled user "
                    f"cannot log in; their open sessions end at once, as they do when their password is set.")
        table = gr.Dataframe(headers=handlers.USER_COLUMNS, interactive=False, label="Users",
                             elem_id="ak-admin-user-table")
        with gr.Row():
            name = gr.Textbox(label="User name", elem_id="ak-admin-user-name", max_length=64)
            password = gr.Textbox(label="Password (8 characters or more)", type="password",
                                  elem_id="ak-admin-user-password", max_length=200)
            admin = gr.Checkbox(False, label="New user is an admin", elem_id="ak-admin-user-admin")
        with gr.Row():
            actions = {a: gr.Button(label, size="sm", elem_id=f"ak-admin-user-{a.replace('_', '-')}")
                       for a, label in USER_BUTTONS.items()}
        status = gr.Markdown(elem_id="ak-admin-user-status")
    return UserWidgets(table, name, password, admin, actions, status)


def wire_users(ctx: AppContext, w: UserWidgets, require_admin) -> None:
    ui = dict(api_visibility="private", show_progress="hidden", concurrency_id=CONCURRENCY_ID)

    def act(action: str):
        def fn(name, password, admin, request: gr.Request):
            require_admin(request)
            try:
                line = handlers.manage_user(ctx.auth, ctx.user(request), action, name, password, admin=admin)
            except UserError as err:
                return {w.status: f"Not changed: {handlers.markdown_text(str(err))}", w.password: gr.skip(),
                        w.table: handlers.user_rows(ctx.auth)}
            return {w.status: handlers.markdown_text(line), w.password: "", w.table: handlers.user_rows(ctx.auth)}

        return fn

    for action, button in w.actions.items():
        button.click(act(action), inputs=[w.name, w.password, w.admin], outputs=[w.status, w.password, w.table],
                     **ui)


def header(ctx: AppContext, demo: gr.Blocks) -> gr.Checkbox:
    """The title, the display toggle (each annotator's own, kept in their browser) and the logout button."""
    with gr.Row(equal_height=True, elem_id="ak-header"):
        gr.Markdown("### alignkit labeling — which response is better?")
        markdown = gr.Checkbox(False, label="Render markdown (HTML is always shown as text)", elem_id="ak-markdown",
                               scale=0, min_width=300)
        if ctx.auth is not None:
            gr.Button("Log out", size="sm", elem_id="ak-logout", scale=0)
    saved = gr.BrowserState(False, storage_key="alignkit-render-markdown")
    ui = dict(api_visibility="private", show_progress="hidden", concurrency_id=CONCURRENCY_ID)
    markdown.change(lambda on: on, inputs=[markdown], outputs=[saved], **ui)
    # Restoring it changes the box, whose change event renders the tabs in the chosen mode.
    demo.load(lambda on: bool(on), inputs=[saved], outputs=[markdown], **ui)
    return markdown


def build_app(store: Store, *, auth: UsersFile | None = None, overlap: int = 3, export_dir: str | Path | None = None,
              concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT,
              min_display_seconds: float = DEFAULT_MIN_DISPLAY_SECONDS,
              guard: GuardSettings | None = None) -> gr.Blocks:
    """The Blocks app over `store`; launch it with `launch()` (which applies auth and hardening)."""
    if overlap < 1:
        raise UserError(f"overlap must be at least 1, got {overlap}")
    if not min_display_seconds >= 0:
        raise UserError(f"the minimum display time must be 0 seconds or more, got {min_display_seconds}")
    export_dir = Path(export_dir) if export_dir else Path(store.name + ".export") if store.dialect == "sqlite" \
        else Path("labels.export")
    ctx = AppContext(store, overlap, auth, export_dir.resolve(), concurrency_limit, min_display_seconds,
                     guard or GuardSettings(), store_settings.scale(store), store_settings.criteria(store))
    with gr.Blocks(title="alignkit labeling") as demo:
        markdown = header(ctx, demo)
        with gr.Tabs():
            labeling_tab(ctx, demo, markdown)
            arena_tab(ctx, demo, markdown)
            leaderboard_tab(ctx, demo)
            admin_tab(ctx, demo)
        api_endpoints(ctx)
    if auth is not None:
        auth.on_revoke(lambda names: end_sessions(demo, names))
    # Gradio keeps up to 10,000 past events and rebuilds a pandas summary of them after every
    # event, for the /monitoring page (which we keep off): at a few thousand votes that costs
    # more than our handlers. Its own settings turn it down, unless the user set them.
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "100")
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000000000")
    # status_update_rate as a number turns off Gradio's live queue estimates, which otherwise
    # send a message to every waiting call each time one starts (quadratic under load);
    # our calls take milliseconds, so a periodic estimate is plenty.
    demo.queue(default_concurrency_limit=concurrency_limit, status_update_rate=5)
    demo.alignkit_context = ctx
    return demo


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """UserError unless `host:port` can be listened on now. Gradio's own failure is a traceback that says to set
    GRADIO_SERVER_PORT or `server_port`, which are not the user's knobs: --port and --host are."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UserError(f"--host {host}: not an address this machine can listen on "
                        f"({getattr(err, 'strerror', None) or err})") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As uvicorn binds: a port a stopped server left in TIME_WAIT is free, one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use; choose another with --port") from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host} is not an address of this machine") from None
            if err.errno == errno.EACCES:
                raise UserError(f"port {port} on {host} needs privileges this user lacks; choose another with --port "
                                f"(1024 or above)") from None
            raise UserError(f"cannot listen on {host} port {port}: {err.strerror}") from None


def _reread_users(auth: UsersFile | None) -> None:
    """Re-read a changed users file (ending revoked sessions). A file broken while serving keeps the last good
    one in force: the handlers refuse with its error, the front door must still answer."""
    if auth is None:
        return
    try:
        auth.users()
    except UserError:
        pass


def export_download(ctx: AppContext) -> ExportDownload:
    """The zip of the latest export, for an admin's session only (with --no-auth, on loopback, everyone is)."""
    def is_admin(user: str | None) -> bool:
        return ctx.auth is None or (user is not None and ctx.auth.is_admin(user))

    def build() -> bytes:
        try:
            return export_zip(ctx.export_dir)
        except UserError as err:
            raise ExportMissing(str(err)) from None

    return ExportDownload(is_admin, build, f"{ctx.export_dir.name}.zip")


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int = 7860, blocked_paths: list[str | Path] = (),
           prevent_thread_lock: bool = False, quiet: bool = False) -> Any:
    """Start the server with login (unless the app was built without auth) and hardening settings.

    quiet=True leaves out Gradio's banner (its URL line and the "set share=True" hint: share links stay off);
    errors in handlers are printed either way."""
    ctx: AppContext = demo.alignkit_context
    if ctx.auth is None and not is_loopback(host):
        raise UserError(f"--no-auth serves only on loopback (127.0.0.1, ::1, localhost), not {host}")
    # `alignkit label serve` calls check_port before it opens the store; a port taken since is caught below.
    blocked = []
    for p in [*blocked_paths, ctx.export_dir]:
        p = Path(p).resolve()
        blocked.append(str(p))
        if p.suffix == ".db":  # SQLite's side files
            blocked += [str(p) + "-wal", str(p) + "-shm", str(p) + "-journal"]
    settings = dict(
        server_name=host,
        server_port=port,
        auth=ctx.auth.check_async if ctx.auth else None,  # async: Gradio awaits it, hashing runs off the loop
        auth_message="alignkit labeling — log in with the name and password your admin gave you.",
        allowed_paths=[],  # nothing beyond Gradio's own static files and cache
        blocked_paths=blocked,  # the store, the users file, exports: never through /file=
        enable_monitoring=False,
        run_history=False,
        mcp_server=False,
        ssr_mode=False,
        pwa=False,
        share=False,
        strict_cors=True,
        max_file_size="1mb",  # the app takes no uploads; Gradio's upload route stays small
        show_error=False,  # gr.Error messages still reach the client; other exceptions do not leak
        max_threads=max(40, 2 * ctx.concurrency_limit),
        css=CSS,
        theme=THEME,
        app_kwargs={"middleware": [Middleware(Guard, settings=ctx.guard, throttle=LoginThrottle(ctx.guard.throttle),
                                              sessions=Sessions(ctx.guard.session_seconds),
                                              devices=DeviceCookies(),
                                              refresh=lambda: _reread_users(ctx.auth),
                                              export=export_download(ctx))]},
        footer_links=["api"],
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
    )
    try:
        return demo.launch(**settings)
    except OSError as err:
        # The port was taken between check_port and Gradio's bind (Gradio says "Cannot find empty port").
        if "empty port" not in str(err):
            raise
        raise UserError(f"port {port} on {host} is in use; choose another with --port") from None
