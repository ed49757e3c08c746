"""ORPO and SimPO on the tiny model through `alignkit run`: after SFT, or from the base; no reference model.

One CLI run of SFT -> {ORPO, SimPO} plus an ORPO stage on the base. Each moves its adapter away from the
one it starts from and leaves the base alone; TRL's logged rewards show the losses the kinds promise
(ORPO's beta * log-prob with an NLL term, SimPO's beta * mean log-prob without one); a rerun trains
nothing; a mistyped setting is one line naming the YAML line and key.
"""

import pytest
import yaml
from safetensors.torch import load_file

from alignkit.artifacts import file_fingerprint, read_stage
from alignkit.cli import EXIT_BAD_INPUT, main
from tests.conftest import REPO

RECIPE = REPO / "recipes" / "configs" / "tiny_sft_orpo.yaml"


def write_recipe(tmp, edit=None):
    raw = yaml.safe_load(RECIPE.read_text())
    raw["run_dir"] = str(tmp / "run")
    for stage in raw["stages"]:
        stage["data"]["train"] = str((RECIPE.parent / stage["data"]["train"]).resolve())
    if edit:
        edit(raw)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def add_orpo_on_base(raw):
    orpo = raw["stages"][1]
    raw["stages"].append({"name": "orpo_base", "kind": "orpo", "data": dict(orpo["data"]),
                          "train": {**orpo["train"], "max_steps": 2}})


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("reference_free")
    path = write_recipe(tmp, add_orpo_on_base)
    base_before = file_fingerprint(tiny_model_dir)
    assert main(["run", str(path)]) == 0
    return {"recipe": path, "run": tmp / "run", "base": tiny_model_dir, "base_before": base_before}


def _lora(stage_dir):
    return load_file(str(stage_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_adapter_moved_from_sft_and_base_untouched(run, kind):
    sft, trained = _lora(run["run"] / "sft"), _lora(run["run"] / kind)
    assert trained.keys() == sft.keys() and all("lora_" in k for k in trained)
    assert sum((trained[k].float() - sft[k].float()).norm() for k in trained) > 1e-3
    record = read_stage(run["run"] / kind)
    assert record["complete"] and record["kind"] == kind and record["lineage"] == ["sft"]
    assert record["data"]["initialized_from_sha256"] == file_fingerprint(run["run"] / "sft" / "adapter_model.safetensors")
    assert record["data"]["reference"].startswith("none")
    assert file_fingerprint(run["base"]) == run["base_before"]


def test_orpo_trains_its_odds_ratio_and_nll_terms(run):
    m = read_stage(run["run"] / "orpo")["metrics"]
    # TRL's ORPO reward is beta * the response's log-prob; beta is the recipe's 0.1.
    assert m["rewards/chosen"] == pytest.approx(0.1 * m["logps/chosen"], rel=1e-3)
    assert m["nll_loss"] > 0 and "log_odds_ratio" in m and m["global_step"] == 4


def test_simpo_defaults_are_the_papers(run):
    """Length-normalised rewards (mean per-token log-prob) at beta 2.0, no behaviour-cloning term (cpo_alpha 0)."""
    record = read_stage(run["run"] / "simpo")
    m = record["metrics"]
    assert "loss_type" not in record["config"]["train"] and "cpo_alpha" not in record["config"]["train"]
    assert m["rewards/chosen"] == pytest.approx(2.0 * m["logps/chosen"], rel=1e-3)
    assert m["nll_loss"] == 0
    assert m["global_step"] == 4


def test_orpo_starts_from_the_base(run):
    record = read_stage(run["run"] / "orpo_base")
    assert record["complete"] and record["lineage"] == [] and "initialized_from" not in record["data"]
    weights = _lora(run["run"] / "orpo_base")
    # PEFT initialises lora_B to zero: a fresh adapter that trained has non-zero B.
    assert sum(v.float().norm() for k, v in weights.items() if "lora_B" in k) > 1e-4


def test_rerun_is_a_skip(run, capsys):
    before = {n: read_stage(run["run"] / n)["run_id"] for n in ("sft", "orpo", "simpo", "orpo_base")}
    assert main(["run", str(run["recipe"])]) == 0
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == 4 and "training into" not in out
    assert {n: read_stage(run["run"] / n)["run_id"] for n in before} == before


def _line_of(path, stage_name, key):
    """The line of `key:` in the stage named `stage_name`."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() in (f"name: {stage_name}", f"- name: {stage_name}"))
    return next(i for i, line in enumerate(lines[start:], start + 1) if line.strip().startswith(f"{key}:"))


@pytest.mark.parametrize("stage, key, value, needle", [
    (1, "betta", 0.1, "unknown key stages.orpo.train.betta"),
    (1, "beta", -1.0, "beta=-1.0 must be above 0"),
    (2, "loss_type", "sigmoid", "a simpo stage trains simpo"),
    (2, "simpo_gamma", "wide", "stages.simpo.train.simpo_gamma='wide'"),
])
def test_bad_setting_is_one_line_naming_file_line_key(tmp_path, capsys, tiny_model_dir, stage, key, value, needle):
    def edit(raw):
        raw["stages"][stage]["train"].pop(key, None)
        raw["stages"][stage]["train"] = {key: value, **raw["stages"][stage]["train"]}

    path = write_recipe(tmp_path, edit)
    code = main(["run", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and "Traceback" not in err and len(err.splitlines()) == 1, err
    name = ("sft", "orpo", "simpo")[stage]
    assert f"error: {path}:{_line_of(path, name, key)}: " in err and needle in err, err
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("stage.json"))
