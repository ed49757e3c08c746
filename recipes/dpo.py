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

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from alignkit.data.sources import load_preference_split
from alignkit.modeling import load_tokenizer, resolve_base
from alignkit.training import (final_metrics, fused_kernel_defaults, load_policy, memory_preflight, reference_info,
                               save_policy, stage_callbacks, train_settings_error, trl_args, truncation_report)

TRAIN_CONFIG = DPOConfig
DATA_KEYS = {"train", "eval", "eval_fraction", "labels_db", "min_agreement", "ties", "both_bad"}
DEFAULTS = {"learning_rate": 5e-5}
# DPOConfig names its loss types only in the field's help; DPOTrainer refuses others at the first loss.
LOSS_TYPES = re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])


def load_data(stage):
    return load_preference_split(stage.data, stage.seed, stage.name)


def train_config(stage) -> DPOConfig:
    args = trl_args(DPOConfig, stage, {**DEFAULTS, **fused_kernel_defaults()},
                    choices={"loss_type": LOSS_TYPES} if LOSS_TYPES else None)
    if not args.beta > 0:  # TRL takes any float: a negative beta trains towards the rejected responses
        raise train_settings_error(stage, f"beta={args.beta!r} must be above 0 (the KL penalty's strength)", key="beta")
    return args


def run(stage) -> dict:
    # chosen and rejected go through the model in one batch: two sequences per example
    return run_against_parent(stage, train_config(stage), DPOTrainer, ("prompt", "chosen", "rejected"), "preference",
                              sequences_per_example=2)


def run_against_parent(stage, args, trainer_cls, columns: tuple[str, ...], fmt: str, *, sequences_per_example: int) -> dict:
    """The DPO / KTO stage body (recipes/kto.py runs TRL's KTOTrainer through it): the parent's adapter trained
    against a frozen copy of itself on one base. `columns` are the rows' columns the trainer reads, `fmt` their
    format for the truncation report."""
    train_rows, eval_rows, info = stage.prepared
    train_rows = [{k: r[k] for k in columns} for r in train_rows]
    eval_rows = [{k: r[k] for k in columns} for r in eval_rows]

    parent = stage.parents.get("after")
    tokenizer = load_tokenizer(str(parent) if parent else resolve_base(stage.model.base))
    info.update(truncation_report(tokenizer, train_rows, args.max_length, fmt))
    memory = memory_preflight(stage, args, sequences_per_example=sequences_per_example)

    # Model: one base; the parent's adapter becomes the trainable policy ("default") and TRL's frozen "ref".
    model, new_adapter, started = load_policy(stage, args.gradient_checkpointing)
    info.update(started)
    info.update(reference_info(stage))

    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=new_adapter,
        callbacks=stage_callbacks(stage.stage_dir),
    )
    output = trainer.train(resume_from_checkpoint=str(stage.resume_from) if stage.resume_from else None)

    save_policy(trainer.model, tokenizer, stage.stage_dir)
    return {"metrics": final_metrics(trainer, output), "data": info, "memory": memory}
