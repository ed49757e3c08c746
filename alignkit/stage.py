"""The stage contract: what a stage kind declares, what its recipe receives, and what it hands back.

A stage recipe (one module per kind under `recipes/`) satisfies `StageRecipe`:

    KIND: StageKind                        its facts: TRL config class, data keys, the parents it accepts
    load_data(stage) -> prepared data      read and checked before any stage directory is touched
    train_config(stage) -> TRL config      built once by the runner's preflight, kept on the StageRun
    run(stage) -> StageResult              train into stage.stage_dir

Dependencies point one way. Recipes import this module and declare their `KIND`; the runner hands those
declarations to `alignkit.config.load_recipe`, which validates every kind fact (which `data:` and `train:`
keys a kind takes, which stages `after:` and `reward:` may name, what IA3 cannot continue) from them, so no
library module imports `recipes/` and no kind fact is written down twice.

Invariants:
- A StageRun is built by the runner, never by a recipe; `prepared` and `args` are filled by the runner's
  preflight, so a recipe's run() never re-reads data or rebuilds its config.
- A parent in `StageRun.parents` is a complete stage directory by the time run() is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from alignkit.errors import UserError
from alignkit.modeling import ModelSettings, PeftSettings
from alignkit.tracking import Reporting

# Train keys alignkit sets itself: checkpoints and TensorBoard logs go into the stage directory.
MANAGED_TRAIN_KEYS = ("output_dir", "report_to", "run_name", "project", "logging_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id")

# A policy is what a later stage can start from; a reward stage's output is a scorer; an eval stage's a report.
Output = Literal["policy", "reward", "report"]


@dataclass(frozen=True)
class StageKind:
    """What the runner and config validation know about a kind, declared once by its recipe module."""

    name: str
    config_class: type  # the dataclass whose fields are the kind's `train:` keys (TRL's SFTConfig, ...)
    data_keys: frozenset[str]
    output: Output = "policy"
    # The kinds `after:` may name: "policy" for any kind whose output is a policy, "any" for every kind.
    after: tuple[str, ...] | Literal["policy", "any"] = "policy"
    takes_reward: bool = False  # scores rollouts with the reward stage `reward:` names
    reward_required: bool = True  # with takes_reward: False where `reward:` may be left out (eval)
    reward_ensemble: bool = False  # `reward:` may list several reward stages, scored as mean - lambda * std
    # TRL builds the reference by copying the parent adapter's `.default.` parameters; IA3 names its own
    # `ia3_l.default`, so under IA3 the reference would silently be the base, not the parent.
    copies_parent_as_reference: bool = False

    def accepts_after(self, parent: StageKind) -> bool:
        if self.after == "any":
            return True
        if self.after == "policy":
            return parent.output == "policy"
        return parent.name in self.after

    def required_data(self) -> tuple[str, ...]:
        """The data keys one of which must be given: train rows (or a label store), else prompts."""
        rows = tuple(k for k in ("train", "labels_db") if k in self.data_keys)
        return rows or tuple(k for k in ("prompts",) if k in self.data_keys)


@dataclass
class RowSplit:
    """Train and eval rows of a preference or KTO stage, with the counts stage.json records."""

    train: list[dict]
    eval: list[dict]
    info: dict


@dataclass
class PromptSet:
    """The prompts an online stage (PPO, RLOO, GRPO) samples from, with the counts stage.json records."""

    rows: list[dict]
    info: dict


@dataclass
class StageResult:
    """What run() hands back to the runner for stage.json."""

    metrics: dict
    data: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)


@dataclass
class StageRun:
    """Everything a recipe's run() needs; built by the runner, never by the recipe."""

    name: str
    kind: str
    stage_dir: Path
    model: ModelSettings
    peft: PeftSettings
    data: dict
    train: dict
    parents: dict[str, Path]  # role ("after", "reward") -> complete stage directory
    seed: int
    config_hash: str = ""
    resume_from: Path | None = None
    prepared: Any = None  # what the recipe's load_data returned (SftData, RowSplit or PromptSet)
    args: Any = None  # what the recipe's train_config returned, built once in preflight
    report: Reporting = field(default_factory=Reporting)  # trackers, identity on them, completion samples


class StageRecipe(Protocol):
    """A recipe module: `recipes/<kind>.py`."""

    KIND: StageKind

    def load_data(self, stage: StageRun) -> Any: ...

    def train_config(self, stage: StageRun) -> Any: ...

    def run(self, stage: StageRun) -> StageResult: ...


@dataclass
class Parents:
    """A stage's parents as checked before it trains: the policy it starts from and the reward it scores with."""

    policy: Path | None
    reward: Path | None
    info: dict
    more_rewards: list[Path] = field(default_factory=list)  # an ensemble's members after `reward`

    def rewards(self) -> list[Path]:
        return [r for r in (self.reward, *self.more_rewards) if r is not None]


def check_parents(stage: StageRun, kind: StageKind, *, min_reward_accuracy: float = 0.0) -> Parents:
    """The one check of a stage's parents against its kind, read from their stage.json: `after:` names a
    kind this one accepts, `reward:` a complete reward stage whose held-out accuracy passes the gate.
    The config checks the same from the YAML; this catches a stage directory that says otherwise."""
    from alignkit.artifacts import read_stage

    info: dict = {}
    policy = stage.parents.get("after")
    if policy is not None:
        parent_kind = (read_stage(policy) or {}).get("kind")
        if kind.after not in ("policy", "any") and parent_kind not in kind.after:
            raise UserError(f"stage {stage.name}: after: {policy.name} is a {parent_kind!r} stage; a {kind.name} "
                            f"stage starts from a policy stage ({' or '.join(kind.after)})")
        info["policy_from"] = str(policy)
    reward = stage.parents.get("reward")
    more = [stage.parents[f"reward_{k}"] for k in range(1, len(stage.parents)) if f"reward_{k}" in stage.parents]
    if kind.takes_reward and (reward is not None or kind.reward_required):
        if reward is None:
            raise UserError(f"stage {stage.name}: a {kind.name} stage needs `reward:` naming a stage of kind reward")
        accuracies = [_gated_accuracy(stage, r, min_reward_accuracy) for r in (reward, *more)]
        info.update(reward_from=str(reward), reward_heldout_accuracy=accuracies[0])
        if more:
            info.update(reward_ensemble=[str(r) for r in (reward, *more)], reward_ensemble_accuracies=accuracies)
    return Parents(policy=policy, reward=reward, info=info, more_rewards=more)


def _gated_accuracy(stage: StageRun, reward: Path, min_reward_accuracy: float) -> float | None:
    """A reward parent's held-out accuracy, refused below the gate (UserError unless a complete reward stage)."""
    from alignkit.reward_model import heldout_accuracy, read_reward_stage

    accuracy = heldout_accuracy(read_reward_stage(reward))
    if below_gate(accuracy, min_reward_accuracy):
        shown = "no held-out accuracy" if accuracy is None else f"held-out accuracy {accuracy:.3f}"
        raise UserError(f"stage {stage.name}: reward stage {reward.name} reports {shown}, below "
                        f"min_reward_accuracy {min_reward_accuracy}; training against it would be wasted "
                        "compute (train a better reward model, or set train.min_reward_accuracy: 0)")
    return accuracy


def below_gate(accuracy: float | None, min_accuracy: float) -> bool:
    """A gate of 0 is off; otherwise an unknown accuracy fails it, like one under the bar."""
    return min_accuracy > 0 and (accuracy is None or accuracy < min_accuracy)


def min_reward_accuracy_field():
    """The `min_reward_accuracy` train key of every kind that takes `reward:` (PPO, RLOO, GRPO)."""
    return field(default=0.6, metadata={"help": "refuse to start unless the reward stage's held-out accuracy is "
                                                "at least this (0 disables the gate)"})
