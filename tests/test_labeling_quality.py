"""Annotator quality through the real server and the CLI: gold items, flags, exclusion by an admin."""

from __future__ import annotations

import json

import pytest
from gradio_client.exceptions import AppError

from _labeling_server import Server, client, make_users, write_prompts
from alignkit.cli import main as alignkit_main


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labeling-quality")
    db = str(tmp / "labels.db")
    gold = tmp / "gold.jsonl"
    gold.write_text("".join(json.dumps({"prompt": f"gold {i}", "chosen": f"right {i}", "rejected": f"wrong {i}"}) + "\n"
                            for i in range(3)))
    assert alignkit_main(["label", "import", "--db", db, str(write_prompts(tmp / "p.jsonl", 6)), "--gold", str(gold)]) == 0
    creds = make_users(tmp / "users.json", ["lead", "ann", "bot"], admins=("lead",))
    server = Server(db, users=tmp / "users.json", overlap=1, extra=["--gold-rate", "1"], log=tmp / "server.log").start()
    try:
        yield {"db": db, "creds": creds, "url": server.url, "tmp": tmp}
    finally:
        server.stop()


def test_gold_items_are_served_blind_and_measure_each_annotator(served):
    for name, right in (("ann", True), ("bot", False)):
        c = client(served["url"], (name, served["creds"][name]))
        for _ in range(3):
            cid, prompt, a, b = c.predict(api_name="/next_item")
            assert prompt.startswith("gold")  # at rate 1, the gold items first, to everyone (overlap 1)
            left_is_right = a.startswith("right")
            c.predict(comparison_id=cid, choice="a" if left_is_right == right else "b", rationale="",
                      api_name="/submit_vote")
        cid, prompt, a, b = c.predict(api_name="/next_item")
        assert prompt.startswith("Prompt ")
        c.predict(comparison_id=cid, choice="a", rationale="", api_name="/submit_vote")
    lead = client(served["url"], ("lead", served["creds"]["lead"]))
    stats = lead.predict(api_name="/admin_stats")
    assert stats["annotators"]["ann"]["gold_accuracy"] == 1.0 and stats["annotators"]["bot"]["gold_accuracy"] == 0.0
    assert stats["n_gold_votes"] == 6


def test_only_an_admin_excludes_and_export_leaves_the_votes_out(served, capsys):
    bot = client(served["url"], ("bot", served["creds"]["bot"]))
    with pytest.raises(AppError, match="admins only"):
        bot.predict(annotator="ann", excluded=True, api_name="/admin_exclude")
    with pytest.raises(AppError, match="admins only"):
        bot.predict(api_name="/admin_stats")
    lead = client(served["url"], ("lead", served["creds"]["lead"]))
    assert lead.predict(annotator="bot", excluded=True, api_name="/admin_exclude")["excluded_now"] == ["bot"]
    with pytest.raises(AppError, match="no annotator 'nobody'"):
        lead.predict(annotator="nobody", excluded=True, api_name="/admin_exclude")
    out = served["tmp"] / "export"
    assert alignkit_main(["label", "export", "--db", served["db"], "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and not [r for r in rows if r["prompt"].startswith("gold")]  # ann's one ordinary vote
    assert json.loads((out / "export.json").read_text())["policy"]["excluded_annotators"] == ["bot"]
    capsys.readouterr()
    assert alignkit_main(["label", "exclude", "--db", served["db"], "bot", "--include"]) == 0
    assert "excluded now: nobody" in capsys.readouterr().out
    assert alignkit_main(["label", "exclude", "--db", served["db"], "nobody"]) == 2
    assert "no annotator 'nobody'" in capsys.readouterr().err
