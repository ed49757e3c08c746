"""`alignkit compare --judge human:DB --battles N`: N battles where the ratings are least certain (or spread evenly),
each a pair of models on a prompt that pair has not met on, through the real CLI on tiny models and a real store."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from alignkit.cli import main
from alignkit.compare import model_identity, round_robin, send_to_store
from alignkit.generation import SamplingParams
from alignkit.store import open_store
from alignkit.store.arena import model_key
from alignkit.store.models import Comparison
from labeling_ui import handlers

PROMPTS = ["the acting was", "the plot felt", "I watched the movie last night and", "my friend said the film was",
           "the ending seemed", "overall the music was"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    from test_compare import make_lora_adapter

    root = tmp_path_factory.mktemp("battle-models")
    return {"base": str(tiny_model_dir), "ad1": str(make_lora_adapter(tiny_model_dir, root / "ad1", seed=1)),
            "ad2": str(make_lora_adapter(tiny_model_dir, root / "ad2", seed=2))}


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def _cli(models, prompts_file, db, out, *flags) -> int:
    argv = ["compare", "--judge", f"human:{db}", "--out", str(out), "--prompts", str(prompts_file),
            "--max-new-tokens", "8", "--bootstrap", "100", "--seed", "1"]
    for name, spec in models.items():
        argv += ["--model", f"{name}={spec}"]
    return main([*argv, *map(str, flags)])


def arena_battles_in(db: str, models: dict[str, str]) -> list[tuple[str, str, str, int]]:
    """Every arena battle in the store as (model, model, prompt text, comparison id), models in --model order,
    told by the model identity their responses carry (what the leaderboard counts them by)."""
    from alignkit.compare import _arena_identity

    name_of = {_arena_identity({"identity": model_identity(s), "spec": s}): m for m, s in models.items()}
    order = list(models)
    store = open_store(db, create=False)
    try:
        with store.read() as s:
            out = []
            for c in s.scalars(select(Comparison).where(Comparison.arena.is_(True))):
                x, y = sorted((name_of[model_key(c.response_a)], name_of[model_key(c.response_b)]), key=order.index)
                out.append((x, y, json.loads(c.prompt.content_json), c.id))
            return out
    finally:
        store.close()


def seed_votes(db: str, tmp_path: Path, models: dict[str, str], history: dict[tuple[str, str], dict[str, str]]):
    """Earlier battles of these models with votes: history[(x, y)] = {prompt: winning model}. The responses are
    made-up texts stored under each model's real identity, as an earlier compare run would have stored them."""
    winner_of = {}
    for (x, y), plan in history.items():
        prompts = list(plan)
        responses = {m: [f"{m} on {p}" for p in prompts] for m in (x, y)}
        info = {m: {"spec": models[m], "identity": model_identity(models[m])} for m in (x, y)}
        out = tmp_path / f"history-{x}-{y}"
        out.mkdir()
        send_to_store(out, db, {x: models[x], y: models[y]}, prompts, responses, info, SamplingParams())
        winner_of.update({f"{m} on {p}": plan[p] == m for p in prompts for m in (x, y)})
    store = open_store(db, create=False)
    try:
        for user in ("ann", "bob", "cat", "dan"):
            view = handlers.arena_view(store, user, overlap=1)
            while not view.done:
                handlers.arena_vote(store, user, view.comparison_id, "a" if winner_of[view.left] else "b", overlap=1)
                view = handlers.arena_view(store, user, overlap=1)
        assert handlers.leaderboard(store, bootstrap=100).without_votes == 0  # every battle has its vote
    finally:
        store.close()


def test_battles_land_in_the_store_on_unmet_prompts_and_rounds_add_up(models, prompts_file, tmp_path, capsys):
    db, out = str(tmp_path / "labels.db"), tmp_path / "out"
    assert _cli(models, prompts_file, db, out, "--battles", 4) == 0
    first = arena_battles_in(db, models)
    assert len(first) == 4
    # No votes yet: every pair "never met", so the four go one to each pair first, then to the first pair.
    assert Counter((x, y) for x, y, _, _ in first) == {("base", "ad1"): 2, ("base", "ad2"): 1, ("ad1", "ad2"): 1}
    human = json.loads((out / "human.json").read_text())
    assert [(p["model_a"], p["model_b"], p["battles"], p["spread"]) for p in human["allocation"]["pairs"]] == [
        ("base", "ad1", 2, None), ("base", "ad2", 1, None), ("ad1", "ad2", 1, None)]
    assert human["allocation"]["rule"] == "uncertainty" and "uncertainty allocation of 4" in capsys.readouterr().out
    # A model is sampled only on the prompts of its battles.
    assert sum(t is not None for t in human["responses"]["ad2"]) == 2

    # A second round before any vote: again every pair, each on prompts it has not met on.
    assert _cli(models, prompts_file, db, out, "--battles", 3) == 0
    both = arena_battles_in(db, models)
    second = [b for b in both if b not in first]
    assert len(both) == 7 and Counter((x, y) for x, y, _, _ in second) == {
        ("base", "ad1"): 1, ("base", "ad2"): 1, ("ad1", "ad2"): 1}
    assert len({(x, y, p) for x, y, p, _ in both}) == 7  # no pair met twice on one prompt
    human = json.loads((out / "human.json").read_text())
    assert [a["rule"] for a in human["allocations"]] == ["uncertainty", "uncertainty"]

    # Votes on both rounds; --collect rates all seven battles of this OUT.
    store = open_store(db, create=False)
    try:
        for user in ("ann", "bob", "cat", "dan"):
            view = handlers.arena_view(store, user, overlap=1)
            while not view.done:
                handlers.arena_vote(store, user, view.comparison_id, "a" if len(view.left) >= len(view.right) else "b",
                                    overlap=1)
                view = handlers.arena_view(store, user, overlap=1)
    finally:
        store.close()
    assert main(["compare", "--judge", f"human:{db}", "--out", str(out), "--collect", "--bootstrap", "100"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert (result["human"]["votes"], result["human"]["battles"]) == (7, 7)
    assert "2 round(s) of `--battles` (uncertainty, uncertainty)" in (out / "compare.md").read_text()
    assert {frozenset((p["model_a"], p["model_b"])): p["n"] for p in result["pairs"]} == {
        frozenset(("base", "ad1")): 3, frozenset(("base", "ad2")): 2, frozenset(("ad1", "ad2")): 2}


def test_uncertainty_sends_more_battles_to_the_uncertain_pair_than_uniform(models, prompts_file, tmp_path):
    """base vs ad1: 20 voted battles (12-8), their difference is well known; base vs ad2 and ad1 vs ad2: one win each
    way on prompts 0 and 1 of the prompts file, so ad2's place is not."""
    db = str(tmp_path / "labels.db")
    seed_votes(db, tmp_path, models, {
        ("base", "ad1"): {f"history prompt {i}": "base" if i % 5 < 3 else "ad1" for i in range(20)},
        ("base", "ad2"): {PROMPTS[0]: "base", PROMPTS[1]: "ad2"},
        ("ad1", "ad2"): {PROMPTS[0]: "ad1", PROMPTS[1]: "ad2"}})
    before = arena_battles_in(db, models)
    uniform_db = str(tmp_path / "uniform.db")
    shutil.copy(db, uniform_db)

    assert _cli(models, prompts_file, db, tmp_path / "active", "--battles", 6) == 0
    assert _cli(models, prompts_file, uniform_db, tmp_path / "uniform", "--battles", 6, "--select", "uniform") == 0
    new = {name: [b for b in arena_battles_in(d, models) if b[3] not in {c for *_, c in before}]
           for name, d in (("active", db), ("uniform", uniform_db))}
    counts = {name: Counter((x, y) for x, y, _, _ in battles) for name, battles in new.items()}
    assert counts["uniform"] == {("base", "ad1"): 2, ("base", "ad2"): 2, ("ad1", "ad2"): 2}
    assert sum(counts["active"].values()) == 6
    assert counts["active"][("base", "ad2")] > 2 and counts["active"][("ad1", "ad2")] > 2
    assert counts["active"][("base", "ad1")] < 2
    # ... and never on a prompt the pair had met on (ad2's pairs met on prompts 0 and 1).
    met = {(x, y, p) for x, y, p, _ in before}
    for battles in new.values():
        assert not met & {(x, y, p) for x, y, p, _ in battles}
    human = json.loads((tmp_path / "active" / "human.json").read_text())
    spread = {(p["model_a"], p["model_b"]): p for p in human["allocation"]["pairs"]}
    assert spread["base", "ad1"]["voted_battles_before"] == 20 and spread["base", "ad2"]["voted_battles_before"] == 2
    assert spread["base", "ad2"]["spread"] > 1.5 * spread["base", "ad1"]["spread"] > 0


def test_round_robin_splits_evenly_and_the_rest_goes_to_the_least_met_pairs():
    met = {("a", "b"): 5, ("a", "c"): 0, ("b", "c"): 2}
    assert round_robin(met, 6) == {("a", "b"): 2, ("a", "c"): 2, ("b", "c"): 2}
    assert round_robin(met, 2) == {("a", "c"): 1, ("b", "c"): 1}
    assert round_robin(dict.fromkeys(met, 0), 4) == {("a", "b"): 2, ("a", "c"): 1, ("b", "c"): 1}


def test_bad_battles_input_is_one_line_and_imports_nothing(models, prompts_file, tmp_path, capsys):
    db, out = str(tmp_path / "labels.db"), tmp_path / "out"
    seed_votes(db, tmp_path, models, {("base", "ad2"): {PROMPTS[0]: "base", PROMPTS[1]: "ad2"}})
    before = arena_battles_in(db, models)
    cases = [(["--battles", 0], "--battles must be >= 1, got 0"),
             (["--select", "uniform"], "--select chooses how --battles N are allocated; give --battles N too"),
             (["--battles", 2, "--select", "loudest"], "--select must be one of uncertainty, uniform, got 'loudest'"),
             # 15 over 3 pairs is 5 each; base and ad2 met on 2 of the 6 prompts.
             (["--battles", 15, "--select", "uniform"], "--battles: base vs ad2 would get 5 battles (uniform) but has "
                                                        "met on all but 4 of the 6 prompts"),
             (["--battles", 40], "--battles: base vs ad1 would get 20 battles (uncertainty) but has met on all but 6")]
    for flags, message in cases:
        assert _cli(models, prompts_file, db, out, *flags) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("alignkit: error: ") and message in err and err.count("\n") == 1, err
    argv = ["compare", "--judge", "oracle:length", "--out", str(out), "--prompts", str(prompts_file),
            "--model", models["base"], "--model", models["ad1"], "--battles", "3"]
    assert main(argv) == 2
    assert "--battles needs a human judge (--judge human:DB)" in capsys.readouterr().err
    assert arena_battles_in(db, models) == before and not out.exists()
