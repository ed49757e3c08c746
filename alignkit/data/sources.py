"""A stage's `data:` section turned into train / eval rows, with fingerprint and counts for stage.json.

Keys (a stage kind accepts a subset, its recipe's DATA_KEYS):
  train          JSONL file or saved HF dataset dir
  eval           JSONL file or dataset dir; otherwise eval_fraction of train is held out
  eval_fraction  share of train held out for evaluation (seeded)
  labels_db      a label store (SQLite path or PostgreSQL URL): preference rows exported from votes; the
                 store sits above this package, so alignkit.stage_data exports them and passes them in
  min_agreement, ties, both_bad   the store's export policy (see alignkit.store.export); both_bad:
                 undesirable (KTO only) keeps both-bad comparisons as two undesirable examples
  prompts        prompt dataset (PPO / RLOO / GRPO)

Errors name the stage's key (`stages.<name>.data.<key>`); alignkit.config checks the same values at load
time with the YAML line (data_value_problem), so these checks matter for callers that skip the config.
"""

from __future__ import annotations

import random
from pathlib import Path

from alignkit.artifacts import file_fingerprint, stable_hash
from alignkit.data.clean import filter_rows, split_rows
from alignkit.data.formats import check_prompt_rows, consistent_pairs, consistent_unpaired, sft_format, standard_sft_rows
from alignkit.data.io import load_rows, without_location
from alignkit.data.keys import both_set, missing_companions, value_problems
from alignkit.errors import UserError

SFT_COLUMNS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
def _name(stage: str | None, key: str = "") -> str:
    """The dotted name of a data key as the recipe spells it."""
    return (f"stages.{stage}.data" if stage else "data") + (f".{key}" if key else "")


def check_data(data: dict, stage: str | None) -> None:
    """Every value of a stage's `data:` section, before anything is read."""
    for key, problem in value_problems(data):
        raise UserError(f"{_name(stage, key)}{problem}")
    for first, second in both_set(data):
        raise UserError(f"{_name(stage)} sets both {first} and {second}; {second} would be ignored, remove one")
    for key, problem in missing_companions(data):
        raise UserError(f"{_name(stage, key)}{problem}")


def resampled(rows: list[dict], data: dict, seed: int) -> list[dict]:
    """With data.resample = k, the k-th seeded bootstrap resample of `rows` (as many rows, drawn with
    replacement): ensemble members trained on different resamples of one set of votes disagree where the
    votes leave the answer open, which is what uncertainty selection looks for."""
    if "resample" not in data:
        return rows
    rng = random.Random(f"resample-{seed}-{data['resample']}")
    return rng.choices(rows, k=len(rows))


def _require(data: dict, key: str, stage: str, alternative: str = "") -> str:
    if key not in data:
        raise UserError(f"{_name(stage, key)}{alternative} is required")
    return data[key]


def _eval_rows(data: dict, train: list[dict], seed: int, stage: str, prepare) -> tuple[list[dict], list[dict]]:
    """(train, eval): the `eval` rows through `prepare(rows, source) -> rows`, or eval_fraction of train."""
    if "eval" in data:
        rows = load_rows(data["eval"], what=f"stages.{stage}.data.eval")
        return train, prepare(rows, data["eval"])
    return split_rows(train, data.get("eval_fraction", 0.0), seed, key=f"stages.{stage}.data.eval_fraction")


def load_sft_split(data: dict, seed: int, stage: str) -> tuple[list[dict], list[dict], str, dict]:
    """(train, eval, format, info) for an SFT stage. ShareGPT and Alpaca rows arrive as `messages` rows
    (info's formats_read counts the shapes read). Rows keep their location keys (`_line` / `_row`) so that the
    recipe can still name a row it refuses; io.without_location drops them."""
    check_data(data, stage)
    source = _require(data, "train", stage)
    rows, formats = standard_sft_rows(load_rows(source, what=f"stages.{stage}.data.train"), source)
    fmt = sft_format(rows, source)
    rows, counts = filter_rows(rows, SFT_COLUMNS[fmt], keep_location=True)
    if not rows:
        raise UserError(f"{source}: no usable rows left after dropping empty and duplicate examples")

    def same_format(eval_rows, eval_source):
        # One SFT dataset format per stage: TRL tokenizes train and eval with the same settings.
        eval_rows, _ = standard_sft_rows(eval_rows, eval_source)
        eval_fmt = sft_format(eval_rows, eval_source)
        if eval_fmt != fmt:
            raise UserError(f"{eval_source}: stages.{stage}.data.eval rows are in the {eval_fmt!r} format but "
                            f"data.train rows are {fmt!r}; use one format for both")
        return eval_rows

    train, evals = _eval_rows(data, rows, seed, stage, same_format)
    info = {"train": str(source), "fingerprint": _fingerprint(data, stage), "format": fmt, "formats_read": formats,
            **counts, "train_rows": len(train), "eval_rows": len(evals)}
    return train, evals, fmt, info


def store_fingerprint(rows: list[dict], *, unpaired: bool) -> str:
    """A label store's export, hashed by the columns training reads (not vote counts or timestamps)."""
    columns = UNPAIRED_COLUMNS if unpaired else PREFERENCE_COLUMNS
    return stable_hash([{k: r.get(k) for k in columns} for r in rows])


def _preference_source(data: dict, stage: str, store_rows: list[dict] | None, *,
                       unpaired: bool) -> tuple[list[dict], str, str]:
    """(rows, source, fingerprint) from data.train or the rows exported from the label store."""
    if "labels_db" in data:
        rows = store_rows or []
        if not rows:
            raise UserError(f"stages.{stage}.data.labels_db: the label store {data['labels_db']} has no "
                            f"{'labeled responses' if unpaired else 'preference pairs'} to export yet")
        return rows, data["labels_db"], store_fingerprint(rows, unpaired=unpaired)
    source = _require(data, "train", stage, " (or labels_db)")
    return load_rows(source, what=f"stages.{stage}.data.train"), source, _fingerprint(data, stage)


def _pairs(rows: list[dict], source) -> tuple[list[dict], dict]:
    """Checked, consistently shaped pairs without empty or duplicate ones, and the counts (rows_read: the
    rows of the file; rows_kept plus every dropped_* count adds up to it)."""
    rows_read = len(rows)
    rows, shaped = consistent_pairs(rows, source)
    columns = PREFERENCE_COLUMNS + (("margin",) if rows and "margin" in rows[0] else ())
    rows, counts = filter_rows(rows, columns)
    counts = {**counts, **shaped, "rows_read": rows_read}
    if not rows:
        dropped = ", ".join(f"{k[len('dropped_'):]} {v}" for k, v in counts.items() if k.startswith("dropped_") and v)
        raise UserError(f"{source}: no usable pairs left of {rows_read} rows (dropped: {dropped})")
    return rows, counts


def load_preference_split(data: dict, seed: int, stage: str,
                          store_rows: list[dict] | None = None) -> tuple[list[dict], list[dict], dict]:
    """(train, eval, info) for DPO / reward stages, from a file, dataset dir or (data.labels_db) the rows
    exported from the label store, which alignkit.stage_data reads."""
    check_data(data, stage)
    rows, source, fingerprint = _preference_source(data, stage, store_rows, unpaired=False)
    rows, counts = _pairs(rows, source)
    train, evals = _eval_rows(data, rows, seed, stage, lambda r, s: _pairs(r, s)[0])
    train = resampled(train, data, seed)
    info = {"train": str(source), "fingerprint": fingerprint, **counts, "train_rows": len(train), "eval_rows": len(evals)}
    return train, evals, info


def _unpaired(rows: list[dict], source) -> tuple[list[dict], dict]:
    """KTO rows from unpaired rows or from pairs (each a desirable and an undesirable row, by TRL's
    unpair_preference_dataset), checked, shaped and without empty or duplicate ones, and the counts."""
    counts = {}
    if rows and isinstance(rows[0], dict) and "chosen" in rows[0]:
        from datasets import Dataset
        from trl.data_utils import unpair_preference_dataset

        pairs, counts = _pairs(rows, source)
        rows = unpair_preference_dataset(Dataset.from_list([{k: r[k] for k in PREFERENCE_COLUMNS} for r in pairs])).to_list()
        counts = {"pairs_kept": counts["rows_kept"], **{k: v for k, v in counts.items() if k != "rows_kept"}}
    rows, shaped = consistent_unpaired(rows, source)
    rows, filtered = filter_rows(rows, UNPAIRED_COLUMNS)
    if not rows:
        raise UserError(f"{source}: no usable rows left after dropping empty and duplicate ones")
    if counts:  # the pairs' counts describe what was read
        filtered = {"rows_kept": filtered["rows_kept"], "dropped_duplicate_unpaired": filtered["dropped_duplicate"]}
    return rows, {**counts, **filtered, **shaped}


def _split_by_prompt(rows: list[dict], fraction: float, seed: int, key: str) -> tuple[list[dict], list[dict]]:
    """split_rows over prompts: the responses to one prompt stay on one side (no eval prompt seen in training)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(stable_hash(r["prompt"]), []).append(r)
    train, evals = split_rows(list(groups.values()), fraction, seed, key=key)
    return [r for g in train for r in g], [r for g in evals for r in g]


def load_unpaired_split(data: dict, seed: int, stage: str,
                        store_rows: list[dict] | None = None) -> tuple[list[dict], list[dict], dict]:
    """(train, eval, info) for a KTO stage: prompt / completion / label rows from unpaired rows, preference
    pairs, or a label store (with both_bad: undesirable, both-bad comparisons count as two undesirable rows)."""
    check_data(data, stage)
    rows, source, fingerprint = _preference_source(data, stage, store_rows, unpaired=True)
    rows, counts = _unpaired(rows, source)
    if "eval" in data:
        train, evals = _eval_rows(data, rows, seed, stage, lambda r, s: _unpaired(r, s)[0])
    else:
        train, evals = _split_by_prompt(rows, data.get("eval_fraction", 0.0), seed, f"stages.{stage}.data.eval_fraction")
    # TRL's KTO reads rows in order and pairs each with its neighbour for the KL estimate: a pair's two rows side
    # by side (or all desirable rows first) would make that a same-prompt pair, so the order is shuffled (seeded).
    train, evals = resampled(train, data, seed), evals[:]
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(evals)
    desirable = sum(r["label"] for r in train)
    info = {"train": str(source), "fingerprint": fingerprint, **counts, "train_rows": len(train),
            "eval_rows": len(evals), "desirable_rows": desirable, "undesirable_rows": len(train) - desirable}
    return train, evals, info


def load_prompt_rows(data: dict, stage: str, key: str = "prompts") -> tuple[list[dict], dict]:
    check_data(data, stage)
    source = _require(data, key, stage)
    rows = load_rows(source, what=f"stages.{stage}.data.{key}")
    check_prompt_rows(rows, source)
    info = {key: str(source), "fingerprint": file_fingerprint(source), "rows": len(rows)}
    return [without_location(r) for r in rows], info


def _fingerprint(data: dict, stage: str | None = None) -> str:
    parts = {}
    for key in ("train", "eval", "prompts"):  # labels_db: data_fingerprint hashes its export
        if key in data and str(data[key]).startswith("hf:"):
            parts[key] = data[key]  # hub datasets are pinned by name (and the hub's own cache)
        elif key in data:
            # file_fingerprint hashes a missing path as an empty directory: say so instead.
            if not Path(data[key]).exists():
                raise UserError(f"{_name(stage, key)} file not found: {data[key]}")
            try:
                parts[key] = file_fingerprint(data[key])
            except OSError as err:
                raise UserError(f"{_name(stage, key)}: cannot read {data[key]}: {err.strerror}") from None
    return stable_hash(parts)


def data_fingerprint(data: dict, stage: str | None = None, store_rows: list[dict] | None = None) -> str:
    """Fingerprint of a stage's inputs for the skip logic (cheap: file contents, not parsing); with
    data.labels_db, of the rows exported from the store (`store_rows`, which change as people vote).
    Pass the stage name so that errors name `stages.<name>.data.<key>`."""
    check_data(data, stage)
    if "labels_db" in data:
        return store_fingerprint(store_rows or [], unpaired=data.get("both_bad") == "undesirable")
    return _fingerprint(data, stage)
