"""DPO stage: direct preference optimisation of the parent's adapter with TRL's DPOTrainer.

Reads top to bottom: data -> tokenizer -> model (+ parent adapter) -> trainer -> stage directory.
The policy starts as a trainable copy of the parent (SFT) adapter; TRL keeps a
frozen copy of it as the `ref` adapter on the same base, so the reference is
the parent policy and the base weights are in memory once. Without a parent,
the reference is the base with the adapter disabled.
Data: prompt/chosen/rejected (plain or conversational) from JSONL, a dataset
dir, or `labels_db:` (a label store, exported with its aggregation policy).

Defaults that differ from TRL's DPOConfig (besides alignkit.training's):
  learning_rate  5e-5  (TRL: 1e-6, a full fine-tuning rate; adapters want more)
  use_liger_kernel  true on a CUDA GPU with liger-kernel installed (TRL: false)
"""

from __future__ import annotations

import re

from trl import DPOConfig, DPOTrainer

from alignkit.data.keys import PREFERENCE_DATA_KEYS
from alignkit.stage_data import load_preference_split
from alignkit.stage import RowSplit, StageKind, StageResult, StageRun
from alignkit.stage_bodies import against_parent
from alignkit.training import fused_kernel_defaults, train_settings_error, trl_args

KIND = StageKind("dpo", config_class=DPOConfig, data_keys=PREFERENCE_DATA_KEYS, copies_parent_as_reference=True)
DEFAULTS = {"learning_rate": 5e-5}
# DPOConfig names its loss types only in the field's help; DPOTrainer refuses others at the first loss.
LOSS_TYPES = re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])


def load_data(stage: StageRun) -> RowSplit:
    return RowSplit(*load_preference_split(stage.data, stage.seed, stage.name))


def train_config(stage: StageRun) -> DPOConfig:
    args = trl_args(DPOConfig, stage, {**DEFAULTS, **fused_kernel_defaults()},
                    choices={"loss_type": LOSS_TYPES} if LOSS_TYPES else None)
    if not args.beta > 0:  # TRL takes any float: a negative beta trains towards the rejected responses
        raise train_settings_error(stage, f"beta={args.beta!r} must be above 0 (the KL penalty's strength)", key="beta")
    return args


def run(stage: StageRun) -> StageResult:
    # chosen and rejected go through the model in one batch: two sequences per example
    return against_parent(stage, DPOTrainer, ("prompt", "chosen", "rejected"), "preference", sequences_per_example=2)
