"""Preference strength: a store's scale, votes that carry how much better, margins on export, a reward stage
trained with them, and the keys in a real browser."""

from __future__ import annotations

import json

import pytest
from gradio_client.exceptions import AppError

from _labeling_server import Server, client, make_users, write_prompts
from alignkit.cli import main as alignkit_main
from alignkit.errors import UserError
from alignkit.store import next_item, open_store, settings, submit_vote
from alignkit.store.export import export_dataset, preference_rows, vote_margin
from alignkit.store.importer import import_file


def test_the_margin_rule_by_hand():
    # Votes a (much: 2), a (slightly: 1), b (much), tie, on a scale-2 store; a wins: mean of (2-1, 1-1) = 0.5.
    assert vote_margin([("a", 2), ("a", 1), ("b", 2), ("tie", None)], "a") == 0.5
    assert vote_margin([("b", 4), ("b", 3)], "b") == 2.5  # scale 4: significantly (3) and better (2)
    assert vote_margin([("a", None)], "a") == 0.0


def test_a_scaled_store_takes_strengths_and_exports_margins(tmp_path):
    store = open_store(str(tmp_path / "labels.db"), overlap=2)
    import_file(store, write_prompts(tmp_path / "p.jsonl", 3))
    settings.set_scale(store, 2)
    assert settings.scale(store) == 2
    item = next_item(store, "ann")
    with pytest.raises(UserError, match=r"strength 1\.\.2"):
        submit_vote(store, "ann", item.comparison_id, "a")
    with pytest.raises(UserError, match="carries no strength"):
        submit_vote(store, "ann", item.comparison_id, "tie", strength=1)
    for name, strength in (("ann", 2), ("bob", 1)):
        item = next_item(store, name)
        shown = "b" if item.swapped else "a"  # both vote for response_a
        submit_vote(store, name, item.comparison_id, shown, strength=strength)
    (row,) = preference_rows(store)
    assert row["margin"] == 0.5  # (2-1 + 1-1) / 2
    export_dataset(store, tmp_path / "out")
    policy = json.loads((tmp_path / "out" / "export.json").read_text())["policy"]
    assert policy["scale"] == 2 and "strength - 1" in policy["margin"]
    with pytest.raises(UserError, match="scale cannot change now"):
        settings.set_scale(store, 4)
    store.close()


def test_an_unscaled_store_refuses_a_strength_and_exports_no_margin(tmp_path):
    store = open_store(str(tmp_path / "labels.db"), overlap=1)
    import_file(store, write_prompts(tmp_path / "p.jsonl", 1))
    item = next_item(store, "ann")
    with pytest.raises(UserError, match="carries no strength"):
        submit_vote(store, "ann", item.comparison_id, "a", strength=2)
    submit_vote(store, "ann", item.comparison_id, "a")
    assert "margin" not in preference_rows(store)[0]
    store.close()


def test_label_import_sets_the_scale_and_guidelines_and_the_api_takes_strengths(tmp_path, capsys):
    db = str(tmp_path / "labels.db")
    guide = tmp_path / "guide.md"
    guide.write_text("# How to judge\n\nPrefer **correct** answers. <script>x</script>")
    assert alignkit_main(["label", "import", "--db", db, str(write_prompts(tmp_path / "p.jsonl", 4)),
                          "--scale", "2", "--guidelines", str(guide)]) == 0
    assert "preference strength scale 2" in capsys.readouterr().out
    creds = make_users(tmp_path / "users.json", ["ann"])
    server = Server(db, users=tmp_path / "users.json", overlap=1, log=tmp_path / "server.log").start()
    try:
        ann = client(server.url, ("ann", creds["ann"]))
        cid = ann.predict(api_name="/next_item")[0]
        with pytest.raises(AppError, match=r"strength 1\.\.2"):
            ann.predict(comparison_id=cid, choice="a", rationale="", api_name="/submit_vote")
        ann.predict(comparison_id=cid, choice="a", rationale="", strength=2, api_name="/submit_vote")
    finally:
        server.stop()
    store = open_store(db, create=False)
    assert settings.guidelines(store).startswith("# How to judge") and preference_rows(store)[0]["margin"] == 1.0
    store.close()
    assert alignkit_main(["label", "import", "--db", db, "--scale", "3"]) == 2  # argparse: not a choice


@pytest.mark.slow
def test_the_reward_stage_trains_with_the_exported_margins(tmp_path, tiny_model_dir):
    from alignkit.artifacts import read_stage
    from recipes.runner import run_recipe
    from tests.conftest import REPO
    from tests.test_reward_stage import write_recipe

    db = str(tmp_path / "labels.db")
    prefs = [json.loads(line) for line in (REPO / "recipes" / "data" / "tiny_rlhf_prefs.jsonl").read_text().splitlines()]
    rows = [{"messages": p["prompt"], "responses": [p["chosen"][0]["content"], p["rejected"][0]["content"]]}
            for p in prefs[:60]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = open_store(db, overlap=1)
    import_file(store, tmp_path / "in.jsonl")
    settings.set_scale(store, 2)
    chosen = {r["responses"][0] for r in rows}
    k = 0
    while (item := next_item(store, "ann")) is not None:
        left_chosen = item.left in chosen
        submit_vote(store, "ann", item.comparison_id, "a" if left_chosen else "b", strength=1 + (k % 2))
        k += 1
    store.close()
    expected = sum(r["margin"] for r in preference_rows(db)) / k

    def labels(raw):
        reward = next(s for s in raw["stages"] if s["kind"] == "reward")
        reward["data"] = {"labels_db": db}

    run_recipe(write_recipe(tmp_path, edit=labels), log=lambda *_: None)
    stage = read_stage(tmp_path / "run" / "reward")
    assert stage["complete"] and stage["data"]["margin_column"]["mean"] > 0
    trained = stage["data"]["margin_column"]
    assert abs(trained["mean"] - expected) < 0.15  # the split holds some pairs out; their margins match in mean
