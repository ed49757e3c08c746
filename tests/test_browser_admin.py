"""The admin tab and the Arena's undo in a real browser: an admin adds a user, exports and downloads the zip,
sees progress per annotator; an annotator takes back a battle vote before the reveal. Screenshots at 1280x800
and 390x844 (ALIGNKIT_SCREENSHOTS=DIR keeps them)."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile

import pytest

from _browser import browser, focus_page, log_in, shown_item  # noqa: F401
from _labeling_server import Server, client, make_users, write_prompts
from alignkit.cli import main as alignkit_main

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOTS = os.environ.get("ALIGNKIT_SCREENSHOTS")


def shows(page, selector, text):
    page.wait_for_function("([sel, text]) => (document.querySelector(sel) || {}).innerText?.includes(text)",
                           arg=[selector, text], timeout=15_000)


def shot(page, name):
    if SHOTS:
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from alignkit.store import open_store
    from alignkit.store.importer import ImportRow, write_rows

    tmp = tmp_path_factory.mktemp("browser-admin")
    db = str(tmp / "labels.db")
    assert alignkit_main(["label", "import", "--db", db, str(write_prompts(tmp / "p.jsonl", 4))]) == 0
    store = open_store(db)
    write_rows(store, [ImportRow(prompt="battle <b>0</b>", source="compare 0", responses=["one answer", "another answer"],
                                 models=["/m/alpha", "/m/beta"],
                                 sampling=[{"model_name": "alpha<img src=x>"}, {"model_name": "beta"}])], arena=True)
    store.close()
    creds = make_users(tmp / "users.json", ["lead", "ann"], admins=("lead",))
    server = Server(db, users=tmp / "users.json", overlap=2, log=tmp / "server.log", min_display=0.3).start()
    try:
        yield {"url": server.url, "creds": creds, "users": tmp / "users.json"}
    finally:
        server.stop()


def test_admin_adds_a_user_exports_and_downloads(browser, served):
    ann = client(served["url"], ("ann", served["creds"]["ann"]))
    cid = ann.predict(api_name="/next_item")[0]
    time.sleep(0.35)  # the server's minimum display time
    ann.predict(comparison_id=cid, choice="a", rationale="clearer", api_name="/submit_vote")
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    try:
        log_in(page, served["url"], "lead", served["creds"]["lead"])
        shown_item(page)
        page.get_by_role("tab", name="Admin").click()
        shows(page, "#ak-admin-progress", "\nann\n1\n0\n0\n0\n0\n")  # ann: 1 vote, nothing else
        shot(page, "admin-1280")
        page.locator("#ak-admin-users").get_by_text("Users", exact=True).first.click()
        page.locator("#ak-admin-user-name input, #ak-admin-user-name textarea").first.fill("erin")
        page.locator("#ak-admin-user-password input").fill("erin-password")
        page.locator("#ak-admin-user-add").click()
        page.locator("#ak-admin-user-status").get_by_text("erin added.").wait_for(timeout=15_000)
        shows(page, "#ak-admin-user-table", "\nerin\nno\nyes")
        assert page.locator("#ak-admin-user-password input").input_value() == ""  # the password is not kept
        shot(page, "admin-users-1280")
        assert "erin" in json.loads(served["users"].read_text())["users"]
        page.locator("#ak-admin-export").click()
        page.locator("#ak-admin-export-status").get_by_text("Exported 1 preference rows").wait_for(timeout=30_000)
        assert "ties drop" in page.locator("#ak-admin-export-status").inner_text()  # the policy it used
        with page.expect_download() as info:
            page.locator("#ak-admin-download a").click()
        data = open(info.value.path(), "rb").read()
        z = zipfile.ZipFile(io.BytesIO(data))
        assert any(n.endswith("/preferences.jsonl") for n in z.namelist())
        assert any(n.endswith("/dataset_info.json") for n in z.namelist())
        page.locator("#ak-admin-export").scroll_into_view_if_needed()
        shot(page, "admin-export-1280")
    finally:
        page.close()
    # erin, added in the browser, logs in.
    assert client(served["url"], ("erin", "erin-password")).predict(api_name="/progress")["done"] == 0


def test_admin_tab_on_a_phone(browser, served):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        log_in(page, served["url"], "lead", served["creds"]["lead"])
        shown_item(page)
        page.wait_for_timeout(800)
        # On a phone Gradio folds the tabs that do not fit into its "..." menu.
        page.locator(".overflow-menu button").first.click()
        page.locator(".overflow-dropdown").get_by_text("Admin").click()
        page.locator("#ak-admin-progress").wait_for(timeout=15_000)
        page.wait_for_timeout(800)
        shot(page, "admin-390")
        assert page.locator("#ak-admin-refresh").bounding_box()["x"] + 40 < 390  # nothing pushed off screen
    finally:
        context.close()


def test_arena_vote_is_undone_before_the_reveal(browser, served):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        log_in(page, served["url"], "ann", served["creds"]["ann"])
        shown_item(page)
        page.get_by_role("tab", name="Arena").click()
        battle = shown_item(page, "ak-arena-prompt")
        assert battle
        page.wait_for_timeout(450)
        focus_page(page)
        page.keyboard.press("1")
        page.locator("#ak-arena-reveal").get_by_text("You voted").wait_for(timeout=15_000)
        assert page.locator("#ak-arena-show-models").is_visible() and page.locator("#ak-arena-undo").is_visible()
        assert "alpha" not in page.locator("body").inner_text()  # no model named before the reveal
        shot(page, "arena-voted-1280")
        focus_page(page)
        page.keyboard.press("u")
        page.locator("#ak-arena-status").get_by_text(f"Undid your vote on #{battle}").wait_for(timeout=15_000)
        assert not page.locator("#ak-arena-a").is_disabled()
        page.wait_for_timeout(450)
        focus_page(page)
        page.keyboard.press("2")
        page.locator("#ak-arena-reveal").get_by_text("You voted").wait_for(timeout=15_000)
        focus_page(page)
        page.keyboard.press("r")
        page.locator("#ak-arena-reveal").get_by_text("was alpha<img src=x>").wait_for(timeout=15_000)
        assert page.locator("#ak-arena-reveal img").count() == 0  # a model's name is text
        assert not page.locator("#ak-arena-undo").is_visible() and page.locator("#ak-arena-next").is_visible()
        shot(page, "arena-revealed-1280")
    finally:
        page.close()


def test_admin_rules_on_a_disagreement_in_the_browser_and_the_export_has_it(browser, tmp_path):
    from test_labeling_review import XSS, vote_canonical

    db = str(tmp_path / "labels.db")
    assert alignkit_main(["label", "import", "--db", db, str(write_prompts(tmp_path / "p.jsonl", 1))]) == 0
    creds = make_users(tmp_path / "users.json", ["lead", "ann", "bob"], admins=("lead",))
    server = Server(db, users=tmp_path / "users.json", overlap=2, log=tmp_path / "server.log").start()
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    try:
        vote_canonical(client(server.url, ("ann", creds["ann"])), {1: "a"}, XSS)
        vote_canonical(client(server.url, ("bob", creds["bob"])), {1: "b"}, "longer is better")
        log_in(page, server.url, "lead", creds["lead"])
        shown_item(page)
        page.get_by_role("tab", name="Admin").click()
        page.locator("#ak-admin-review").get_by_text("Disagreements", exact=True).first.click()
        page.locator("#ak-admin-review-pick input").click()
        page.get_by_role("option").first.click()
        shows(page, "#ak-admin-review-item", "longer is better")
        assert XSS in page.locator("#ak-admin-review-item").inner_text()  # a rationale is text
        assert page.locator("#ak-admin-review-item img").count() == 0 and page.evaluate("window.__r") is None
        page.locator("#ak-admin-rule-a").click()
        shows(page, "#ak-admin-review-status", "Ruled #1: A better")
        page.locator("#ak-admin-review").scroll_into_view_if_needed()
        shot(page, "admin-review-1280")
        page.locator("#ak-admin-export").click()
        page.locator("#ak-admin-export-status").get_by_text("Exported 1 preference rows").wait_for(timeout=30_000)
        with page.expect_download() as info:
            page.locator("#ak-admin-download a").click()
        z = zipfile.ZipFile(io.BytesIO(open(info.value.path(), "rb").read()))
        top = z.namelist()[0].split("/", 1)[0]
        (row,) = [json.loads(line) for line in z.read(f"{top}/preferences.jsonl").decode().splitlines()]
        assert (row["chosen"], row["adjudicated"]) == ("short 0", True)
        assert json.loads(z.read(f"{top}/export.json"))["adjudicated"] == 1
    finally:
        page.close()
        server.stop()
