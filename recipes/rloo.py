"""RLOO stage: REINFORCE Leave-One-Out with TRL's RLOOTrainer, the reward stage as reward function, on one base.

Reads top to bottom like recipes/grpo.py, whose body (alignkit.stage_bodies.online) it shares: config
-> parents (policy, reward; accuracy gate) -> prompts -> model (+ parent adapter,
+ reward adapter) -> trainer -> stage directory.

RLOO samples `num_generations` responses per prompt; each response's baseline is
the mean reward of the others (leave-one-out) — no value model. Roles on one
base: the policy adapter, TRL's frozen "ref" copy of it, and the reward stage's
adapter + score head.

`train:` keys are trl.RLOOConfig's, plus min_reward_accuracy (the same gate as PPO's).
Defaults that differ from TRL's RLOOConfig (besides alignkit.training's):
  learning_rate          1e-5  (TRL: 1e-6, a full fine-tuning rate; adapters want more)
  num_generations        4     (TRL: 2)
  max_completion_length  128   (TRL: 512)
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import RLOOConfig, RLOOTrainer

from alignkit.data.sources import load_prompt_rows
from alignkit.stage import PromptSet, StageKind, StageResult, StageRun, min_reward_accuracy_field
from alignkit.stage_bodies import online
from alignkit.training import trl_args


@dataclass
class AlignkitRLOOConfig(RLOOConfig):
    min_reward_accuracy: float = min_reward_accuracy_field()


KIND = StageKind("rloo", config_class=AlignkitRLOOConfig, data_keys=frozenset({"prompts"}),
                 after=("sft", "dpo", "kto"), takes_reward=True, copies_parent_as_reference=True)
DEFAULTS = {"learning_rate": 1e-5, "num_generations": 4, "max_completion_length": 128}


def load_data(stage: StageRun) -> PromptSet:
    return PromptSet(*load_prompt_rows(stage.data, stage.name))


def train_config(stage: StageRun) -> AlignkitRLOOConfig:
    return trl_args(AlignkitRLOOConfig, stage, DEFAULTS)


def run(stage: StageRun) -> StageResult:
    return online(stage, KIND, RLOOTrainer)
