"""A stage's `data:` section read from wherever it points: files and datasets through alignkit.data.sources,
a label store (`data.labels_db`) through alignkit.store.export.

This module sits above both packages so that neither imports the other's way: the store builds on
alignkit.data's row formats, and alignkit.data never reaches up into the store. Recipes and the config
hash read preference and unpaired data through here; SFT and prompt data never come from a store and
are read from alignkit.data.sources directly.
"""

from __future__ import annotations

from alignkit.data import sources
from alignkit.data.keys import POLICY_KEYS
from alignkit.errors import UserError
from alignkit.store.export import preference_rows, unpaired_rows


def store_rows(data: dict, stage: str | None, *, unpaired: bool) -> list[dict] | None:
    """The rows exported from data.labels_db under the stage's policy keys, or None without a store."""
    if "labels_db" not in data:
        return None
    policy = {k: data[k] for k in POLICY_KEYS if k in data}
    if not unpaired and policy.get("both_bad") == "undesirable":
        where = f"stages.{stage}.data.both_bad" if stage else "data.both_bad"
        raise UserError(f"{where}=undesirable makes unpaired examples, which only a kto stage trains on; "
                        f"use drop or ignore")
    return (unpaired_rows if unpaired else preference_rows)(data["labels_db"], **policy)


def load_preference_split(data: dict, seed: int, stage: str) -> tuple[list[dict], list[dict], dict]:
    """(train, eval, info) for reward / DPO-family stages (alignkit.data.sources.load_preference_split)."""
    sources.check_data(data, stage)
    return sources.load_preference_split(data, seed, stage, store_rows(data, stage, unpaired=False))


def load_unpaired_split(data: dict, seed: int, stage: str) -> tuple[list[dict], list[dict], dict]:
    """(train, eval, info) for a KTO stage (alignkit.data.sources.load_unpaired_split)."""
    sources.check_data(data, stage)
    return sources.load_unpaired_split(data, seed, stage, store_rows(data, stage, unpaired=True))


def data_fingerprint(data: dict, stage: str | None = None) -> str:
    """A stage's data fingerprint for the skip logic. Only a kto stage may say both_bad: undesirable (the
    other loaders refuse it), so that setting alone says the store's rows are read unpaired."""
    sources.check_data(data, stage)
    unpaired = data.get("both_bad") == "undesirable"
    return sources.data_fingerprint(data, stage, store_rows(data, stage, unpaired=unpaired))
