"""Filtering (empty, duplicate) and seeded train/eval splitting, with counts for stage.json."""

from __future__ import annotations

import json
import random

from alignkit.errors import UserError


def _is_empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return not value or all(_is_empty(m.get("content") if isinstance(m, dict) else m) for m in value)
    return False


def _key(row: dict, columns: tuple[str, ...]) -> str:
    # default=str: rows from a dataset directory may hold values JSON has no type for.
    return json.dumps([row.get(c) for c in columns], sort_keys=True, default=str)


def filter_rows(rows: list[dict], columns: tuple[str, ...]) -> tuple[list[dict], dict]:
    """Drop rows whose content columns are empty, then exact duplicates; returns (kept, counts)."""
    kept, seen, empty, dup = [], set(), 0, 0
    for row in rows:
        if any(_is_empty(row.get(c)) for c in columns if c in row):
            empty += 1
            continue
        if "chosen" in columns and row.get("chosen") == row.get("rejected"):
            empty += 1  # a pair with the same response twice teaches nothing
            continue
        k = _key(row, columns)
        if k in seen:
            dup += 1
            continue
        seen.add(k)
        kept.append({k2: v for k2, v in row.items() if k2 != "_line"})
    return kept, {"rows_read": len(rows), "dropped_empty": empty, "dropped_duplicate": dup, "rows_kept": len(kept)}


def split_rows(rows: list[dict], eval_fraction: float, seed: int, *, key: str = "data.eval_fraction") -> tuple[list[dict], list[dict]]:
    """(train, eval): `eval_fraction` of the rows held out, seeded. `key` names the setting in errors."""
    from alignkit.data.sources import data_value_problem  # the one check of data: values

    problem = data_value_problem("eval_fraction", eval_fraction)
    if problem:
        raise UserError(f"{key}={eval_fraction!r} {problem}")
    if eval_fraction == 0:
        return rows, []
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    n_eval = max(1, round(len(rows) * eval_fraction))
    if n_eval >= len(rows):
        raise UserError(f"{key}={eval_fraction} leaves no training rows out of {len(rows)}")
    return shuffled[n_eval:], shuffled[:n_eval]
