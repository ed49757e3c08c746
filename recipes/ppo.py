"""PPO stage: the policy (from the `after:` SFT/DPO stage) optimised against the `reward:` stage, on ONE base.

Reads top to bottom: config -> parents (policy, reward; accuracy gate) -> prompts -> trainer -> stage directory.
The four roles (policy, reference, reward, value) are LoRA adapters on one
4-bit base, switched with set_adapter (alignkit/ppo/trainer.py); the stage
directory holds the policy adapter at its top level (a model spec like any
other stage), the value adapter + head under value/, TensorBoard logs under
logs/ (and the recipe's other `report_to` trackers), every step's metrics and
sample responses in ppo_log.jsonl, and checkpoints/checkpoint-N for --resume.

`train:` keys are the fields of alignkit.ppo.config.PPOConfig.
The parents are checked by alignkit.stage.check_parents, like GRPO's and RLOO's; PPO also needs the
policy parent to be an adapter, since its roles are adapters on one base.
"""

from __future__ import annotations

from alignkit.artifacts import file_fingerprint
from alignkit.data.formats import prompt_of
from alignkit.data.sources import load_prompt_rows
from alignkit.errors import UserError
from alignkit.ppo.config import PPOConfig
from alignkit.stage import Parents, PromptSet, StageKind, StageResult, StageRun, check_parents
from alignkit.training import train_settings_error

# A PPO stage may continue another one (a loop's PPO rounds): the parent's adapter is then its reference too.
KIND = StageKind("ppo", config_class=PPOConfig, data_keys=frozenset({"prompts"}), after=("sft", "dpo", "kto", "ppo"),
                 takes_reward=True, reward_ensemble=True)


def load_data(stage: StageRun) -> PromptSet:
    return PromptSet(*load_prompt_rows(stage.data, stage.name))


def train_config(stage: StageRun) -> PPOConfig:
    values = {"seed": stage.seed, **stage.train}
    try:
        return PPOConfig(**values)
    except (ValueError, TypeError) as err:
        raise train_settings_error(stage, str(err)) from None


def ppo_parents(stage: StageRun) -> Parents:
    """The shared parents check, plus what PPO's roles need of the policy parent: an adapter to copy."""
    parents = check_parents(stage, KIND, min_reward_accuracy=stage.args.min_reward_accuracy)
    policy = parents.policy
    if policy is None:
        parents.info["reference"] = "base model (adapters disabled)"
        return parents
    if not (policy / "adapter_config.json").exists():
        raise UserError(f"stage {stage.name}: after: {policy.name} has no adapter; PPO's roles need an adapter parent")
    parents.info["initialized_from_sha256"] = file_fingerprint(policy / "adapter_model.safetensors")
    parents.info["reference"] = f"{policy} (frozen copy of the parent adapter, on the same base)"
    return parents


def run(stage: StageRun) -> StageResult:
    from alignkit.completions import completion_log
    from alignkit.ppo.trainer import PPOTrainer
    from alignkit.tracking import TrackerRuns
    from alignkit.training import ppo_memory_preflight, stage_tokenizer

    data: PromptSet = stage.prepared
    info, config = data.info, stage.args
    parents = ppo_parents(stage)
    info.update(parents.info)

    prompts = [prompt_of(r) for r in data.rows]
    tokenizer = stage_tokenizer(stage, padding_side="left")
    memory = ppo_memory_preflight(stage, config, prompts, tokenizer)
    trackers = TrackerRuns.for_stage(stage, hf_logs=False)  # the loop is alignkit's: it logs every metric itself
    trainer = PPOTrainer(config, stage.model, stage.peft, prompts=prompts, stage_dir=stage.stage_dir,
                         reward=parents.rewards() if parents.more_rewards else parents.reward,
                         policy_adapter=parents.policy, tokenizer=tokenizer, seed=stage.seed,
                         trackers=trackers, completions=completion_log(stage, trackers))
    metrics = trainer.train(resume_from=stage.resume_from)
    trainer.save()
    info["roles"] = "policy, reference, reward, value: LoRA adapters on one base"
    return StageResult(metrics=metrics, data=info, memory=memory)
