"""The keys of a stage's `data:` section and the one check of their values.

Shared by the loaders (alignkit.data.sources), the row cleaning (alignkit.data.clean) and the recipe config
(alignkit.config), which checks the same values at load time with their YAML line.
"""

from __future__ import annotations

import math

# What a preference stage (DPO, KTO, reward) reads: rows, or a label store under its export policy.
# rounds: only the label store's comparisons of those `alignkit loop` rounds; resample: train on the k-th seeded
# bootstrap resample of the training rows (a reward ensemble's member k).
PREFERENCE_DATA_KEYS = frozenset({"train", "eval", "eval_fraction", "labels_db", "min_agreement", "ties", "both_bad",
                                  "rounds", "resample"})
# The label store's export policies (alignkit.store.export takes these names): what ties and both-bad votes become.
POLICIES = ("drop", "ignore")
BOTH_BAD_POLICIES = POLICIES + ("undesirable",)  # undesirable: unpaired rows only
# Keys whose values are paths, dataset dirs, hf:NAME or store URLs.
PATH_KEYS = ("train", "eval", "prompts", "eval_prompts", "labels_db")
# The path keys whose contents data_fingerprint hashes (labels_db: the rows its export policy keeps).
FINGERPRINTED_KEYS = ("train", "eval", "prompts", "labels_db")
# Each pair names two ways to say one thing; with both set the loaders would silently use the first.
EXCLUSIVE_KEYS = (("labels_db", "train"), ("eval", "eval_fraction"))
POLICY_KEYS = ("min_agreement", "ties", "both_bad", "rounds")
# A key that means something only beside another one.
NEEDS_KEY = {"rounds": "labels_db"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def data_value_problem(key: str, value) -> str | None:
    """What is wrong with one `data:` value ("must be ..."), or None when it is fine (or not ours to judge)."""
    if key in PATH_KEYS:
        if not isinstance(value, str) or not value.strip():
            return "must be a path (a file, a dataset directory or hf:NAME)"
    elif key == "eval_fraction":
        if not (_is_number(value) and 0 <= value < 1):
            return "must be a number in [0, 1)"
    elif key == "min_agreement":
        if not (_is_number(value) and 0 <= value <= 1):
            return "must be a number in [0, 1]"
    elif key == "rounds":
        if not (isinstance(value, list) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in value)):
            return "must be a list of round numbers (integers >= 0)"
    elif key == "resample":
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return "must be an integer >= 0 (which bootstrap resample)"
    elif key in ("ties", "both_bad"):
        allowed = BOTH_BAD_POLICIES if key == "both_bad" else POLICIES
        if not isinstance(value, str) or value not in allowed:
            return f"must be one of {', '.join(allowed)}"
    return None


def value_problems(data: dict) -> list[tuple[str, str]]:
    """(key, "=VALUE must be ...") for each wrong value of a `data:` section, in the section's order."""
    return [(key, f"={value!r} {problem}") for key, value in data.items()
            for problem in [data_value_problem(key, value)] if problem]


def missing_companions(data: dict) -> list[tuple[str, str]]:
    """(key, " needs ...") for each key of NEEDS_KEY set without its companion."""
    return [(key, f" needs {needed}: it selects among the label store's comparisons")
            for key, needed in NEEDS_KEY.items() if key in data and needed not in data]


def both_set(data: dict) -> list[tuple[str, str]]:
    """The pairs of EXCLUSIVE_KEYS a `data:` section sets both of."""
    return [(first, second) for first, second in EXCLUSIVE_KEYS if first in data and second in data]
