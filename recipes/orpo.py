"""ORPO stage: odds-ratio preference optimisation with TRL's ORPOTrainer, reference-free, from a base or SFT.

Reads top to bottom: config and data here, then the body it shares with SimPO (alignkit.stage_bodies.
reference_free: tokenizer -> model (+ parent adapter, or a fresh one) -> trainer -> stage directory).
ORPO adds to the chosen response's NLL (an SFT loss) a term that raises the odds of chosen over rejected,
so it needs no reference model: no frozen copy is loaded, and it can start from the base in one stage
(the paper's setting) or from an SFT stage's adapter.
Data: prompt/chosen/rejected (plain or conversational) from JSONL, a dataset dir or `labels_db:`, as DPO's.

Defaults that differ from TRL's ORPOConfig (besides alignkit.training's):
  learning_rate  5e-5  (TRL: 1e-6, a full fine-tuning rate; adapters want more, as for DPO)
Kept as TRL has them: beta 0.1, the paper's λ (Hong et al. 2024 train Mistral-ORPO with λ = 0.1).
"""

from __future__ import annotations

from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from alignkit.data.keys import PREFERENCE_DATA_KEYS
from alignkit.stage import RowSplit, StageKind, StageResult, StageRun
from alignkit.stage_bodies import reference_free
from alignkit.stage_data import load_preference_split
from alignkit.training import train_settings_error, trl_args

KIND = StageKind("orpo", config_class=ORPOConfig, data_keys=PREFERENCE_DATA_KEYS, after=("sft",))
# remove_unused_columns: TRL sets it off itself (its collator reads the tokenized columns), with a warning.
DEFAULTS = {"learning_rate": 5e-5, "remove_unused_columns": False}


def load_data(stage: StageRun) -> RowSplit:
    return RowSplit(*load_preference_split(stage.data, stage.seed, stage.name))


def train_config(stage: StageRun) -> ORPOConfig:
    args = trl_args(ORPOConfig, stage, DEFAULTS)
    if not args.beta > 0:  # TRL takes any float: 0 is plain SFT, a negative λ raises the rejected responses' odds
        raise train_settings_error(stage, f"beta={args.beta!r} must be above 0 (λ, the odds-ratio term's weight)",
                                   key="beta")
    return args


def run(stage: StageRun) -> StageResult:
    return reference_free(stage, ORPOTrainer)
