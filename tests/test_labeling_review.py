"""Disagreement review through the real server: the admin sees the most disputed comparisons with every vote and
rationale, rules on one, and export follows the ruling (and counts it); annotators are refused all of it."""

from __future__ import annotations

import json

import pytest
from gradio_client.exceptions import AppError

from _labeling_server import Server, client, make_users, write_prompts
from alignkit.cli import main as alignkit_main

XSS = "<img src=x onerror=\"window.__r = 1\">because"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labeling-review")
    db = str(tmp / "labels.db")
    assert alignkit_main(["label", "import", "--db", db, str(write_prompts(tmp / "p.jsonl", 2))]) == 0
    creds = make_users(tmp / "users.json", ["lead", "ann", "bob", "cat"], admins=("lead",))
    server = Server(db, users=tmp / "users.json", overlap=3, log=tmp / "server.log").start()
    try:
        yield {"db": db, "creds": creds, "url": server.url, "tmp": tmp}
    finally:
        server.stop()


def vote_canonical(c, canonical: dict[int, str], rationale=""):
    """Vote on every item served: canonical choice per comparison ("a" = its first response, "short N")."""
    while True:
        cid, _, left, _ = c.predict(api_name="/next_item")
        if cid is None:
            return
        want = canonical[cid]
        shown = want if want not in ("a", "b") or left.startswith("short") else {"a": "b", "b": "a"}[want]
        c.predict(comparison_id=cid, choice=shown, rationale=rationale, api_name="/submit_vote")


def test_admin_reviews_disagreements_and_export_follows_the_ruling(served):
    users = {n: client(served["url"], (n, served["creds"][n])) for n in ("lead", "ann", "bob", "cat")}
    vote_canonical(users["ann"], {1: "a", 2: "a"}, "short is enough")
    vote_canonical(users["bob"], {1: "b", 2: "a"})
    vote_canonical(users["cat"], {1: "b", 2: "a"}, XSS)
    for call in (dict(api_name="/admin_disagreements"),
                 dict(comparison_id=1, choice="a", api_name="/admin_adjudicate")):
        with pytest.raises(AppError, match="admins only"):
            users["ann"].predict(**call)
    lead = users["lead"]
    (item,) = lead.predict(api_name="/admin_disagreements")  # comparison 2 is unanimous: not listed
    assert item["comparison_id"] == 1 and item["response_a"] == "short 0" and item["adjudication"] is None
    assert abs(item["disagreement"] - 1 / 3) < 1e-9
    assert [(v["annotator"], v["choice"], v["rationale"]) for v in item["votes"]] == \
        [("ann", "a", "short is enough"), ("bob", "b", None), ("cat", "b", XSS)]
    out = served["tmp"] / "before"
    assert alignkit_main(["label", "export", "--db", served["db"], "--out", str(out)]) == 0
    before = {r["comparison_id"]: r for r in map(json.loads, (out / "preferences.jsonl").read_text().splitlines())}
    assert before[1]["chosen"] == "a longer answer number 0" and not before[1]["adjudicated"]  # the plurality
    with pytest.raises(AppError, match="unknown choice"):
        lead.predict(comparison_id=1, choice="left", api_name="/admin_adjudicate")
    lead.predict(comparison_id=1, choice="a", rationale="the short one answers", api_name="/admin_adjudicate")
    assert lead.predict(api_name="/admin_disagreements")[0]["adjudication"] == "a"
    summary = lead.predict(min_agreement=0.9, api_name="/admin_export")  # 2/3 agreement would drop it otherwise
    assert summary["per_reason"]["adjudicated"] == 1
    out = served["tmp"] / "after"
    assert alignkit_main(["label", "export", "--db", served["db"], "--out", str(out), "--min-agreement", "0.9"]) == 0
    rows = {r["comparison_id"]: r for r in map(json.loads, (out / "preferences.jsonl").read_text().splitlines())}
    assert rows[1]["chosen"] == "short 0" and rows[1]["rejected"] == "a longer answer number 0"
    assert rows[1]["adjudicated"] and not rows[2]["adjudicated"]
    meta = json.loads((out / "export.json").read_text())
    assert meta["adjudicated"] == 1 and "ruling replaces the plurality" in meta["policy"]["adjudication"]
    # A ruling of tie drops it, as a tie plurality would.
    lead.predict(comparison_id=1, choice="tie", api_name="/admin_adjudicate")
    assert alignkit_main(["label", "export", "--db", served["db"], "--out", str(out)]) == 0
    meta = json.loads((out / "export.json").read_text())
    assert meta["per_reason"]["adjudicated_tie"] == 1 and meta["rows"] == 1 and meta["adjudicated"] == 1
