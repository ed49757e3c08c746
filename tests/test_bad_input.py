"""Bad input: one clear line naming what and where, exit status 2, no traceback, nothing marked complete."""

import json
import subprocess
import sys

import pytest

from alignkit.cli import EXIT_BAD_INPUT, main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_clean_line(code, err, *needles):
    assert code == EXIT_BAD_INPUT, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def _no_stage_complete(run_dir):
    return not any(p.name == "stage.json" for p in run_dir.rglob("stage.json")) if run_dir.exists() else True


def test_missing_config_file(capsys, tmp_path):
    code, err = _run(capsys, "run", str(tmp_path / "nope.yaml"))
    _assert_one_clean_line(code, err, "config file not found", "nope.yaml")


def test_invalid_yaml_names_line(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  base: x\nstages: [\n  - {name: a\n")
    code, err = _run(capsys, "run", str(path))
    _assert_one_clean_line(code, err, f"{path}:", "invalid YAML")


@pytest.mark.parametrize(
    "edit, needles",
    [
        (lambda raw: raw["stages"][0]["train"].update(lerning_rate=1.0), ["lerning_rate", "did you mean 'learning_rate'"]),
        (lambda raw: raw["stages"][0]["train"].update(max_steps="lots"), ["stages.sft.train.max_steps='lots'"]),
        (lambda raw: raw["model"].update(base="/no/such/model"), ["model path does not exist", "/no/such/model"]),
        (lambda raw: raw["stages"][0]["data"].update(train="/no/such/data.jsonl"), ["not found", "/no/such/data.jsonl"]),
        # The CPU test machine has no liger-kernel (it is the [gpu] extra): asking for it is caught before anything trains.
        (lambda raw: raw["stages"][1]["train"].update(use_liger_kernel=True),
         ["stages.dpo.train.use_liger_kernel needs the liger-kernel package", "alignkit[gpu]"]),
    ],
)
def test_config_mistakes(capsys, tiny_recipe, edit, needles):
    path = tiny_recipe(edit)
    code, err = _run(capsys, "run", str(path))
    _assert_one_clean_line(code, err, *needles)
    assert _no_stage_complete(path.parent / "run")


@pytest.mark.parametrize(
    "content, needles",
    [
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [oops\n', [":2:", "malformed JSON"]),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"text_typo": "x"}\n', [":2:", "missing column 'messages'"]),
        ("", ["empty"]),
        ('{"prompt": "a"}\n', [":1:", "'prompt' + 'completion'"]),
    ],
)
def test_bad_sft_data_leaves_every_stage_untouched(capsys, tiny_recipe, tmp_path, content, needles):
    data = tmp_path / "sft.jsonl"
    data.write_text(content)
    path = tiny_recipe(lambda raw: raw["stages"][0]["data"].update(train=str(data)))
    code, err = _run(capsys, "run", str(path))
    _assert_one_clean_line(code, err, *needles)
    assert not (path.parent / "run").exists(), "a stage directory was created for bad input"


def test_bad_preference_data_checked_before_sft_trains(capsys, tiny_recipe, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    path = tiny_recipe(lambda raw: raw["stages"][1]["data"].update(train=str(data)))
    code, err = _run(capsys, "run", str(path))
    _assert_one_clean_line(code, err, f"{data}:1", "missing column 'rejected'")
    assert not (path.parent / "run").exists(), "SFT trained although DPO's data was bad"


def test_complete_stage_survives_bad_input_in_a_later_run(capsys, tiny_recipe, tmp_path, tiny_model_dir):
    from alignkit.artifacts import read_stage

    def small(raw):
        raw["stages"][0]["train"]["max_steps"] = 2
        raw["stages"][1]["train"]["max_steps"] = 1

    path = tiny_recipe(small)
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    before = (path.parent / "run" / "sft" / "stage.json").read_text()
    data = tmp_path / "broken.jsonl"
    data.write_text("{not json\n")
    code, err = _run(capsys, "run", str(path), "--set", f"stages.dpo.data.train={data}")
    _assert_one_clean_line(code, err, f"{data}:1")
    assert (path.parent / "run" / "sft" / "stage.json").read_text() == before
    assert read_stage(path.parent / "run" / "dpo")["complete"], "the old DPO stage was touched"


def test_bad_input_exit_status_through_the_console_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "alignkit.cli", "run", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_import_file_not_utf8_names_line_and_column(capsys, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(json.dumps({"prompt": "ok", "responses": ["a", "b"]}).encode() + b"\n"
                     + '{"prompt": "caf\u00e9", "responses": ["a", "b"]}\n'.encode("latin-1"))
    db = tmp_path / "labels.db"
    code, err = _run(capsys, "label", "import", "--db", str(db), str(data))
    _assert_one_clean_line(code, err, f"{data}:2: not UTF-8 (byte 0xe9 at column 16)")
    assert not db.exists()
    # The same for a .json list file read by the training data loader.
    from alignkit.data.io import load_rows
    from alignkit.errors import UserError

    listed = tmp_path / "rows.json"
    listed.write_bytes(b'[\n  {"prompt": "ok"},\n  {"prompt": "caf\xe9"}\n]\n')
    with pytest.raises(UserError, match=r"rows.json:3: not UTF-8 \(byte 0xe9 at column 18\)"):
        load_rows(listed)


def test_greedy_generation_with_one_model_is_refused_before_a_store_exists(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "the film was"}) + "\n")
    db = tmp_path / "labels.db"
    code, err = _run(capsys, "label", "import", "--db", str(db), str(data), "--generate", str(tiny_model_dir),
                     "--temperature", "0")
    _assert_one_clean_line(code, err, "one --generate model with greedy decoding (--temperature 0)")
    assert not db.exists()
    # Sampling settings transformers would take silently (top_p 2) or raise on mid-run (0 new tokens).
    for flags, message in ((["--top-p", "2"], "top_p must be in (0, 1]"),
                           (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1")):
        code, err = _run(capsys, "label", "import", "--db", str(db), str(data), "--generate", str(tiny_model_dir), *flags)
        _assert_one_clean_line(code, err, message)
        assert not db.exists()


def test_failed_generation_leaves_no_store(capsys, tmp_path, tiny_model_dir):
    """Sampling runs before the store is opened: a failure (here every sample empty, so no comparison) left an
    empty store that `serve` and `export` then took for a real one."""
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "the film was"}) + "\n")
    db = tmp_path / "labels.db"
    code, err = _run(capsys, "label", "import", "--db", str(db), str(data), "--generate", str(tiny_model_dir),
                     "--generate", str(tiny_model_dir), "--temperature", "0", "--max-new-tokens", "2")
    assert code == 2 and "Traceback" not in err  # after the progress bars of the sampling, one line
    assert err.strip().splitlines()[-1].startswith(f"alignkit: error: {data}:1: fewer than 2 distinct responses")
    assert not db.exists()
    code, err = _run(capsys, "label", "import", "--db", str(tmp_path / "no" / "dir.db"), str(data),
                     "--generate", str(tiny_model_dir))
    _assert_one_clean_line(code, err, "cannot create label store")


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "soon"])
def test_serve_lease_seconds_must_be_positive_and_finite(capsys, tmp_path, value):
    code, err = _run(capsys, "label", "serve", "--db", str(tmp_path / "l.db"), "--no-auth", "--lease-seconds", value)
    _assert_one_clean_line(code, err, "--lease-seconds")


def test_values_found_wrong_only_at_load_time_cost_no_complete_stage(capsys, tiny_recipe, tmp_path, tiny_model_dir):
    """Each of these passed --dry-run and failed after the runner had begun the stage again, so its complete
    stage.json and checkpoints were gone (two with tracebacks). Now each is one line naming the key where it
    was set, before any stage directory is touched; and a complete parent with broken weights is named too."""
    from alignkit.artifacts import read_stage

    path = tiny_recipe(lambda raw: [s["train"].update(max_steps=1) for s in raw["stages"]])
    run = path.parent / "run"
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    before = {name: (run / name / "stage.json").read_text() for name in ("sft", "dpo")}
    for override, needles in (
        ("peft.lora_dropout=2", ["--set peft.lora_dropout=2", "must be in [0, 1)"]),
        ("peft.r=0", ["--set peft.r=0", "peft.r=0 must be >= 1"]),
        ("peft.target_modules=[nonexistent_proj]", ["--set peft.target_modules", "nonexistent_proj not in", "q_proj"]),
        ("stages.sft.train.per_device_train_batch_size=0",
         ["--set stages.sft.train.per_device_train_batch_size=0", "must be at least 1"]),
        ("stages.dpo.train.lr_scheduler_type=cosin", ["--set stages.dpo.train.lr_scheduler_type=cosin", "cosin"]),
        ("stages.dpo.train.beta=-1", ["--set stages.dpo.train.beta=-1", "beta=-1 must be above 0"]),
    ):
        code, err = _run(capsys, "run", str(path), "--set", override)
        _assert_one_clean_line(code, err, *needles)
        assert {name: (run / name / "stage.json").read_text() for name in ("sft", "dpo")} == before, override
    # A parent marked complete whose adapter is gone: named, and the child's directory is left as it was.
    (run / "sft" / "adapter_model.safetensors").write_bytes(b"junk")
    code, err = _run(capsys, "run", str(path), "--set", "stages.dpo.train.beta=0.3")
    _assert_one_clean_line(code, err, f"its after stage {run / 'sft'} is marked complete but has an unreadable "
                                      "adapter_model.safetensors", "remove")
    assert read_stage(run / "dpo")["complete"]


def test_a_second_run_in_the_same_run_dir_is_refused(capsys, tiny_recipe):
    """Two runners on one stage: the second removed the first one's logs and checkpoints as it began the same
    stage, and the first died with a traceback. The second now refuses while the first holds the stage."""
    from recipes.runner import _stage_lock

    path = tiny_recipe()
    run = path.parent / "run"
    with _stage_lock(run, "sft"):
        code, err = _run(capsys, "run", str(path))
        _assert_one_clean_line(code, err, f"stage sft in {run} is being trained by another alignkit run on this machine")
        assert _no_stage_complete(run) and not (run / "sft").exists()
        code, _ = _run(capsys, "run", str(path), "--dry-run")  # a dry run writes nothing: no lock needed
        assert code == 0


def test_missing_accelerate_config_is_one_line(capsys, tiny_recipe):
    path = tiny_recipe()
    code, err = _run(capsys, "run", str(path), "--launcher", "accelerate", "--accelerate-config", "nope.yaml")
    _assert_one_clean_line(code, err, "--accelerate-config nope.yaml: no such file")
    assert not (path.parent / "run").exists()
