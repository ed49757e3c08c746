"""Stage overhead: our SFT and DPO stages vs a plain TRL script, identical model, data and hyperparameters.

    python -m benchmarks.bench_stage_overhead            # full: appends to benchmarks/RESULTS.md
    python -m benchmarks.bench_stage_overhead --quick    # smoke: tiny model, a few steps, prints only

Target: ours/plain samples-per-second ratio >= 0.98 for both stages.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.harness import compare, emit, parse_args, ratio, record

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data"
MODULE = "benchmarks.bench_stage_overhead"


def settings(quick: bool) -> dict:
    if quick:
        return {"hidden": 64, "layers": 2, "steps": 3, "batch": 4, "max_length": 64}
    # 100 steps: the Trainer's train_runtime of a 30-step run is ~4 s, where start-up jitter alone moves the ratio by 5%.
    return {"hidden": 256, "layers": 4, "steps": 100, "batch": 8, "max_length": 128}


def shared_train_args(s: dict) -> dict:
    # Exactly what both sides train with; a plain TRL user would write these into SFTConfig / DPOConfig.
    return {"max_steps": s["steps"], "per_device_train_batch_size": s["batch"], "max_length": s["max_length"],
            "learning_rate": 1e-3, "logging_steps": 5, "save_steps": 10_000, "gradient_checkpointing": False,
            "seed": 0, "use_cpu": True, "bf16": False, "optim": "adamw_torch", "save_total_limit": 2}


def base_model(work: Path, s: dict) -> Path:
    from alignkit.tiny import build_tiny_model

    return build_tiny_model(work / f"base-{s['hidden']}x{s['layers']}", hidden_size=s["hidden"], num_layers=s["layers"])


def recipe(work: Path, base: Path, s: dict, run_dir: Path) -> Path:
    train = shared_train_args(s)
    raw = {
        "model": {"base": str(base), "quantization": "4bit", "compute_dtype": "float32"},
        "peft": {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "run_dir": str(run_dir),
        "seed": 0,
        "stages": [
            {"name": "sft", "kind": "sft", "data": {"train": str(DATA / "tiny_sft.jsonl")}, "train": train},
            {"name": "dpo", "kind": "dpo", "after": "sft", "data": {"train": str(DATA / "tiny_prefs.jsonl")}, "train": train},
        ],
    }
    path = work / f"recipe-{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def plain_trl(stage: str, work: Path, s: dict) -> dict:
    """The script a TRL user writes by hand: load 4-bit, LoRA config, trainer, train, save."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from alignkit.data.io import read_jsonl
    from alignkit.modeling import DEFAULT_CHAT_TEMPLATE

    base = base_model(work, s)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, device_map={"": "cpu"}, dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    out = tempfile.mkdtemp(dir=work)
    if stage == "sft":
        rows = [{"messages": r["messages"]} for r in read_jsonl(DATA / "tiny_sft.jsonl")]
        args = SFTConfig(output_dir=out, report_to="none", assistant_only_loss=True, **shared_train_args(s))
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora)
    else:
        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_jsonl(DATA / "tiny_prefs.jsonl")]
        model = PeftModel.from_pretrained(model, str(work / "sft-parent" / "sft"), is_trainable=True)
        args = DPOConfig(output_dir=out, report_to="none", **shared_train_args(s))
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    metrics = trainer.train().metrics
    trainer.save_model(out)
    return {"samples_per_second": metrics["train_samples_per_second"], "train_seconds": metrics["train_runtime"]}


def ours(stage: str, work: Path, s: dict) -> dict:
    from alignkit.artifacts import read_stage
    from recipes.runner import run_recipe

    base = base_model(work, s)
    run_dir = Path(tempfile.mkdtemp(dir=work)) / "run"
    if stage == "dpo":
        # Same SFT parent as the plain script: a copy of the one prepared SFT stage (the runner skips it).
        shutil.copytree(work / "sft-parent", run_dir)
    run_recipe(recipe(work, base, s, run_dir), only=[stage], log=lambda *_: None)
    m = read_stage(run_dir / stage)["metrics"]
    return {"samples_per_second": m["train_samples_per_second"], "train_seconds": m["train_runtime"]}


def main() -> None:
    args = parse_args(__doc__)
    s = settings(args.quick)
    if args.variant:
        side, stage = args.variant.split("-")
        result = (plain_trl if side == "trl" else ours)(stage, Path(args.work), s)
        emit(result)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    from recipes.runner import run_recipe

    run_recipe(recipe(work, base_model(work, s), s, work / "sft-parent"), only=["sft"], log=lambda *_: None)
    repeats = 1 if args.quick else args.repeats
    extra = ["--work", str(work)] + (["--quick"] if args.quick else [])
    rows = []
    for stage in ("sft", "dpo"):
        base, mine = compare(MODULE, f"trl-{stage}", f"ours-{stage}", extra, repeats)
        rows.append([stage.upper(), f"{base['samples_per_second']:.2f}", f"{mine['samples_per_second']:.2f}",
                     ratio(mine["samples_per_second"], base["samples_per_second"]),
                     f"{base['peak_memory_mb']:.0f}", f"{mine['peak_memory_mb']:.0f}", ratio(mine["peak_memory_mb"], base["peak_memory_mb"])])
    cmd = "python -m benchmarks.bench_stage_overhead" + (" --quick" if args.quick else "")
    record("Stage overhead vs plain TRL (samples/s, peak memory)", cmd,
           ["stage", "plain TRL samples/s", "alignkit samples/s", "ratio (target ≥ 0.98)", "plain peak MB", "alignkit peak MB", "memory ratio"],
           rows, notes=f"Model: 4-bit Llama {s['hidden']}x{s['layers']}, LoRA r=8 all-linear, {s['steps']} steps, batch {s['batch']}, "
                       f"median of {repeats} alternating runs; each variant in a fresh process.", quick=args.quick)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
