"""A stage's `data:` section turned into train / eval rows, with fingerprint and counts for stage.json.

Keys (a stage kind accepts a subset, its recipe's DATA_KEYS):
  train          JSONL file or saved HF dataset dir
  eval           JSONL file or dataset dir; otherwise eval_fraction of train is held out
  eval_fraction  share of train held out for evaluation (seeded)
  labels_db      a label store (SQLite path or PostgreSQL URL): preference rows exported from votes
  min_agreement, ties, both_bad   the store's export policy (see alignkit.store.export)
  prompts        prompt dataset (PPO / RLOO / GRPO)
"""

from __future__ import annotations

from alignkit.artifacts import file_fingerprint, stable_hash
from alignkit.data.clean import filter_rows, split_rows
from alignkit.data.formats import check_preference_rows, check_prompt_rows, sft_format
from alignkit.data.io import load_rows
from alignkit.errors import UserError

SFT_COLUMNS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def _require(data: dict, key: str, stage: str) -> str:
    if key not in data:
        raise UserError(f"stage {stage}: data.{key} is required")
    return data[key]


def _eval_rows(data: dict, train: list[dict], seed: int, check) -> tuple[list[dict], list[dict]]:
    if "eval" in data:
        rows = load_rows(data["eval"], what="data.eval")
        check(rows, data["eval"])
        return train, rows
    return split_rows(train, float(data.get("eval_fraction", 0.0)), seed)


def load_sft_split(data: dict, seed: int, stage: str) -> tuple[list[dict], list[dict], str, dict]:
    """(train, eval, format, info) for an SFT stage."""
    source = _require(data, "train", stage)
    rows = load_rows(source, what="data.train")
    fmt = sft_format(rows, source)
    rows, counts = filter_rows(rows, SFT_COLUMNS[fmt])
    if not rows:
        raise UserError(f"{source}: no usable rows left after dropping empty and duplicate examples")
    train, evals = _eval_rows(data, rows, seed, lambda r, s: sft_format(r, s) == fmt or None)
    evals = [{k: v for k, v in r.items() if k != "_line"} for r in evals]
    info = {"train": str(source), "fingerprint": _fingerprint(data), "format": fmt, **counts,
            "train_rows": len(train), "eval_rows": len(evals)}
    return train, evals, fmt, info


def load_preference_split(data: dict, seed: int, stage: str) -> tuple[list[dict], list[dict], dict]:
    """(train, eval, info) for DPO / reward stages, from a file, dataset dir or label store."""
    if "labels_db" in data:
        try:
            from alignkit.store.export import preference_rows
        except ImportError:
            raise UserError(f"stage {stage}: data.labels_db needs the label store (alignkit.store)") from None
        policy = {k: data[k] for k in ("min_agreement", "ties", "both_bad") if k in data}
        rows = preference_rows(data["labels_db"], **policy)
        source = data["labels_db"]
        if not rows:
            raise UserError(f"stage {stage}: the label store {source} has no preference pairs to export yet")
        fingerprint = stable_hash([{k: r.get(k) for k in PREFERENCE_COLUMNS} for r in rows])
    else:
        source = _require(data, "train", stage)
        rows = load_rows(source, what="data.train")
        fingerprint = _fingerprint(data)
    check_preference_rows(rows, source)
    columns = PREFERENCE_COLUMNS + (("margin",) if "margin" in rows[0] else ())
    rows, counts = filter_rows(rows, columns)
    if not rows:
        raise UserError(f"{source}: no usable pairs left after dropping empty and duplicate ones")
    train, evals = _eval_rows(data, rows, seed, check_preference_rows)
    evals = [{k: v for k, v in r.items() if k != "_line"} for r in evals]
    info = {"train": str(source), "fingerprint": fingerprint, **counts, "train_rows": len(train), "eval_rows": len(evals)}
    return train, evals, info


def load_prompt_rows(data: dict, stage: str, key: str = "prompts") -> tuple[list[dict], dict]:
    source = _require(data, key, stage)
    rows = load_rows(source, what=f"data.{key}")
    check_prompt_rows(rows, source)
    info = {key: str(source), "fingerprint": file_fingerprint(source), "rows": len(rows)}
    return [{k: v for k, v in r.items() if k != "_line"} for r in rows], info


def _fingerprint(data: dict) -> str:
    parts = {}
    for key in ("train", "eval", "prompts"):
        if key in data and str(data[key]).startswith("hf:"):
            parts[key] = data[key]  # hub datasets are pinned by name (and the hub's own cache)
        elif key in data:
            try:
                parts[key] = file_fingerprint(data[key])
            except FileNotFoundError:
                raise UserError(f"data.{key} file not found: {data[key]}") from None
    return stable_hash(parts)


def data_fingerprint(data: dict) -> str:
    """Fingerprint of a stage's inputs for the skip logic (cheap: file contents, not parsing)."""
    if "labels_db" in data:
        # Store contents change as people vote; the export is hashed when the stage runs.
        try:
            from alignkit.store.export import preference_rows

            policy = {k: data[k] for k in ("min_agreement", "ties", "both_bad") if k in data}
            rows = preference_rows(data["labels_db"], **policy)
            return stable_hash([{k: r.get(k) for k in PREFERENCE_COLUMNS} for r in rows])
        except ImportError:
            return "labels_db"
    return _fingerprint(data)
