"""Stage bodies two kinds share, so that recipes never import each other.

    supervised       SFT and best-of-N: TRL's SFTTrainer on rows the stage read (SftData), loss on the replies
    against_parent   DPO and KTO: the parent's adapter trained against a frozen copy of itself on one base
    reference_free   ORPO and SimPO: the parent's adapter (or a fresh one) trained on pairs, with no reference
    online           GRPO and RLOO: policy, TRL's frozen reference and the reward stage as adapters on one base

Each reads like a recipe (tokenizer -> model -> trainer -> stage directory) and ends in
alignkit.training.fit, the body every TRL-backed kind shares.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from alignkit.data.chat_mask import MaskPlan, mask_plan, masked_rows
from alignkit.data.io import without_location
from alignkit.errors import UserError
from alignkit.stage import PromptSet, RowSplit, StageKind, StageResult, StageRun, check_parents
from alignkit.training import (build_trainer, fit, load_policy, memory_preflight, reference_info, stage_tokenizer,
                               truncation_report)

LOSS_ON = {"messages": "every assistant turn", "prompt_completion": "completion tokens", "text": "all tokens"}


@dataclass
class SftData:
    """What an SFT-style stage trains on: the rows as read, and what the trainer takes.

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

    def datasets(self):
        from datasets import Dataset

        train = self.train_tokens if self.train_tokens is not None else self.train
        evals = self.eval_tokens if self.eval_tokens is not None else self.eval
        return Dataset.from_list(train), (Dataset.from_list(evals) if evals else None)


def sft_data(stage: StageRun, train: list[dict], evals: list[dict], fmt: str, info: dict, tokenizer) -> SftData:
    """The rows as the trainer takes them; for `messages` rows, how assistant tokens are found (a row the
    chat template cannot mask stops the stage here, before anything trains). `info["train"]` names the rows'
    source in that error."""
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


def fit_to_data(stage: StageRun, data: SftData):
    """The config with TRL's own masking on when the chat template marks generations; the config is
    built before the data is read (a mistyped setting costs no data read), so this is its one adjustment."""
    if "assistant_only_loss" in stage.train or stage.args.assistant_only_loss == data.marks_generations:
        return stage.args
    return replace(stage.args, assistant_only_loss=data.marks_generations)


def loss_tokens(dataset) -> int:
    """Tokens the loss covers in TRL's prepared dataset (labels not -100), after its truncation."""
    return sum(sum(label != -100 for label in labels) for labels in dataset["labels"])


def supervised(stage: StageRun, data: SftData) -> StageResult:
    """Tokenizer -> the config fitted to the data -> model (+ parent adapter or a fresh one) -> TRL's
    SFTTrainer -> stage directory, with stage.json's loss_tokens counted from TRL's own labels."""
    from trl import SFTTrainer

    tokenizer = stage_tokenizer(stage)
    if tokenizer.chat_template != data.chat_template:  # a parent trained since the data was read, with another template
        data = sft_data(stage, data.train, data.eval, data.fmt, data.info, tokenizer)
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


def against_parent(stage: StageRun, trainer_cls, columns: tuple[str, ...], fmt: str, *,
                   sequences_per_example: int) -> StageResult:
    """`columns` are the rows' columns the trainer reads, `fmt` their format for the truncation report;
    `sequences_per_example` how many sequences of one example go through the model in one batch."""
    # Model: one base; the parent's adapter becomes the trainable policy ("default") and TRL's frozen "ref".
    return _on_rows(stage, trainer_cls, columns, fmt, sequences_per_example, reference_info(stage))


def reference_free(stage: StageRun, trainer_cls) -> StageResult:
    """ORPO and SimPO on prompt / chosen / rejected rows: chosen and rejected go through the model in one
    batch (two sequences per example), and no reference model is loaded or copied."""
    from alignkit.artifacts import file_fingerprint

    info = {"reference": "none (the loss needs no reference model)"}
    parent = stage.parents.get("after")
    if parent and (parent / "adapter_model.safetensors").exists():
        info["initialized_from_sha256"] = file_fingerprint(parent / "adapter_model.safetensors")
    return _on_rows(stage, trainer_cls, ("prompt", "chosen", "rejected"), "preference", 2, info)


def _on_rows(stage: StageRun, trainer_cls, columns: tuple[str, ...], fmt: str, sequences_per_example: int,
             reference: dict) -> StageResult:
    """Rows -> tokenizer -> model (the parent's adapter, trainable, or a fresh one) -> trainer -> stage
    directory; `reference` is what stage.json says the stage's reference is."""
    data: RowSplit = stage.prepared
    train_rows = [{k: r[k] for k in columns} for r in data.train]
    eval_rows = [{k: r[k] for k in columns} for r in data.eval]
    info, args = data.info, stage.args

    tokenizer = stage_tokenizer(stage)
    info.update(truncation_report(tokenizer, train_rows, args.max_length, fmt))
    memory = memory_preflight(stage, args, sequences_per_example=sequences_per_example)

    model, new_adapter, started = load_policy(stage, args.gradient_checkpointing)
    info.update(started)
    info.update(reference)

    trainer = build_trainer(trainer_cls, stage, model=model, tokenizer=tokenizer, train=train_rows, eval=eval_rows,
                            peft_config=new_adapter)
    return StageResult(metrics=fit(stage, trainer, tokenizer), data=info, memory=memory)


def online(stage: StageRun, kind: StageKind, trainer_cls) -> StageResult:
    """Parents (policy, reward; accuracy gate) -> prompts -> one base with policy + ref + reward adapters ->
    a reward callable that switches to the reward adapter under no_grad -> trainer -> stage directory."""
    from alignkit.data.formats import prompt_of
    from alignkit.reward_model import AttachedReward

    data: PromptSet = stage.prepared
    info, args = data.info, stage.args
    parents = check_parents(stage, kind, min_reward_accuracy=args.min_reward_accuracy)
    info.update(parents.info)
    memory = memory_preflight(stage, args)
    tokenizer = stage_tokenizer(stage, padding_side="left")

    model, new_adapter, started = load_policy(stage, args.gradient_checkpointing)
    info.update(started)
    if new_adapter is not None:  # no parent adapter: make the policy adapter now, so the reward can join it
        import peft

        model = peft.get_peft_model(model, new_adapter)
    if not hasattr(model, "peft_config"):
        raise UserError(f"stage {stage.name}: {stage.kind} keeps its roles as adapters on one base; use a PEFT method, not full")
    reward_fn = AttachedReward(model, tokenizer, parents.reward)
    info["roles"] = "policy, reference (TRL 'ref' copy), reward: adapters on one base"

    trainer = build_trainer(trainer_cls, stage, model=model, tokenizer=tokenizer,
                            train=[{"prompt": prompt_of(r)} for r in data.rows], reward_funcs=[reward_fn])
    return StageResult(metrics=fit(stage, trainer, tokenizer), data=info, memory=memory)
