"""SFT -> reward -> PPO through the CLI on the tiny model: lineage, outputs, the reward role, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignkit.artifacts import read_stage

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "configs" / "tiny_rlhf.yaml"

pytestmark = pytest.mark.slow


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "alignkit.cli", *args], capture_output=True, text=True, cwd=cwd or REPO)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("rlhf")
    raw = yaml.safe_load(RECIPE.read_text())
    raw["run_dir"] = str(tmp / "run")
    for stage in raw["stages"]:
        for key in ("train", "eval", "prompts"):
            if key in stage["data"]:
                stage["data"][key] = str((RECIPE.parent / stage["data"][key]).resolve())
    recipe = tmp / "tiny_rlhf.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = cli("run", str(recipe))
    assert out.returncode == 0, out.stderr[-3000:]
    return {"recipe": recipe, "run": tmp / "run", "tmp": tmp}


def test_lineage_and_outputs(chain):
    run = chain["run"]
    sft, reward, ppo = (read_stage(run / n) for n in ("sft", "reward", "ppo"))
    assert all(s and s["complete"] for s in (sft, reward, ppo))
    assert ppo["kind"] == "ppo"
    assert ppo["parents"]["after"]["name"] == "sft" and ppo["parents"]["after"]["config_hash"] == sft["config_hash"]
    assert ppo["parents"]["reward"]["name"] == "reward" and ppo["parents"]["reward"]["config_hash"] == reward["config_hash"]
    assert reward["parents"]["after"]["name"] == "sft"
    assert ppo["lineage"] == ["sft"]
    assert ppo["metrics"]["global_step"] == 4
    for key in ("mean_reward", "kl", "entropy", "policy_loss", "value_loss", "clip_frac", "approx_kl", "response_length"):
        assert key in ppo["metrics"], key
    assert ppo["data"]["reward_heldout_accuracy"] >= 0.6
    # The memory preflight ran for PPO too: one base, four role adapters, fits this machine.
    assert ppo["memory"]["roles"] == 4 and ppo["memory"]["fits"] is True
    assert 0 < ppo["memory"]["expected_bytes"] < ppo["memory"]["available_bytes"]
    d = run / "ppo"
    assert (d / "adapter_config.json").exists() and (d / "value" / "value_head.safetensors").exists()
    assert len((d / "ppo_log.jsonl").read_text().splitlines()) == 4
    assert (d / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()


def test_reward_role_on_the_shared_base_scores_like_the_reward_model(chain):
    """The reward stage's SEQ_CLS adapter, loaded as the `reward` role on the causal-LM base, gives its scores."""
    import torch

    from alignkit.modeling import ModelSettings, PeftSettings
    from alignkit.ppo.config import PPOConfig
    from alignkit.ppo.trainer import PPOTrainer
    from alignkit.reward_model import load_reward_scorer

    run = chain["run"]
    prompts = [[{"role": "user", "content": "Tell me about the film?"}], [{"role": "user", "content": "How was the music?"}]]
    responses = ["the film was very wonderful.", "the music was quite cold."]
    expected = load_reward_scorer(run / "reward").score(prompts, responses)
    trainer = PPOTrainer(PPOConfig(min_reward_accuracy=0), ModelSettings(base="alignkit-tiny"), PeftSettings(),
                         prompts=prompts, stage_dir=chain["tmp"] / "scratch", reward=run / "reward", policy_adapter=run / "sft")
    got = trainer.score(prompts, responses).tolist()
    assert got == pytest.approx(expected, abs=1e-3)
    assert got[0] > got[1]  # "wonderful" is what the tiny reward model learned to prefer


def test_reward_that_is_not_a_reward_stage_is_refused(chain):
    before = (chain["run"] / "ppo" / "stage.json").read_text()
    out = cli("run", str(chain["recipe"]), "--set", "stages.ppo.reward=sft")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "not a reward stage" in out.stderr
    assert (chain["run"] / "ppo" / "stage.json").read_text() == before


def test_reward_accuracy_gate(chain):
    before = (chain["run"] / "ppo" / "stage.json").read_text()
    out = cli("run", str(chain["recipe"]), "--set", "stages.ppo.train.min_reward_accuracy=1.5")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "below min_reward_accuracy" in out.stderr
    assert (chain["run"] / "ppo" / "stage.json").read_text() == before


def test_prompts_without_prompt_column(chain, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n")
    out = cli("run", str(chain["recipe"]), "--set", f"stages.ppo.data.prompts={bad}")
    assert out.returncode == 2
    assert "missing column 'prompt'" in out.stderr and str(bad) in out.stderr
