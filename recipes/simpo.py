"""SimPO stage: simple preference optimisation with TRL's CPOTrainer (loss_type simpo), reference-free.

Reads top to bottom: config and data here, then the body it shares with ORPO (alignkit.stage_bodies.
reference_free: tokenizer -> model (+ parent adapter, or a fresh one) -> trainer -> stage directory).
SimPO's implicit reward is the response's mean per-token log-probability times beta, and its loss asks the
chosen reward to beat the rejected one by a margin gamma: no reference model is loaded or copied. It starts
from an SFT stage's adapter (the paper's setting) or from the base.
Data: prompt/chosen/rejected (plain or conversational) from JSONL, a dataset dir or `labels_db:`, as DPO's.

`train:` keys are trl.experimental.cpo.CPOConfig's; loss_type stays simpo (alphapo, SimPO with AlphaPO's
reward shape, is taken too). Defaults that differ from TRL's CPOConfig (besides alignkit.training's):
  loss_type      simpo  (TRL: sigmoid, CPO's loss)
  cpo_alpha      0.0    (TRL: 1.0; TRL's SimPO setting: no behaviour-cloning NLL term, as in the paper)
  beta           2.0    (TRL: 0.1, a scale for summed log-probs; Meng et al. 2024 use 2.0-2.5 on mean ones)
  simpo_gamma    1.0    (TRL: 0.5; the paper's margin gamma = 0.5 * beta, its recommended gamma/beta ratio)
  learning_rate  5e-5   (TRL: 1e-6, a full fine-tuning rate; adapters want more, as for DPO)
"""

from __future__ import annotations

from trl.experimental.cpo import CPOConfig, CPOTrainer

from alignkit.data.keys import PREFERENCE_DATA_KEYS
from alignkit.stage import RowSplit, StageKind, StageResult, StageRun
from alignkit.stage_bodies import reference_free
from alignkit.stage_data import load_preference_split
from alignkit.training import train_settings_error, trl_args

KIND = StageKind("simpo", config_class=CPOConfig, data_keys=PREFERENCE_DATA_KEYS, after=("sft",))
# remove_unused_columns: TRL sets it off itself (its collator reads the tokenized columns), with a warning.
DEFAULTS = {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 1.0, "learning_rate": 5e-5,
            "remove_unused_columns": False}


def load_data(stage: StageRun) -> RowSplit:
    return RowSplit(*load_preference_split(stage.data, stage.seed, stage.name))


def train_config(stage: StageRun) -> CPOConfig:
    args = trl_args(CPOConfig, stage, DEFAULTS)
    if args.loss_type != "simpo":  # CPOConfig maps alphapo to simpo; the other losses are CPO's, not SimPO
        raise train_settings_error(stage, f"loss_type={stage.train['loss_type']!r}; a simpo stage trains simpo "
                                          f"(or alphapo)", key="loss_type")
    if not args.beta > 0:  # TRL takes any float: a negative beta trains towards the rejected responses
        raise train_settings_error(stage, f"beta={args.beta!r} must be above 0 (the reward's scale)", key="beta")
    return args


def run(stage: StageRun) -> StageResult:
    return reference_free(stage, CPOTrainer)
