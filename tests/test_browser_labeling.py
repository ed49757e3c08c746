"""A real headless browser (Debian's chromium via Playwright) logs in and labels with the keyboard."""

from __future__ import annotations

import pytest

from _browser import browser, focus_page, log_in, other_host, shown_item, text_of  # noqa: F401
from _labeling_server import Server, make_store, make_users
from alignkit.store import open_store
from alignkit.store.agreement import load_votes

pytestmark = [pytest.mark.browser, pytest.mark.slow]

XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"><b id="injected">bold</b>'


def test_login_label_three_with_shortcuts_and_model_html_stays_text(browser, tmp_path, other_host):
    image_url, image_hits = other_host
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
    server = Server(db, users=tmp_path / "users.json", overlap=1, log=tmp_path / "server.log", min_display=0.3).start()
    page = browser.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        log_in(page, server.url, "erin", creds["erin"])
        shown_item(page)

        # The response with <script> and an onerror image is shown verbatim as text, never run.
        texts = [text_of(page, "#ak-left"), text_of(page, "#ak-right")]
        assert XSS in texts
        assert page.evaluate("window.__xss") is None
        assert page.locator("#injected").count() == 0 and page.locator("img[src=x]").count() == 0
        # With markdown on, the code block is rendered; images are never fetched, from any host (that
        # would leak every annotator's address), nor shown: the prompt's image syntax is shown as text.
        page.locator("#ak-markdown input").check()
        page.wait_for_selector("#ak-prompt pre code", timeout=15_000)
        page.wait_for_timeout(500)
        assert page.locator("#ak-prompt img").count() == 0 and image_hits == []
        page.locator("#ak-markdown input").uncheck()
        page.wait_for_selector("#ak-prompt .ak-text", timeout=15_000)

        shown = []
        for key, expect in (("1", "a"), ("2", "b"), ("3", "tie")):
            shown_item(page)
            page.wait_for_timeout(400)  # on screen past the 0.3 s minimum
            before = (text_of(page, "#ak-left"), text_of(page, "#ak-right"))
            shown.append(before)
            focus_page(page)
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
        log_in(admin, server.url, "root", creds["root"])
        admin.get_by_role("tab", name="Admin").click(timeout=30_000)
        admin.get_by_text("3 votes on 3 comparisons").wait_for(timeout=15_000)
        admin.close()

        # The Arena: anonymous texts, a vote with the same key, then the names (as text) and locked buttons.
        page.get_by_role("tab", name="Arena").click()
        shown_item(page, "ak-arena-prompt")
        page.wait_for_timeout(400)
        arena_left = text_of(page, "#ak-arena-left")
        assert "model" not in page.locator("#ak-arena-reveal").inner_text()
        focus_page(page)
        page.keyboard.press("1")  # A is better; the hidden Label tab's button must not take it
        page.locator("#ak-arena-reveal").get_by_text("You voted").wait_for(timeout=15_000)
        focus_page(page)
        page.keyboard.press("r")  # the models, once the annotator asks (until then the vote can be undone)
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
