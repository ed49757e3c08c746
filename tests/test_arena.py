"""Human judging in the Arena: compare's pairs land in the store as battles, are voted blind (handlers and the
real server), names are revealed only after the vote, and the votes come back through the leaderboard and
`alignkit compare --collect`."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict

import pytest
from gradio_client.exceptions import AppError
from sqlalchemy import select

from _labeling_server import Server, client, make_users
from alignkit.compare import send_to_store
from alignkit.errors import UserError
from alignkit.generation import SamplingParams
from alignkit.store import open_store
from alignkit.store.arena import model_name, reveal
from alignkit.store.export import preference_rows
from alignkit.store.importer import import_file
from alignkit.store.models import Comparison, Response
from labeling_ui import handlers
from labeling_ui.simulate import run_simulated_annotators

MODELS = {"alpha-k3": "/specs/alpha-model", "beta-q7": "/specs/beta-model", "gamma-z9": "/specs/gamma-model"}
PROMPTS = [f"Write line {i} of a poem." for i in range(4)]


def fixed_responses(models) -> dict[str, list[str]]:
    return {m: [f"response {k} to line {i}" for i in range(len(PROMPTS))] for k, m in enumerate(models)}


def add_label_prompts(db, tmp_path, n=2):
    path = tmp_path / "label.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"label prompt {i}", "responses": [f"x{i}", f"y{i}"]}) + "\n"
                            for i in range(n)))
    store = open_store(db)
    try:
        import_file(store, path)
    finally:
        store.close()


def shown_model(responses: dict[str, list[str]], prompt_index: int, text: str) -> str:
    (name,) = [m for m in responses if responses[m][prompt_index] == text]
    return name


def test_arena_handlers_blind_vote_reveal_and_leaderboard(tmp_path):
    db = str(tmp_path / "labels.db")
    add_label_prompts(db, tmp_path)  # comparisons 1, 2: ordinary preference pairs
    responses = fixed_responses(MODELS)
    (tmp_path / "out").mkdir()
    sent = send_to_store(tmp_path / "out", db, MODELS, PROMPTS, responses,
                         {m: {"spec": s} for m, s in MODELS.items()}, SamplingParams())
    assert sent["comparisons"] == sent["new_comparisons"] == 3 * len(PROMPTS)
    store = open_store(db, create=False)
    with store.read() as s:
        battle_ids = set(s.scalars(select(Comparison.id).where(Comparison.arena.is_(True))).all())
        names = {r.text: model_name(r) for r in s.scalars(select(Response))}
    assert battle_ids == set(range(3, 15))
    assert names["response 2 to line 0"] == "gamma-z9"  # the display name, not the spec

    # The Label tab serves only the ordinary pairs.
    view = handlers.current_view(store, "ann", overlap=3)
    seen = []
    while not view.done:
        seen.append(view.comparison_id)
        view = handlers.vote(store, "ann", view.comparison_id, "a", None, overlap=3)
    assert seen == [1, 2]

    # The Arena serves only battles; three annotators prefer gamma, and alpha over beta except once each.
    cast, voted_on = [], set()  # (winner model or "tie", model_left, model_right); battles voted on
    for user in ("ann", "bob", "cat"):
        view = handlers.arena_view(store, user, overlap=3)
        n = 0
        while not view.done:
            assert view.comparison_id in battle_ids and not view.revealed and view.reveal_markdown == ""
            shown = json.dumps(asdict(view))
            assert not any(x in shown for x in [*MODELS, *MODELS.values()]), shown  # nothing names a model
            i = int(view.prompt_markdown.split()[2])  # "Write line {i} ..."
            left, right = shown_model(responses, i, view.left), shown_model(responses, i, view.right)
            n += 1
            if "gamma-z9" in (left, right):
                choice = "a" if left == "gamma-z9" else "b"
            elif n % 4 == 0:
                choice = "both_bad"
            else:
                choice = "a" if left == "alpha-k3" else "b"
            voted = handlers.arena_vote(store, user, view.comparison_id, choice, overlap=3)
            # The same battle with the vote, no names yet: the vote can still be taken back.
            assert (voted.comparison_id, voted.left, voted.right, voted.choice) == \
                (view.comparison_id, view.left, view.right, choice)
            assert voted.voted and not voted.revealed and "Undo vote" in voted.reveal_markdown
            assert not any(x in json.dumps(asdict(voted)) for x in [*MODELS, *MODELS.values()])
            if n == 1:  # the first battle: taken back, the same battle (sides as shown) to vote on again
                undone = handlers.arena_undo(store, user, overlap=3)
                assert (undone.comparison_id, undone.left, undone.voted) == (view.comparison_id, view.left, False)
                handlers.arena_vote(store, user, view.comparison_id, choice, overlap=3)
            voted = handlers.arena_reveal(store, user, view.comparison_id, overlap=3)
            # Revealed: the names of the models behind each side as shown, and the vote stays.
            assert (voted.model_left, voted.model_right) == (left, right) == (names[view.left], names[view.right])
            if n == 1:
                refused = handlers.arena_undo(store, user, overlap=3)
                assert refused.refused and "cannot be taken back after the reveal" in refused.status
            assert voted.reveal_markdown.startswith(f"A was **{handlers.markdown_text(left)}**, "
                                                    f"B was **{handlers.markdown_text(right)}**")
            again = handlers.arena_vote(store, user, view.comparison_id, "a", overlap=3)
            # A second vote (a double tap) is refused and the same battle's reveal stays on screen.
            assert again.status.startswith("Not saved") and again.revealed
            assert (again.comparison_id, again.choice) == (view.comparison_id, choice)
            winner = {"a": left, "b": right}.get(choice, "tie")
            cast.append((winner, left, right))
            voted_on.add(view.comparison_id)
            view = handlers.arena_view(store, user, overlap=3)
        # Every prompt's battles reach each annotator (all of them, or one per prompt: the queue's rule).
        assert n >= len(PROMPTS)
    assert handlers.current_view(store, "bob", overlap=3).comparison_id == 1  # battles never reach the Label tab
    with pytest.raises(UserError, match="not an arena battle"):
        reveal(store, "ann", 1)

    board = handlers.leaderboard(store, bootstrap=200)
    assert board.votes == len(cast) >= 3 * len(PROMPTS) and board.battles == len(voted_on)
    assert board.without_votes == len(battle_ids) - len(voted_on)
    assert [m["model"] for m in board.models] == ["gamma-z9", "alpha-k3", "beta-q7"]
    fought = Counter(m for _, a, b in cast for m in (a, b))
    for m in board.models:
        assert m["ci_low"] <= m["rating"] <= m["ci_high"]
        won = sum(w == m["model"] for w, *_ in cast)
        ties = sum(w == "tie" and m["model"] in (a, b) for w, a, b in cast)
        assert (m["votes"], m["wins"], m["ties"]) == (fought[m["model"]], won, ties)
        assert 0 < m["battles"] <= m["votes"]
    assert board.models[0]["wins"] == fought["gamma-z9"] and board.models[1]["wins"] > board.models[2]["wins"]
    # gamma won every vote: no finite MLE, and the leaderboard says so.
    assert board.warning and "gamma-z9 never lost or tied" in board.warning
    assert "Warning" in board.summary_markdown
    assert {frozenset((p["model_a"], p["model_b"])) for p in board.pairs} == \
        {frozenset(p) for p in [("alpha-k3", "beta-q7"), ("alpha-k3", "gamma-z9"), ("beta-q7", "gamma-z9")]}
    assert all(p["n"] == sum({a, b} == {p["model_a"], p["model_b"]} for _, a, b in cast) > 0 for p in board.pairs)
    assert board.model_rows()[0][:2] == [1, "gamma-z9"]
    # Battles stay out of the preference export: only the two Label-tab votes are training data.
    assert [r["comparison_id"] for r in preference_rows(store)] == [1, 2]
    store.close()


def test_leaderboard_without_battles(tmp_path):
    db = str(tmp_path / "labels.db")
    add_label_prompts(db, tmp_path)
    store = open_store(db, create=False)
    board = handlers.leaderboard(store)
    assert (board.votes, board.models, board.pairs) == (0, [], [])
    assert "No votes" in board.summary_markdown
    view = handlers.arena_view(store, "ann", overlap=3)
    assert view.done and "No battles left" in view.prompt_markdown
    with pytest.raises(UserError, match="bootstrap must be >= 100"):
        handlers.leaderboard(store, bootstrap=10)
    store.close()


def test_leaderboard_keeps_two_models_shown_under_one_name_apart(tmp_path):
    """Two compare runs each call their DPO stage `dpo` (the directory name); the leaderboard must not merge them,
    while the SFT stage both runs share is one model."""
    db = str(tmp_path / "labels.db")
    runs = [{"sft": "/exp/sft", "dpo": "/exp/run1/dpo"}, {"sft": "/exp/sft", "dpo": "/exp/run2/dpo"}]
    for k, models in enumerate(runs):
        out = tmp_path / f"out{k}"
        out.mkdir()
        responses = {m: [f"run {k} {m} answer {i}" for i in range(len(PROMPTS))] for m in models}
        send_to_store(out, db, models, PROMPTS, responses, {m: {"spec": spec} for m, spec in models.items()}, SamplingParams())
    store = open_store(db, create=False)
    # run2's dpo beats sft, sft beats run1's dpo, every time.
    strength = {"/exp/run2/dpo": 2, "/exp/sft": 1, "/exp/run1/dpo": 0}
    with store.read() as s:
        spec_of = {r.text: r.model_spec for r in s.scalars(select(Response))}
    for user in ("ann", "bob"):
        view = handlers.arena_view(store, user, overlap=2)
        while not view.done:
            choice = "a" if strength[spec_of[view.left]] > strength[spec_of[view.right]] else "b"
            handlers.arena_vote(store, user, view.comparison_id, choice, overlap=2)
            handlers.arena_reveal(store, user, view.comparison_id, overlap=2)
            view = handlers.arena_view(store, user, overlap=2)
    board = handlers.leaderboard(store, bootstrap=100)
    assert [m["model"] for m in board.models] == ["dpo (/exp/run2/dpo)", "sft", "dpo (/exp/run1/dpo)"]
    votes = [m["votes"] for m in board.models]  # sft is in every battle, each dpo in half
    assert votes[1] == votes[0] + votes[2] and votes[0] == votes[2] >= len(PROMPTS)
    assert "never lost or tied" in board.warning and "never won or tied" in board.warning
    store.close()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_model_dir):
    from test_compare import make_lora_adapter

    root = tmp_path_factory.mktemp("arena-models")
    return {"alpha-k3": str(tiny_model_dir), "beta-q7": str(make_lora_adapter(tiny_model_dir, root / "ad", seed=1))}


def test_human_judge_through_the_real_server_and_collect(two_models, tmp_path):
    from alignkit.cli import main
    from alignkit.compare import compare_models

    db, out = str(tmp_path / "labels.db"), tmp_path / "compare"
    sent = compare_models(two_models, PROMPTS, f"human:{db}", out, SamplingParams(max_new_tokens=12, seed=0),
                          bootstrap=200)
    assert sent["pending"]
    human = json.loads((out / "human.json").read_text())
    responses = human["responses"]
    distinct = [i for i in range(len(PROMPTS)) if responses["alpha-k3"][i] != responses["beta-q7"][i]]
    assert sent["comparisons"] == sent["new_comparisons"] == len(distinct) >= 2  # identical samples make no battle
    add_label_prompts(db, tmp_path)  # ordinary pairs in the same store: never served as battles
    secrets = [*two_models, *two_models.values()]

    creds = make_users(tmp_path / "users.json", ["ann", "bob", "cat"])
    server = Server(db, users=tmp_path / "users.json", overlap=3, log=tmp_path / "server.log").start()
    try:
        cast = []  # (winner model or "tie") per vote
        for user, plan in (("ann", ["a", "b", "tie", "both_bad"]), ("bob", ["a", "a", "b", "b"])):
            c = client(server.url, (user, creds[user]))
            label_cid = c.predict(api_name="/next_item")[0]
            for k in range(len(distinct) + 1):
                payload = c.predict(api_name="/arena_next")
                cid, prompt, a, b = payload
                if cid is None:
                    break
                assert cid != label_cid and prompt in PROMPTS
                assert not any(x in json.dumps(payload) for x in secrets), payload  # blind before the vote
                with pytest.raises(AppError, match="is an arena battle"):
                    c.predict(comparison_id=cid, choice="a", rationale="", api_name="/submit_vote")
                i = PROMPTS.index(prompt)
                choice = plan[k % len(plan)]
                receipt = c.predict(comparison_id=cid, choice=choice, api_name="/arena_vote")
                assert receipt == {"comparison_id": cid, "choice": choice,
                                   "model_a": shown_model(responses, i, a), "model_b": shown_model(responses, i, b)}
                cast.append({"a": receipt["model_a"], "b": receipt["model_b"]}.get(choice, "tie"))
                with pytest.raises(AppError, match="already voted"):
                    c.predict(comparison_id=cid, choice="b", api_name="/arena_vote")
            assert k == len(distinct)  # every battle once, then none left
            with pytest.raises(AppError, match="not an arena battle"):
                c.predict(comparison_id=label_cid, choice="a", api_name="/arena_vote")
        # A simulated annotator (`alignkit label simulate --arena`) votes on the same battles through the server.
        decided = []

        def longer_side(prompt, a, b):
            choice = "a" if len(a) >= len(b) else "b"
            decided.append(shown_model(responses, PROMPTS.index(prompt), a if choice == "a" else b))
            return choice

        sim = run_simulated_annotators(server.url, [("cat", creds["cat"])], longer_side, arena=True)
        assert sim["votes"] == len(decided) == len(distinct) and not sim["errors"]
        cast += decided
        assert len(cast) == 3 * len(distinct)
        board = client(server.url, ("ann", creds["ann"])).predict(api_name="/leaderboard")
        # Three people voted on each battle: 3x as many votes as battles, and the board says which is which.
        assert (board["votes"], board["battles"]) == (len(cast), len(distinct))
        assert {m["model"] for m in board["models"]} == set(two_models)
        assert all(m["ci_low"] <= m["rating"] <= m["ci_high"] and m["votes"] == len(cast) for m in board["models"])
    finally:
        server.stop()

    assert main(["compare", "--judge", f"human:{db}", "--out", str(out), "--collect", "--bootstrap", "200"]) == 0
    result = json.loads((out / "compare.json").read_text())
    identical = len(PROMPTS) - len(distinct)
    assert {k: v for k, v in result["human"].items() if k != "weighting"} == {
        "votes": len(cast), "battles": len(distinct), "battles_without_votes": 0, "identical_responses": identical,
        "shared_responses": 0}
    (pair,) = result["pairs"]
    counts = Counter(cast)
    assert (pair["model_a"], pair["model_b"]) == ("alpha-k3", "beta-q7")
    assert (pair["wins"], pair["losses"], pair["ties"]) == (counts["alpha-k3"], counts["beta-q7"], counts["tie"])
    # The server's leaderboard reports the same pair from the same votes (it may show it the other way round).
    (bp,) = board["pairs"]
    same = bp["model_a"] == "alpha-k3"
    assert (bp["wins"], bp["losses"]) == ((pair["wins"], pair["losses"]) if same else (pair["losses"], pair["wins"]))
    assert bp["win_rate"] == pytest.approx(pair["win_rate"] if same else 1 - pair["win_rate"])


def _vote_all(store, users, decide, overlap):
    """Every user votes on every battle they are served; decide(left_text, right_text) -> choice as shown."""
    for user in users:
        view = handlers.arena_view(store, user, overlap=overlap)
        while not view.done:
            handlers.arena_vote(store, user, view.comparison_id, decide(user, view.left, view.right), overlap=overlap)
            handlers.arena_reveal(store, user, view.comparison_id, overlap=overlap)
            view = handlers.arena_view(store, user, overlap=overlap)


def test_human_votes_weigh_one_comparison_once_in_collect_and_the_leaderboard(tmp_path):
    """Three people vote on every battle of prompts 0-2; prompt 3's responses are identical: no battle, not rated.
    Every (prompt, pair) counts once: a vote weighs 1/(votes on its comparison)."""
    from alignkit.compare import collect_from_store

    db, out = str(tmp_path / "labels.db"), tmp_path / "out"
    out.mkdir()
    models = {"alpha-k3": "/specs/alpha-model", "beta-q7": "/specs/beta-model"}
    responses = {"alpha-k3": [f"alpha {i}" for i in range(len(PROMPTS))],
                 "beta-q7": [f"beta {i}" for i in range(len(PROMPTS) - 1)] + [f"alpha {len(PROMPTS) - 1}"]}
    send_to_store(out, db, models, PROMPTS, responses, {m: {"spec": s} for m, s in models.items()}, SamplingParams())
    store = open_store(db, create=False)
    # Prompts 0-2: alpha wins 2 of 3 votes (cat prefers beta). Prompt 3: identical responses, no battle.
    _vote_all(store, ["ann", "bob", "cat"],
              lambda user, left, right: ("a" if left.startswith("alpha") else "b") if user != "cat"
              else ("a" if left.startswith("beta") else "b"), overlap=3)
    result = collect_from_store(out, db, bootstrap=200)
    (pair,) = result["pairs"]
    # Raw counts are votes; the identical responses of prompt 3 are counted apart, not as a tie nobody cast.
    assert (pair["wins"], pair["losses"], pair["ties"], pair["n"], pair["battles"], pair["units"]) == (6, 3, 0, 9, 3, 3)
    assert result["human"]["identical_responses"] == 1
    # The win rate weighs each comparison once: alpha won 2 of 3 votes on each.
    assert pair["win_rate"] == pytest.approx(2 / 3)
    battles = [json.loads(x) for x in (out / "battles.jsonl").read_text().splitlines()]
    assert [b["weight"] for b in battles] == pytest.approx([1 / 3] * 9)
    assert "weighted win rate" in (out / "compare.md").read_text()

    board = handlers.leaderboard(store, bootstrap=100)
    (lp,) = board.pairs
    assert (lp["n"], lp["battles"], lp["units"]) == (9, 3, 3) and (board.votes, board.battles) == (9, 3)
    rate_alpha = lp["win_rate"] if lp["model_a"] == "alpha-k3" else 1 - lp["win_rate"]
    assert rate_alpha == pytest.approx(pair["win_rate"])
    store.close()


def test_collect_and_the_leaderboard_agree_when_models_repeat_each_others_text(tmp_path):
    """dpo gives sft's text on half the prompts: the store keeps that text once, credited to sft, so a vote on it
    against ppo is one sft-vs-ppo vote in both views (not one for dpo too, nor sft-vs-dpo ties nobody cast, which
    would make the two views' ratings differ)."""
    from alignkit.compare import collect_from_store

    db, out = str(tmp_path / "labels.db"), tmp_path / "out"
    out.mkdir()
    models = {"sft": "/specs/sft", "dpo": "/specs/dpo", "ppo": "/specs/ppo"}
    n = 6
    responses = {"sft": [f"sft {i}" for i in range(n)], "ppo": [f"ppo {i}" for i in range(n)],
                 "dpo": [f"sft {i}" if i % 2 else f"dpo {i}" for i in range(n)]}
    send_to_store(out, db, models, [f"prompt {i}" for i in range(n)], responses,
                  {m: {"spec": s} for m, s in models.items()}, SamplingParams())
    store = open_store(db, create=False)
    strength = {"sft": 0, "dpo": 1, "ppo": 2}

    def decide(user, left, right):
        # The stronger model wins, except that bob prefers sft to ppo and cat dpo to ppo.
        x, y = left.split()[0], right.split()[0]
        upset = (user, {x, y}) in (("bob", {"sft", "ppo"}), ("cat", {"dpo", "ppo"}))
        return "a" if (strength[x] > strength[y]) != upset else "b"

    _vote_all(store, ["ann", "bob", "cat"], decide, overlap=3)
    board = handlers.leaderboard(store, bootstrap=100)
    result = collect_from_store(out, db, bootstrap=100)
    assert result["ratings"] == {m["model"]: {k: m[k] for k in ("rating", "ci_low", "ci_high", "median")}
                                 for m in board.models}
    assert list(result["ratings"]) == [m["model"] for m in board.models]
    assert (result["human"]["votes"], result["human"]["battles"]) == (board.votes, board.battles)
    assert board.battles == 3 * n - 2 * (n // 2) and board.votes > board.battles
    assert result["human"]["identical_responses"] == n // 2
    # ... and dpo-vs-ppo on those prompts is not rated either (the vote counts for sft): said, so that every
    # (prompt, pair) is accounted for.
    assert result["human"]["shared_responses"] == n // 2
    assert board.battles + result["human"]["identical_responses"] + result["human"]["shared_responses"] == 3 * n
    assert "nor are 3 (prompt, pair)s where one model gave the text another model also gave" in \
        (out / "compare.md").read_text()
    store.close()


def test_collect_before_any_vote_says_so(tmp_path, capsys):
    """No votes: one line and exit status 2, nothing written (it printed `dpo: 1000 [1000, 1000]`, one model missing,
    no warning). Votes for some models only: the others are named as not rated."""
    from alignkit.cli import main

    db, out = str(tmp_path / "labels.db"), tmp_path / "out"
    out.mkdir()
    responses = fixed_responses(MODELS)
    responses["beta-q7"][0] = responses["alpha-k3"][0]  # an identical pair: nobody voted on it, so it is no tie
    send_to_store(out, db, MODELS, PROMPTS, responses, {m: {"spec": s} for m, s in MODELS.items()}, SamplingParams())
    argv = ["compare", "--judge", f"human:{db}", "--out", str(out), "--collect", "--bootstrap", "100"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"alignkit: error: --collect: no votes yet on the 10 battles {out} sent to {db}; annotators vote "
                   f"in the labeling app's Arena tab (alignkit label serve --db {db})\n")
    assert not (out / "compare.json").exists() and not (out / "battles.jsonl").exists()
    store = open_store(db, create=False)
    assert handlers.leaderboard(store, bootstrap=100).summary_markdown == "*No votes on arena battles yet (10 waiting).*"

    # One vote on a battle beta is not in (response k is model k's): beta has none, and both views say so.
    for user in (f"ann{k}" for k in range(12)):
        view = handlers.arena_view(store, user, overlap=3)
        if not view.left.startswith("response 1") and not view.right.startswith("response 1"):
            break
    handlers.arena_vote(store, user, view.comparison_id, "a", overlap=3)
    assert main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    assert set(result["ratings"]) == {"alpha-k3", "gamma-z9"}
    assert "No votes yet for beta-q7: not rated." in result["ratings_warning"]
    assert "warning: No votes yet for beta-q7" in capsys.readouterr().out
    board = handlers.leaderboard(store, bootstrap=100)
    assert (board.votes, board.battles, board.without_votes) == (1, 1, 9) and "beta-q7" in board.warning
    store.close()


def test_leaderboard_cache_recomputes_only_when_the_votes_change(tmp_path):
    from alignkit.store import undo_last_vote
    from alignkit.store.arena import LeaderboardCache

    db = str(tmp_path / "labels.db")
    (tmp_path / "out").mkdir()
    responses = fixed_responses(MODELS)
    send_to_store(tmp_path / "out", db, MODELS, PROMPTS, responses, {m: {"spec": s} for m, s in MODELS.items()},
                  SamplingParams())
    store = open_store(db, create=False)
    _vote_all(store, ["ann"], lambda user, left, right: "a" if left < right else "b", overlap=3)
    cache = LeaderboardCache()
    first = handlers.leaderboard(store, bootstrap=100, cache=cache)
    assert handlers.leaderboard(store, bootstrap=100, cache=cache) is first and cache.computed == 1
    assert first == handlers.leaderboard(store, bootstrap=100)  # the same board as without a cache

    view = handlers.arena_view(store, "bob", overlap=3)
    handlers.arena_vote(store, "bob", view.comparison_id, "a", overlap=3)
    second = handlers.leaderboard(store, bootstrap=100, cache=cache)
    assert cache.computed == 2 and second.votes == first.votes + 1

    # Undo and vote again the other way: same count (and, in SQLite, possibly the same vote id), new board.
    undo_last_vote(store, "bob", arena=True)
    handlers.arena_vote(store, "bob", view.comparison_id, "b", overlap=3)
    third = handlers.leaderboard(store, bootstrap=100, cache=cache)
    assert cache.computed == 3 and third.votes == second.votes and third.pairs != second.pairs
    store.close()
