"""A real headless browser (Debian's chromium via Playwright) logs in and labels with the keyboard."""

from __future__ import annotations

import os

import pytest

from _labeling_server import Server, make_store, make_users
from alignkit.store import open_store
from alignkit.store.agreement import load_votes

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"><b id="injected">bold</b>'


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"browser tests SKIPPED: {CHROMIUM} missing (apt-get install -y chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="browser tests SKIPPED: playwright not installed")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def image_host():
    """Another origin serving an image, counting the requests it gets: a stand-in for a remote host."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/gif")
            self.end_headers()
            self.wfile.write(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_login_label_three_with_shortcuts_and_model_html_stays_text(browser, tmp_path, image_host):
    image_url, image_hits = image_host
    db = make_store(str(tmp_path / "labels.db"), tmp_path, 0, extra=[
        {"prompt": "Which answer is **safer**?\n\n```python\nprint('hi')\n```\n\n"
                   f"![pixel]({image_url}/md.gif) <img src=\"{image_url}/tag.gif\">",
         "responses": [XSS, "plain answer"]},
        {"prompt": "second", "responses": ["one", "two"]},
        {"prompt": "third", "responses": ["three", "four"]},
        {"prompt": "fourth", "responses": ["five", "six"]},
    ])
    # One arena battle, as `alignkit compare --judge human:DB` sends it; a model name with HTML in it.
    from alignkit.store.importer import ImportRow, write_rows

    battle_models = ["sft-model", 'dpo<img src=x onerror="window.__xss = 3">']
    store = open_store(db)
    write_rows(store, [ImportRow("battle prompt", "test", ["battle answer one", "battle answer two"],
                                 ["/specs/sft", "/specs/dpo"], [{"model_name": m} for m in battle_models])],
               arena=True)
    store.close()
    creds = make_users(tmp_path / "users.json", ["erin", "root"], admins=("root",))
    server = Server(db, users=tmp_path / "users.json", overlap=1, log=tmp_path / "server.log").start()
    page = browser.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page.goto(server.url, wait_until="domcontentloaded")
        page.fill("input[type=text]", "erin")
        page.fill("input[type=password]", creds["erin"])
        page.keyboard.press("Enter")
        left = page.locator("#ak-left textarea")
        right = page.locator("#ak-right textarea")
        page.wait_for_function("() => { const t = document.querySelector('#ak-left textarea'); "
                               "return t && t.value.length > 0; }", timeout=30_000)

        # The response with <script> and an onerror image is shown verbatim as text, never run.
        texts = [left.input_value(), right.input_value()]
        assert XSS in texts
        assert page.evaluate("window.__xss") is None
        assert page.locator("#injected").count() == 0 and page.locator("img[src=x]").count() == 0
        # The prompt is markdown: the code block is rendered.
        assert page.locator("#ak-prompt pre code").count() >= 1
        # Its images are not fetched from other hosts (that would leak every annotator's address).
        page.wait_for_function("() => document.querySelectorAll('#ak-prompt img').length > 0", timeout=15_000)
        page.wait_for_timeout(500)
        assert image_hits == []

        shown = []
        for key, expect in (("1", "a"), ("2", "b"), ("3", "tie")):
            before = (left.input_value(), right.input_value())
            shown.append(before)
            page.locator("body").click(position={"x": 5, "y": 5})  # focus outside any text box
            page.keyboard.press(key)
            page.wait_for_function(
                "(n) => (document.querySelector('#ak-status') || {}).innerText?.includes('Saved #' + n)",
                arg=str(len(shown)), timeout=15_000)
        progress = page.locator("#ak-progress").inner_text()
        assert "done 3" in progress and "remaining 1" in progress
        assert page.get_by_role("tab", name="Admin").count() == 0  # not an admin: no admin tab
        assert dialogs == []

        # An admin sees the admin tab with the counts.
        admin = browser.new_context().new_page()
        admin.goto(server.url, wait_until="domcontentloaded")
        admin.fill("input[type=text]", "root")
        admin.fill("input[type=password]", creds["root"])
        admin.keyboard.press("Enter")
        admin.get_by_role("tab", name="Admin").click(timeout=30_000)
        admin.get_by_text("3 votes on 3 comparisons").wait_for(timeout=15_000)
        admin.close()

        # The Arena: anonymous texts, a vote with the same key, then the names (as text) and locked buttons.
        page.get_by_role("tab", name="Arena").click()
        page.wait_for_function("() => { const t = document.querySelector('#ak-arena-left textarea'); "
                               "return t && t.value.length > 0; }", timeout=15_000)
        arena_left = page.locator("#ak-arena-left textarea").input_value()
        assert "model" not in page.locator("#ak-arena-reveal").inner_text()
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("1")  # A is better; the hidden Label tab's button must not take it
        page.locator("#ak-arena-reveal").get_by_text("A was").wait_for(timeout=15_000)
        left_model = battle_models[0] if arena_left == "battle answer one" else battle_models[1]
        right_model = battle_models[1] if left_model == battle_models[0] else battle_models[0]
        assert page.locator("#ak-arena-reveal").inner_text().startswith(f"A was {left_model}, B was {right_model}")
        assert page.locator("#ak-arena-a").is_disabled() and page.locator("#ak-arena-next").is_visible()
        assert page.evaluate("window.__xss") is None and page.locator("img[src=x]").count() == 0
        page.get_by_role("tab", name="Leaderboard").click()
        page.locator("#ak-leaderboard").get_by_text("sft-model").wait_for(timeout=30_000)
    finally:
        page.close()
        server.stop()

    store = open_store(db, create=False)
    votes = load_votes(store)
    with store.read() as s:
        from alignkit.store.models import Comparison

        pairs = {c.id: (c.response_a.text, c.response_b.text) for c in s.query(Comparison)}
    store.close()
    (battle_vote,) = [v for v in votes if v.arena]
    votes = [v for v in votes if not v.arena]
    assert [v.annotator for v in votes] == ["erin"] * 3
    assert battle_vote.annotator == "erin" and battle_vote.choice == ("b" if battle_vote.swapped else "a")
    # Each stored vote, mapped back through the side order shown, is the key that was pressed.
    for v, (shown_left, _), pressed in zip(votes, shown, ("a", "b", "tie")):
        a_text, b_text = pairs[v.comparison_id]
        assert shown_left == (b_text if v.swapped else a_text)
        if pressed == "tie":
            assert v.choice == "tie"
        else:
            left_won = pressed == "a"
            assert v.choice == ("a" if left_won != v.swapped else "b")
