"""Trackers and completion samples, against the real tools' local stores: a tiny SFT stage through the runner
reports to TensorBoard, MLflow (SQLite store), W&B (offline) and trackio (local store) at once, sampling
completions every 2 steps; each test reads back what landed with that tool's own API or files."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.errors import UserError
from recipes.runner import RECIPES, run_recipe

TOOLS = [t for t in ("mlflow", "wandb", "trackio") if importlib.util.find_spec(t) is not None]
STEPS, EVERY, PROMPTS = 4, 2, 3
# Run directory names, so tracker projects: unique, since trackio keeps the store of its first import's TRACKIO_DIR.
RUN, PPO_RUN = f"run{os.getpid()}", f"ppo{os.getpid()}"


def tracker_env(root: Path) -> dict:
    """Each tool's own settings, all pointing into `root`: nothing leaves the test's directory."""
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "MLFLOW_EXPERIMENT_NAME": "alignkit-tests",
            "WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb"), "WANDB_SILENT": "true",
            "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data"),
            "WANDB_ARTIFACT_DIR": str(root / "wandb-artifacts"), "WANDB_CONFIG_DIR": str(root / "wandb-config"),
            "TRACKIO_DIR": str(root / "trackio")}


def mlflow_experiment(root: Path) -> None:
    """The experiment, made with its artifacts under `root` (MLflow's default is ./mlruns in the working directory)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    if client.get_experiment_by_name("alignkit-tests") is None:
        client.create_experiment("alignkit-tests", artifact_location=str(root / "mlflow-artifacts"))


def sft_only(report_to, *, log_completions=True):
    def edit(raw):
        raw["stages"] = raw["stages"][:1]
        raw["report_to"] = report_to
        train = raw["stages"][0]["train"]
        train.update(max_steps=STEPS, logging_steps=2, save_steps=50)
        if log_completions:
            train["log_completions"] = {"every": EVERY, "prompts": PROMPTS, "max_new_tokens": 6}

    return edit


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in tracker_env(root).items():
            mp.setenv(k, v)
        if "mlflow" in TOOLS:
            mlflow_experiment(root)
        import yaml

        from tests.conftest import TINY_RECIPE

        raw = yaml.safe_load(TINY_RECIPE.read_text())
        raw["run_dir"] = str(root / RUN)
        raw["stages"][0]["data"]["train"] = str((TINY_RECIPE.parent / raw["stages"][0]["data"]["train"]).resolve())
        sft_only(["tensorboard", *TOOLS])(raw)
        path = root / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        records = run_recipe(path, log=lambda line: None)
    return {"root": root, "stage": records["sft"], "stage_dir": root / RUN / "sft"}


def test_ci_has_every_tracker():
    """.ci/run sets ALIGNKIT_REQUIRE_TRACKERS: there, the tracker tests below must run, not skip."""
    if os.environ.get("ALIGNKIT_REQUIRE_TRACKERS") == "1":
        assert TOOLS == ["mlflow", "wandb", "trackio"], "install alignkit[tracking] (scripts/setup.sh does)"


def test_completions_land_at_the_configured_steps(tracked):
    rows = [json.loads(line) for line in (tracked["stage_dir"] / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in range(EVERY, STEPS + 1, EVERY) for _ in range(PROMPTS)]
    assert all(isinstance(r["completion"], str) and r["score"] is None for r in rows)  # SFT has no reward
    # The same prompts each time: the first PROMPTS distinct prompts, held-out rows first.
    first = [json.dumps(r["prompt"]) for r in rows[:PROMPTS]]
    assert first == [json.dumps(r["prompt"]) for r in rows[PROMPTS:]] and len(set(first)) == PROMPTS


def test_tensorboard_holds_the_completions_and_the_stage(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked["stage_dir"] / "logs"), size_guidance={"tensors": 0}).Reload()
    tags = acc.Tags()["tensors"]
    assert "completions/text_summary" in tags and "alignkit/stage/text_summary" in tags
    assert [e.step for e in acc.Tensors("completions/text_summary")] == list(range(EVERY, STEPS + 1, EVERY))
    assert tracked["stage"]["config_hash"] in acc.Tensors("alignkit/stage/text_summary")[0].tensor_proto.string_val[0].decode()


@pytest.mark.skipif("mlflow" not in TOOLS, reason="mlflow is not installed")
def test_mlflow_run_holds_metrics_identity_and_completions(tracked):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tracked['root']}/mlflow.db")
    experiment = client.get_experiment_by_name("alignkit-tests")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`alignkit.stage` = 'sft'")
    assert run.info.run_name == f"{RUN}/sft" and run.info.status == "FINISHED"
    assert run.data.tags["alignkit.config_hash"] == tracked["stage"]["config_hash"]
    assert run.data.params["alignkit.recipe"].endswith("recipe.yaml")
    assert run.data.params["max_steps"] == str(STEPS)  # the HF integration's TRL settings, in the same run
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    assert "eval_loss" in run.data.metrics and run.data.metrics["final/global_step"] == STEPS
    tables = client.list_artifacts(run.info.run_id, "completions")
    assert [Path(t.path).name for t in tables] == ["step_0000002.json", "step_0000004.json"]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, tables[0].path, str(tracked["root"]))).read_text())
    assert len(table["data"]) == PROMPTS and table["columns"] == ["step", "prompt", "completion", "score"]


def wandb_records(run_dir: Path) -> list[dict]:
    """The run's records as W&B's own reader of its transaction log prints them."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.skipif("wandb" not in TOOLS, reason="wandb is not installed")
def test_wandb_offline_run_holds_metrics_identity_and_completions(tracked):
    (run_dir,) = (tracked["root"] / "wandb" / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["display_name"] == f"{RUN}/sft" and run["project"] == RUN and "sft" in run["tags"]
    config = {k: v for r in records if r["type"] == "config" for k, v in r["config"].get("update", {}).items()}
    config.update(run["config"]["update"])
    assert config["alignkit.config_hash"] == tracked["stage"]["config_hash"]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["train/global_step"] for h in history if "train/loss" in h] == [2, 4]
    tables = [h for h in history if h.get("completions._type") == "table-file"]
    assert [h["train/global_step"] for h in tables] == [2, 4] and all(h["completions.nrows"] == PROMPTS for h in tables)
    assert any("final/global_step" in r["summary"]["update"] for r in records if r["type"] == "summary")


@pytest.mark.skipif("trackio" not in TOOLS, reason="trackio is not installed")
def test_trackio_run_holds_metrics_identity_and_completions(tracked):
    from trackio.sqlite_storage import SQLiteStorage

    assert f"{RUN}/sft" in SQLiteStorage.get_runs(RUN)
    logs = SQLiteStorage.get_logs(RUN, f"{RUN}/sft")
    config = SQLiteStorage.get_run_config(RUN, f"{RUN}/sft")
    assert [entry["train/global_step"] for entry in logs if "train/loss" in entry] == [2, 4]
    tables = [entry["completions"] for entry in logs if "completions" in entry]
    assert len(tables) == 2 and all(len(t["_value"]) == PROMPTS for t in tables)
    assert config["alignkit.config_hash"] == tracked["stage"]["config_hash"] and config["max_steps"] == STEPS
    assert any(entry.get("final/global_step") == STEPS for entry in logs)


def test_log_completions_and_trackers_leave_the_config_hash_alone(tiny_recipe):
    from alignkit.config import load_recipe
    from recipes.runner import plan

    hashes = [plan(load_recipe(tiny_recipe(edit, name=f"{i}.yaml"), stage_kinds=RECIPES), only=[], resume=False).hashes
              for i, edit in enumerate((sft_only("tensorboard", log_completions=False), sft_only(["tensorboard", *TOOLS])))]
    assert hashes[0] == hashes[1]


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw.update(report_to="mlfow"), r"recipe.yaml:\d+: report_to='mlfow'; one of .*did you mean 'mlflow'"),
    (lambda raw: raw["stages"][1].update(report_to=["tensorboard", "tensorbord"]),
     r"recipe.yaml:\d+: stages.dpo.report_to='tensorbord'"),
    (lambda raw: raw["stages"][0]["train"].update(report_to="wandb"), r"recipe.yaml:\d+: stages.sft.train.report_to is set by alignkit.*report_to:"),
    (lambda raw: raw["stages"][0]["train"].update(log_completions={"every": 0}),
     r"recipe.yaml:\d+: stages.sft.train.log_completions.every=0 must be an integer >= 1"),
    (lambda raw: raw["stages"][0]["train"].update(log_completions={"evry": 5}),
     r"recipe.yaml:\d+: unknown key stages.sft.train.log_completions.evry \(did you mean 'every'\?\)"),
])
def test_a_bad_tracker_setting_is_one_line_naming_file_line_and_key(tiny_recipe, edit, message):
    from alignkit.config import load_recipe

    with pytest.raises(UserError, match=message):
        load_recipe(tiny_recipe(edit), stage_kinds=RECIPES)


def test_a_bad_report_to_from_set_exits_2_naming_the_set(tiny_recipe, capsys):
    from alignkit.cli import main

    assert main(["run", str(tiny_recipe()), "--dry-run", "--set", "stages.sft.report_to=tensorbored"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set stages.sft.report_to=tensorbored" in err


@pytest.fixture(scope="module")
def tracked_ppo(tmp_path_factory, tiny_model_dir):
    """alignkit's own PPO loop (the fast tiny setup of test_ppo_stage, a programmatic reward) on every tracker."""
    from alignkit.completions import completion_log
    from alignkit.modeling import ModelSettings
    from alignkit.ppo.trainer import PPOTrainer
    from alignkit.stage import PromptSet, StageRun
    from alignkit.tracking import LogCompletions, Reporting, TrackerRuns
    from tests.test_ppo_stage import PROMPTS as PPO_PROMPTS, char_reward, config, peft_settings

    root = tmp_path_factory.mktemp("ppo-trackers")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in tracker_env(root).items():
            mp.setenv(k, v)
        if "mlflow" in TOOLS:
            mlflow_experiment(root)
        stage = StageRun(name="ppo", kind="ppo", stage_dir=root / PPO_RUN / "ppo", model=ModelSettings(
            base=str(tiny_model_dir), quantization="none"), peft=peft_settings(), data={}, train={}, parents={},
            seed=0, config_hash="0123abcd", prepared=PromptSet([{"prompt": p} for p in PPO_PROMPTS], {}),
            report=Reporting(report_to=("tensorboard", *TOOLS), project=PPO_RUN, recipe="recipe.yaml",
                             lineage=("sft",), log_completions=LogCompletions(every=EVERY, prompts=PROMPTS, max_new_tokens=6)))
        trackers = TrackerRuns.for_stage(stage, hf_logs=False)
        trainer = PPOTrainer(config(steps=STEPS, rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=6),
                             stage.model, stage.peft, prompts=PPO_PROMPTS, stage_dir=stage.stage_dir, reward=char_reward,
                             trackers=trackers, completions=completion_log(stage, trackers))
        trainer.train()
    return {"root": root, "stage_dir": stage.stage_dir, "char_reward": char_reward}


def test_ppo_completions_are_scored_by_the_stage_reward(tracked_ppo):
    rows = [json.loads(line) for line in (tracked_ppo["stage_dir"] / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in range(EVERY, STEPS + 1, EVERY) for _ in range(PROMPTS)]
    expected = tracked_ppo["char_reward"]([r["prompt"] for r in rows], [r["completion"] for r in rows])
    assert [r["score"] for r in rows] == pytest.approx(expected)


@pytest.mark.skipif("mlflow" not in TOOLS, reason="mlflow is not installed")
def test_ppo_on_mlflow(tracked_ppo):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tracked_ppo['root']}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("alignkit-tests").experiment_id])
    assert run.info.run_name == f"{PPO_RUN}/ppo" and run.data.tags["alignkit.lineage"] == "ppo <- sft"
    assert run.data.params["rollout_batch_size"] == "8" and run.data.params["alignkit.config_hash"] == "0123abcd"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "ppo/mean_reward")] == list(range(1, STEPS + 1))
    assert len(client.list_artifacts(run.info.run_id, "completions")) == STEPS // EVERY
    assert len(client.list_artifacts(run.info.run_id, "ppo/samples")) == STEPS


@pytest.mark.skipif("wandb" not in TOOLS, reason="wandb is not installed")
def test_ppo_on_wandb(tracked_ppo):
    (run_dir,) = (tracked_ppo["root"] / "wandb" / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["display_name"] == f"{PPO_RUN}/ppo" and run["config"]["update"]["rollout_batch_size"] == 8
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["train/global_step"] for h in history if "ppo/mean_reward" in h] == list(range(1, STEPS + 1))
    assert [h["train/global_step"] for h in history if h.get("completions._type") == "table-file"] == [2, 4]


@pytest.mark.skipif("trackio" not in TOOLS, reason="trackio is not installed")
def test_ppo_on_trackio(tracked_ppo):
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs(PPO_RUN, f"{PPO_RUN}/ppo")
    config = SQLiteStorage.get_run_config(PPO_RUN, f"{PPO_RUN}/ppo")
    assert [entry["step"] for entry in logs if "ppo/mean_reward" in entry] == list(range(1, STEPS + 1))
    assert len([entry for entry in logs if "completions" in entry]) == STEPS // EVERY
    assert config["alignkit.config_hash"] == "0123abcd" and config["rollout_batch_size"] == 8
