"""RLOO stage: REINFORCE Leave-One-Out with TRL's RLOOTrainer, the reward stage as reward function, on one base.

Reads top to bottom like recipes/grpo.py, whose `run_online` it shares: config
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

from dataclasses import dataclass, field

from trl import RLOOConfig, RLOOTrainer

from recipes.grpo import load_data, run_online  # noqa: F401  (load_data: the runner calls it for every stage)


@dataclass
class AlignkitRLOOConfig(RLOOConfig):
    min_reward_accuracy: float = field(default=0.6, metadata={
        "help": "refuse to start unless the reward stage's held-out accuracy is at least this (0 disables the gate)"})


TRAIN_CONFIG = AlignkitRLOOConfig
DATA_KEYS = {"prompts"}
DEFAULTS = {"learning_rate": 1e-5, "num_generations": 4, "max_completion_length": 128}


def train_config(stage) -> AlignkitRLOOConfig:
    from alignkit.training import trl_args

    return trl_args(AlignkitRLOOConfig, stage, DEFAULTS)


def run(stage) -> dict:
    return run_online(stage, train_config(stage), RLOOTrainer)
