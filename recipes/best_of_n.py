"""Best-of-N stage: rejection-sampling fine-tuning, as in Llama 2 and open-instruct.

Reads top to bottom: config -> parents (policy, reward; accuracy gate) -> prompts -> N samples per prompt
from the parent policy -> the reward stage's score of each -> the top-scored sample per prompt -> the SFT
body (alignkit.stage_bodies.supervised: TRL's SFTTrainer, loss on the response only) -> stage directory.

The parent (`after:`, required) is the policy that samples; `reward:` names the reward stage that scores,
behind the same held-out accuracy gate as PPO's. The trained adapter continues the parent's. stage.json's
metrics.best_of_n records the selection: N, prompts, mean / std / quantiles of all scores and of the kept
ones; samples.jsonl in the stage directory holds every sample with its score and which one was kept.
A kept response is exactly the text sampled. Chat prompts become `messages` rows (loss on the assistant
turn), text prompts `prompt`/`completion` rows (loss on the completion).

`train:` keys are trl.SFTConfig's, plus the sampling settings below and min_reward_accuracy.
Defaults that differ from TRL's SFTConfig (besides alignkit.training's):
  learning_rate  2e-4  (TRL: 2e-5, a full fine-tuning rate; LoRA adapters want ~10x more, as for SFT)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from alignkit.data.formats import prompt_of
from alignkit.data.sources import load_prompt_rows
from alignkit.errors import UserError
from alignkit.generation import SamplingParams
from alignkit.rejection_sampling import (Candidates, distribution_summary, sample_from_parent, score_with_reward,
                                         write_samples)
from alignkit.stage import PromptSet, StageKind, StageResult, StageRun, check_parents, min_reward_accuracy_field
from alignkit.stage_bodies import sft_data, supervised
from alignkit.training import fused_kernel_defaults, stage_tokenizer, train_settings_error, trl_args


@dataclass
class BestOfNConfig(SFTConfig):
    # Llama 2 (fig. 7) finds the best-of-N reward gain grows with N and flattens past ~10 samples; 8 keeps
    # it near that at 8 generations per prompt.
    num_samples: int = field(default=8, metadata={"help": "responses sampled per prompt (N, at least 2); the "
                                                          "top-scored one is trained on"})
    sample_max_new_tokens: int = field(default=256, metadata={"help": "longest sampled response, in tokens"})
    # 1.0 samples the parent's own distribution; Llama 2 finds higher temperatures widen the reward spread.
    sample_temperature: float = field(default=1.0, metadata={"help": "sampling temperature (above 0: greedy "
                                                                     "decoding would make the N samples identical)"})
    sample_top_p: float = field(default=1.0, metadata={"help": "nucleus sampling's top_p, in (0, 1]"})
    sample_batch_size: int = field(default=8, metadata={"help": "prompts per generate call (each brings N "
                                                                "sequences) and pairs per reward batch"})
    min_reward_accuracy: float = min_reward_accuracy_field()


KIND = StageKind("best_of_n", config_class=BestOfNConfig, data_keys=frozenset({"prompts"}), after="policy",
                 takes_reward=True)
DEFAULTS = {"learning_rate": 2e-4}
# SamplingParams' field -> the train key that sets it, to name the key a refused value came from.
SAMPLING_KEYS = {"num_return_sequences": "num_samples", "max_new_tokens": "sample_max_new_tokens",
                 "temperature": "sample_temperature", "top_p": "sample_top_p", "batch_size": "sample_batch_size"}


def load_data(stage: StageRun) -> PromptSet:
    if "after" not in stage.parents:
        raise UserError(f"stages.{stage.name}.after: a best_of_n stage samples from its parent policy; "
                        f"name it with `after:` (an sft stage, say)")
    return PromptSet(*load_prompt_rows(stage.data, stage.name))


def sampling_params(stage: StageRun, args: BestOfNConfig) -> SamplingParams:
    values = {ours: getattr(args, ours) for ours in SAMPLING_KEYS.values()}
    try:
        params = SamplingParams(seed=stage.seed, **{theirs: values[ours] for theirs, ours in SAMPLING_KEYS.items()})
    except UserError as err:
        key = next(ours for theirs, ours in SAMPLING_KEYS.items() if theirs in str(err))
        raise train_settings_error(stage, f"{key}={values[key]!r}: {str(err).split(', got')[0]}", key=key) from None
    if params.num_return_sequences < 2:
        raise train_settings_error(stage, f"num_samples={params.num_return_sequences!r} must be at least 2 (one "
                                          "sample leaves nothing to choose from)", key="num_samples")
    if params.temperature == 0:
        raise train_settings_error(stage, "sample_temperature=0 decodes greedily: the N samples would be identical",
                                   key="sample_temperature")
    return params


def train_config(stage: StageRun) -> BestOfNConfig:
    args = trl_args(BestOfNConfig, stage, {**DEFAULTS, **fused_kernel_defaults()})
    sampling_params(stage, args)  # refused now, before any stage trains
    return args


def sft_row(c: Candidates) -> dict:
    """The kept sample as an SFT row, its text exactly as sampled."""
    text = c.texts[c.best]
    if isinstance(c.prompt, str):
        return {"prompt": c.prompt, "completion": text}
    return {"messages": [*c.prompt, {"role": "assistant", "content": text}]}


def run(stage: StageRun) -> StageResult:
    data: PromptSet = stage.prepared
    args, params = stage.args, sampling_params(stage, stage.args)
    parents = check_parents(stage, KIND, min_reward_accuracy=args.min_reward_accuracy)
    info = {**data.info, **parents.info, "sampling": params.to_dict()}

    candidates = sample_from_parent(stage, [prompt_of(r) for r in data.rows], params)
    score_with_reward(parents.reward, candidates, batch_size=params.batch_size)
    samples = stage.stage_dir / "samples.jsonl"
    write_samples(samples, candidates)
    selection = distribution_summary(candidates)
    print(f"{stage.name}: kept the best of {params.num_return_sequences} samples for {len(candidates)} prompts; "
          f"mean reward {selection['all']['mean']:.3f} over all samples, {selection['chosen']['mean']:.3f} kept")

    rows = [sft_row(c) for c in candidates]
    fmt = "prompt_completion" if "prompt" in rows[0] else "messages"
    info.update(train=str(samples), format=fmt, train_rows=len(rows), eval_rows=0)
    result = supervised(stage, sft_data(stage, rows, [], fmt, info, stage_tokenizer(stage)))
    result.metrics["best_of_n"] = selection
    return result
