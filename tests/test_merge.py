"""`alignkit merge`: merged logits match the adapter model's; the result loads with transformers alone; lineage card.

The stage directories here are built without training: a LoRA adapter made with
PEFT on the tiny model, its lora_B weights randomised so it is not a no-op,
saved, and completed with a stage.json that says it was trained on a 4-bit base.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit import artifacts
from alignkit.cli import main as cli_main
from alignkit.errors import UserError
from alignkit.merge import FP32_ATOL, merge_model

PROBES = ["The film was very good.", "Tell me about the plot?", "the cast felt rather dull. the music"]
MODEL_4BIT = {"base": "alignkit-tiny", "quantization": "4bit", "bnb_4bit_quant_type": "nf4",
              "bnb_4bit_use_double_quant": True, "compute_dtype": "float32", "dtype": "float32"}


def _make_stage(stage_dir: Path, *, task_type="CAUSAL_LM", name="sft", kind="sft", parent: Path | None = None, seed=0):
    import peft
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignkit.modeling import load_tokenizer, resolve_base

    base = resolve_base("alignkit-tiny")
    tok = load_tokenizer(base)
    if task_type == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=tok.pad_token_id)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS", modules_to_save=["score"])
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or ("modules_to_save" in n and "score" in n):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    pm.save_pretrained(str(stage_dir))
    tok.save_pretrained(str(stage_dir))
    parents = {}
    if parent is not None:
        p_stage = artifacts.read_stage(parent)
        parents = {"after": {"name": p_stage["name"], "path": str(parent), "config_hash": p_stage["config_hash"]}}
    artifacts.complete_stage(stage_dir, {"name": name, "kind": kind, "base": "alignkit-tiny", "model": MODEL_4BIT,
                                         "parents": parents, "config_hash": f"hash-of-{name}-" + "0" * 40})
    return stage_dir


@pytest.fixture(scope="module")
def stages(tmp_path_factory, alignkit_cache):
    root = tmp_path_factory.mktemp("stages")
    sft = _make_stage(root / "sft", seed=1)
    dpo = _make_stage(root / "dpo", name="dpo", kind="dpo", parent=sft, seed=2)
    reward = _make_stage(root / "reward", task_type="SEQ_CLS", name="reward", kind="reward", parent=sft, seed=3)
    return {"sft": sft, "dpo": dpo, "reward": reward}


def _inputs(tok):
    ids = [tok(t)["input_ids"] for t in PROBES]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return input_ids, mask


def _adapter_logits(stage_dir: Path, *, quantization: str, seq_cls: bool = False):
    """Logits of the unmerged adapter model: the base (unquantized or 4-bit NF4) + PeftModel, built independently."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from alignkit.modeling import ModelSettings, load_base_model, load_tokenizer

    tok = load_tokenizer(str(stage_dir))
    settings = ModelSettings(**{**MODEL_4BIT, "quantization": quantization})
    extra = {"model_class": AutoModelForSequenceClassification, "num_labels": 1, "pad_token_id": tok.pad_token_id} if seq_cls else {}
    model = PeftModel.from_pretrained(load_base_model(settings, **extra), str(stage_dir))
    # The forward training runs (no dropout here: LoRA dropout 0). In eval mode without grad, bitsandbytes' CPU
    # kernel on AVX512-BF16 machines computes in bfloat16 instead, which no float32 merge could reproduce.
    model.train(quantization == "4bit")
    ids, mask = _inputs(tok)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits, mask


def _merged_logits(out: Path, seq_cls: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    model = cls.from_pretrained(str(out)).eval()
    ids, mask = _inputs(AutoTokenizer.from_pretrained(str(out)))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _max_diff(a, b, mask=None):
    d = (a - b).abs()
    if mask is not None and d.dim() == 3:
        d = d[mask.bool()]  # padded positions carry no meaning
    return float(d.max())


def test_merged_logits_match_adapter_model_and_card_names_lineage(stages, tmp_path):
    out = tmp_path / "merged"
    result = merge_model(str(stages["dpo"]), out, dtype="float32")
    ref, mask = _adapter_logits(stages["dpo"], quantization="none")
    merged = _merged_logits(out)
    diff = _max_diff(merged, ref, mask)
    assert diff <= FP32_ATOL, diff
    assert result.max_abs_logit_diff is not None and result.max_abs_logit_diff <= FP32_ATOL
    # The adapter really changes the model (so the match above means something).
    from transformers import AutoModelForCausalLM

    from alignkit.modeling import load_tokenizer, resolve_base

    plain = AutoModelForCausalLM.from_pretrained(resolve_base("alignkit-tiny")).eval()
    with torch.no_grad():
        base_logits = plain(input_ids=_inputs(load_tokenizer(str(out)))[0]).logits
    assert _max_diff(base_logits, ref, mask) > 100 * FP32_ATOL

    card = (out / "README.md").read_text()
    assert "base_model: alignkit-tiny" in card
    assert "| dpo | dpo |" in card and "| sft | sft |" in card  # the whole chain, newest first
    assert "hash-of-dpo" in card and "4bit" in card
    info = json.loads((out / "alignkit_merge.json").read_text())
    assert [s["name"] for s in info["lineage"]] == ["dpo", "sft"]
    assert info["adapter_sha256"] == artifacts.file_fingerprint(stages["dpo"] / "adapter_model.safetensors")
    assert not list(tmp_path.glob(".merged.merging-*"))  # the temp dir was renamed, nothing left over


def test_merged_dir_loads_with_transformers_alone(stages, tmp_path):
    out = tmp_path / "merged"
    merge_model(str(stages["sft"]), out)
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True, return_tensors='pt', return_dict=True)['input_ids']\n"
        "out = m.generate(ids, max_new_tokens=3, do_sample=False)\n"
        "assert out.shape[1] == ids.shape[1] + 3 or t.eos_token_id in out[0].tolist()\n"
        "assert 'peft' not in sys.modules and 'alignkit' not in sys.modules, 'needed more than transformers'\n"
        "print('ok', type(m).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok LlamaForCausalLM" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a dense checkpoint any server can load


def test_relative_to_the_4bit_model(stages, tmp_path):
    """Against the trained 4-bit model: merging onto the NF4-dequantized base reproduces it to float rounding;
    merging onto the original weights differs by the base's quantization error (measured, printed)."""
    q_logits, mask = _adapter_logits(stages["sft"], quantization="4bit")
    assert cli_main(["merge", str(stages["sft"]), "--out", str(tmp_path / "dequantized"),
                     "--base-weights", "dequantized"]) == 0
    assert json.loads((tmp_path / "dequantized" / "alignkit_merge.json").read_text())["base_weights"] == "dequantized"
    merge_model(str(stages["sft"]), tmp_path / "original")
    d_deq = _max_diff(_merged_logits(tmp_path / "dequantized"), q_logits, mask)
    d_orig = _max_diff(_merged_logits(tmp_path / "original"), q_logits, mask)
    print(f"max |Δlogit| vs the 4-bit adapter model: dequantized base {d_deq:.2e}, original base {d_orig:.2e}")
    assert d_deq <= FP32_ATOL
    assert d_orig > d_deq  # the NF4 rounding the adapter was trained on is real


def test_reward_stage_merges_into_a_sequence_classifier(stages, tmp_path):
    out = tmp_path / "merged-rm"
    result = merge_model(str(stages["reward"]), out)
    assert result.model_class.endswith("ForSequenceClassification")
    ref, _ = _adapter_logits(stages["reward"], quantization="none", seq_cls=True)
    merged = _merged_logits(out, seq_cls=True)
    assert merged.shape == ref.shape == (len(PROBES), 1)
    assert _max_diff(merged, ref) <= FP32_ATOL


def test_cli_merge_and_bad_input(stages, tmp_path, capsys):
    before = artifacts.file_fingerprint(stages["sft"])
    out = tmp_path / "cli-out"
    assert cli_main(["merge", str(stages["sft"]), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text()).get("dtype") == "bfloat16"
    # An existing non-empty output is never overwritten.
    assert cli_main(["merge", str(stages["sft"]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    # A full model has nothing to merge; a missing path is named.
    from alignkit.modeling import resolve_base

    assert cli_main(["merge", resolve_base("alignkit-tiny"), "--out", str(tmp_path / "x")]) == 2
    assert "no adapter to merge" in capsys.readouterr().err
    assert cli_main(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert artifacts.file_fingerprint(stages["sft"]) == before  # the stage is read, never written


def test_prompt_tuning_is_refused(tmp_path, alignkit_cache):
    import peft
    from transformers import AutoModelForCausalLM

    from alignkit.modeling import resolve_base

    base = resolve_base("alignkit-tiny")
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                             peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    pm.save_pretrained(str(tmp_path / "pt"))
    with pytest.raises(UserError, match="prompt_tuning adapter has no weights to merge"):
        merge_model(str(tmp_path / "pt"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
