"""SFT stage: supervised fine-tuning of a (Q)LoRA adapter with TRL's SFTTrainer.

Reads top to bottom: data -> tokenizer -> model (+ adapter) -> trainer -> stage directory; the body after
the data (alignkit.stage_bodies.supervised) is the one best-of-N trains its chosen samples with.
Data: chat `messages` JSONL (loss on every assistant turn), ShareGPT and Alpaca rows (read as `messages`),
`prompt`/`completion` JSONL (loss on the completion only), `text` JSONL, or a saved HF dataset dir.
Empty and duplicate rows are dropped and counted in stage.json.

Assistant-only loss works with any chat template (alignkit.data.chat_mask): with `{% generation %}` markers,
the template's or TRL's training version of it, TRL masks (assistant_only_loss); without, the rows go to
TRL pre-tokenized, masked turn by turn and checked against the template's own rendering, or the stage stops
naming the row it cannot mask. stage.json's `assistant_mask` says which, `loss_tokens` how many tokens train.

Defaults that differ from TRL's SFTConfig (besides alignkit.training's):
  learning_rate        2e-4   (TRL: 2e-5, a full fine-tuning rate; LoRA adapters want ~10x more)
  assistant_only_loss  true for `messages` data when the chat template (or TRL's version of it) marks generations
  use_liger_kernel     true on a CUDA GPU with liger-kernel installed (TRL: false)
"""

from __future__ import annotations

from trl import SFTConfig

from alignkit.data.sources import load_sft_split
from alignkit.stage import StageKind, StageResult, StageRun
from alignkit.stage_bodies import SftData, sft_data, supervised
from alignkit.training import fused_kernel_defaults, stage_tokenizer, trl_args

KIND = StageKind("sft", config_class=SFTConfig, data_keys=frozenset({"train", "eval", "eval_fraction"}))
DEFAULTS = {"learning_rate": 2e-4}


def load_data(stage: StageRun) -> SftData:
    train, evals, fmt, info = load_sft_split(stage.data, stage.seed, stage.name)
    return sft_data(stage, train, evals, fmt, info, stage_tokenizer(stage))


def train_config(stage: StageRun) -> SFTConfig:
    """TRL's SFTConfig: alignkit's defaults < this recipe's < the recipe's train:. assistant_only_loss is
    the data's to decide (alignkit.stage_bodies.fit_to_data), unless train: sets it."""
    return trl_args(SFTConfig, stage, {**DEFAULTS, **fused_kernel_defaults()})


def run(stage: StageRun) -> StageResult:
    return supervised(stage, stage.prepared)
