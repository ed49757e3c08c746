"""Reward stage on the tiny model: learns an easy preference, reports honest held-out numbers, loads as a scorer."""

import json
import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignkit.artifacts import file_fingerprint, read_stage
from alignkit.errors import UserError
from recipes.runner import run_recipe

from tests.conftest import REPO

RLHF_RECIPE = REPO / "recipes" / "configs" / "tiny_rlhf.yaml"


def write_recipe(tmp, *, stages=("sft", "reward"), edit=None):
    """A copy of the tiny RLHF recipe with absolute data paths, only `stages`, run_dir under tmp."""
    raw = yaml.safe_load(RLHF_RECIPE.read_text())
    raw["run_dir"] = str(tmp / "run")
    raw["stages"] = [s for s in raw["stages"] if s["name"] in stages]
    for stage in raw["stages"]:
        for key in ("train", "eval", "prompts"):
            if key in stage.get("data", {}):
                stage["data"][key] = str((RLHF_RECIPE.parent / stage["data"][key]).resolve())
    if edit:
        edit(raw)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("reward")
    base_before = file_fingerprint(tiny_model_dir)
    records = run_recipe(write_recipe(tmp), log=lambda *_: None)
    return {"run": tmp / "run", "records": records, "base_before": base_before, "base": tiny_model_dir}


def test_reward_model_learns_the_easy_preference_held_out(reward_run):
    metrics = read_stage(reward_run["run"] / "reward")["metrics"]
    # chosen says "wonderful", rejected another adjective: a working reward model separates held-out pairs.
    assert metrics["heldout_pairs"] == 36
    assert metrics["heldout_accuracy"] >= 0.9
    assert metrics["eval_accuracy"] == metrics["heldout_accuracy"]
    assert metrics["heldout_margin"] > 0.5
    assert metrics["reward_std"] > 0
    assert "reward_mean" in metrics and "warning" not in metrics
    lo, hi = metrics["heldout_accuracy_ci95"]
    assert lo < metrics["heldout_accuracy"] <= hi <= 1


def test_reward_stage_directory_and_lineage(reward_run):
    run = reward_run["run"]
    stage = read_stage(run / "reward")
    assert stage["complete"] and stage["kind"] == "reward"
    assert stage["parents"]["after"]["name"] == "sft"
    assert stage["parents"]["after"]["config_hash"] == read_stage(run / "sft")["config_hash"]
    assert stage["lineage"] == ["sft"]
    assert stage["data"]["parent_tensors_copied"] > 0 and stage["data"]["parent_tensors_skipped"] == 0
    config = json.loads((run / "reward" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    weights = load_file(str(run / "reward" / "adapter_model.safetensors"))
    assert weights["base_model.model.score.weight"].shape[0] == 1
    assert (run / "reward" / "tokenizer_config.json").exists()
    assert any((run / "reward" / "logs").iterdir())


def test_reward_adapter_started_from_sft_and_moved(reward_run):
    sft = load_file(str(reward_run["run"] / "sft" / "adapter_model.safetensors"))
    rm = load_file(str(reward_run["run"] / "reward" / "adapter_model.safetensors"))
    shared = [k for k in sft if k in rm]
    assert len(shared) == len(sft)
    moved = sum(not torch.allclose(sft[k].float(), rm[k].float()) for k in shared)
    assert moved > 0, "the reward adapter did not train"
    assert file_fingerprint(reward_run["base"]) == reward_run["base_before"]


def test_load_reward_scorer_scores_batched_and_in_order(reward_run):
    from alignkit.reward_model import load_reward_scorer

    scorer = load_reward_scorer(reward_run["run"] / "reward", batch_size=3)
    prompt = [{"role": "user", "content": "Tell me about the film?"}]
    responses = ["the film was very wonderful.", "the film was very boring.", "the plot is quite wonderful.",
                 "the plot is quite dull.", "the show felt so wonderful."]
    batched = scorer.score([prompt] * 5, responses)
    one_by_one = [scorer.score([prompt], [r])[0] for r in responses]
    assert batched == pytest.approx(one_by_one, abs=1e-4)
    assert batched[0] > batched[1] and batched[2] > batched[3]


def test_load_reward_scorer_refuses_a_policy_stage(reward_run):
    from alignkit.reward_model import load_reward_scorer

    with pytest.raises(UserError, match="'sft' stage, not a reward stage"):
        load_reward_scorer(reward_run["run"] / "sft")


def test_near_chance_accuracy_warns():
    from recipes.reward import near_chance_warning, pair_metrics

    coin = pair_metrics([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    assert coin["accuracy"] == 0.5 and coin["margin"] == 0
    assert "near chance" in near_chance_warning(coin, heldout=True)
    good = pair_metrics([2.0, 3.0, 1.0], [0.0, 1.0, 1.0])  # a tie counts half
    assert good["accuracy"] == pytest.approx(2.5 / 3)
    assert near_chance_warning(good, heldout=True) is None


def test_margin_column_trains(tmp_path, tiny_model_dir):
    rows = [json.loads(line) for line in (RLHF_RECIPE.parent.parent / "data" / "tiny_rlhf_prefs.jsonl").read_text().splitlines()]
    data = tmp_path / "margin.jsonl"
    data.write_text("".join(json.dumps({**r, "margin": 1.0 + i % 3}) + "\n" for i, r in enumerate(rows[:64])))

    def edit(raw):
        stage = raw["stages"][0]
        stage.pop("after")  # from the base: a fresh adapter and head
        stage["data"] = {"train": str(data), "eval_fraction": 0.25}
        stage["train"].update(max_steps=2, logging_steps=1, save_steps=2)

    records = run_recipe(write_recipe(tmp_path, stages=("reward",), edit=edit), log=lambda *_: None)
    assert records["reward"]["metrics"]["global_step"] == 2
    assert records["reward"]["data"]["train_rows"] == 48


def test_missing_column_is_one_clear_error_and_trains_nothing(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "a"}) + "\n")

    def edit(raw):
        raw["stages"][1]["data"] = {"train": str(bad)}

    with pytest.raises(UserError, match=r"bad\.jsonl:1: missing column 'rejected'"):
        run_recipe(write_recipe(tmp_path, edit=edit), log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_attached_reward_matches_the_standalone_scorer(reward_run, tiny_model_dir):
    """The reward as an extra adapter on a policy's base scores exactly what load_reward_scorer scores."""
    from alignkit.modeling import ModelSettings, attach_adapter, load_base_model, load_tokenizer
    from alignkit.reward_model import AttachedReward, load_reward_scorer

    run = reward_run["run"]
    prompt = [{"role": "user", "content": "Describe the plot?"}]
    responses = ["the plot was very wonderful.", "the plot was very dull.", "the plot"]
    expected = load_reward_scorer(run / "reward").score([prompt] * 3, responses)
    policy = attach_adapter(load_base_model(ModelSettings(base=str(tiny_model_dir))), run / "sft", trainable=True)
    policy.eval()
    reward = AttachedReward(policy, load_tokenizer(str(run / "sft")), run / "reward", batch_size=2)
    conversational = [[{"role": "assistant", "content": r}] for r in responses]  # how TRL passes completions
    assert reward([prompt] * 3, conversational) == pytest.approx(expected, abs=1e-4)
    assert policy.active_adapter == "default"
    assert all(p.requires_grad == (".default." in n) for n, p in policy.named_parameters() if "lora_" in n)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_grpo_and_rloo_stages_use_the_reward_stage(kind, reward_run, tmp_path):
    """A critic-free stage after SFT with the reward stage as reward function: trains, saves only the policy adapter."""
    import shutil

    run = tmp_path / "run"
    for name in ("sft", "reward"):
        shutil.copytree(reward_run["run"] / name, run / name)

    def edit(raw):
        raw["run_dir"] = str(run)
        raw["stages"].append({"name": kind, "kind": kind, "after": "sft", "reward": "reward",
                              "data": {"prompts": str(RLHF_RECIPE.parent.parent / "data" / "tiny_prompts.jsonl")},
                              "train": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4,
                                        "max_completion_length": 8, "logging_steps": 1, "save_steps": 2,
                                        "learning_rate": 1e-3, "gradient_checkpointing": False}})

    records = run_recipe(write_recipe(tmp_path, edit=edit), log=lambda *_: None)
    stage = records[kind]
    assert stage["parents"]["reward"]["name"] == "reward" and stage["lineage"] == ["sft"]
    assert stage["metrics"]["global_step"] == 2
    assert "rewards/reward_model/mean" in stage["metrics"]
    weights = load_file(str(run / kind / "adapter_model.safetensors"))
    sft = load_file(str(run / "sft" / "adapter_model.safetensors"))
    assert set(weights) == set(sft), "only the policy adapter belongs in the stage directory"


def test_grpo_refuses_a_policy_stage_as_reward(reward_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    for name in ("sft", "reward"):
        shutil.copytree(reward_run["run"] / name, run / name)

    def edit(raw):
        raw["run_dir"] = str(run)
        raw["stages"].append({"name": "grpo", "kind": "grpo", "after": "sft", "reward": "sft",
                              "data": {"prompts": str(RLHF_RECIPE.parent.parent / "data" / "tiny_prompts.jsonl")},
                              "train": {"max_steps": 1}})

    with pytest.raises(UserError, match="stages.grpo.reward names 'sft', a sft stage, not a reward stage"):
        run_recipe(write_recipe(tmp_path, edit=edit), log=lambda *_: None)
    assert not (run / "grpo" / "stage.json").exists()


@pytest.mark.parametrize("name", ["tiny_rlhf", "llama-3.2-1b_rlhf", "llama-3.1-8b_rlhf"])
def test_rlhf_recipes_validate_every_stage(name):
    """Keys are checked by the config loader; values too: RewardConfig / PPOConfig accept each stage's settings."""
    from alignkit.config import load_recipe
    from alignkit.ppo.config import PPOConfig
    from recipes.runner import RECIPES

    cfg = load_recipe(REPO / "recipes" / "configs" / f"{name}.yaml", stage_kinds=RECIPES)
    kinds = [s.kind for s in cfg.stages]
    assert kinds == ["sft", "reward", "ppo"]
    ppo, reward = cfg.stage("ppo"), cfg.stage("reward")
    assert ppo.after == "sft" and ppo.reward == "reward" and reward.after == "sft"
    PPOConfig(**ppo.train)
    assert set(reward.data) <= RECIPES["reward"].KIND.data_keys


def test_loading_a_scorer_hides_only_the_load_report_it_must_cause(tiny_model_dir, capfd):
    """A causal LM loaded as a one-label scorer always has an unused lm_head and a new score head; transformers
    prints that as an alarming MISSING table on every reward stage, judge and merge. Any other row still shows."""
    import logging

    from transformers import AutoModelForSequenceClassification

    from alignkit.modeling import ModelSettings, _ExpectedScorerReport, load_base_model

    load_base_model(ModelSettings(base=str(tiny_model_dir), quantization="none"),
                    model_class=AutoModelForSequenceClassification, num_labels=1)
    assert "LOAD REPORT" not in capfd.readouterr().err

    def shown(rows):
        table = "Key | Status | \n---+---+-\n" + "".join(f"{k} | {s} | \n" for k, s in rows)
        record = logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, "X LOAD REPORT\n" + table, None, None)
        return _ExpectedScorerReport().filter(record)

    assert not shown([("lm_head.weight", "UNEXPECTED"), ("score.weight", "MISSING")])
    assert not shown([("score.weight", "\x1b[31mMISSING\x1b[0m")])  # on a terminal the cells are coloured
    assert shown([("score.weight", "MISSING"), ("model.layers.0.mlp.up_proj.weight", "MISSING")])
