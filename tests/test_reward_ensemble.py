"""A reward ensemble on one base: K reward stages (different seeds) as K adapters on one 4-bit base."""

from __future__ import annotations

import numpy as np
import pytest

from recipes.runner import run_recipe
from tests.test_reward_stage import write_recipe

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
