"""What an annotator sees, in a real browser at 1280x800 and on a phone (390x844): long responses keep the buttons
in view, the boxes scroll together, a skipped item comes back, and nothing left means no button to press."""

from __future__ import annotations

import json
import os

import pytest

from _browser import browser, focus_page, log_in, shown_item  # noqa: F401
from _labeling_server import Server, make_users
from alignkit.cli import main as alignkit_main

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOTS = os.environ.get("ALIGNKIT_SCREENSHOTS")  # a directory: the screenshots are kept there to look at


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser-view")
    long_a = "\n".join(f"line {i} of a long answer, " + "word " * 12 for i in range(400))  # ~35 kB
    rows = [{"prompt": "Compare these two long answers.", "responses": [long_a, long_a.replace("word", "term")]},
            {"prompt": "second prompt", "responses": ["one", "two"]}]
    path = tmp / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = str(tmp / "labels.db")
    assert alignkit_main(["label", "import", "--db", db, str(path)]) == 0
    creds = make_users(tmp / "users.json", ["desk", "phone"])
    server = Server(db, users=tmp / "users.json", overlap=2, log=tmp / "server.log", min_display=0.3).start()
    try:
        yield {"url": server.url, "creds": creds, "lengths": {len(t) for t in rows[0]["responses"]}}
    finally:
        server.stop()


def shot(page, name):
    if SHOTS:
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=False)


def test_desktop_long_responses_keep_the_buttons_in_view_and_scroll_together(browser, served):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        log_in(page, served["url"], "desk", served["creds"]["desk"])
        shown_item(page)
        page.wait_for_timeout(500)
        shot(page, "label-1280")
        left, right = page.locator("#ak-left .ak-response"), page.locator("#ak-right .ak-response")
        assert abs(left.bounding_box()["height"] - right.bounding_box()["height"]) < 1  # boxes of one height
        assert page.locator("#ak-vote-a").bounding_box()["y"] + 30 < 800  # the buttons are above the fold
        shown_lengths = {f"({n:,} characters)" for n in served["lengths"]}
        assert page.locator("#ak-left .ak-len").inner_text() in shown_lengths  # the length is shown
        left.evaluate("el => { el.scrollTop = (el.scrollHeight - el.clientHeight) / 2; }")
        page.wait_for_timeout(300)
        fraction = right.evaluate("el => el.scrollTop / (el.scrollHeight - el.clientHeight)")
        assert 0.45 < fraction < 0.55  # the other box followed
        assert page.locator("#ak-progress progress").count() == 1
        # Skip, bring it back from the skipped list, vote on both: nothing left, no button to press.
        first = shown_item(page)
        focus_page(page)
        page.keyboard.press("s")
        page.wait_for_function("(f) => document.querySelector('#ak-prompt [data-ak-render]')"
                               ".getAttribute('data-ak-item') !== f", arg=first, timeout=15_000)
        page.locator("#ak-skipped").get_by_text("Skipped items").click()
        page.locator("#ak-skipped-pick input").click()
        page.get_by_role("option").first.click()
        page.locator("#ak-unskip").click()
        page.locator("#ak-status").get_by_text(f"Brought back #{first}").wait_for(timeout=15_000)
        assert shown_item(page) == first
        for _ in range(2):
            page.wait_for_timeout(450)
            focus_page(page)
            page.keyboard.press("1")
            page.locator("#ak-status").get_by_text("Saved #").wait_for(timeout=15_000)
            page.wait_for_timeout(300)
        page.wait_for_function("() => document.querySelector('#ak-vote-a').disabled", timeout=15_000)
        assert page.locator("#ak-skip").is_disabled() and "Nothing left" in page.locator("#ak-prompt").inner_text()
        shot(page, "label-1280-done")
        page.get_by_role("tab", name="Arena").click()
        page.wait_for_timeout(800)
        shot(page, "arena-1280")
        page.get_by_role("tab", name="Leaderboard").click()
        page.wait_for_timeout(800)
        shot(page, "leaderboard-1280")
    finally:
        page.close()


def test_on_a_phone_the_responses_stack_and_key_hints_go(browser, served):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        log_in(page, served["url"], "phone", served["creds"]["phone"])
        shown_item(page)
        page.wait_for_timeout(600)
        shot(page, "label-390")
        title = page.get_by_text("alignkit labeling").bounding_box()
        assert title["width"] > 200 and title["height"] < 80  # the header is not squeezed into one column
        left = page.locator("#ak-left .ak-response").bounding_box()
        right = page.locator("#ak-right .ak-response").bounding_box()
        assert right["y"] > left["y"] + left["height"] - 1 and left["width"] > 250  # stacked, full width
        assert "[1]" not in page.locator("#ak-vote-a").inner_text()  # no keys on a touch screen
        page.get_by_role("tab", name="Arena").click()
        page.wait_for_timeout(800)
        shot(page, "arena-390")
    finally:
        context.close()


def test_strength_keys_and_guidelines_on_a_scaled_store(browser, tmp_path):
    from _labeling_server import write_prompts
    from alignkit.store import open_store
    from alignkit.store.agreement import load_votes
    from alignkit.store.models import Vote

    db = str(tmp_path / "labels.db")
    guide = tmp_path / "guide.md"
    guide.write_text("# Judge correctness first\n\nThen **tone**. <img src=x onerror=\"window.__g = 1\">")
    assert alignkit_main(["label", "import", "--db", db, str(write_prompts(tmp_path / "p.jsonl", 3)), "--scale", "2",
                          "--guidelines", str(guide)]) == 0
    creds = make_users(tmp_path / "users.json", ["ann"])
    server = Server(db, users=tmp_path / "users.json", overlap=1, log=tmp_path / "server.log", min_display=0.3).start()
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        log_in(page, server.url, "ann", creds["ann"])
        shown_item(page)
        guidelines = page.locator("#ak-guidelines-text")
        guidelines.get_by_text("Judge correctness first").wait_for(timeout=15_000)  # open on a first visit
        assert guidelines.locator("h1").count() == 1 and guidelines.locator("img").count() == 0
        assert page.evaluate("window.__g") is None
        labels = [page.locator(f"#ak-vote-{s}").inner_text() for s in ("a-2", "a-1", "tie", "b-1", "b-2", "both-bad")]
        assert labels == ["A much better [1]", "A slightly better [2]", "Tie [3]", "B slightly better [4]",
                          "B much better [5]", "Both bad [6]"]  # as the browser shows them
        shot(page, "label-scale-1280")
        for key in ("1", "4"):
            page.wait_for_timeout(450)
            focus_page(page)
            page.keyboard.press(key)
            page.locator("#ak-status").get_by_text("Saved #").wait_for(timeout=15_000)
            page.wait_for_timeout(300)
        page.reload(wait_until="domcontentloaded")
        shown_item(page)
        page.wait_for_timeout(800)
        assert not guidelines.is_visible()  # seen: closed on later visits (still one click away)
    finally:
        page.close()
        server.stop()
    store = open_store(db, create=False)
    with store.read() as s:
        strengths = [v.strength for v in s.query(Vote).order_by(Vote.id)]
    votes = load_votes(store)
    store.close()
    # "1" = A much better (strength 2), "4" = B slightly better (strength 1), mapped back through the sides shown.
    assert strengths == [2, 1]
    shown = [("b" if v.choice == "a" else "a") if v.swapped else v.choice for v in votes]
    assert shown == ["a", "b"]
