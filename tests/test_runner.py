"""The runner: skip complete stages, re-run what changed and its descendants, survive a kill, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.artifacts import last_complete_checkpoint, read_stage
from recipes.runner import run_recipe


def _small(raw):
    raw["stages"][0]["train"]["max_steps"] = 4
    raw["stages"][1]["train"]["max_steps"] = 2


def _mtime(run, name):
    return (run / name / "stage.json").stat().st_mtime_ns


def test_rerun_skips_and_changes_rerun_descendants_only(tiny_recipe, tiny_model_dir):
    path = tiny_recipe(_small)
    run = Path(json.loads(json.dumps(str(path.parent / "run"))))
    lines = []
    run_recipe(path, log=lines.append)
    first = {n: _mtime(run, n) for n in ("sft", "dpo")}

    lines.clear()
    run_recipe(path, log=lines.append)
    assert all("skipped" in line for line in lines), lines
    assert {n: _mtime(run, n) for n in ("sft", "dpo")} == first

    # A DPO-only change re-runs DPO and leaves SFT alone; its completed run's checkpoints go, named as such.
    had = last_complete_checkpoint(run / "dpo")
    lines.clear()
    run_recipe(path, ["stages.dpo.train.beta=0.3"], log=lines.append)
    assert _mtime(run, "sft") == first["sft"] and _mtime(run, "dpo") != first["dpo"]
    assert had is not None and any(f"removed the checkpoints of its earlier, completed run (up to {had.name})" in line
                                   for line in lines), lines
    assert read_stage(run / "dpo")["config"]["train"]["beta"] == 0.3

    # An SFT change re-runs SFT and, through the parent hash, DPO.
    second_dpo = _mtime(run, "dpo")
    run_recipe(path, ["stages.dpo.train.beta=0.3", "stages.sft.train.learning_rate=0.001"], log=lines.append)
    assert _mtime(run, "sft") != first["sft"] and _mtime(run, "dpo") != second_dpo


def test_data_change_reruns_the_stage(tiny_recipe, tmp_path, tiny_model_dir):
    from tests.conftest import TINY_RECIPE

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text((TINY_RECIPE.parent / "../data/tiny_prefs.jsonl").resolve().read_text())

    def edit(raw):
        _small(raw)
        raw["stages"][1]["data"]["train"] = str(prefs)

    path = tiny_recipe(edit)
    run_recipe(path, log=lambda *_: None)
    before = _mtime(path.parent / "run", "dpo")
    prefs.write_text("\n".join(prefs.read_text().splitlines()[:-3]) + "\n")
    run_recipe(path, log=lambda *_: None)
    assert _mtime(path.parent / "run", "dpo") != before


@pytest.mark.slow
def test_killed_stage_is_incomplete_and_resume_continues(tiny_recipe, tiny_model_dir):
    def long_sft(raw):
        raw["stages"][0]["train"].update(max_steps=60, save_steps=3, logging_steps=3, save_total_limit=3)
        raw["stages"][1]["train"]["max_steps"] = 2

    path = tiny_recipe(long_sft)
    run = path.parent / "run"
    cmd = [sys.executable, "-m", "alignkit.cli", "run", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 180
    while time.time() < deadline and last_complete_checkpoint(run / "sft") is None:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = last_complete_checkpoint(run / "sft")
    assert checkpoint is not None, "no checkpoint was written before the kill"
    assert read_stage(run / "sft") is None, "a killed stage must not be complete"

    # A half-written newer checkpoint (Trainer writes are not atomic) must be skipped, not crash the resume.
    broken = run / "sft" / "checkpoints" / "checkpoint-999"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"partial")
    resumed_from = last_complete_checkpoint(run / "sft")
    assert resumed_from != broken

    # A dry run says what a plain run would remove and what --resume would continue, and removes nothing.
    lines = []
    run_recipe(path, dry_run=True, log=lines.append)
    assert any(f"removing the checkpoints of its unfinished earlier run (up to {resumed_from.name}), which --resume "
               f"continues" in line for line in lines), lines
    run_recipe(path, dry_run=True, resume=True, log=lines.append)
    assert any(f"would train into {run / 'sft'}, resuming from {resumed_from.name}" in line for line in lines), lines
    assert last_complete_checkpoint(run / "sft") == resumed_from

    lines = []
    run_recipe(path, resume=True, log=lines.append)
    assert any(f"resuming from {resumed_from.name}" in line for line in lines), lines
    sft = read_stage(run / "sft")
    assert sft["complete"] and sft["metrics"]["global_step"] == 60
    assert read_stage(run / "dpo")["complete"]


def test_interrupted_stage_completes_on_plain_rerun(tiny_recipe, tiny_model_dir):
    path = tiny_recipe(_small)
    run = path.parent / "run"
    (run / "sft" / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # leftovers of a crash
    (run / "sft" / "pending.json").write_text('{"config_hash": "something-else"}')
    run_recipe(path, log=lambda *_: None)
    assert read_stage(run / "sft")["complete"] and read_stage(run / "dpo")["complete"]


def test_cli_chain_end_to_end(tiny_recipe, tiny_model_dir):
    path = tiny_recipe(_small)
    out = subprocess.run([sys.executable, "-m", "alignkit.cli", "run", str(path)], capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[2/2] dpo (dpo): complete" in out.stdout
    dpo = read_stage(path.parent / "run" / "dpo")
    assert dpo["complete"] and dpo["parents"]["after"]["name"] == "sft"


def test_divergence_stops_keeps_last_good_checkpoint(tiny_recipe, tiny_model_dir, capsys):
    from alignkit.cli import EXIT_DIVERGED, main

    path = tiny_recipe(_small)
    code = main(["run", str(path), "--only", "sft",
                 "--set", "stages.sft.train.learning_rate=1e30", "--set", "stages.sft.train.lr_scheduler_type=constant",
                 "--set", "stages.sft.train.max_grad_norm=0", "--set", "stages.sft.train.save_steps=1",
                 "--set", "stages.sft.train.max_steps=10"])
    err = capsys.readouterr().err
    assert code == EXIT_DIVERGED
    assert "non-finite" in err and "Traceback" not in err
    run = path.parent / "run"
    assert read_stage(run / "sft") is None
    assert last_complete_checkpoint(run / "sft") is not None


def test_mistakes_and_bookkeeping_leave_complete_stages_alone(tiny_recipe, tmp_path, tiny_model_dir):
    from alignkit.errors import UserError
    from tests.conftest import TINY_RECIPE

    moved = tmp_path / "moved"
    moved.mkdir()
    prefs = (TINY_RECIPE.parent / "../data/tiny_prefs.jsonl").resolve()
    (moved / prefs.name).write_text(prefs.read_text())  # a moved project keeps its file names
    path = tiny_recipe(_small)
    run = path.parent / "run"
    run_recipe(path, log=lambda *_: None)
    first = {name: _mtime(run, name) for name in ("sft", "dpo")}

    # Values TRL rejects and a mistyped model path fail before any stage directory is touched.
    for override in ("stages.dpo.train.lr_scheduler_type=cosin", "model.base=./no-such-model"):
        with pytest.raises(UserError):
            run_recipe(path, [override], log=lambda *_: None)
        assert {name: _mtime(run, name) for name in ("sft", "dpo")} == first, override
    with pytest.raises(UserError, match="cosin"):
        run_recipe(path, ["stages.dpo.train.lr_scheduler_type=cosin"], dry_run=True, log=lambda *_: None)

    # Logging and saving settings, and the same data at another path, do not retrain anything.
    lines = []
    run_recipe(path, ["stages.sft.train.logging_steps=1", "stages.dpo.train.save_steps=7",
                      f"stages.dpo.data.train={moved / prefs.name}"], dry_run=True, log=lines.append)
    assert sum("complete, skipped" in line for line in lines) == 2, lines

    # Stages completed under the oldest hash formula (data paths and every train key in it) are still complete,
    # and a run upgrades their stage.json to the current formula once.
    from alignkit.artifacts import write_json_atomic
    from alignkit.config import load_recipe, order_stages
    from alignkit.hashing import HASH_FORMULA, config_hashes, fingerprints
    from recipes.runner import RECIPES

    cfg = load_recipe(path, stage_kinds=RECIPES)
    ordered = order_stages(cfg.stages)
    legacy = config_hashes(cfg, ordered, fingerprints(ordered), formula=1)

    def unversioned(name, config_hash):
        record = {k: v for k, v in read_stage(run / name).items() if k != "hash_formula"}
        write_json_atomic(run / name / "stage.json", {**record, "config_hash": config_hash})

    for stage in ordered:
        record = read_stage(run / stage.name)
        assert record["config_hash"] != legacy[stage.name] and record["hash_formula"] == HASH_FORMULA
        unversioned(stage.name, legacy[stage.name])
    lines = []
    run_recipe(path, dry_run=True, log=lines.append)
    assert sum("complete, skipped" in line for line in lines) == 2, lines
    unversioned("dpo", "0" * 64)
    lines = []
    run_recipe(path, dry_run=True, log=lines.append)
    assert sum("would train" in line for line in lines) == 1, lines
    unversioned("dpo", legacy["dpo"])
    current = {name: read_stage(run / name)["run_id"] for name in ("sft", "dpo")}
    run_recipe(path, log=lambda *_: None)  # the upgrade: nothing trains, both records carry the current formula
    for name in ("sft", "dpo"):
        assert read_stage(run / name)["hash_formula"] == HASH_FORMULA and read_stage(run / name)["run_id"] == current[name]

    # A parent retrained under the same config (it was interrupted) makes its child stale.
    (run / "sft" / "stage.json").unlink()
    (run / "sft" / "pending.json").write_text(json.dumps({"config_hash": read_stage(run / "dpo")["parents"]["after"]["config_hash"]}))
    lines = []
    run_recipe(path, log=lines.append)
    assert _mtime(run, "sft") != first["sft"] and _mtime(run, "dpo") != first["dpo"]
    assert any("its after stage sft is trained again" in line for line in lines), lines
    assert read_stage(run / "dpo")["parents"]["after"]["run_id"] == read_stage(run / "sft")["run_id"]


def test_only_takes_comma_separated_stage_names(tiny_recipe, capsys):
    from alignkit.cli import main

    path = tiny_recipe()
    assert main(["run", str(path), "--dry-run", "--only", "sft,dpo"]) == 0
    out = capsys.readouterr().out
    assert "sft (sft): would train" in out and "dpo (dpo): would train" in out
    assert main(["run", str(path), "--dry-run", "--only", "sft,dpp"]) == 2
    assert "no stage named 'dpp' (did you mean 'dpo'?)" in capsys.readouterr().err


def test_help_lists_the_commands_a_user_runs(capsys):
    from alignkit.cli import build_parser

    text = build_parser().format_help()
    assert "SUPPRESS" not in text and "_stage" not in text and "dispatch only" not in text
    assert all(f"\n    {name} " in text for name in ("run", "label", "compare", "merge", "generate", "estimate", "demo"))


def test_a_moved_project_with_a_local_base_model_is_not_retrained(tmp_path, tiny_model_dir):
    """model.base as a local directory was hashed by its absolute path: copying the project elsewhere retrained
    every stage, which the README says moving never does. It is hashed relative to the recipe now."""
    import shutil

    from alignkit.config import load_recipe
    from alignkit.hashing import portable_base
    from recipes.runner import RECIPES

    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "models" / "tiny")
    shutil.copy(Path(__file__).resolve().parents[1] / "recipes" / "data" / "tiny_sft.jsonl", project / "sft.jsonl")
    (project / "recipe.yaml").write_text(
        "model: {base: models/tiny, quantization: none, compute_dtype: float32}\n"
        "peft: {r: 4, lora_alpha: 8}\nrun_dir: runs\nstages:\n  - name: sft\n    kind: sft\n"
        "    data: {train: sft.jsonl}\n    train: {max_steps: 1, per_device_train_batch_size: 4, max_length: 64}\n")
    run_recipe(project / "recipe.yaml", log=lambda *_: None)
    moved = shutil.copytree(project, tmp_path / "elsewhere" / "project")
    shutil.rmtree(project)  # nothing of the old location is left to find
    assert portable_base(load_recipe(moved / "recipe.yaml", stage_kinds=RECIPES)) == "models/tiny"
    lines = []
    run_recipe(moved / "recipe.yaml", dry_run=True, log=lines.append)
    assert lines and all("complete, skipped" in line for line in lines), lines
