"""SFT stage: supervised fine-tuning of a (Q)LoRA adapter with TRL's SFTTrainer.

Reads top to bottom: data -> tokenizer -> model (+ adapter) -> trainer -> stage directory.
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

from dataclasses import dataclass

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from alignkit.data.chat_mask import MaskPlan, mask_plan, masked_rows
from alignkit.data.io import without_location
from alignkit.data.sources import load_sft_split
from alignkit.modeling import load_tokenizer, resolve_base
from alignkit.training import (final_metrics, fused_kernel_defaults, load_policy, memory_preflight, save_policy,
                               stage_callbacks, trl_args, truncation_report)

TRAIN_CONFIG = SFTConfig
DATA_KEYS = {"train", "eval", "eval_fraction"}
DEFAULTS = {"learning_rate": 2e-4}
LOSS_ON = {"messages": "every assistant turn", "prompt_completion": "completion tokens", "text": "all tokens"}


@dataclass
class SftData:
    """What load_data hands run(): the rows as read, and what the trainer takes.

    `train` / `eval` are messages, prompt / completion or text rows. With a turn-by-turn mask,
    `train_tokens` / `eval_tokens` hold the same rows pre-tokenized (input_ids + assistant_masks), made with
    the chat template `chat_template`; otherwise they are None and TRL tokenizes the rows itself.
    """

    train: list[dict]
    eval: list[dict]
    fmt: str
    info: dict
    mask: MaskPlan | None = None
    chat_template: str | None = None
    train_tokens: list[dict] | None = None
    eval_tokens: list[dict] | None = None

    def datasets(self) -> tuple[Dataset, Dataset | None]:
        train = self.train_tokens if self.train_tokens is not None else self.train
        evals = self.eval_tokens if self.eval_tokens is not None else self.eval
        return Dataset.from_list(train), (Dataset.from_list(evals) if evals else None)


def stage_tokenizer(stage):
    """The parent stage's tokenizer (it carries the chat template the parent trained with), else the base's —
    also for a parent this run trains first, which saves the base's tokenizer."""
    parent = stage.parents.get("after")
    has_tokenizer = parent is not None and (parent / "tokenizer_config.json").exists()
    return load_tokenizer(str(parent) if has_tokenizer else resolve_base(stage.model.base))


def prepare(stage, train: list[dict], evals: list[dict], fmt: str, info: dict, tokenizer) -> SftData:
    """The rows as the trainer takes them; for `messages` rows, how assistant tokens are found (a row the
    chat template cannot mask stops the stage here, before anything trains)."""
    data = SftData(train, evals, fmt, info, chat_template=tokenizer.chat_template)
    info["loss_on"] = LOSS_ON[fmt]
    if fmt == "messages":
        data.mask = mask_plan(tokenizer)
        info["assistant_mask"] = data.mask.method
        if not data.mask.uses_markers:
            source = info["train"]
            data.train_tokens = masked_rows(tokenizer, train, source)
            data.eval_tokens = masked_rows(tokenizer, evals, stage.data.get("eval", source))
    data.train, data.eval = [without_location(r) for r in train], [without_location(r) for r in evals]
    return data


def load_data(stage) -> SftData:
    train, evals, fmt, info = load_sft_split(stage.data, stage.seed, stage.name)
    return prepare(stage, train, evals, fmt, info, stage_tokenizer(stage))


def train_config(stage, **derived) -> SFTConfig:
    """TRL's SFTConfig: alignkit's defaults < this recipe's < settings derived from the data < the recipe's train:."""
    return trl_args(SFTConfig, stage, {**DEFAULTS, **fused_kernel_defaults(), **derived})


def loss_tokens(dataset) -> int:
    """Tokens the loss covers in TRL's prepared dataset (labels not -100), after its truncation."""
    return sum(sum(label != -100 for label in labels) for labels in dataset["labels"])


def run(stage) -> dict:
    data: SftData = stage.prepared
    tokenizer = stage_tokenizer(stage)
    if tokenizer.chat_template != data.chat_template:  # a parent trained since load_data, with another template
        data = prepare(stage, data.train, data.eval, data.fmt, data.info, tokenizer)
    info = data.info
    if data.mask is not None:
        print(f"{stage.name}: loss on every assistant turn, masked by {data.mask.method}")
    args = train_config(stage, assistant_only_loss=data.mask is not None and data.mask.uses_markers)
    if not args.packing:  # packed sequences are cut to max_length by design
        info.update(truncation_report(tokenizer, data.train, args.max_length, data.fmt))

    memory = memory_preflight(stage, args)

    # Model: the base (4-bit by default) with either the parent's adapter, trainable, or a fresh one.
    model, new_adapter, started = load_policy(stage, args.gradient_checkpointing)
    info.update(started)

    train_dataset, eval_dataset = data.datasets()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=new_adapter,
        callbacks=stage_callbacks(stage.stage_dir),
    )
    info["loss_tokens"] = loss_tokens(trainer.train_dataset)
    output = trainer.train(resume_from_checkpoint=str(stage.resume_from) if stage.resume_from else None)

    save_policy(trainer.model, tokenizer, stage.stage_dir)
    return {"metrics": final_metrics(trainer, output), "data": info, "memory": memory}
