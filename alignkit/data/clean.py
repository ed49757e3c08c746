"""Filtering (empty, duplicate) and seeded train/eval splitting, with counts for stage.json."""

from __future__ import annotations

import json
import random

from alignkit.data.io import without_location
from alignkit.data.keys import data_value_problem
from alignkit.errors import UserError


def is_empty(value) -> bool:
    """No text: None, blank text, or messages whose contents are all blank."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return not value or all(is_empty(m.get("content") if isinstance(m, dict) else m) for m in value)
    return False


def _key(row: dict, columns: tuple[str, ...]) -> str:
    # default=str: rows from a dataset directory may hold values JSON has no type for.
    return json.dumps([row.get(c) for c in columns], sort_keys=True, default=str)


def filter_rows(rows: list[dict], columns: tuple[str, ...], *, keep_location: bool = False) -> tuple[list[dict], dict]:
    """Drop rows whose content columns are empty, then exact duplicates; returns (kept, counts).

    Kept rows lose their location keys (`_line`, `_row`) unless `keep_location`, for a caller that still
    names rows in errors. Pairs with the same response twice are consistent_pairs' to count.
    """
    kept, seen, empty, dup = [], set(), 0, 0
    for row in rows:
        if any(is_empty(row.get(c)) for c in columns if c in row):
            empty += 1
            continue
        k = _key(row, columns)
        if k in seen:
            dup += 1
            continue
        seen.add(k)
        kept.append(dict(row) if keep_location else without_location(row))
    return kept, {"rows_read": len(rows), "dropped_empty": empty, "dropped_duplicate": dup, "rows_kept": len(kept)}


def split_rows(rows: list[dict], eval_fraction: float, seed: int, *, key: str = "data.eval_fraction") -> tuple[list[dict], list[dict]]:
    """(train, eval): `eval_fraction` of the rows held out, seeded. `key` names the setting in errors."""
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
