"""Ranking tasks of K > 2 responses and per-criterion questions: the store (SQLite and PostgreSQL), the import's
refusals, export and agreement, and both end to end through the real server (gradio_client)."""

from __future__ import annotations

import json
import re

import pytest
from gradio_client.exceptions import AppError

from _labeling_server import Server, client, make_users
from tests.test_store import pg_cluster, store_url  # noqa: F401  (the store on SQLite and PostgreSQL)
from alignkit.cli import main as alignkit_main
from alignkit.errors import UserError
from alignkit.store import next_item, open_store, settings, submit_ranking, submit_vote, undo_last_vote
from alignkit.store.agreement import adjudicate, agreement_report, disagreements
from alignkit.store.export import RANK_MARGIN_RULE, export_dataset, preference_rows
from alignkit.store.importer import import_file

FOUR = ["best answer", "second answer", "third answer", "worst answer"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ranks_for(item, order: list[str]) -> list[int]:
    """The ranks (as shown) that put the texts in `order` best first; a text listed in a tuple ties."""
    rank = {}
    for i, entry in enumerate(order):
        for text in entry if isinstance(entry, tuple) else (entry,):
            rank[text] = i + 1
    return [rank[text] for text in item.ranking]


def test_a_ranking_of_4_is_one_task_one_vote_each_and_exports_6_pairs_with_margins(store_url, tmp_path):
    store = open_store(store_url, overlap=2)
    summary = import_file(store, write_jsonl(tmp_path / "r.jsonl", [{"prompt": "rank these", "responses": FOUR}]),
                          rank=True)
    assert summary.new_comparisons == 1
    item = next_item(store, "ann")
    assert item.is_ranking and sorted(item.ranking) == sorted(FOUR)
    assert next_item(store, "ann").ranking == item.ranking  # the same order on every call
    with pytest.raises(UserError, match="ranking task"):
        submit_vote(store, "ann", item.comparison_id, "a")
    with pytest.raises(UserError, match="needs 4 ranks"):
        submit_ranking(store, "ann", item.comparison_id, [1, 2, 3])
    submit_ranking(store, "ann", item.comparison_id, ranks_for(item, FOUR))
    with pytest.raises(UserError, match="already voted"):
        submit_ranking(store, "ann", item.comparison_id, ranks_for(item, FOUR))
    assert next_item(store, "ann") is None  # one task, one vote
    again = undo_last_vote(store, "ann")
    assert again.comparison_id == item.comparison_id and again.ranking == item.ranking
    submit_ranking(store, "ann", item.comparison_id, ranks_for(item, FOUR))
    bob = next_item(store, "bob")
    submit_ranking(store, "bob", bob.comparison_id, ranks_for(bob, FOUR))
    rows = preference_rows(store)
    assert len(rows) == 6 and all(r["ranking"] and r["agreement"] == 1.0 for r in rows)
    margins = {(r["chosen"], r["rejected"]): r["margin"] for r in rows}
    assert margins[("best answer", "second answer")] == 0.0  # adjacent ranks
    assert margins[("best answer", "worst answer")] == 2.0  # first against last: K - 2
    assert margins[("second answer", "worst answer")] == 1.0
    report = agreement_report(store)
    assert report["n_votes"] == 2 and report["annotators"]["ann"]["votes"] == 1  # once, not six times
    assert disagreements(store) == []
    with pytest.raises(UserError, match="ranking task"):
        adjudicate(store, "admin", item.comparison_id, "a")
    summary = export_dataset(store, tmp_path / "out")
    assert summary["rows"] == 6 and summary["policy"]["ranking_margin"] == RANK_MARGIN_RULE
    store.close()


def test_ties_in_a_ranking_are_tied_pairs(tmp_path):
    store = open_store(str(tmp_path / "labels.db"), overlap=1)
    import_file(store, write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": FOUR[:3]}]), rank=True)
    item = next_item(store, "ann")
    submit_ranking(store, "ann", item.comparison_id, ranks_for(item, [("best answer", "second answer"),
                                                                      "third answer"]))
    rows = preference_rows(store, ties="drop")
    assert {(r["chosen"], r["rejected"]) for r in rows} == {("best answer", "third answer"),
                                                           ("second answer", "third answer")}
    assert all(r["margin"] == 0.0 for r in rows)  # a tie group shares one rank: adjacent
    store.close()


def test_criteria_ask_one_choice_each_and_export_one_or_all_combined(store_url, tmp_path):
    store = open_store(store_url, overlap=3)
    settings.set_criteria(store, ["helpfulness", "harmlessness", "honesty"])
    with pytest.raises(UserError, match="carry no strength"):
        settings.set_scale(store, 2)
    import_file(store, write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "responses": ["one", "two"]}]))
    item = next_item(store, "ann")
    with pytest.raises(UserError, match="one choice per criterion"):
        submit_vote(store, "ann", item.comparison_id, "a")
    with pytest.raises(UserError, match="each criterion: helpfulness, harmlessness, honesty"):
        submit_vote(store, "ann", item.comparison_id, None, answers={"helpfulness": "a"})
    # In canonical terms: ann and bob say helpful a, harmless b, honest a; cat says b on all three.
    for name, canonical in (("ann", ("a", "b", "a")), ("bob", ("a", "b", "a")), ("cat", ("b", "b", "b"))):
        it = next_item(store, name)
        shown = [{"a": "b", "b": "a"}[c] if it.swapped else c for c in canonical]
        submit_vote(store, name, it.comparison_id, None, answers=dict(zip(settings.criteria(store), shown)))
    combined = preference_rows(store)
    assert combined[0]["chosen"] == "one" and combined[0]["agreement"] == pytest.approx(2 / 3)
    (harmless,) = preference_rows(store, criterion="harmlessness")
    assert harmless["chosen"] == "two" and harmless["agreement"] == 1.0
    with pytest.raises(UserError, match="unknown criterion; .* asks helpfulness, harmlessness, honesty"):
        preference_rows(store, criterion="speed")
    with pytest.raises(UserError, match="criteria cannot change now"):
        settings.set_criteria(store, ["helpfulness"])
    summary = export_dataset(store, tmp_path / "out", criterion="honesty")
    assert summary["policy"]["criterion"] == "honesty" and summary["rows"] == 1
    store.close()


def test_the_combine_rule_by_hand():
    assert settings.combine_criteria({"x": "a", "y": "b", "z": "a"}) == "a"
    assert settings.combine_criteria({"x": "a", "y": "b"}) == "tie"  # as many each way: dropped by default
    assert settings.combine_criteria({"x": "tie", "y": "both_bad"}) == "tie"
    assert settings.combine_criteria({"x": "both_bad", "y": "both_bad"}) == "both_bad"


@pytest.mark.parametrize("rows, flags, message", [
    ([{"prompt": "p", "responses": ["x", "y", "z"]}, {"prompt": "q", "responses": ["x", "y"]}], ["--rank"],
     r"r\.jsonl:2: --rank needs 3 to 9 `responses` per prompt, got 2 \(import it without --rank: a pair\)"),
    ([{"prompt": "p", "responses": [str(i) for i in range(10)]}], ["--rank"], r"r\.jsonl:1: --rank needs 3 to 9"),
    ([{"prompt": "p", "responses": ["x", "y"]}], ["--criteria", "helpfulness,Harm"],
     "criterion 'Harm' is not a name"),
    ([{"prompt": "p", "responses": ["x", "y"]}], ["--criteria", "honesty,honesty"], "honesty is named twice"),
])
def test_bad_rank_or_criteria_input_is_one_line_exit_2_and_nothing_imported(tmp_path, capsys, rows, flags, message):
    db = tmp_path / "labels.db"
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    assert alignkit_main(["label", "import", "--db", str(db), str(path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not db.exists()  # every check runs before a store is created


def test_export_with_an_unknown_criterion_is_one_line_exit_2(tmp_path, capsys):
    db = str(tmp_path / "labels.db")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "responses": ["x", "y"]}])
    assert alignkit_main(["label", "import", "--db", db, str(path), "--criteria", "helpfulness,harmlessness"]) == 0
    assert alignkit_main(["label", "export", "--db", db, "--out", str(tmp_path / "out"), "--criterion",
                          "speed"]) == 2
    assert "--criterion speed: unknown criterion" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server over a store with a ranking of 4 and two pairs asking two criteria."""
    tmp = tmp_path_factory.mktemp("ranking-e2e")
    db = str(tmp / "labels.db")
    ranked = write_jsonl(tmp / "rank.jsonl", [{"prompt": "Rank these four.", "responses": FOUR}])
    pairs = write_jsonl(tmp / "pairs.jsonl", [{"prompt": f"pair {i}", "responses": [f"kind {i}", f"rude {i}"]}
                                              for i in range(2)])
    assert alignkit_main(["label", "import", "--db", db, str(ranked), "--rank"]) == 0
    assert alignkit_main(["label", "import", "--db", db, str(pairs), "--criteria", "helpfulness,harmlessness"]) == 0
    creds = make_users(tmp / "users.json", ["ann", "bob", "boss"], admins=("boss",))
    server = Server(db, users=tmp / "users.json", overlap=2, log=tmp / "server.log").start()
    try:
        yield {"url": server.url, "creds": creds, "db": db, "tmp": tmp}
    finally:
        server.stop()


def test_end_to_end_a_ranking_and_criteria_through_the_server(served):
    for name in ("ann", "bob"):
        c = client(served["url"], (name, served["creds"][name]))
        seen = set()
        while (item := c.predict(api_name="/item"))["comparison_id"] is not None:
            cid = item["comparison_id"]
            assert cid not in seen
            seen.add(cid)
            if item["kind"] == "ranking":
                assert sorted(item["responses"]) == sorted(FOUR)
                with pytest.raises(AppError, match="ranking task"):
                    c.predict(cid, "a", api_name="/submit_vote")
                ranks = [FOUR.index(t) + 1 for t in item["responses"]]
                c.predict(cid, ranks, api_name="/submit_ranking")
            else:
                assert item["criteria"] == ["helpfulness", "harmlessness"]
                kind = 0 if item["responses"][0].startswith("kind") else 1
                side = "ab"[kind]
                c.predict(cid, {"helpfulness": side, "harmlessness": side}, api_name="/submit_answers")
        assert len(seen) == 3
    out = served["tmp"] / "out"
    assert alignkit_main(["label", "export", "--db", served["db"], "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    ranking = [r for r in rows if r["ranking"]]
    assert len(ranking) == 6 and sorted(r["margin"] for r in ranking) == [0.0, 0.0, 0.0, 1.0, 1.0, 2.0]
    assert all(FOUR.index(r["chosen"]) < FOUR.index(r["rejected"]) for r in ranking)
    assert sorted(r["chosen"] for r in rows if not r["ranking"]) == ["kind 0", "kind 1"]
    assert alignkit_main(["label", "export", "--db", served["db"], "--out", str(out), "--criterion",
                          "harmlessness"]) == 0
    summary = json.loads((out / "export.json").read_text())
    assert summary["policy"]["criterion"] == "harmlessness"
    assert summary["rows"] == 2 and summary["per_reason"]["ranking_asks_no_criteria"] == 1
    boss = client(served["url"], ("boss", served["creds"]["boss"]))
    stats = boss.predict(api_name="/admin_stats")
    assert stats["annotators"]["ann"]["votes"] == 3  # the ranking counts once
