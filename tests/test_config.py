"""Recipe configs: every shipped YAML validates; overrides and mistakes are reported precisely."""

from pathlib import Path

import pytest

from alignkit.config import apply_override, load_recipe
from alignkit.errors import UserError
from recipes.runner import RECIPES

REPO = Path(__file__).resolve().parents[1]
ALL_RECIPES = sorted(p for p in (REPO / "recipes" / "configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_loads_and_validates(path):
    cfg = load_recipe(path, stage_kinds=RECIPES)
    assert cfg.stages, path
    assert path.read_text().lstrip().startswith("#"), f"{path} must open with a comment on how to launch it"
    assert "alignkit run" in path.read_text().split("\n\n")[0]


def test_overrides_address_stages_by_name(tiny_recipe):
    cfg = load_recipe(tiny_recipe(), ["stages.dpo.train.beta=0.25", "seed=7", "peft.r=4"], stage_kinds=RECIPES)
    assert cfg.stage("dpo").train["beta"] == 0.25
    assert cfg.seed == 7 and cfg.peft.r == 4


def test_exponent_without_dot_is_a_float(tiny_recipe):
    # YAML 1.1 reads 1e-4 as a string; a float field must still accept it.
    cfg = load_recipe(tiny_recipe(), ["stages.sft.train.learning_rate=1e-4"], stage_kinds=RECIPES)
    assert cfg.stage("sft").train["learning_rate"] == pytest.approx(1e-4)


def test_unknown_train_key_names_line_and_suggests(tiny_recipe):
    path = tiny_recipe(lambda raw: raw["stages"][0]["train"].update(lerning_rate=0.1))
    with pytest.raises(UserError) as err:
        load_recipe(path, stage_kinds=RECIPES)
    msg = str(err.value)
    assert "stages.sft.train.lerning_rate" in msg and "did you mean 'learning_rate'" in msg
    assert f"{path}:" in msg and msg.split(f"{path}:")[1].split(":")[0].isdigit()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("stages.sft.train.max_steps=many", "stages.sft.train.max_steps='many'"),
        ("model.quantization=3bit", "model.quantization='3bit'"),
        ("peft.method=lorra", "did you mean 'lora'"),
        ("stages.dpo.after=sfft", "did you mean 'sft'"),
        ("stages.dpo.kind=dpoo", "did you mean 'dpo'"),
        ("stages.sft.train.output_dir=/tmp/x", "set by alignkit"),
        ("stages.sft.data.trian=x.jsonl", "did you mean 'train'"),
        ("stages.nope.train.beta=1", "no stage named 'nope'"),
    ],
)
def test_bad_values_are_named(tiny_recipe, override, expected):
    with pytest.raises(UserError, match=None) as err:
        load_recipe(tiny_recipe(), [override], stage_kinds=RECIPES)
    assert expected in str(err.value)


def test_dependency_cycle_is_an_error(tiny_recipe):
    def cycle(raw):
        raw["stages"][0]["after"] = "dpo"

    with pytest.raises(UserError, match="cycle"):
        load_recipe(tiny_recipe(cycle), stage_kinds=RECIPES)


def test_apply_override_rejects_missing_equals():
    with pytest.raises(UserError, match="KEY=VALUE"):
        apply_override({}, "seed")


def test_override_does_not_leak_through_yaml_anchors(tmp_path):
    from tests.conftest import TINY_RECIPE

    data = (TINY_RECIPE.parent / "../data").resolve()
    path = tmp_path / "anchors.yaml"
    path.write_text(f"""
model: {{base: alignkit-tiny}}
stages:
  - {{name: sft, kind: sft, data: {{train: {data}/tiny_sft.jsonl}}, train: &common {{max_steps: 2}}}}
  - {{name: dpo, kind: dpo, after: sft, data: {{train: {data}/tiny_prefs.jsonl}}, train: *common}}
""")
    cfg = load_recipe(path, ["stages.dpo.train.beta=0.3"], stage_kinds=RECIPES)
    assert cfg.stage("dpo").train == {"max_steps": 2, "beta": 0.3}
    assert cfg.stage("sft").train == {"max_steps": 2}


def test_a_duplicate_key_is_an_error_not_the_last_one_silently(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model: {base: alignkit-tiny}\nstages:\n  - name: sft\n    kind: sft\n    data: {train: x.jsonl}\n"
                    "    train:\n      max_steps: 2\n      max_steps: 5\n")
    with pytest.raises(UserError, match=rf"{path}:8: duplicate key stages.sft.train.max_steps \(first on line 7\)"):
        load_recipe(path, stage_kinds=RECIPES)


@pytest.mark.parametrize(
    "edit, expected",
    [
        # Known from the YAML alone; they failed only when the stage started, after its parents had trained.
        (lambda raw: raw["stages"].append({"name": "ppo", "kind": "ppo", "after": "sft",
                                           "data": {"prompts": "x.jsonl"}}), "a ppo stage needs `reward:`"),
        (lambda raw: raw["stages"].append({"name": "ppo", "kind": "ppo", "after": "sft", "reward": "sft",
                                           "data": {"prompts": "x.jsonl"}}), "names 'sft', a sft stage, not a reward stage"),
        (lambda raw: raw["stages"][1].update(reward="sft"), "only best_of_n, eval, grpo, ppo, rloo stages take `reward:`"),
        (lambda raw: (raw["stages"].insert(1, {"name": "rm", "kind": "reward", "after": "sft",
                                               "data": {"train": "x.jsonl"}}), raw["stages"][2].update(after="rm")),
         "stages.dpo.after names 'rm', a reward stage"),
        (lambda raw: raw["peft"].update(lora_dropout=1.5), "peft.lora_dropout=1.5 must be in [0, 1)"),
        # prefix tuning: PEFT refused it only once the model was loaded (a traceback), with TRL's default settings
        (lambda raw: (raw["peft"].update(method="prefix_tuning"), raw["stages"].pop(),
                      raw["stages"][0]["train"].pop("gradient_checkpointing")),
         "set stages.sft.train.gradient_checkpointing: false"),
    ],
)
def test_what_a_stage_may_start_from_is_checked_on_load(tiny_recipe, edit, expected):
    with pytest.raises(UserError) as err:
        load_recipe(tiny_recipe(edit), stage_kinds=RECIPES)
    assert expected in str(err.value)


def test_target_modules_are_matched_as_peft_matches_them(tiny_model_dir):
    """The preflight refused a missing module before a stage began; it must not refuse what PEFT accepts:
    a module's last name, a dotted ending, or a full name."""
    from alignkit.modeling import ModelSettings, PeftSettings, check_model

    model = ModelSettings(base=str(tiny_model_dir))
    check_model(model, PeftSettings(target_modules=["q_proj", "self_attn.v_proj", "model.layers.0.mlp.down_proj"]))
    with pytest.raises(UserError, match="peft.target_modules: query_key_value not in"):
        check_model(model, PeftSettings(target_modules=["q_proj", "query_key_value"]))


def test_a_reward_model_may_continue_a_reward_model(tiny_recipe):
    def chain(raw):
        raw["stages"][1] = {"name": "rm", "kind": "reward", "after": "sft", "data": {"train": "x.jsonl"}}
        raw["stages"].append({"name": "rm2", "kind": "reward", "after": "rm", "data": {"train": "x.jsonl"}})

    assert [s.name for s in load_recipe(tiny_recipe(chain), stage_kinds=RECIPES).stages] == ["sft", "rm", "rm2"]
