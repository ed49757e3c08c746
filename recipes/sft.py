"""SFT stage: supervised fine-tuning of a (Q)LoRA adapter with TRL's SFTTrainer.

Reads top to bottom: data -> tokenizer -> model (+ adapter) -> trainer -> stage directory.
Data: chat `messages` JSONL (loss on assistant tokens only), `prompt`/`completion`
JSONL (loss on the completion only), `text` JSONL, or a saved HF dataset dir.
Empty and duplicate rows are dropped and counted in stage.json.

Defaults that differ from TRL's SFTConfig (besides alignkit.training's):
  learning_rate        2e-4   (TRL: 2e-5, a full fine-tuning rate; LoRA adapters want ~10x more)
  assistant_only_loss  true for `messages` data when the chat template marks generations
  use_liger_kernel     true on a CUDA GPU with liger-kernel installed (TRL: false)
"""

from __future__ import annotations

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from alignkit.data.sources import load_sft_split
from alignkit.modeling import load_tokenizer, resolve_base
from alignkit.training import (final_metrics, fused_kernel_defaults, load_policy, memory_preflight, save_policy,
                               stage_callbacks, trl_args, truncation_report)

TRAIN_CONFIG = SFTConfig
DATA_KEYS = {"train", "eval", "eval_fraction"}
DEFAULTS = {"learning_rate": 2e-4}


def load_data(stage):
    return load_sft_split(stage.data, stage.seed, stage.name)


def can_mask_assistant_turns(tokenizer) -> bool:
    """Whether TRL can train on assistant tokens only: the template has {% generation %} markers, or is one TRL patches."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return True
    try:
        get_training_chat_template(tokenizer)
    except ValueError:  # TRL raises for templates it has no training version of
        return False
    return True


def _last_turn_as_completion(rows: list[dict]) -> list[dict]:
    """Chat rows as conversational prompt/completion, for templates without {% generation %} markers."""
    out = []
    for row in rows:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append({"prompt": messages[:last], "completion": [messages[last]]})
    return out


def train_config(stage, **derived) -> SFTConfig:
    """TRL's SFTConfig: alignkit's defaults < this recipe's < settings derived from the data < the recipe's train:."""
    return trl_args(SFTConfig, stage, {**DEFAULTS, **fused_kernel_defaults(), **derived})


def run(stage) -> dict:
    train_rows, eval_rows, fmt, info = stage.prepared

    # Tokenizer: the parent stage's (it carries the chat template the parent trained with), else the base's.
    parent = stage.parents.get("after")
    tokenizer = load_tokenizer(str(parent) if parent else resolve_base(stage.model.base))
    marks_generation = can_mask_assistant_turns(tokenizer)
    if fmt == "messages" and not marks_generation:
        # Without generation markers TRL cannot mask non-assistant turns; train on the final reply instead.
        train_rows, eval_rows = _last_turn_as_completion(train_rows), _last_turn_as_completion(eval_rows)
        info["loss_on"] = "last assistant turn (chat template has no generation markers)"
    else:
        info["loss_on"] = {"messages": "assistant tokens", "prompt_completion": "completion tokens", "text": "all tokens"}[fmt]
    args = train_config(stage, assistant_only_loss=fmt == "messages" and marks_generation)
    if not args.packing:  # packed sequences are cut to max_length by design
        info.update(truncation_report(tokenizer, train_rows, args.max_length, "prompt_completion" if "prompt" in train_rows[0] else fmt))

    memory = memory_preflight(stage, args)

    # Model: the base (4-bit by default) with either the parent's adapter, trainable, or a fresh one.
    model, new_adapter, started = load_policy(stage, args.gradient_checkpointing)
    info.update(started)

    trainer = SFTTrainer(
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
