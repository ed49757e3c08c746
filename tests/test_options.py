"""The settings users reach for — PEFT methods, quantization, packing, optimizers, data formats — really train."""

import json

import pytest
from safetensors.torch import load_file

from alignkit.artifacts import read_stage
from recipes.runner import run_recipe


def _sft_only(raw, **train):
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0]["train"].update(max_steps=3, **train)


def _adapter(stage_dir):
    return load_file(str(stage_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "overrides, check",
    [
        (["peft.method=dora"], "lora"),
        (["peft.method=ia3"], "ia3"),
        (["peft.method=prompt_tuning"], "prompt"),
        (["model.quantization=8bit"], "lora"),
        (["model.quantization=none"], "lora"),
        (["model.quantization=none", "peft.method=full"], "full"),
        (["stages.sft.train.packing=true"], "lora"),
        (["stages.sft.train.optim=paged_adamw_8bit"], "lora"),
        (["stages.sft.train.gradient_checkpointing=true"], "lora"),
    ],
    ids=lambda v: "+".join(v) if isinstance(v, list) else v,
)
def test_sft_variants_train(tiny_recipe, tiny_model_dir, overrides, check):
    path = tiny_recipe(_sft_only)
    run_recipe(path, overrides, log=lambda *_: None)
    stage_dir = path.parent / "run" / "sft"
    stage = read_stage(stage_dir)
    assert stage["complete"] and stage["metrics"]["global_step"] == 3
    if check == "lora":
        w = _adapter(stage_dir)
        assert sum(v.float().norm() for k, v in w.items() if "lora_B" in k) > 0
    elif check == "ia3":
        w = _adapter(stage_dir)
        assert any(((v.float() - 1).abs() > 0).any() for v in w.values())  # IA3 vectors start at 1
    elif check == "prompt":
        assert "prompt_embeddings" in _adapter(stage_dir)
    elif check == "full":
        base = load_file(str(tiny_model_dir / "model.safetensors"))
        tuned = load_file(str(stage_dir / "model.safetensors"))
        assert any(not base[k].equal(tuned[k]) for k in base)


def test_prompt_completion_and_dataset_dir_inputs(tiny_recipe, tmp_path, tiny_model_dir):
    import datasets

    rows = [{"prompt": f"Describe the film {i}?", "completion": f" the film was good {i}."} for i in range(16)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "pc_dataset"))
    path = tiny_recipe(lambda raw: (_sft_only(raw), raw["stages"][0]["data"].update(train=str(tmp_path / "pc_dataset"))))
    run_recipe(path, log=lambda *_: None)
    stage = read_stage(path.parent / "run" / "sft")
    assert stage["data"]["format"] == "prompt_completion" and stage["data"]["loss_on"] == "completion tokens"
    assert stage["data"]["rows_kept"] == 16


def test_full_finetune_chain_dpo_from_full_sft(tiny_recipe, tiny_model_dir):
    def edit(raw):
        raw["stages"][0]["train"]["max_steps"] = 2
        raw["stages"][1]["train"]["max_steps"] = 2

    path = tiny_recipe(edit)
    run_recipe(path, ["model.quantization=none", "peft.method=full"], log=lambda *_: None)
    dpo = read_stage(path.parent / "run" / "dpo")
    assert dpo["complete"] and dpo["data"]["initialized_from"].endswith("sft")
    assert (path.parent / "run" / "dpo" / "model.safetensors").exists()


def test_truncation_is_reported(tiny_recipe, tiny_model_dir):
    path = tiny_recipe(lambda raw: _sft_only(raw, max_length=12))
    run_recipe(path, log=lambda *_: None)
    data = read_stage(path.parent / "run" / "sft")["data"]
    assert data["max_length"] == 12 and data["rows_truncated"] > 0 and data["longest_tokens"] > 12


@pytest.mark.parametrize("loss", [["ipo"], ["sigmoid", "sft"]], ids=lambda l: "+".join(l))
def test_dpo_loss_types_pass_through(tiny_recipe, tiny_model_dir, loss):
    def edit(raw):
        raw["stages"][0]["train"]["max_steps"] = 2
        raw["stages"][1]["train"].update(max_steps=2, loss_type=loss, loss_weights=[1.0] * len(loss))

    path = tiny_recipe(edit)
    run_recipe(path, log=lambda *_: None)
    dpo = read_stage(path.parent / "run" / "dpo")
    assert dpo["complete"] and dpo["config"]["train"]["loss_type"] == loss
    assert "rewards/margins" in dpo["metrics"]
