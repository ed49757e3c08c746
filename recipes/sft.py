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

from dataclasses import dataclass, replace

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from alignkit.data.chat_mask import MaskPlan, mask_plan, masked_rows
from alignkit.data.io import without_location
from alignkit.data.sources import load_sft_split
from alignkit.stage import StageKind, StageResult, StageRun
from alignkit.training import (build_trainer, fit, fused_kernel_defaults, load_policy, memory_preflight,
                               stage_tokenizer, trl_args, truncation_report)

KIND = StageKind("sft", config_class=SFTConfig, data_keys=frozenset({"train", "eval", "eval_fraction"}))
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

    @property
    def marks_generations(self) -> bool:
        """TRL masks the assistant turns itself (assistant_only_loss) when the template marks generations."""
        return self.mask is not None and self.mask.uses_markers

    def datasets(self) -> tuple[Dataset, Dataset | None]:
        train = self.train_tokens if self.train_tokens is not None else self.train
        evals = self.eval_tokens if self.eval_tokens is not None else self.eval
        return Dataset.from_list(train), (Dataset.from_list(evals) if evals else None)


def prepare(stage: StageRun, train: list[dict], evals: list[dict], fmt: str, info: dict, tokenizer) -> SftData:
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


def load_data(stage: StageRun) -> SftData:
    train, evals, fmt, info = load_sft_split(stage.data, stage.seed, stage.name)
    return prepare(stage, train, evals, fmt, info, stage_tokenizer(stage))


def train_config(stage: StageRun) -> SFTConfig:
    """TRL's SFTConfig: alignkit's defaults < this recipe's < the recipe's train:. assistant_only_loss is
    the data's to decide (fit_to_data), unless train: sets it."""
    return trl_args(SFTConfig, stage, {**DEFAULTS, **fused_kernel_defaults()})


def fit_to_data(stage: StageRun, data: SftData) -> SFTConfig:
    """The config with TRL's own masking on when the chat template marks generations; the config is
    built before the data is read (a mistyped setting costs no data read), so this is its one adjustment."""
    if "assistant_only_loss" in stage.train or stage.args.assistant_only_loss == data.marks_generations:
        return stage.args
    return replace(stage.args, assistant_only_loss=data.marks_generations)


def loss_tokens(dataset) -> int:
    """Tokens the loss covers in TRL's prepared dataset (labels not -100), after its truncation."""
    return sum(sum(label != -100 for label in labels) for labels in dataset["labels"])


def run(stage: StageRun) -> StageResult:
    data: SftData = stage.prepared
    tokenizer = stage_tokenizer(stage)
    if tokenizer.chat_template != data.chat_template:  # a parent trained since load_data, with another template
        data = prepare(stage, data.train, data.eval, data.fmt, data.info, tokenizer)
    stage.args = fit_to_data(stage, data)
    info, args = data.info, stage.args
    if data.mask is not None:
        print(f"{stage.name}: loss on every assistant turn, masked by {data.mask.method}")
    if not args.packing:  # packed sequences are cut to max_length by design
        info.update(truncation_report(tokenizer, data.train, args.max_length, data.fmt))

    memory = memory_preflight(stage, args)

    # Model: the base (4-bit by default) with either the parent's adapter, trainable, or a fresh one.
    model, new_adapter, started = load_policy(stage, args.gradient_checkpointing)
    info.update(started)

    train_dataset, eval_dataset = data.datasets()
    trainer = build_trainer(SFTTrainer, stage, model=model, tokenizer=tokenizer, train=train_dataset,
                            eval=eval_dataset, peft_config=new_adapter)
    info["loss_tokens"] = loss_tokens(trainer.train_dataset)
    return StageResult(metrics=fit(stage, trainer, tokenizer), data=info, memory=memory)
