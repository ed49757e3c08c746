"""Shared fixtures: an isolated model cache and the tiny model, built once per session.

Area-specific fixtures live in their own modules (tests/_pg.py, tests/_labeling_server.py, ...).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "configs" / "tiny_sft_dpo.yaml"


@pytest.fixture(scope="session", autouse=True)
def alignkit_cache(tmp_path_factory):
    """Every test builds models into a throwaway cache: `alignkit-tiny` resolves there."""
    cache = tmp_path_factory.mktemp("alignkit-cache")
    old = os.environ.get("ALIGNKIT_CACHE")
    os.environ["ALIGNKIT_CACHE"] = str(cache)
    os.environ.setdefault("TQDM_DISABLE", "1")
    yield cache
    if old is None:
        os.environ.pop("ALIGNKIT_CACHE", None)
    else:
        os.environ["ALIGNKIT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(alignkit_cache) -> Path:
    from alignkit.tiny import build_tiny_model, default_tiny_dir

    return build_tiny_model(default_tiny_dir())


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write a copy of the tiny SFT -> DPO recipe into tmp_path; returns a function taking edits."""

    def make(edit=None, name="recipe.yaml") -> Path:
        raw = yaml.safe_load(TINY_RECIPE.read_text())
        raw["run_dir"] = str(tmp_path / "run")
        for stage in raw["stages"]:
            for key in ("train", "eval"):
                if key in stage["data"]:
                    stage["data"][key] = str((TINY_RECIPE.parent / stage["data"][key]).resolve())
        if edit:
            edit(raw)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return make


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
