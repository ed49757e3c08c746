"""Stage bodies two kinds share, so that recipes never import each other.

    against_parent   DPO and KTO: the parent's adapter trained against a frozen copy of itself on one base
    online           GRPO and RLOO: policy, TRL's frozen reference and the reward stage as adapters on one base

Each reads like a recipe (tokenizer -> model -> trainer -> stage directory) and ends in
alignkit.training.fit, the body every TRL-backed kind shares.
"""

from __future__ import annotations

from alignkit.errors import UserError
from alignkit.stage import PromptSet, RowSplit, StageKind, StageResult, StageRun, check_parents
from alignkit.training import (build_trainer, fit, load_policy, memory_preflight, reference_info, stage_tokenizer,
                               truncation_report)


def against_parent(stage: StageRun, trainer_cls, columns: tuple[str, ...], fmt: str, *,
                   sequences_per_example: int) -> StageResult:
    """`columns` are the rows' columns the trainer reads, `fmt` their format for the truncation report;
    `sequences_per_example` how many sequences of one example go through the model in one batch."""
    data: RowSplit = stage.prepared
    train_rows = [{k: r[k] for k in columns} for r in data.train]
    eval_rows = [{k: r[k] for k in columns} for r in data.eval]
    info, args = data.info, stage.args

    tokenizer = stage_tokenizer(stage)
    info.update(truncation_report(tokenizer, train_rows, args.max_length, fmt))
    memory = memory_preflight(stage, args, sequences_per_example=sequences_per_example)

    # Model: one base; the parent's adapter becomes the trainable policy ("default") and TRL's frozen "ref".
    model, new_adapter, started = load_policy(stage, args.gradient_checkpointing)
    info.update(started)
    info.update(reference_info(stage))

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
