"""What bench_ppo_peer needs before either side runs: TRL 0.29.1's environment and the models both sides start from.

The peer environment is a separate virtual environment (cached, the project's own untouched) holding TRL 0.29.1,
the last TRL with a PPOTrainer (trl.experimental.ppo), and the releases it shipped beside: TRL 0.29.1 was
published 2026-03-20; the newest transformers, peft, accelerate, bitsandbytes and datasets released before that
day are pinned below. torch is the CPU build already on disk (2.13.0), since an unpinned torch pulls CUDA wheels.

The models: the demo's SFT and reward stages, built with the demo's own functions in the benchmark's workdir;
for TRL they are merged (alignkit.merge) into the plain checkpoints its example script loads: the SFT policy
as a causal LM, the reward stage as a one-label sequence classifier (its LoRA chain + score head).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "bench_ppo_peer"


@dataclass(frozen=True)
class PeerPins:
    """Versions of the peer environment (the newest of each released before TRL 0.29.1, 2026-03-20)."""

    trl: str = "0.29.1"
    transformers: str = "5.3.0"  # 2026-03-04; 5.4.0 came 2026-03-27
    peft: str = "0.18.1"  # 2026-01-09; 0.19.0 came 2026-04-14
    accelerate: str = "1.13.0"  # 2026-03-04
    bitsandbytes: str = "0.49.2"  # 2026-02-16
    datasets: str = "4.8.2"  # 2026-03-17
    torch: str = "2.13.0"  # the local CPU wheel, as the project's

    def requirements(self) -> list[str]:
        return [f"{name}=={version}" for name, version in asdict(self).items()]

    def describe(self) -> str:
        return ", ".join(f"{name} {version}" for name, version in asdict(self).items())


PINS = PeerPins()


def peer_venv_dir(root: Path | None = None) -> Path:
    return (root or RUNS) / f"venv-trl-{PINS.trl}"


def peer_python(root: Path | None = None) -> Path | None:
    """The peer environment's interpreter if the environment is complete with these pins, else None."""
    venv = peer_venv_dir(root)
    marker = venv / "alignkit_pins.json"
    python = venv / "bin" / "python"
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == asdict(PINS):
        return python
    return None


def ensure_peer_venv(root: Path | None = None, log=print) -> Path:
    """Create (once) the peer environment from the registry; returns its interpreter."""
    found = peer_python(root)
    if found:
        return found
    venv = peer_venv_dir(root)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log(f"creating {venv} with {PINS.describe()} (a few minutes, once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *PINS.requirements(), "psutil", "pyyaml"], check=True)
    # The marker goes last: an environment without it is rebuilt, never half-used.
    (venv / "alignkit_pins.json").write_text(json.dumps(asdict(PINS)))
    return venv / "bin" / "python"


def peer_versions(python: Path) -> str:
    """The peer environment's library versions as installed (what RESULTS.md records)."""
    code = ("from importlib.metadata import version as v; print(', '.join(f'{n} {v(n)}' for n in "
            "('trl', 'transformers', 'peft', 'accelerate', 'bitsandbytes', 'torch')))")
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@dataclass(frozen=True)
class DemoModels:
    """The demo's stages and their merged forms: what both PPO sides start from."""

    workdir: Path
    recipe: Path
    sft_stage: Path
    reward_stage: Path
    sft_merged: Path  # causal LM: TRL's policy (4-bit + fresh LoRA) and, adapter disabled, its reference
    reward_merged: Path  # one-label sequence classifier: TRL's reward model and its value model's start
    prompts: Path
    eval_prompts: Path


def prepare_demo(workdir: Path, quick: bool, log=print) -> DemoModels:
    """The demo's SFT and reward stages (reused when complete), via the demo's own functions, then merged."""
    from demo.data import write_data, write_recipe
    from demo.labeling import label_pairs
    from demo.settings import DemoSettings, quiet_libraries
    from recipes.runner import run_recipe

    from alignkit.tasks.pretrain import pretrained_tiny_model

    settings = DemoSettings.quick() if quick else DemoSettings()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    base = pretrained_tiny_model(None, settings.pretrain, log=log)
    write_data(workdir, settings)
    recipe = write_recipe(workdir, base, settings.recipe_overrides)
    records = run_recipe(recipe.with_name("recipe.sft.yaml"), log=log)
    label_pairs(workdir, workdir / "run" / "sft", records["sft"]["config_hash"], settings, log=log)
    run_recipe(recipe, only=["reward"], log=log)
    models = DemoModels(workdir, recipe, workdir / "run" / "sft", workdir / "run" / "reward",
                        workdir / "merged" / "sft", workdir / "merged" / "reward",
                        workdir / "data" / "prompts_train.jsonl", workdir / "data" / "prompts_eval.jsonl")
    merge_stages(models, log=log)
    return models


def merge_stages(models: DemoModels, log=print) -> None:
    """SFT and reward stages as full float32 checkpoints; redone when a stage's adapter changed."""
    import shutil

    from alignkit.artifacts import file_fingerprint
    from alignkit.merge import merge_model

    for stage, out in ((models.sft_stage, models.sft_merged), (models.reward_stage, models.reward_merged)):
        key = file_fingerprint(stage / "adapter_model.safetensors")
        marker = out / "alignkit_merge.json"
        if marker.exists() and json.loads(marker.read_text()).get("adapter_sha256") == key:
            continue
        shutil.rmtree(out, ignore_errors=True)
        merge_model(str(stage), out, dtype="float32", log=log)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="prepare bench_ppo_peer's environment and models")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--venv", action="store_true", help="create the peer environment too")
    a = p.parse_args()
    if a.venv:
        print(ensure_peer_venv())
    print(prepare_demo(RUNS / ("demo-quick" if a.quick else "demo"), a.quick))
