"""The labeling app: Gradio Blocks wiring over the handlers in handlers.py.

One function per tab (`labeling_tab`, `admin_tab`), each taking the AppContext and
the Blocks, so a new tab is one more function and one more line in `build_app`.

Named API endpoints (gradio_client: `Client(url, auth=(name, password))`), acting
as the logged-in annotator:
  /next_item                                   -> (comparison_id | None, prompt, response_a, response_b)
  /submit_vote(comparison_id, choice, rationale="") -> {"vote_id", "comparison_id", "choice", "seconds"}
  /skip(comparison_id)                         -> {"skipped": comparison_id}
  /undo_last_vote                              -> (comparison_id | None, prompt, response_a, response_b)
  /progress                                    -> {"done", "remaining", "skipped"}
`choice` is a | b | tie | both_bad as shown (a = the response returned first / shown on
the left). Errors come back as gradio_client AppError with a one-line message.

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
import ipaddress
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from alignkit.errors import UserError
from alignkit.store import Store, next_item as store_next_item, progress as store_progress
from alignkit.store import skip as store_skip, submit_vote as store_submit_vote, undo_last_vote
from labeling_ui import handlers
from labeling_ui.users import UsersFile

DEFAULT_CONCURRENCY_LIMIT = 8
# Every event of the app is in one concurrency group, so the limit bounds all handler calls
# together (Gradio's limit is otherwise per event: 11 events x 8 would be 88 at once).
CONCURRENCY_ID = "store"
LOCAL_USER = "local"  # the annotator's name with --no-auth (loopback only)

# Keyboard shortcuts: 1 = A better, 2 = B better, 3 = tie, 4 = both bad, s = skip, u = undo.
# Ignored while typing in an editable field (the rationale box).
KEYBOARD_HEAD = """
<script>
document.addEventListener('keydown', function (e) {
  var t = e.target;
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  if (t && ((t.tagName === 'TEXTAREA' || t.tagName === 'INPUT') && !t.readOnly || t.isContentEditable)) return;
  var ids = {'1': 'ak-vote-a', '2': 'ak-vote-b', '3': 'ak-vote-tie', '4': 'ak-vote-both-bad',
             's': 'ak-skip', 'u': 'ak-undo'};
  var id = ids[(e.key || '').toLowerCase()];
  if (!id) return;
  var el = document.getElementById(id);
  if (el && !el.disabled) { e.preventDefault(); el.click(); }
});
</script>
"""

CSS = """
#ak-prompt { max-height: 22em; overflow-y: auto; }
"""


@dataclass
class AppContext:
    store: Store
    overlap: int
    auth: UsersFile | None  # None: --no-auth (loopback only), everyone is LOCAL_USER and admin
    export_dir: Path
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT

    def user(self, request: gr.Request | None) -> str:
        name = getattr(request, "username", None) if request is not None else None
        if self.auth is None:
            return name or LOCAL_USER
        if not name:
            raise gr.Error("log in first")
        return name

    def is_admin(self, request: gr.Request | None) -> bool:
        if self.auth is None:
            return True
        return self.auth.is_admin(getattr(request, "username", None))


def _item_tuple(item) -> tuple[int | None, str, str, str]:
    if item is None:
        return None, "", "", ""
    return item.comparison_id, item.prompt_text, item.left, item.right


def _api(fn):
    """Turn UserError into gr.Error so the client sees a one-line message."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise gr.Error(str(err)) from None

    return wrapper


def api_endpoints(ctx: AppContext) -> None:
    """The named endpoints scripts and simulated annotators use (see the module doc)."""

    @_api
    def next_item(request: gr.Request) -> tuple[int | None, str, str, str]:
        """Lease the next comparison to the logged-in annotator (or return the one they hold)."""
        return _item_tuple(store_next_item(ctx.store, ctx.user(request), overlap=ctx.overlap))

    @_api
    def submit_vote(comparison_id: int, choice: str, rationale: str = "", request: gr.Request = None) -> dict:
        """Vote on a leased comparison: choice a | b | tie | both_bad, as shown (a = first/left)."""
        r = store_submit_vote(ctx.store, ctx.user(request), comparison_id, choice, rationale or None,
                              overlap=ctx.overlap)
        return {"vote_id": r.vote_id, "comparison_id": r.comparison_id, "choice": r.choice, "seconds": r.seconds}

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

    group = dict(concurrency_id=CONCURRENCY_ID)
    gr.api(next_item, api_name="next_item", **group)
    gr.api(submit_vote, api_name="submit_vote", **group)
    gr.api(skip, api_name="skip", **group)
    gr.api(undo_last, api_name="undo_last_vote", **group)
    gr.api(my_progress, api_name="progress", **group)


def labeling_tab(ctx: AppContext, demo: gr.Blocks) -> None:
    with gr.Tab("Label", id="label"):
        progress = gr.Markdown(elem_id="ak-progress")
        prompt = gr.Markdown(label="Prompt", elem_id="ak-prompt", sanitize_html=True, container=True)
        with gr.Row(equal_height=True):
            # Model text goes in read-only text boxes: shown as text, never parsed as HTML or markdown.
            left = gr.Textbox(label="A", lines=10, max_lines=30, interactive=False, elem_id="ak-left")
            right = gr.Textbox(label="B", lines=10, max_lines=30, interactive=False, elem_id="ak-right")
        with gr.Row():
            btn_a = gr.Button("A better  [1]", variant="primary", elem_id="ak-vote-a")
            btn_b = gr.Button("B better  [2]", variant="primary", elem_id="ak-vote-b")
            btn_tie = gr.Button("Tie  [3]", elem_id="ak-vote-tie")
            btn_bad = gr.Button("Both bad  [4]", elem_id="ak-vote-both-bad")
        rationale = gr.Textbox(label="Rationale (optional)", lines=2, max_lines=6, elem_id="ak-rationale")
        with gr.Row():
            btn_skip = gr.Button("Skip  [s]", size="sm", elem_id="ak-skip")
            btn_undo = gr.Button("Undo last vote  [u]", size="sm", elem_id="ak-undo")
        status = gr.Markdown(elem_id="ak-status")
        comparison = gr.State(None)

    outputs = [comparison, prompt, left, right, progress, status, rationale]

    def render(view: handlers.ItemView) -> dict:
        return {comparison: view.comparison_id, prompt: view.prompt_markdown, left: view.left, right: view.right,
                progress: view.progress, status: view.status, rationale: ""}

    def show(request: gr.Request):
        return render(handlers.current_view(ctx.store, ctx.user(request), overlap=ctx.overlap))

    def on_vote(choice: str):
        def fn(cid, why, request: gr.Request):
            return render(handlers.vote(ctx.store, ctx.user(request), cid, choice, why, overlap=ctx.overlap))

        return fn

    def on_skip(cid, request: gr.Request):
        return render(handlers.skip_item(ctx.store, ctx.user(request), cid, overlap=ctx.overlap))

    def on_undo(request: gr.Request):
        return render(handlers.undo(ctx.store, ctx.user(request), overlap=ctx.overlap))

    ui = dict(api_visibility="private", show_progress="hidden", concurrency_id=CONCURRENCY_ID)
    demo.load(show, outputs=outputs, **ui)
    for button, choice in ((btn_a, "a"), (btn_b, "b"), (btn_tie, "tie"), (btn_bad, "both_bad")):
        button.click(on_vote(choice), inputs=[comparison, rationale], outputs=outputs, **ui)
    btn_skip.click(on_skip, inputs=[comparison], outputs=outputs, **ui)
    btn_undo.click(on_undo, outputs=outputs, **ui)


def admin_tab(ctx: AppContext, demo: gr.Blocks) -> None:
    with gr.Tab("Admin", id="admin", visible=False) as tab:
        summary = gr.Markdown()
        annotators = gr.Dataframe(headers=handlers.ANNOTATOR_COLUMNS, interactive=False, label="Annotators")
        pairs = gr.Dataframe(headers=handlers.PAIR_COLUMNS, interactive=False, label="Annotator pairs")
        refresh = gr.Button("Refresh", size="sm")
        with gr.Row():
            min_agreement = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Minimum agreement")
            ties = gr.Dropdown(["drop", "ignore"], value="drop", label="Ties")
            both_bad = gr.Dropdown(["drop", "ignore"], value="drop", label="Both bad")
        export = gr.Button("Export preference dataset")
        export_status = gr.Markdown()

    def require_admin(request: gr.Request) -> None:
        if not ctx.is_admin(request):
            raise gr.Error("admins only")

    def show(request: gr.Request):
        if not ctx.is_admin(request):
            return {tab: gr.Tab(visible=False)}
        view = handlers.admin_view(ctx.store)
        return {tab: gr.Tab(visible=True), summary: view.summary_markdown, annotators: view.annotators,
                pairs: view.pairs}

    def do_export(x, t, b, request: gr.Request):
        require_admin(request)
        return {export_status: handlers.admin_export(ctx.store, ctx.export_dir, min_agreement=x, ties=t, both_bad=b)}

    ui = dict(api_visibility="private", show_progress="hidden", concurrency_id=CONCURRENCY_ID)
    demo.load(show, outputs=[tab, summary, annotators, pairs], **ui)
    refresh.click(show, outputs=[tab, summary, annotators, pairs], **ui)
    export.click(do_export, inputs=[min_agreement, ties, both_bad], outputs=[export_status], **ui)


def build_app(store: Store, *, auth: UsersFile | None = None, overlap: int = 3, export_dir: str | Path | None = None,
              concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT) -> gr.Blocks:
    """The Blocks app over `store`; launch it with `launch()` (which applies auth and hardening)."""
    if overlap < 1:
        raise UserError(f"overlap must be at least 1, got {overlap}")
    export_dir = Path(export_dir) if export_dir else Path(store.name + ".export") if "://" not in store.name \
        else Path("labels.export")
    ctx = AppContext(store, overlap, auth, export_dir.resolve(), concurrency_limit)
    with gr.Blocks(title="alignkit labeling") as demo:
        gr.Markdown("### alignkit labeling — which response is better?")
        with gr.Tabs():
            labeling_tab(ctx, demo)
            admin_tab(ctx, demo)
        api_endpoints(ctx)
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


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int = 7860, blocked_paths: list[str | Path] = (),
           prevent_thread_lock: bool = False, quiet: bool = False) -> Any:
    """Start the server with login (unless the app was built without auth) and hardening settings."""
    ctx: AppContext = demo.alignkit_context
    if ctx.auth is None and not is_loopback(host):
        raise UserError(f"--no-auth serves only on loopback (127.0.0.1, ::1, localhost), not {host}")
    blocked = []
    for p in [*blocked_paths, ctx.export_dir]:
        p = Path(p).resolve()
        blocked.append(str(p))
        if p.suffix == ".db":  # SQLite's side files
            blocked += [str(p) + "-wal", str(p) + "-shm", str(p) + "-journal"]
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=ctx.auth.check if ctx.auth else None,
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
        head=KEYBOARD_HEAD,
        css=CSS,
        footer_links=["api"],
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
    )
