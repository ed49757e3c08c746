"""A stage's config hash: what decides whether a complete stage still describes the recipe.

The hash covers the stage's kind, the model and PEFT settings, the seed, its data (by content, through
alignkit.stage_data.data_fingerprint), the train settings that change the weights, and its parents'
hashes, so changing one stage re-runs it and everything after it, nothing else.

Invariants:
- Moving the project retrains nothing: data is hashed by content, and a local `model.base` inside the
  recipe's directory by its path relative to the recipe.
- Logging, saving and eval-schedule settings (BOOKKEEPING_TRAIN_KEYS) retrain nothing.
- stage.json records `hash_formula`. A stage completed under an older formula (its stage.json has none)
  is recognised once by `recorded_under_old_formula` and its record upgraded by the runner, so the old
  formulas are computed only for such stages, never on a run whose stages all carry the current one.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from alignkit.artifacts import stable_hash
from alignkit.config import RecipeConfig, StageConfig
from alignkit.data.keys import FINGERPRINTED_KEYS
from alignkit.stage_data import data_fingerprint

HASH_FORMULA = 3

# Settings that change what is logged, saved or evaluated, never the trained weights: changing them
# must not retrain a stage (unless the best checkpoint is loaded at the end, when eval and save pick it).
BOOKKEEPING_TRAIN_KEYS = frozenset({
    "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "save_steps",
    "save_strategy", "save_total_limit", "save_only_model", "eval_steps", "eval_strategy", "eval_on_start",
    "per_device_eval_batch_size", "eval_accumulation_steps", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "disable_tqdm", "sample_log_count",
})


def hashed_train_settings(train: dict) -> dict:
    if train.get("load_best_model_at_end"):
        return dict(train)
    return {k: v for k, v in train.items() if k not in BOOKKEEPING_TRAIN_KEYS}


def portable_base(cfg: RecipeConfig) -> str:
    """model.base as hashed: a local directory inside the recipe's directory relative to it (the project moves
    with it; its weights are not hashed, like compare's identity it would take minutes), one outside as its
    absolute path (it stays where it is when the project moves), a hub id or alignkit-tiny as given."""
    base = Path(cfg.model.base)
    if base.is_absolute() and base.exists():
        relative = os.path.relpath(base, cfg.path.resolve().parent)
        if not relative.startswith(".."):
            return relative
    return cfg.model.base


def fingerprints(stages: list[StageConfig]) -> dict[str, str]:
    """Each stage's data fingerprint, read once per run (it hashes the data files' contents)."""
    return {stage.name: data_fingerprint(stage.data, stage.name) for stage in stages}


def config_hashes(cfg: RecipeConfig, ordered: list[StageConfig], fingerprint: dict[str, str],
                  formula: int = HASH_FORMULA) -> dict[str, str]:
    """Every stage's hash under `formula`, parents first (`ordered` is dependency order)."""
    hashes: dict[str, str] = {}
    for stage in ordered:
        parents = {role: hashes[ref] for role, ref in stage.references().items()}
        hashes[stage.name] = stable_hash(_hashed(cfg, stage, fingerprint[stage.name], parents, formula))
    return hashes


def _hashed(cfg: RecipeConfig, stage: StageConfig, fingerprint: str, parents: dict[str, str], formula: int) -> dict:
    """What formula `formula` hashes. Formula 1 held data paths and every train key; formula 2 held a local
    `model.base` as an absolute path; formula 3 (the current one) holds neither."""
    model = dataclasses.asdict(cfg.model)
    # Paths whose contents the fingerprint holds are left out: a moved project is not retrained.
    data = {k: v for k, v in stage.data.items() if k not in FINGERPRINTED_KEYS or str(v).startswith("hf:")}
    train = hashed_train_settings(stage.train)
    if formula == 1:
        data, train = stage.data, stage.train
    if formula == HASH_FORMULA:
        model = {**model, "base": portable_base(cfg)}
    return {"kind": stage.kind, "peft": dataclasses.asdict(cfg.peft), "seed": cfg.seed, "data_fingerprint": fingerprint,
            "model": model, "data": data, "train": train, "parents": parents}


def recorded_under_old_formula(cfg: RecipeConfig, ordered: list[StageConfig], fingerprint: dict[str, str],
                               records: dict[str, dict | None]) -> set[str]:
    """The complete stages whose stage.json carries no formula and whose hash is this config's under an older
    one: complete, and to be upgraded to the current formula. Computes the old formulas only when such a
    record exists."""
    unversioned = {name for name, record in records.items()
                   if record and record.get("complete") and "hash_formula" not in record}
    if not unversioned:
        return set()
    old = [config_hashes(cfg, ordered, fingerprint, formula) for formula in range(1, HASH_FORMULA)]
    return {name for name in unversioned if any(records[name].get("config_hash") == hashes[name] for hashes in old)}
