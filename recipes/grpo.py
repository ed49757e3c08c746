"""GRPO stage: critic-free RL with TRL's GRPOTrainer, the reward stage as reward function, on one base.

Reads top to bottom: config -> parents (policy, reward; accuracy gate) -> prompts -> model (+ parent adapter,
+ reward adapter) -> trainer -> stage directory.

Group Relative Policy Optimization samples `num_generations` responses per
prompt and uses each response's reward relative to its group as the advantage —
no value model. The roles share ONE base, as in PPO:
  policy     the parent (SFT/DPO) stage's adapter, trainable ("default");
  reference  TRL's frozen "ref" copy of that adapter (used when beta > 0);
  reward     the reward stage's adapter + score head (alignkit.reward_model.AttachedReward),
             switched to under no_grad inside the reward callable.
The stage directory holds the policy adapter at its top level (a model spec).

`train:` keys are trl.GRPOConfig's, plus min_reward_accuracy (the same gate as PPO's).
Defaults that differ from TRL's GRPOConfig (besides alignkit.training's):
  learning_rate          1e-5  (TRL: 1e-6, a full fine-tuning rate; adapters want more)
  beta                   0.04  (TRL: 0.0; a KL term against the SFT policy, as in PPO)
  num_generations        4     (TRL: 8)
  max_completion_length  128   (TRL: 512)

recipes/rloo.py runs TRL's RLOOTrainer through the same body (alignkit.stage_bodies.online).
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import GRPOConfig, GRPOTrainer

from alignkit.data.sources import load_prompt_rows
from alignkit.stage import PromptSet, StageKind, StageResult, StageRun, min_reward_accuracy_field
from alignkit.stage_bodies import online
from alignkit.training import trl_args


@dataclass
class AlignkitGRPOConfig(GRPOConfig):
    min_reward_accuracy: float = min_reward_accuracy_field()


KIND = StageKind("grpo", config_class=AlignkitGRPOConfig, data_keys=frozenset({"prompts"}),
                 after=("sft", "dpo", "kto"), takes_reward=True, copies_parent_as_reference=True)
DEFAULTS = {"learning_rate": 1e-5, "beta": 0.04, "num_generations": 4, "max_completion_length": 128}


def load_data(stage: StageRun) -> PromptSet:
    return PromptSet(*load_prompt_rows(stage.data, stage.name))


def train_config(stage: StageRun) -> AlignkitGRPOConfig:
    return trl_args(AlignkitGRPOConfig, stage, DEFAULTS)


def run(stage: StageRun) -> StageResult:
    return online(stage, KIND, GRPOTrainer)
