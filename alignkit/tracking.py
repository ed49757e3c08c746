"""Experiment trackers a stage reports to: TensorBoard (stage_dir/logs), MLflow, Weights & Biases, trackio.

`report_to` in a recipe (top level, per stage, or `--set`) names them; `tensorboard` alone is the default.
TRL stages hand the external ones to the HF Trainer's own integrations, which log the metrics and TRL's
settings; `TrackerRuns` opens the MLflow and W&B runs before training, so those integrations log into
runs that carry the stage's identity (run and stage names, recipe, config hash, lineage) and stay open
through the final evaluation, and closes them after it. The PPO stage's loop is alignkit's own: it logs
its metrics, settings and sample completions through the same TrackerRuns.

Each tool reads its own environment: MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME, WANDB_MODE / WANDB_DIR /
WANDB_PROJECT, TRACKIO_DIR / TRACKIO_PROJECT. The experiment or project defaults to the run directory's name,
the run name to `<run_dir name>/<stage>`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from alignkit.errors import UserError

if TYPE_CHECKING:
    from alignkit.stage import StageRun

Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio"]
TRACKERS: tuple[str, ...] = ("tensorboard", "mlflow", "wandb", "trackio")
EXTERNAL = ("mlflow", "wandb", "trackio")  # each the name of its package too


@dataclass(frozen=True)
class LogCompletions:
    """`train.log_completions`: sample the policy on a fixed set of prompts every `every` steps."""

    every: int  # training steps between two samples
    prompts: int = 8  # how many of the stage's prompts (held-out ones first) are sampled each time
    max_new_tokens: int = 48  # greedy, so one step's completions compare with the next's


@dataclass(frozen=True)
class Reporting:
    """Where a stage reports, and what it says about itself there; built by the runner from the recipe."""

    report_to: tuple[str, ...] = ("tensorboard",)
    project: str = "alignkit"  # the run directory's name
    recipe: str = ""
    lineage: tuple[str, ...] = ()  # `after:` parents, nearest first
    log_completions: LogCompletions | None = None


def parse_report_to(value: Any, key: str, where) -> tuple[str, ...]:
    """A recipe's `report_to` (one name or a list; `none` or [] for no tracker), checked at its line."""
    from alignkit.config import _suggest

    items = [] if value in (None, "none") else value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        at = where(f"{key}.{i}" if isinstance(value, list) else key)
        if not isinstance(item, str) or item not in TRACKERS:
            raise UserError(f"{at}: {key}={item!r}; one of {', '.join(TRACKERS)}, a list of them, or none"
                            f"{_suggest(item, TRACKERS)}")
    return tuple(dict.fromkeys(items))


def parse_log_completions(value: Any, key: str, where) -> LogCompletions | None:
    """`train.log_completions: {every: 50, prompts: 8, max_new_tokens: 48}`, checked at its line."""
    from alignkit.config import _suggest

    if value is None:
        return None
    if not isinstance(value, dict):
        raise UserError(f"{where(key)}: {key} must be a mapping, e.g. {{every: 50, prompts: 8}}")
    fields = ("every", "prompts", "max_new_tokens")
    for name, item in value.items():
        if name not in fields:
            raise UserError(f"{where(f'{key}.{name}')}: unknown key {key}.{name}{_suggest(name, fields)}")
        if not isinstance(item, int) or isinstance(item, bool) or item < 1:
            raise UserError(f"{where(f'{key}.{name}')}: {key}.{name}={item!r} must be an integer >= 1")
    if "every" not in value:
        raise UserError(f"{where(key)}: {key}.every is required (training steps between two samples)")
    return LogCompletions(**value)


def require_packages(report_to: tuple[str, ...], at: str) -> None:
    """A tracker whose package is missing is refused before any stage trains, not when its stage starts."""
    import importlib.util

    for name in report_to:
        if name in EXTERNAL and importlib.util.find_spec(name) is None:
            raise UserError(f"{at}: report_to {name} needs the {name} package "
                            "(pip install 'alignkit[tracking]')")


@dataclass(frozen=True)
class RunIdentity:
    """A stage as its tracker runs name it: `params` are logged as parameters and tags."""

    project: str
    run_name: str
    params: dict[str, str]


def stage_identity(stage: StageRun) -> RunIdentity:
    report = stage.report
    params = {"alignkit.run": report.project, "alignkit.stage": stage.name, "alignkit.kind": stage.kind,
              "alignkit.recipe": report.recipe, "alignkit.config_hash": stage.config_hash,
              "alignkit.lineage": " <- ".join((stage.name, *report.lineage)),
              **{f"alignkit.parent.{role}": path.name for role, path in stage.parents.items()}}
    return RunIdentity(project=report.project, run_name=f"{report.project}/{stage.name}", params=params)


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # under accelerate: one run per stage, from rank 0


class TrackerRuns:
    """One stage's runs on its trackers. `hf_logs`: the HF Trainer's integrations log the metrics and open
    trackio's run themselves (TRL stages); otherwise every metric goes through `log_metrics` (PPO)."""

    def __init__(self, report_to: tuple[str, ...], identity: RunIdentity, logs_dir: Path, *, hf_logs: bool):
        self.report_to = report_to if _main_process() else ()
        self.identity, self.logs_dir, self.hf_logs = identity, Path(logs_dir), hf_logs
        self.purge_step: int | None = None  # TensorBoard drops events from this step on (a resumed run logs them again)
        self.tb = None
        self.hyperparameters: dict = {}

    @classmethod
    def for_stage(cls, stage: StageRun, *, hf_logs: bool) -> TrackerRuns:
        return cls(stage.report.report_to, stage_identity(stage), Path(stage.stage_dir) / "logs", hf_logs=hf_logs)

    def open(self, hyperparameters: dict | None = None) -> TrackerRuns:
        ident, self.hyperparameters = self.identity, dict(hyperparameters or {})
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.logs_dir), purge_step=self.purge_step)
            self.tb.add_text("alignkit/stage", "\n".join(f"- **{k}**: {v}" for k, v in ident.params.items()), 0)
        if "mlflow" in self.report_to:
            import mlflow

            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or ident.project)
            if mlflow.active_run() is not None:  # one left open by a stage that failed in this process
                mlflow.end_run()
            mlflow.start_run(run_name=ident.run_name, tags=ident.params)
            mlflow.log_params({**ident.params, **{k: _short(v) for k, v in self.hyperparameters.items()}})
        if "wandb" in self.report_to:
            import wandb

            # dir: read now, not once per process by wandb's first setup, so each stage honours WANDB_DIR.
            wandb.init(project=os.environ.get("WANDB_PROJECT") or ident.project, name=ident.run_name,
                       dir=os.environ.get("WANDB_DIR"),
                       group=ident.project, job_type=ident.params["alignkit.kind"], reinit="finish_previous",
                       tags=[ident.params["alignkit.stage"], ident.params["alignkit.kind"]],
                       config={**ident.params, **self.hyperparameters})
            wandb.define_metric("train/global_step")
            wandb.define_metric("*", step_metric="train/global_step", step_sync=True)
        if "trackio" in self.report_to and not self.hf_logs:
            self._trackio_init(self.hyperparameters)
        return self

    def _trackio_init(self, config: dict) -> None:
        import trackio

        trackio.init(project=self.trackio_project(), name=self.identity.run_name, resume="allow",
                     config={**config, **self.identity.params})

    def trackio_project(self) -> str:
        return os.environ.get("TRACKIO_PROJECT") or self.identity.project

    def on_hf_setup(self) -> None:
        """Called once the HF integrations set up their runs, before their first log: trackio's run (which the
        integration opens) takes the identity into the config it stores with that log."""
        if "trackio" in self.report_to:
            import trackio

            trackio.config.update(self.identity.params)

    def log_metrics(self, metrics: dict, step: int, *, prefix: str = "") -> None:
        values = {f"{prefix}{k}": float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if "mlflow" in self.report_to:
            import mlflow

            mlflow.log_metrics(values, step=step)
        if "wandb" in self.report_to:
            import wandb

            wandb.log({**values, "train/global_step": step})
        if "trackio" in self.report_to:
            import trackio

            trackio.log(values, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """Rows as a table on the external trackers and as markdown text on TensorBoard."""
        if self.tb is not None:
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
            body = "\n".join("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)
            self.tb.add_text(name, f"{header}\n{body}", step)
            self.tb.flush()
        if "mlflow" in self.report_to:
            import mlflow

            mlflow.log_table({c: [row[i] for row in rows] for i, c in enumerate(columns)},
                             artifact_file=f"{name}/step_{step:07d}.json")
        if "wandb" in self.report_to:
            import wandb

            wandb.log({name: wandb.Table(columns=columns, data=rows), "train/global_step": step})
        if "trackio" in self.report_to:
            import trackio

            if self.hf_logs or trackio.context_vars.current_run.get() is not None:
                trackio.log({name: trackio.Table(columns=columns, data=rows)}, step=step)

    def close(self, final: dict | None = None) -> None:
        """End the runs; `final` (the stage's final metrics) is logged as `final/<metric>` first."""
        step = int((final or {}).get("global_step", 0))
        numbers = {f"final/{k}": float(v) for k, v in (final or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if "mlflow" in self.report_to:
            import mlflow

            if mlflow.active_run() is not None:
                if numbers:
                    mlflow.log_metrics(numbers, step=step)
                mlflow.end_run()
        if "wandb" in self.report_to:
            import wandb

            if wandb.run is not None:
                wandb.run.summary.update(numbers)
                wandb.finish()
        if "trackio" in self.report_to:
            self._close_trackio(numbers, step)

    def _close_trackio(self, numbers: dict, step: int) -> None:
        import trackio

        if self.hf_logs:
            # The integration finished its run at the end of training and opened it again for the final
            # evaluation, storing that config without the identity: stored once more, with it.
            config = {k: v for k, v in dict(trackio.config).items() if not k.startswith("_")}
            if trackio.context_vars.current_run.get() is not None:
                trackio.finish()
            self._trackio_init(config)
        if trackio.context_vars.current_run.get() is not None:
            trackio.log(numbers or {"final/global_step": float(step)}, step=step)
            trackio.finish()


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", "<br>")


def hf_report_to(report_to: tuple[str, ...]) -> list[str] | str:
    """What TRL's `report_to` gets: the external trackers (TensorBoard is attached by alignkit, writing to
    stage_dir/logs), or "none"."""
    external = [t for t in report_to if t in EXTERNAL]
    return external or "none"


def tracking_callback(runs: TrackerRuns):
    """A TrainerCallback that hands the HF integrations' freshly set-up runs the stage's identity; it sits
    after them in the Trainer's callback list, so its on_train_begin runs after their setup."""
    from transformers import TrainerCallback

    class StageIdentity(TrainerCallback):
        def __init__(self):
            self.runs = runs  # alignkit.training.fit opens them before training and closes them after

        def on_train_begin(self, args, state, control, **kwargs):
            runs.on_hf_setup()

    return StageIdentity()
