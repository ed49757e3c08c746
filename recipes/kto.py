"""KTO stage: Kahneman-Tversky optimisation of the parent's adapter with TRL's KTOTrainer.

Reads top to bottom: config and data here, then the body it shares with DPO (alignkit.stage_bodies.
against_parent: tokenizer -> model (+ parent adapter) -> trainer -> stage directory).
KTO learns from responses labeled desirable or undesirable on their own, so it
takes what DPO cannot: a label store's both-bad votes (`both_bad: undesirable`:
both responses count as undesirable), thumbs-up / thumbs-down data, and sets with
more of one kind than the other. As in DPO, the policy starts as a trainable
copy of the parent (SFT) adapter and TRL keeps a frozen copy of it as the `ref`
adapter on the same base.
Data: prompt / completion / label rows, or prompt / chosen / rejected pairs
(each becomes a desirable and an undesirable row), from JSONL, a dataset dir or
`labels_db:`. The eval split holds out whole prompts, so no eval prompt is seen
in training. stage.json counts desirable and undesirable rows; TRL warns when
their balance and desirable_weight / undesirable_weight are far apart (the KTO
paper's rule: desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
in [1, 4/3]).

Defaults that differ from TRL's KTOConfig (besides alignkit.training's):
  learning_rate  5e-5  (TRL: 1e-6, a full fine-tuning rate; adapters want more)
"""

from __future__ import annotations

from trl import KTOConfig, KTOTrainer

from alignkit.data.keys import PREFERENCE_DATA_KEYS
from alignkit.data.sources import UNPAIRED_COLUMNS
from alignkit.stage_data import load_unpaired_split
from alignkit.errors import UserError
from alignkit.stage import RowSplit, StageKind, StageResult, StageRun
from alignkit.stage_bodies import against_parent
from alignkit.training import trl_args

KIND = StageKind("kto", config_class=KTOConfig, data_keys=PREFERENCE_DATA_KEYS, copies_parent_as_reference=True)
DEFAULTS = {"learning_rate": 5e-5}


def load_data(stage: StageRun) -> RowSplit:
    return RowSplit(*load_unpaired_split(stage.data, stage.seed, stage.name))


def train_config(stage: StageRun) -> KTOConfig:
    args = trl_args(KTOConfig, stage, DEFAULTS)
    # TRL checks these only when building the trainer, after the model is loaded: the KL term pairs each
    # completion with its neighbour's prompt in a fixed-order batch.
    if args.loss_type != "apo_zero_unpaired":
        if args.per_device_train_batch_size < 2:
            raise UserError(f"stage {stage.name}: loss_type {args.loss_type!r} estimates its KL term from mismatched "
                            f"pairs within a batch: per_device_train_batch_size must be at least 2")
        if args.train_sampling_strategy != "sequential":
            raise UserError(f"stage {stage.name}: loss_type {args.loss_type!r} pairs neighbouring rows for its KL term: "
                            f"train_sampling_strategy must be 'sequential' (alignkit shuffles the rows once, seeded)")
    return args


def run(stage: StageRun) -> StageResult:
    # The KL estimate's forward over mismatched completions runs without gradients: one sequence per example.
    return against_parent(stage, KTOTrainer, UNPAIRED_COLUMNS, "prompt_completion", sequences_per_example=1)
