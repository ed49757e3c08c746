"""Reward stage: a sequence-scoring reward model on the same (4-bit) base, with TRL's RewardTrainer.

Reads top to bottom: data -> tokenizer -> model (+ parent's LoRA weights, fresh score head) -> trainer
-> held-out evaluation -> stage directory.

The model is the base loaded as AutoModelForSequenceClassification(num_labels=1):
the same decoder weights, plus a `score` Linear(hidden, 1) on the last non-pad
token. Its adapter (task SEQ_CLS, `modules_to_save=["score"]`) starts from the
parent (SFT) stage: every LoRA tensor whose name matches is copied from the
parent adapter, and the score head is new and trained. The stage directory is
that adapter (head included) + tokenizer + stage.json;
`alignkit.reward_model.load_reward_scorer(stage_dir)` loads it for scoring, and
PPO runs it as the `reward` role on its one base.

Data: prompt/chosen/rejected (plain strings or conversational message lists),
optional `margin` column (TRL subtracts it inside the Bradley-Terry loss), from
JSONL, a dataset dir, or `labels_db:` (a label store's export). Unless the
recipe gives `eval` or `eval_fraction`, 10% of pairs are held out.

Reported in stage.json metrics: held-out pairwise accuracy (`heldout_accuracy`,
also `eval_accuracy`), mean margin (`heldout_margin`), reward mean / std over the
held-out responses, and a `warning` when the accuracy is near chance (< 0.6):
PPO against a reward model that cannot tell pairs apart is wasted compute, and
PPO's accuracy gate refuses it by default.

Defaults that differ from TRL's RewardConfig (besides alignkit.training's):
  learning_rate  1e-4  (same as TRL's; stated because adapters and a fresh head like it)
  max_length     512   (TRL: 1024; pairs longer are dropped by TRL, counted here)
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from trl import RewardConfig, RewardTrainer

from alignkit.data.keys import PREFERENCE_DATA_KEYS
from alignkit.stage_data import load_preference_split
from alignkit.reward_model import NEAR_CHANCE_ACCURACY, RewardScorer
from alignkit.stage import RowSplit, StageKind, StageResult, StageRun
from alignkit.stats import wilson_interval
from alignkit.training import build_trainer, fit, memory_preflight, stage_tokenizer, trl_args, truncation_report

# A reward model may continue a policy or another reward model; its output is a scorer, not a policy.
KIND = StageKind("reward", config_class=RewardConfig, data_keys=PREFERENCE_DATA_KEYS, output="reward", after="any")
DEFAULTS = {"learning_rate": 1e-4, "max_length": 512}
DEFAULT_EVAL_FRACTION = 0.1

log = logging.getLogger("alignkit")


def load_data(stage: StageRun) -> RowSplit:
    data = dict(stage.data)
    if "eval" not in data and "eval_fraction" not in data:
        data["eval_fraction"] = DEFAULT_EVAL_FRACTION
    return RowSplit(*load_preference_split(data, stage.seed, stage.name))


def _reward_model(stage: StageRun, args):
    """(model, info): the base as a 1-label sequence classifier with a SEQ_CLS adapter started from the parent."""
    import dataclasses

    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, set_seed

    from alignkit.modeling import load_base_model, peft_config, prepare_for_training

    parent = stage.parents.get("after")
    parent_adapter = parent is not None and (Path(parent) / "adapter_config.json").exists()
    settings, info = stage.model, {}
    if parent is not None and not parent_adapter:
        settings = dataclasses.replace(settings, base=str(parent))  # a fully fine-tuned parent is the base
        info["initialized_from"] = str(parent)
    set_seed(args.seed)  # the score head is initialised randomly: make it reproducible
    model = load_base_model(settings, model_class=AutoModelForSequenceClassification, num_labels=1)
    model = prepare_for_training(model, settings, args.gradient_checkpointing)
    if stage.peft.method == "full":
        return model, info
    if parent_adapter:
        # Same shape as the parent's adapter, so its tensors can be copied in.
        config = peft.PeftConfig.from_pretrained(str(parent))
        config.task_type = "SEQ_CLS"
        config.inference_mode = False
        config.modules_to_save = sorted(set(config.modules_to_save or []) | {"score"})
    else:
        config = peft_config(stage.peft, task_type="SEQ_CLS")
        config.modules_to_save = sorted(set(config.modules_to_save or []) | {"score"})
    model = peft.get_peft_model(model, config)
    if parent_adapter:
        weights = load_file(str(Path(parent) / "adapter_model.safetensors"))
        current = peft.get_peft_model_state_dict(model)  # includes the fresh score head, which stays as it is
        matched = {k: v for k, v in weights.items() if k in current and current[k].shape == v.shape}
        peft.set_peft_model_state_dict(model, {**current, **matched})
        info["initialized_from"] = str(parent)
        info["parent_tensors_copied"] = len(matched)
        info["parent_tensors_skipped"] = len(weights) - len(matched)
        if not matched:
            log.warning("reward stage %s: no tensor of the parent adapter %s matched; starting from a fresh adapter",
                        stage.name, parent)
    return model, info


def _match_compute_dtype(model, compute_dtype: str) -> None:
    """TRL casts a quantized model's trainable weights to bfloat16 (the QLoRA paper's choice); with another
    compute dtype (float32 on CPU) that breaks the score head's matmul. Put them back in the compute dtype."""
    import torch

    if compute_dtype == "bfloat16":
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.to(getattr(torch, compute_dtype))


def _score_pairs(model, tokenizer, rows: list[dict], batch_size: int) -> tuple[list[float], list[float]]:
    scorer = RewardScorer(model=model, tokenizer=tokenizer, batch_size=batch_size)
    chosen = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    return chosen, rejected


def pair_metrics(chosen: list[float], rejected: list[float]) -> dict:
    """Pairwise accuracy (ties count half), mean margin, reward mean / std, and a 95% Wilson interval."""
    n = len(chosen)
    wins = sum((c > r) + 0.5 * (c == r) for c, r in zip(chosen, rejected))
    acc = wins / n
    low, high = wilson_interval(acc, n)
    rewards = chosen + rejected
    return {
        "accuracy": acc,
        "accuracy_ci95": [round(low, 4), round(high, 4)],
        "margin": statistics.fmean(c - r for c, r in zip(chosen, rejected)),
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        "pairs": n,
    }


def near_chance_warning(pm: dict, heldout: bool) -> str | None:
    """The warning for a reward model whose pairwise accuracy is near chance, or None."""
    if pm["accuracy"] >= NEAR_CHANCE_ACCURACY:
        return None
    what = "held-out" if heldout else "training (no held-out pairs)"
    return (f"reward model {what} pairwise accuracy {pm['accuracy']:.3f} over {pm['pairs']} pairs is near chance "
            f"(< {NEAR_CHANCE_ACCURACY}); PPO against it would be wasted compute: more or cleaner pairs, "
            f"more steps, or a stronger base")


def train_config(stage: StageRun) -> RewardConfig:
    return trl_args(RewardConfig, stage, DEFAULTS)


def run(stage: StageRun) -> StageResult:
    data: RowSplit = stage.prepared  # one shape per dataset (alignkit.data.formats.consistent_pairs)
    columns = ("prompt", "chosen", "rejected") + (("margin",) if data.train and "margin" in data.train[0] else ())
    train_rows = [{k: r[k] for k in columns} for r in data.train]
    eval_rows = [{k: r[k] for k in columns if k in r} for r in data.eval]
    info, args = data.info, stage.args
    if "margin" in columns:  # TRL subtracts it in the loss; stage.json says the trainer had it
        info["margin_column"] = {"rows": len(train_rows), "mean": sum(r["margin"] for r in train_rows) / len(train_rows)}

    tokenizer = stage_tokenizer(stage)
    info.update(truncation_report(tokenizer, train_rows, args.max_length, "preference"))
    memory = memory_preflight(stage, args, sequences_per_example=2, lm_head="score")  # chosen and rejected in one batch

    model, started = _reward_model(stage, args)
    info.update(started)
    model.config.pad_token_id = tokenizer.pad_token_id

    trainer = build_trainer(RewardTrainer, stage, model=model, tokenizer=tokenizer, train=train_rows, eval=eval_rows)
    _match_compute_dtype(trainer.model, stage.model.compute_dtype)
    metrics = fit(stage, trainer, tokenizer)
    metrics.update(_heldout_metrics(stage, trainer.model, tokenizer, eval_rows or train_rows, heldout=bool(eval_rows)))
    return StageResult(metrics=metrics, data=info, memory=memory)


def _heldout_metrics(stage: StageRun, model, tokenizer, rows: list[dict], *, heldout: bool) -> dict:
    """Our own evaluation: every pair, scored exactly as load_reward_scorer will score it (held-out pairs, or
    the training pairs when none are held out, named so)."""
    model.eval()
    chosen, rejected = _score_pairs(model, tokenizer, rows, stage.args.per_device_eval_batch_size)
    pm = pair_metrics(chosen, rejected)
    prefix = "heldout" if heldout else "train"
    metrics = {
        f"{prefix}_accuracy": pm["accuracy"], f"{prefix}_accuracy_ci95": pm["accuracy_ci95"],
        f"{prefix}_margin": pm["margin"], f"{prefix}_pairs": pm["pairs"],
        "reward_mean": pm["reward_mean"], "reward_std": pm["reward_std"],
    }
    if heldout:
        metrics["eval_accuracy"] = pm["accuracy"]
    warning = near_chance_warning(pm, heldout)
    if warning:
        log.warning("stage %s: %s", stage.name, warning)
        metrics["warning"] = warning
    return metrics
