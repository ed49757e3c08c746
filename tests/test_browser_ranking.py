"""A ranking task and per-criterion questions in a real browser: keys rank and answer, what is shown is inert,
and the export has the ranking's 6 pairs with margins. Screenshots at 1280x800 and 390x844 go to
ALIGNKIT_SCREENSHOTS when set."""

from __future__ import annotations

import json
import os

import pytest

from _browser import browser, focus_page, log_in, next_item_rendered, shown_item  # noqa: F401
from _labeling_server import Server, make_users
from alignkit.cli import main as alignkit_main

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOTS = os.environ.get("ALIGNKIT_SCREENSHOTS")
FOUR = ["<b>best</b> answer <img src=x onerror=alert(1)>", "second answer", "third answer", "worst answer"]


def shot(page, name):
    if SHOTS:
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=False)


def serve(tmp, criteria: bool):
    db = str(tmp / "labels.db")
    path = tmp / "in.jsonl"
    if criteria:
        rows = [{"prompt": "Is this reply kind and safe?", "responses": ["A kind, safe reply.", "A rude reply."]}]
        flags = ["--criteria", "helpfulness,harmlessness,honesty"]
    else:
        rows, flags = [{"prompt": "Rank these four answers.", "responses": FOUR}], ["--rank"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert alignkit_main(["label", "import", "--db", db, str(path), *flags]) == 0
    creds = make_users(tmp / "users.json", ["desk", "phone"])
    server = Server(db, users=tmp / "users.json", overlap=2, log=tmp / "server.log", min_display=0.3).start()
    return server, creds, db


def test_a_ranking_of_4_by_keys_in_the_browser_exports_6_pairs(browser, tmp_path):
    server, creds, db = serve(tmp_path, criteria=False)
    try:
        for name, size in (("desk", (1280, 800)), ("phone", (390, 844))):
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            log_in(page, server.url, name, creds[name])
            first = shown_item(page)
            page.locator("#ak-ranking").wait_for(state="visible", timeout=15_000)
            assert page.locator("#ak-vote-a").is_hidden() and page.locator("#ak-left").is_hidden()
            shown = [page.locator(f"#ak-rank-response-{i} .ak-text").text_content() for i in range(1, 5)]
            assert sorted(shown) == sorted(FOUR)  # shown as text, the markup inert
            assert page.locator("#ak-ranking img, #ak-ranking b").count() == 0
            assert page.locator("#ak-rank-5").is_hidden()
            shot(page, f"ranking-{size[0]}")
            page.wait_for_timeout(400)
            focus_page(page)
            for text in shown:  # a rank per response in turn, the first two tied
                page.keyboard.press(str(max(1, FOUR.index(text))))
            page.keyboard.press("Enter")
            page.locator("#ak-status").get_by_text(f"Saved #{first}").wait_for(timeout=15_000)
            next_item_rendered(page, first)
            assert dialogs == []
            if name == "desk":
                shot(page, "ranking-1280-done")
            page.close()
    finally:
        server.stop()
    out = tmp_path / "out"
    assert alignkit_main(["label", "export", "--db", db, "--out", str(out), "--ties", "ignore"]) == 0
    rows = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    # Best and second tied (ranks 1, 1, 2, 3): that pair is dropped, the other 5 kept with margins.
    assert len(rows) == 5 and all(r["ranking"] for r in rows)
    margins = {(FOUR.index(r["chosen"]), FOUR.index(r["rejected"])): r["margin"] for r in rows}
    assert margins == {(0, 2): 0.0, (1, 2): 0.0, (0, 3): 1.0, (1, 3): 1.0, (2, 3): 0.0}
    summary = json.loads((out / "export.json").read_text())
    assert summary["per_reason"] == {"kept": 5, "no_usable_votes": 1}


def test_per_criterion_questions_by_keys_and_clicks_in_the_browser(browser, tmp_path):
    server, creds, db = serve(tmp_path, criteria=True)
    try:
        for name, size in (("desk", (1280, 800)), ("phone", (390, 844))):
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            log_in(page, server.url, name, creds[name])
            first = shown_item(page)
            page.locator("#ak-criteria").wait_for(state="visible", timeout=15_000)
            assert page.locator("#ak-vote-a").is_hidden() and page.locator("#ak-ranking").is_hidden()
            left = page.locator("#ak-left .ak-text").text_content()
            kind = "a" if left.startswith("A kind") else "b"
            shot(page, f"criteria-{size[0]}")
            page.wait_for_timeout(400)
            focus_page(page)
            page.keyboard.press("Enter")  # nothing answered yet: refused, nothing saved
            page.locator("#ak-status").get_by_text("Not saved: answer helpfulness").wait_for(timeout=15_000)
            page.keyboard.press("1" if kind == "a" else "2")  # helpfulness: the kind one
            page.locator("#ak-criterion-harmlessness").get_by_text("Tie").click()  # a click works too
            focus_page(page)
            page.keyboard.press("1" if kind == "a" else "2")  # honesty: the kind one
            page.keyboard.press("Enter")
            page.locator("#ak-status").get_by_text(f"Saved #{first}").wait_for(timeout=15_000)
            page.close()
    finally:
        server.stop()
    out = tmp_path / "out"
    assert alignkit_main(["label", "export", "--db", db, "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert row["chosen"] == "A kind, safe reply." and row["agreement"] == 1.0
    assert alignkit_main(["label", "export", "--db", db, "--out", str(out), "--criterion", "harmlessness"]) == 2
