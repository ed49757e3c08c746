"""Eval stage: a recipe's own scorecard, task metrics of the policy it comes after (or of the base without `after:`).

    - name: scorecard
      kind: eval
      after: dpo                  # any policy stage; without it, the base model
      reward: reward              # optional: also the reward stage's mean score of the answers
      data: {eval: ../data/my_eval.jsonl}
      train: {metrics: [exact_match, rouge], extract: gsm8k, max_new_tokens: 64}

Reads top to bottom: config (alignkit.evaluation.EvalConfig: the `train:` keys) -> rows -> parents -> the model
answers every prompt -> metrics, perplexity, mean reward -> eval.json / eval.md / predictions.jsonl in the stage
directory, the numbers in stage.json's metrics. Nothing trains; a later stage cannot start from it.
A metric given as a relative path that exists next to the recipe resolves against the recipe's directory.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from alignkit.errors import UserError
from alignkit.evaluation import EvalConfig, EvalRow, read_eval_rows, run_eval
from alignkit.stage import StageKind, StageResult, StageRun, check_parents
from alignkit.training import train_settings_error

KIND = StageKind("eval", config_class=EvalConfig, data_keys=frozenset({"eval"}), output="report", after="policy",
                 takes_reward=True, reward_required=False)


def train_config(stage: StageRun) -> EvalConfig:
    try:
        config = EvalConfig(**stage.train)
    except (ValueError, TypeError) as err:
        raise train_settings_error(stage, str(err)) from None
    here = Path(stage.report.recipe).parent if stage.report.recipe else None
    local = [str(here / m) if here is not None and not Path(m).is_absolute() and (here / m).exists() else m
             for m in config.metrics]
    return replace(config, metrics=local)


def load_data(stage: StageRun) -> list[EvalRow]:
    if "eval" not in stage.data:
        raise UserError(f"stages.{stage.name}.data.eval is required (JSONL of prompt + reference rows)")
    return read_eval_rows(stage.data["eval"], stage.args.limit)


def run(stage: StageRun) -> StageResult:
    from alignkit.modeling import resolve_base

    parents = check_parents(stage, KIND)
    spec = str(parents.policy) if parents.policy is not None else resolve_base(stage.model.base)
    name = parents.policy.name if parents.policy is not None else "base"
    report = run_eval([(name, spec)], stage.data["eval"], stage.args, Path(stage.stage_dir),
                      reward=parents.reward, rows=stage.prepared)
    return StageResult(metrics=report["models"][0]["metrics"],
                       data={**parents.info, "evaluated": spec, "rows": report["rows"], "report": "eval.json, eval.md"})
