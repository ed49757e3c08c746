"""The demo's data files and its recipe: SFT rows and prompts from the sentiment task, the template made concrete."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

import recipes
from alignkit.tasks import sentiment
from demo.settings import DemoSettings

TEMPLATE = Path(recipes.__file__).resolve().parent / "configs" / "demo" / "demo.yaml"


def write_text_if_changed(path: Path, text: str) -> None:
    """Write `text` unless the file already holds exactly it (so fingerprints and mtimes stay put)."""
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_jsonl_if_changed(path: Path, rows: list[dict]) -> None:
    write_text_if_changed(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_data(workdir: Path, s: DemoSettings) -> None:
    data = workdir / "data"
    _write_jsonl_if_changed(data / "sft.jsonl", sentiment.sft_rows(s.sft_rows, seed=s.seed))
    _write_jsonl_if_changed(data / "prompts_train.jsonl", [{"prompt": p} for p in sentiment.prompts("train")])
    _write_jsonl_if_changed(data / "prompts_eval.jsonl", [{"prompt": p} for p in eval_prompts(s)])


def eval_prompts(s: DemoSettings) -> list[str]:
    prompts = sentiment.prompts("eval")
    return prompts[: s.eval_prompts] if s.eval_prompts else prompts


def write_recipe(workdir: Path, base: Path, overrides: list[str]) -> Path:
    """The template with the pretrained model as base and the settings' overrides applied, as workdir/recipe.yaml."""
    from alignkit.config import apply_override

    raw = yaml.safe_load(TEMPLATE.read_text())
    raw["model"]["base"] = str(base)
    for item in overrides:
        apply_override(raw, item)
    header = (f"# Written by `alignkit demo` from {TEMPLATE.relative_to(TEMPLATE.parents[3])}"
              f"{' with ' + ', '.join(overrides) if overrides else ''}.\n"
              f"# Re-run by hand: alignkit run {workdir / 'recipe.yaml'}\n")
    path = workdir / "recipe.yaml"
    write_text_if_changed(path, header + yaml.safe_dump(raw, sort_keys=False))
    # The runner fingerprints every stage's data up front, and the preference data does not exist until the
    # labels are in: the SFT stage runs from a copy holding only it (same stage, so the same hash and directory).
    sft_only = dict(raw, stages=[st for st in raw["stages"] if st["name"] == "sft"])
    write_text_if_changed(workdir / "recipe.sft.yaml", "# The SFT stage of recipe.yaml alone (run before labeling).\n"
                          + yaml.safe_dump(sft_only, sort_keys=False))
    return path
