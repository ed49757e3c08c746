"""A reward ensemble on one base: K reward stages (different seeds) as K adapters on one 4-bit base."""

from __future__ import annotations

import numpy as np
import pytest

import yaml

from recipes.runner import run_recipe
from tests.test_reward_stage import RLHF_RECIPE, write_recipe

pytestmark = pytest.mark.slow

PROMPTS = ["The film was", "The acting was", "I thought the story"]
RESPONSES = [" wonderful and moving.", " dull and slow.", " fine, I suppose."]


def two_rewards(raw):
    reward = next(s for s in raw["stages"] if s["kind"] == "reward")
    second = {**reward, "name": "reward_b", "train": {**reward.get("train", {}), "seed": 1234}}
    raw["stages"].append(second)


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("ensemble")
    run_recipe(write_recipe(tmp, edit=two_rewards), log=lambda *_: None)
    return tmp / "run"


def test_members_share_one_4bit_base_and_score_as_their_own_stages(ensemble_run):
    import bitsandbytes as bnb

    from alignkit.reward_model import load_reward_ensemble, load_reward_scorer

    dirs = [ensemble_run / "reward", ensemble_run / "reward_b"]
    ensemble = load_reward_ensemble(dirs)
    quantized = [m for m in ensemble.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "the base is loaded in 4-bit"
    # One copy of every base weight; each quantized layer carries every member's adapter and nothing else.
    assert len({id(m.weight) for m in quantized}) == len(quantized)
    lora_layers = [m for m in ensemble.model.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert lora_layers and all(set(m.lora_A) == {"member-0", "member-1"} for m in lora_layers)

    prompts = [p for p in PROMPTS for _ in RESPONSES]
    responses = RESPONSES * len(PROMPTS)
    scores = ensemble.scores(prompts, responses)
    assert scores.shape == (2, len(prompts))
    assert not np.allclose(scores[0], scores[1], atol=1e-3)  # the members differ
    for k, d in enumerate(dirs):  # and each scores as its stage does when loaded alone
        alone = load_reward_scorer(d).score(prompts, responses)
        assert np.allclose(scores[k], alone, atol=1e-3)
    lam = 0.5
    assert np.allclose(ensemble.conservative(prompts, responses, lam), scores.mean(0) - lam * scores.std(0))


def test_an_ensemble_needs_two_stages_of_one_base(ensemble_run):
    from alignkit.errors import UserError
    from alignkit.reward_model import load_reward_ensemble

    with pytest.raises(UserError, match="2 or more reward stages"):
        load_reward_ensemble([ensemble_run / "reward"])
    with pytest.raises(UserError, match="not a reward stage"):
        load_reward_ensemble([ensemble_run / "reward", ensemble_run / "sft"])


def test_conservative_reward_by_hand():
    from alignkit.reward_model import conservative_reward

    # members [1, 3] and [3, 3]: means 2 and 3, population stds 1 and 0.
    assert conservative_reward([[1.0, 3.0], [3.0, 3.0]], 1.0).tolist() == [1.0, 3.0]
    assert conservative_reward([[1.0, 3.0], [3.0, 3.0]], 0.5).tolist() == [1.5, 3.0]


def ppo_on_the_ensemble(raw):
    two_rewards(raw)
    ppo = next(s for s in yaml.safe_load(RLHF_RECIPE.read_text())["stages"] if s["kind"] == "ppo")
    ppo["data"]["prompts"] = str((RLHF_RECIPE.parent / ppo["data"]["prompts"]).resolve())
    ppo["reward"] = ["reward", "reward_b"]
    ppo["train"].update(steps=1, rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=6,
                        min_reward_accuracy=0.0, ensemble_lambda=0.5)
    raw["stages"].append(ppo)


def test_ppo_scores_with_the_ensemble_as_mean_minus_lambda_std(ensemble_run, tmp_path_factory):
    """A PPO stage whose `reward:` lists two reward stages trains against mean - 0.5 * std of their scores, each
    member scoring as its stage does alone, both on the policy's one base."""
    from alignkit.artifacts import read_stage
    from alignkit.modeling import ModelSettings, PeftSettings
    from alignkit.ppo.config import PPOConfig
    from alignkit.ppo.trainer import PPOTrainer
    from alignkit.reward_model import load_reward_scorer

    run = ensemble_run
    record = run_recipe(write_recipe(run.parent, edit=ppo_on_the_ensemble), log=lambda *_: None)["ppo"]
    assert record["data"]["reward_ensemble"] == [str(run / "reward"), str(run / "reward_b")]
    assert set(record["parents"]) == {"after", "reward", "reward_1"}

    settings = read_stage(run / "reward")["model"]
    trainer = PPOTrainer(PPOConfig(steps=1, rollout_batch_size=4, mini_batch_size=4, ensemble_lambda=0.5),
                         ModelSettings(**settings), PeftSettings(r=8, lora_alpha=16, lora_dropout=0.0),
                         prompts=PROMPTS, stage_dir=tmp_path_factory.mktemp("ppo"),
                         reward=[run / "reward", run / "reward_b"], policy_adapter=run / "sft")
    prompts = [p for p in PROMPTS for _ in RESPONSES]
    responses = RESPONSES * len(PROMPTS)
    members = np.array([load_reward_scorer(d).score(prompts, responses) for d in (run / "reward", run / "reward_b")])
    expected = members.mean(0) - 0.5 * members.std(0)
    scores = trainer.score(prompts, responses).numpy()
    # PPO's roles run on the base prepared for training (norms in float32), so 4-bit numerics differ slightly
    # from the stand-alone scorer's; the penalty is what must show: every score sits at mean - 0.5 std, not the mean.
    assert np.allclose(scores, expected, atol=2e-2)
    assert (np.abs(scores - expected) < np.abs(scores - members.mean(0))).all()


@pytest.mark.parametrize("edit, message", [
    (lambda ppo: ppo.update(kind="grpo"), "only ppo stages take an ensemble"),
    (lambda ppo: ppo.update(reward=["reward", "sft"]), "names 'sft', a sft stage, not a reward stage"),
])
def test_reward_lists_are_checked_on_load(tmp_path, edit, message):
    from alignkit.config import load_recipe
    from alignkit.errors import UserError
    from recipes.runner import RECIPES

    def recipe(raw):
        ppo_on_the_ensemble(raw)
        edit(raw["stages"][-1])
        if raw["stages"][-1]["kind"] == "grpo":
            raw["stages"][-1]["train"] = {"max_steps": 1}

    with pytest.raises(UserError, match=message):
        load_recipe(write_recipe(tmp_path, edit=recipe), stage_kinds=RECIPES)
