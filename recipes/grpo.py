"""GRPO stage: critic-free RL with TRL's GRPOTrainer, the reward stage as reward function, on one base.

Reads top to bottom: config -> parents (policy, reward; accuracy gate) -> prompts -> model (+ parent adapter,
+ reward adapter) -> trainer -> stage directory.

Group Relative Policy Optimization samples `num_generations` responses per
prompt and uses each response's reward relative to its group as the advantage —
no value model. The roles share ONE base, as in PPO:
  policy     the parent (SFT/DPO) stage's adapter, trainable ("default");
  reference  TRL's frozen "ref" copy of that adapter (used when beta > 0);
  reward     the reward stage's adapter + score head (alignkit.reward_model.AttachedReward),
             switched to under no_grad inside the reward callable.
The stage directory holds the policy adapter at its top level (a model spec).

`train:` keys are trl.GRPOConfig's, plus min_reward_accuracy (the same gate as PPO's).
Defaults that differ from TRL's GRPOConfig (besides alignkit.training's):
  learning_rate          1e-5  (TRL: 1e-6, a full fine-tuning rate; adapters want more)
  beta                   0.04  (TRL: 0.0; a KL term against the SFT policy, as in PPO)
  num_generations        4     (TRL: 8)
  max_completion_length  128   (TRL: 512)

recipes/rloo.py runs TRL's RLOOTrainer through the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from alignkit.data.formats import prompt_of
from alignkit.data.sources import load_prompt_rows
from alignkit.errors import UserError

POLICY_KINDS = ("sft", "dpo", "kto")


@dataclass
class AlignkitGRPOConfig(GRPOConfig):
    min_reward_accuracy: float = field(default=0.6, metadata={
        "help": "refuse to start unless the reward stage's held-out accuracy is at least this (0 disables the gate)"})


TRAIN_CONFIG = AlignkitGRPOConfig
DATA_KEYS = {"prompts"}
DEFAULTS = {"learning_rate": 1e-5, "beta": 0.04, "num_generations": 4, "max_completion_length": 128}


def load_data(stage):
    return load_prompt_rows(stage.data, stage.name)


def check_parents(stage, min_reward_accuracy: float) -> tuple[Path | None, Path, dict]:
    """(policy parent or None, reward stage dir, info); UserError for a wrong kind or a reward model below the gate."""
    from alignkit.artifacts import read_stage
    from alignkit.reward_model import heldout_accuracy, read_reward_stage

    info: dict = {}
    policy = stage.parents.get("after")
    if policy is not None:
        kind = (read_stage(policy) or {}).get("kind")
        if kind not in POLICY_KINDS:
            raise UserError(f"stage {stage.name}: after: {policy.name} is a {kind!r} stage; "
                            f"{stage.kind} starts from a policy stage ({' or '.join(POLICY_KINDS)})")
        info["policy_from"] = str(policy)
    reward = stage.parents.get("reward")
    if reward is None:
        raise UserError(f"stage {stage.name}: a {stage.kind} stage needs `reward:` naming a stage of kind reward")
    accuracy = heldout_accuracy(read_reward_stage(reward))
    info.update(reward_from=str(reward), reward_heldout_accuracy=accuracy)
    if min_reward_accuracy > 0 and (accuracy is None or accuracy < min_reward_accuracy):
        shown = "no held-out accuracy" if accuracy is None else f"held-out accuracy {accuracy:.3f}"
        raise UserError(f"stage {stage.name}: reward stage {reward.name} reports {shown}, below min_reward_accuracy "
                        f"{min_reward_accuracy}; train a better reward model or set train.min_reward_accuracy: 0")
    return policy, reward, info


def run_online(stage, args, trainer_cls) -> dict:
    """The GRPO / RLOO stage body: one base, policy + TRL's ref + reward adapters, reward callable, save."""
    from alignkit.modeling import load_tokenizer, resolve_base
    from alignkit.reward_model import AttachedReward
    from alignkit.training import final_metrics, load_policy, memory_preflight, save_policy, stage_callbacks

    rows, info = stage.prepared
    policy, reward, parents_info = check_parents(stage, args.min_reward_accuracy)
    info.update(parents_info)
    memory = memory_preflight(stage, args)
    tokenizer = load_tokenizer(str(policy) if policy else resolve_base(stage.model.base), padding_side="left")

    model, new_adapter, started = load_policy(stage, args.gradient_checkpointing)
    info.update(started)
    if new_adapter is not None:  # no parent adapter: make the policy adapter now, so the reward can join it
        import peft

        model = peft.get_peft_model(model, new_adapter)
    if not hasattr(model, "peft_config"):
        raise UserError(f"stage {stage.name}: {stage.kind} keeps its roles as adapters on one base; use a PEFT method, not full")
    reward_fn = AttachedReward(model, tokenizer, reward)
    info["roles"] = "policy, reference (TRL 'ref' copy), reward: adapters on one base"

    trainer = trainer_cls(
        model=model,
        reward_funcs=[reward_fn],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": prompt_of(r)} for r in rows]),
        processing_class=tokenizer,
        callbacks=stage_callbacks(stage.stage_dir),
    )
    output = trainer.train(resume_from_checkpoint=str(stage.resume_from) if stage.resume_from else None)
    save_policy(trainer.model, tokenizer, stage.stage_dir)
    return {"metrics": final_metrics(trainer, output), "data": info, "memory": memory}


def train_config(stage) -> AlignkitGRPOConfig:
    from alignkit.training import trl_args

    return trl_args(AlignkitGRPOConfig, stage, DEFAULTS)


def run(stage) -> dict:
    return run_online(stage, train_config(stage), GRPOTrainer)
