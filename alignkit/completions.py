"""Sample completions while a policy trains: the same prompts, every N steps.

    train:
      log_completions: {every: 50, prompts: 8, max_new_tokens: 48}

Any policy stage takes it (its kind's KIND.output is "policy"). Each time, the policy completes the same
prompts greedily (the stage's held-out prompts first, then its training prompts), the stage's reward model
scores them where it has one (PPO, GRPO, RLOO: the stage's `reward:`), and they go to
stage_dir/completions.jsonl, one line per prompt (step, prompt, completion, score), and to the stage's
trackers as a `completions` table (TensorBoard: a markdown table as text).

TRL stages attach `completions_callback` (alignkit.training.build_trainer does, for every kind); PPO's
own loop calls `CompletionLog.log` at the same steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from alignkit.errors import UserError
from alignkit.tracking import LogCompletions, TrackerRuns

if TYPE_CHECKING:
    from alignkit.stage import StageRun

COMPLETIONS_JSONL = "completions.jsonl"
Scorer = Callable[[list, list[str]], Sequence[float]]


def row_prompt(row: dict) -> Any:
    """The prompt of a training row: `prompt`, or a chat up to its last assistant turn; None for `text` rows."""
    if "prompt" in row:
        return row["prompt"]
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        cut = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
        return messages[:cut] or None
    return None


def stage_prompts(stage: StageRun, count: int) -> list:
    """The first `count` distinct prompts of the stage's prepared data, held-out rows first."""
    prepared = stage.prepared
    rows = [*getattr(prepared, "eval", []), *getattr(prepared, "train", [])] or list(getattr(prepared, "rows", []))
    prompts, seen = [], set()
    for row in rows:
        prompt = row_prompt(row)
        key = json.dumps(prompt, sort_keys=True)
        if prompt is not None and key not in seen:
            seen.add(key)
            prompts.append(prompt)
        if len(prompts) == count:
            break
    if not prompts:
        raise UserError(f"stage {stage.name}: train.log_completions needs prompts, and its rows have none "
                        "(text rows: use prompt/completion or messages rows)")
    return prompts


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


@dataclass
class CompletionLog:
    """Where a stage's samples go; `score` is the stage's reward (prompts, completions) -> scores, if any."""

    settings: LogCompletions
    prompts: list
    path: Path
    runs: TrackerRuns | None = None
    score: Scorer | None = None

    def due(self, step: int) -> bool:
        return step > 0 and step % self.settings.every == 0

    def restart(self, resumed_step: int) -> None:
        """Lines of steps after the checkpoint a run continues are sampled again: dropped, so each step is logged once."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, model, tokenizer) -> list[dict]:
        """Sample, score and write the step's completions; returns the rows written."""
        import torch

        from alignkit.generation import SamplingParams, generate_batch

        was_training = model.training
        model.eval()
        try:
            params = SamplingParams(max_new_tokens=self.settings.max_new_tokens, temperature=0.0,
                                    batch_size=len(self.prompts))
            texts = generate_batch(model, tokenizer, self.prompts, params).texts
            with torch.no_grad():
                scores = [float(s) for s in self.score(self.prompts, texts)] if self.score else [None] * len(texts)
        finally:
            model.train(was_training)
        rows = [{"step": step, "prompt": p, "completion": t, "score": s} for p, t, s in zip(self.prompts, texts, scores)]
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        if self.runs is not None:
            self.runs.log_table("completions", ["step", "prompt", "completion", "score"],
                                [[step, prompt_text(r["prompt"]), r["completion"], r["score"]] for r in rows], step)
        return rows


def completion_log(stage: StageRun, runs: TrackerRuns | None, score: Scorer | None = None) -> CompletionLog | None:
    """The stage's CompletionLog, or None when its recipe asks for no samples (or on a non-main process)."""
    settings = stage.report.log_completions
    if settings is None or int(os.environ.get("RANK", "0")) != 0:
        return None
    return CompletionLog(settings, stage_prompts(stage, settings.prompts), Path(stage.stage_dir) / COMPLETIONS_JSONL,
                         runs, score)


def completions_callback(log: CompletionLog, tokenizer):
    """A TrainerCallback that samples at every step `log` is due, with the model as it is after that step."""
    from transformers import TrainerCallback

    class LogCompletionsCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            log.restart(state.global_step)  # the checkpoint's step when resuming, else 0

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None and log.due(state.global_step):
                log.log(state.global_step, model, tokenizer)

    return LogCompletionsCallback()
