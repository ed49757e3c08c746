"""`alignkit loop`: rounds through the real labeling server, lineage across rounds, --status, reruns, kills, bad input."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from alignkit.artifacts import read_stage
from alignkit.cli import EXIT_BAD_INPUT, main
from alignkit.store import open_store
from alignkit.store.models import Comparison, Vote
from labeling_ui.simulate import length_judge, run_simulated_annotators
from tests._labeling_server import REPO, running_server

LOOP_RECIPE = REPO / "recipes" / "configs" / "tiny_loop.yaml"


def loop_recipe(tmp_path: Path, edit=None) -> Path:
    """A copy of the tiny loop recipe whose run_dir and label store are under tmp_path."""
    raw = yaml.safe_load(LOOP_RECIPE.read_text())
    db = str(tmp_path / "labels.db")
    raw["run_dir"] = str(tmp_path / "run")
    for stage in raw["stages"]:
        if "labels_db" in stage["data"]:
            stage["data"]["labels_db"] = db
        for key in ("train",):
            if key in stage["data"]:
                stage["data"][key] = str((LOOP_RECIPE.parent / stage["data"][key]).resolve())
    raw["loop"].update(labels_db=db, prompts=str((LOOP_RECIPE.parent / raw["loop"]["prompts"]).resolve()))
    if edit:
        edit(raw)
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def loop(capsys, path: Path, *args: str) -> str:
    code = main(["loop", str(path), *args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def round_comparisons(db: str) -> list[tuple]:
    store = open_store(db)
    try:
        with store.read() as s:
            return s.execute(select(Comparison.id, Comparison.loop_round, Comparison.source_stage,
                                    Comparison.selection_score).order_by(Comparison.id)).all()
    finally:
        store.close()


def vote_count(db: str) -> int:
    store = open_store(db)
    try:
        with store.read() as s:
            return len(s.scalars(select(Vote.id)).all())
    finally:
        store.close()


def vote_through_server(url: str) -> int:
    result = run_simulated_annotators(url, None, length_judge)
    return result["votes"]


def run_ids(run: Path) -> dict[str, str]:
    return {str(p.parent.relative_to(run)): json.loads(p.read_text())["run_id"] for p in run.rglob("stage.json")}


@pytest.mark.slow
def test_two_rounds_through_the_real_server_survive_a_kill_and_rerun_as_a_no_op(tmp_path, capsys, tiny_model_dir):
    path = loop_recipe(tmp_path)
    db, run = str(tmp_path / "labels.db"), tmp_path / "run"
    open_store(db).close()
    with running_server(db, overlap=1) as server:
        out = loop(capsys, path)
        assert "round 0: 0 of 16 comparisons have their votes" in out
        assert not (run / "round-0" / "dpo").exists()
        status = loop(capsys, path, "--status")
        assert "round 0: 0 of 16 comparisons have their votes" in status and "round 1: not started" in status
        round0 = round_comparisons(db)
        assert len(round0) == 16 and {(r, s, score) for _, r, s, score in round0} == {(0, "sft", None)}

        assert vote_through_server(server.url) == 16
        # Killed while the round trains: the rerun loses no vote, imports round 0 again nowhere, and completes.
        proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "loop", str(path), "--wait"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        pending = run / "round-0" / "reward-0" / "pending.json"
        deadline = time.time() + 300
        while not pending.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert pending.exists(), "the loop never started training round 0"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (run / "round-0" / "reward-0" / "stage.json").exists()

        out = loop(capsys, path)
        assert "round 1: 0 of 16 comparisons have their votes" in out
        assert vote_count(db) == 16
        rows = round_comparisons(db)
        assert [r for r in rows if r[1] == 0] == round0  # round 0 was not imported again
        round1 = [r for r in rows if r[1] == 1]
        assert len(round1) == 16 and {s for _, _, s, _ in round1} == {"round-0/dpo"}
        assert all(score is not None for *_, score in round1)  # chosen by the ensemble's uncertainty
        assert vote_through_server(server.url) == 16
        out = loop(capsys, path)
        assert "all 2 rounds complete" in out

    table = json.loads((run / "loop.json").read_text())
    assert [row["round"] for row in table["rounds"]] == [0, 1]
    assert [row["labels"] for row in table["rounds"]] == [16, 32]
    for row in table["rounds"]:
        for key in ("vs_previous", "vs_first"):
            assert 0 <= row[key]["ci_low"] <= row[key]["win_rate"] <= row[key]["ci_high"] <= 1
        assert row["rm_accuracy"] is not None and "kl" in row and row["mean_length"] > 0
    assert table["rounds"][1]["vs_previous"]["against"] == "round-0/dpo"
    assert table["rounds"][1]["vs_first"]["against"] == "sft"
    assert (run / "loop.png").stat().st_size > 0

    # Lineage across rounds: round 1's policy continues round 0's, and says so.
    dpo1 = read_stage(run / "round-1" / "dpo")
    assert (dpo1["round"], dpo1["parent_round"]) == (1, 0)
    assert dpo1["parents"]["after"]["name"] == "round-0/dpo" and dpo1["lineage"] == ["round-0/dpo", "sft"]
    assert read_stage(run / "round-0" / "dpo")["parent_round"] is None
    assert read_stage(run / "round-1" / "reward-1")["config"]["data"]["resample"] == 1

    # The members of a round's ensemble trained on different resamples of the same votes, and learned differently.
    members = [read_stage(run / "round-1" / f"reward-{k}")["metrics"]["train_loss"] for k in (0, 1)]
    assert members[0] != members[1]

    ids = run_ids(run)
    before = ids, len(round_comparisons(db))
    out = loop(capsys, path)
    assert "all 2 rounds complete" in out and "training into" not in out
    assert (run_ids(run), len(round_comparisons(db))) == before
    status = loop(capsys, path, "--status")
    assert "round 0: complete (16 labels" in status and "round 1: complete (32 labels" in status


def bad_loop(capsys, path: Path) -> str:
    code = main(["loop", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw["loop"].update(stages=["reward", "dpoo"]), "loop.stages names 'dpoo', which is not a stage"),
    (lambda raw: raw["loop"].update(budget=65), "loop.budget=65 is larger than the prompt pool (64 prompts"),
    (lambda raw: raw["loop"].update(ensemble=1), "loop.ensemble=1 must be >= 2 with select: uncertainty"),
    (lambda raw: raw["loop"].update(stages=["reward"]), "loop.stages is one policy stage (dpo, ppo, ...) and at most"),
    (lambda raw: raw["loop"].update(stages=["reward", "dpo", "dpo"]), "loop.stages names a stage twice"),
    (lambda raw: raw["loop"].update(judge="oracle:nonsense"), "loop.judge"),
    (lambda raw: raw["loop"].update(start="reward", stages=["dpo"]), "loop.start names 'reward', a reward stage"),
])
def test_bad_loop_sections_are_one_line_and_touch_nothing(tmp_path, capsys, edit, message):
    path = loop_recipe(tmp_path, edit)
    err = bad_loop(capsys, path)
    assert message in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "labels.db").exists()


def test_a_store_that_is_not_a_label_store_is_refused(tmp_path, capsys):
    path = loop_recipe(tmp_path)
    with sqlite3.connect(tmp_path / "labels.db") as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    err = bad_loop(capsys, path)
    line = [n for n, text in enumerate(path.read_text().splitlines(), 1) if "labels_db" in text][-1]  # loop's
    assert f"{path}:{line}:" in err and "is not an alignkit label store (it has other tables: invoices)" in err
    assert not (tmp_path / "run").exists()
    with sqlite3.connect(tmp_path / "labels.db") as conn:
        assert [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["invoices"]


def test_a_recipe_without_a_loop_section_is_refused(tmp_path, capsys):
    path = loop_recipe(tmp_path, lambda raw: raw.pop("loop"))
    assert "needs a loop: section" in bad_loop(capsys, path)


def test_a_ppo_round_scores_with_the_round_s_ensemble(tmp_path):
    """With PPO as the round's policy stage, each round's PPO continues the previous round's policy and scores
    with all of that round's reward members (mean - lambda * std), through the runner's parents."""
    from recipes.loop import load_loop_recipe, round_config

    def with_ppo(raw):
        prompts = str((LOOP_RECIPE.parent / raw["loop"]["prompts"]).resolve())
        raw["stages"].append({"name": "ppo", "kind": "ppo", "after": "sft", "reward": "reward",
                              "data": {"prompts": prompts}, "train": {"steps": 1, "min_reward_accuracy": 0.0}})
        raw["loop"].update(stages=["reward", "ppo"], ensemble=3, judge="oracle:length")

    lr = load_loop_recipe(loop_recipe(tmp_path, with_ppo))
    cfg = round_config(lr, 1)
    ppo1 = cfg.stage("round-1/ppo")
    assert (ppo1.after, ppo1.reward, ppo1.more_rewards) == ("round-0/ppo", "round-1/reward-0",
                                                             ("round-1/reward-1", "round-1/reward-2"))
    assert ppo1.references() == {"after": "round-0/ppo", "reward": "round-1/reward-0", "reward_1": "round-1/reward-1",
                                 "reward_2": "round-1/reward-2"}
    assert [s.name for s in cfg.stages] == ["sft", *(f"round-{r}/{n}" for r in (0, 1)
                                                      for n in ("reward-0", "reward-1", "reward-2", "ppo"))]
    assert cfg.stage("round-0/ppo").data == {"prompts": str((LOOP_RECIPE.parent / "../data/tiny_prompts.jsonl").resolve())}


def test_a_ppo_loop_is_not_judged_by_the_reward_it_optimises(tmp_path, capsys):
    def with_ppo(raw):
        prompts = str((LOOP_RECIPE.parent / raw["loop"]["prompts"]).resolve())
        raw["stages"].append({"name": "ppo", "kind": "ppo", "after": "sft", "reward": "reward",
                              "data": {"prompts": prompts}, "train": {"steps": 1}})
        raw["loop"].update(stages=["reward", "ppo"])

    err = bad_loop(capsys, loop_recipe(tmp_path, with_ppo))
    assert "loop.judge is needed (a PPO round is optimised against the round's reward model)" in err
    assert not (tmp_path / "run").exists()


def test_win_rate_of_takes_the_named_model_s_side():
    from recipes.loop import win_rate_of

    result = {"pairs": [{"model_a": "old", "model_b": "new", "win_rate": 0.3, "ci_low": 0.2, "ci_high": 0.45, "n": 10}]}
    assert win_rate_of(result, "new") == pytest.approx({"win_rate": 0.7, "ci_low": 0.55, "ci_high": 0.8, "n": 10})
    assert win_rate_of(result, "old") == {"win_rate": 0.3, "ci_low": 0.2, "ci_high": 0.45, "n": 10}
    with pytest.raises(ValueError):
        win_rate_of(result, "other")
