"""`kind: eval` after SFT through `alignkit run`: the recipe ends with its own scorecard."""

import json

import pytest

from alignkit.cli import main
from alignkit.errors import UserError
from recipes.runner import RECIPES
from tests.test_evaluation import ROWS, metric_dir


def with_eval(tmp_path, **stage):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    metric = metric_dir(tmp_path, "same_text", "string")

    def edit(raw):
        raw["stages"] = raw["stages"][:1]
        raw["stages"][0]["train"].update(max_steps=2, save_steps=50)
        raw["stages"].append({"name": "scorecard", "kind": "eval", "after": "sft", "data": {"eval": str(data)},
                              "train": {"metrics": [str(metric)], "extract": "gsm8k", "max_new_tokens": 6}, **stage})

    return edit


def test_eval_stage_after_sft_scores_the_sft_policy(tiny_recipe, tmp_path, tiny_model_dir):
    path = tiny_recipe(with_eval(tmp_path))
    assert main(["run", str(path)]) == 0
    stage_dir = tmp_path / "run" / "scorecard"
    record = json.loads((stage_dir / "stage.json").read_text())
    assert record["complete"] and record["kind"] == "eval" and record["lineage"] == ["sft"]
    assert record["data"]["evaluated"] == str(tmp_path / "run" / "sft")
    # As in test_evaluation: no '#' in the tiny vocabulary, so only the two rows without an answer match.
    predictions = [json.loads(line) for line in (stage_dir / "predictions.jsonl").read_text().splitlines()]
    assert all(p["extracted"] == "" for p in predictions)
    assert record["metrics"]["same_text"] == 0.5 and record["metrics"]["perplexity"] > 1
    assert json.loads((stage_dir / "eval.json").read_text())["models"][0]["name"] == "sft"
    # Complete: a second run skips it.
    lines = []
    from recipes.runner import run_recipe

    run_recipe(path, log=lines.append)
    assert any("scorecard" in line and "skipped" in line for line in lines)


@pytest.mark.parametrize("stage, message", [
    ({"train": {"metrics": ["x"], "extract": "gsm9k"}}, r"stages.scorecard.train.extract='gsm9k' is not a valid one of"),
    ({"train": {"metrics": ["x"], "log_completions": {"every": 2}}}, r"a eval stage trains none"),
])
def test_eval_stage_settings_are_checked_at_their_line(tiny_recipe, tmp_path, stage, message):
    from alignkit.config import load_recipe

    with pytest.raises(UserError, match=r"recipe.yaml:\d+: .*" + message):
        load_recipe(tiny_recipe(with_eval(tmp_path, **stage)), stage_kinds=RECIPES)


def test_nothing_may_start_from_an_eval_stage(tiny_recipe, tmp_path):
    from alignkit.config import load_recipe

    def edit(raw):
        with_eval(tmp_path)(raw)
        raw["stages"].append({"name": "dpo", "kind": "dpo", "after": "scorecard", "data": {"train": "x.jsonl"}})

    with pytest.raises(UserError, match="stages.dpo.after names 'scorecard', a eval stage"):
        load_recipe(tiny_recipe(edit), stage_kinds=RECIPES)
