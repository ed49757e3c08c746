"""PPO stage: the policy (from the `after:` SFT/DPO stage) optimised against the `reward:` stage, on ONE base.

Reads top to bottom: config -> parents (policy, reward; accuracy gate) -> prompts -> trainer -> stage directory.
The four roles (policy, reference, reward, value) are LoRA adapters on one
4-bit base, switched with set_adapter (alignkit/ppo/trainer.py); the stage
directory holds the policy adapter at its top level (a model spec like any
other stage), the value adapter + head under value/, TensorBoard logs under
logs/, every step's metrics and sample responses in ppo_log.jsonl, and
checkpoints/checkpoint-N for --resume.

`train:` keys are the fields of alignkit.ppo.config.PPOConfig.
"""

from __future__ import annotations

from pathlib import Path

from alignkit.artifacts import file_fingerprint, read_stage
from alignkit.data.formats import prompt_of
from alignkit.data.sources import load_prompt_rows
from alignkit.errors import UserError
from alignkit.training import train_settings_error
from alignkit.ppo.config import PPOConfig

TRAIN_CONFIG = PPOConfig
DATA_KEYS = {"prompts"}
POLICY_KINDS = ("sft", "dpo", "kto")


def load_data(stage):
    rows = load_prompt_rows(stage.data, stage.name)
    # Parents already complete (a re-run): check them now, before the runner touches this stage's directory.
    from alignkit.artifacts import is_complete

    if stage.parents and all(is_complete(p) for p in stage.parents.values()):
        check_parents(stage, train_config(stage))
    return rows


def train_config(stage) -> PPOConfig:
    values = {"seed": stage.seed, **stage.train}
    try:
        return PPOConfig(**values)
    except (ValueError, TypeError) as err:
        raise train_settings_error(stage, str(err)) from None


def check_parents(stage, config: PPOConfig) -> tuple[Path | None, Path, dict]:
    """(policy parent or None, reward stage dir, info); UserError for a wrong kind or a reward model below the gate."""
    from alignkit.reward_model import heldout_accuracy, read_reward_stage

    info: dict = {}
    policy = stage.parents.get("after")
    if policy is not None:
        parent = read_stage(policy) or {}
        if parent.get("kind") not in POLICY_KINDS:
            raise UserError(f"stage {stage.name}: after: {policy.name} is a {parent.get('kind')!r} stage; "
                            f"PPO starts from a policy stage ({' or '.join(POLICY_KINDS)})")
        if not (policy / "adapter_config.json").exists():
            raise UserError(f"stage {stage.name}: after: {policy.name} has no adapter; PPO's roles need an adapter parent")
        info["policy_from"] = str(policy)
        info["initialized_from_sha256"] = file_fingerprint(policy / "adapter_model.safetensors")
        info["reference"] = f"{policy} (frozen copy of the parent adapter, on the same base)"
    else:
        info["reference"] = "base model (adapters disabled)"
    reward = stage.parents.get("reward")
    if reward is None:
        raise UserError(f"stage {stage.name}: a ppo stage needs `reward:` naming a stage of kind reward")
    reward_stage = read_reward_stage(reward)  # UserError unless kind == reward and complete
    accuracy = heldout_accuracy(reward_stage)
    info["reward_from"] = str(reward)
    info["reward_heldout_accuracy"] = accuracy
    if config.min_reward_accuracy > 0:
        if accuracy is None:
            raise UserError(f"stage {stage.name}: reward stage {reward.name} reports no held-out accuracy; "
                            f"set train.min_reward_accuracy: 0 to run PPO against it anyway")
        if accuracy < config.min_reward_accuracy:
            raise UserError(f"stage {stage.name}: reward stage {reward.name} held-out accuracy {accuracy:.3f} is below "
                            f"min_reward_accuracy {config.min_reward_accuracy}; PPO against it would be wasted compute "
                            f"(train a better reward model, or lower train.min_reward_accuracy)")
    return policy, reward, info


def run(stage) -> dict:
    from alignkit.modeling import load_tokenizer, resolve_base, tokenizer_source
    from alignkit.ppo.trainer import PPOTrainer
    from alignkit.training import ppo_memory_preflight

    rows, info = stage.prepared
    config = train_config(stage)
    policy, reward, parents_info = check_parents(stage, config)
    info.update(parents_info)

    prompts = [prompt_of(r) for r in rows]
    tokenizer = load_tokenizer(tokenizer_source(policy, resolve_base(stage.model.base)), padding_side="left")
    memory = ppo_memory_preflight(stage, config, prompts, tokenizer)
    trainer = PPOTrainer(config, stage.model, stage.peft, prompts=prompts, stage_dir=stage.stage_dir,
                         reward=reward, policy_adapter=policy, tokenizer=tokenizer, seed=stage.seed)
    metrics = trainer.train(resume_from=stage.resume_from)
    trainer.save()
    info["roles"] = "policy, reference, reward, value: LoRA adapters on one base"
    return {"metrics": metrics, "data": info, "memory": memory}
