"""Scale-out: stages launched through `accelerate launch` with 2 CPU processes (gloo), runner in one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignkit.artifacts import read_stage
from alignkit.generation import SamplingParams, generate_from_spec

REPO = Path(__file__).resolve().parents[1]
ACCEL = REPO / "recipes" / "configs" / "accelerate"


@pytest.mark.parametrize("path", sorted(ACCEL.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in {"MULTI_GPU", "DEEPSPEED", "FSDP"}
    assert cfg["num_processes"] >= 2
    assert path.read_text().startswith("#") and "--launcher accelerate" in path.read_text()


@pytest.mark.slow
def test_two_process_data_parallel_chain(tiny_recipe, tiny_model_dir):
    def small(raw):
        raw["stages"][0]["train"]["max_steps"] = 4
        raw["stages"][1]["train"]["max_steps"] = 2

    path = tiny_recipe(small)
    out = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "run", str(path), "--launcher", "accelerate",
         "--accelerate-config", str(ACCEL / "cpu_2proc.yaml")],
        capture_output=True, text=True, env=os.environ.copy(), timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("sft", "dpo"):
        stage = read_stage(path.parent / "run" / name)
        assert stage["complete"] and stage["data"]["world_size"] == 2
    texts = generate_from_spec(str(path.parent / "run" / "dpo"), ["Describe the plot?"], SamplingParams(max_new_tokens=4, temperature=0))
    assert len(texts) == 1
