"""GPU path: QLoRA SFT and DPO on Llama-3.2-1B- and Llama-3.1-8B-shaped models, plain TRL+PEFT vs alignkit's recipe.

    python -m benchmarks.gpu_qlora                    # on a GPU: both shapes, appends to RESULTS.md
    python -m benchmarks.gpu_qlora --shapes 8b        # one shape
    python -m benchmarks.gpu_qlora --set stages.sft.train.use_liger_kernel=false   # override our side's recipe
    python -m benchmarks.gpu_qlora --quick            # CPU smoke of the same code path (tiny shape), prints only
    bash benchmarks/gpu_device.sh                     # the whole device run, wheels included (see that file)

Random weights (the shapes need no download), saved once in bf16 and loaded in 4-bit NF4
like a real model, with the real 128k vocabulary (the LM head costs what it costs in
practice); the tokenizer is alignkit's tiny BPE, whose ids fit any vocabulary.
Workload: the same examples, one epoch, on both sides. Lengths are drawn log-normally
up to --seq-len (chat data is mostly short with a long tail), so padding and packing
cost or save what they do on real data.
  plain: the script a TRL user writes (as trl/scripts/sft.py): 4-bit load, the recipe's
         LoRA, batch size, learning rate, schedule and gradient checkpointing; TRL's defaults for
         the rest (padded batches, fused AdamW, a reference forward in every DPO step).
  ours:  `alignkit run` on the shape's shipped recipe (recipes/configs/llama-3.2-1b_sft_dpo.yaml,
         llama-3.1-8b_sft_dpo.yaml): packing (padding-free) for SFT, precomputed reference
         log-probs for DPO, paged 8-bit AdamW, Liger kernels (alignkit's default on a GPU).
  Both sides, to make it a benchmark: synthetic data, one epoch, max_length --seq-len,
  no gradient accumulation, no evaluation or checkpoints, a log every step. DPO starts from
  the same SFT adapter on both sides (our SFT run's).
Measured: tokens/s = real tokens (TRL's num_tokens) / wall seconds from loading the model to the
end of training, end to end (model load, tokenization, warm-up and DPO's reference precompute,
which TRL runs while building the trainer, all included); steady tokens/s between the first and
last logged step (alignkit.training.throughput_meter, on both sides); peak memory = the GPU's
memory in use, sampled (harness.device_peak: what nvidia-smi shows, bitsandbytes' paged optimizer
state included, which torch.cuda.max_memory_allocated does not see; that figure is kept beside
it), ru_maxrss on CPU; MFU = TRL's compute_flops_per_token(config, seq_len) · tokens/s / TRL's
get_peak_flops(GPU, bf16): 3 × the forward FLOPs with attention at seq_len, the full-fine-tuning
convention. LoRA skips the base weights' gradients, so the true FLOPs are lower: an upper bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.harness import compare, device_peak, emit, parse_args, ratio, record

MODULE = "benchmarks.gpu_qlora"
REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1024, tie_word_embeddings=False),
}
RECIPES = {"1b": "llama-3.2-1b_sft_dpo.yaml", "8b": "llama-3.1-8b_sft_dpo.yaml", "tiny": "llama-3.2-1b_sft_dpo.yaml"}
# What plain TRL takes over from our recipe: the hyperparameters. Everything else stays at TRL's defaults.
SHARED_TRAIN_KEYS = ("per_device_train_batch_size", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
                     "max_grad_norm", "gradient_checkpointing", "bf16", "beta", "loss_type")


def benchmark_train(seq_len: int, gpu: bool) -> dict:
    """What both sides train with on top of the recipe's hyperparameters."""
    return {"num_train_epochs": 1, "max_length": seq_len, "gradient_accumulation_steps": 1, "logging_steps": 1,
            "save_strategy": "no", "eval_strategy": "no", **({} if gpu else {"bf16": False, "optim": "adamw_torch"})}


def build_model(work: Path, shape: str) -> Path:
    """Random-weight Llama of the given shape + the tiny tokenizer, saved once (bf16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.tiny import build_tokenizer, tiny_corpus

    out = work / f"llama-{shape}"
    if (out / "tokenizer_config.json").exists():  # saved last
        return out
    tok = build_tokenizer(tiny_corpus(), vocab_size=512)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def write_data(work: Path, n: int, seq_len: int) -> dict[str, Path]:
    """SFT prompt/completion and DPO prompt/chosen/rejected JSONL, log-normal lengths capped at seq_len tokens."""
    from alignkit.tiny import tiny_corpus

    lines = tiny_corpus(n_lines=4000, seed=3)
    rng = random.Random(0)
    chars_per_token = 3  # the tiny byte-level BPE on this corpus

    def text(tokens: int) -> str:
        out, size = [], 0
        while size < tokens * chars_per_token:
            out.append(lines[rng.randrange(len(lines))])
            size += len(out[-1]) + 1
        return " ".join(out)

    def length() -> int:  # median ~ a third of seq_len, a tail past it (truncated like real data)
        return max(16, min(seq_len, int(rng.lognormvariate(math.log(seq_len / 3), 0.7))))

    sft, prefs = work / "sft.jsonl", work / "prefs.jsonl"
    with sft.open("w") as f:
        for _ in range(n):
            total = length()
            f.write(json.dumps({"prompt": text(total // 4), "completion": text(total - total // 4)}) + "\n")
    with prefs.open("w") as f:
        for _ in range(n):
            prompt = length() // 4
            f.write(json.dumps({"prompt": text(prompt), "chosen": text(length() - prompt), "rejected": text(length() - prompt)}) + "\n")
    return {"sft": sft, "dpo": prefs}


def our_recipe(work: Path, shape: str, model: Path, data: dict[str, Path], seq_len: int, gpu: bool, overrides: list[str]) -> Path:
    """The shipped recipe for this shape with the benchmark's model, data and run settings (see the docstring)."""
    from alignkit.config import apply_override

    raw = yaml.safe_load((REPO / "recipes" / "configs" / RECIPES[shape]).read_text())
    raw["model"]["base"] = str(model)
    if not gpu:
        raw["model"].update(compute_dtype="float32", dtype="float32")
    for stage in raw["stages"]:
        stage["data"] = {"train": str(data[stage["kind"]])}
        for key in ("eval_steps", "save_steps"):
            stage["train"].pop(key, None)
        stage["train"].update(benchmark_train(seq_len, gpu))
    for item in overrides:
        apply_override(raw, item)
    path = work / f"recipe-{shape}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_ours(kind: str, recipe: Path, work: Path) -> dict:
    from alignkit.artifacts import read_stage
    from recipes.runner import run_recipe

    run_dir = Path(tempfile.mkdtemp(prefix=f"ours-{kind}-", dir=work)) / "run"
    if kind == "dpo":
        shutil.copytree(work / "sft-parent", run_dir)  # the SFT stage is complete there: the runner skips it
    start = time.perf_counter()
    run_recipe(recipe, [f"run_dir={run_dir}"], only=[kind], log=lambda *_: None)
    seconds = time.perf_counter() - start
    stage = read_stage(run_dir / kind)
    m, train = stage["metrics"], stage["config"]["train"]
    from alignkit.training import fused_kernel_defaults

    # What the stage really ran with: a Liger kernel that failed to import would drop out silently otherwise.
    liger = train.get("use_liger_kernel", fused_kernel_defaults().get("use_liger_kernel", False))
    return {"tokens": m["num_tokens"], "seconds": seconds, "steady_tokens_per_second": m.get("tokens_per_second", math.nan),
            "liger": float(bool(liger)), "paged_optim": float("paged" in str(train.get("optim", "")))}


def run_plain(kind: str, recipe: Path, model_dir: Path, data: Path, work: Path) -> dict:
    """The plain TRL + PEFT script, with the hyperparameters of our recipe and nothing else of it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from alignkit.data.io import read_jsonl
    from alignkit.training import throughput_meter

    raw = yaml.safe_load(recipe.read_text())
    stage = next(s for s in raw["stages"] if s["kind"] == kind)
    gpu = torch.cuda.is_available()
    compute = getattr(torch, raw["model"]["compute_dtype"])
    start = time.perf_counter()  # as ours: from loading the model to the end of training
    tok = AutoTokenizer.from_pretrained(model_dir)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=compute,
                                                 device_map={"": 0 if gpu else "cpu"}, attn_implementation="sdpa")
    # As TRL's own scripts (trl/scripts/sft.py) do: no peft.prepare_model_for_kbit_training, whose fp32 upcast of
    # the unquantized weights TRL 1.16 no longer asks for; the trainer freezes the base and wires checkpointing.
    p = raw["peft"]
    lora = LoraConfig(r=p["r"], lora_alpha=p["lora_alpha"], lora_dropout=p["lora_dropout"], target_modules=p["target_modules"],
                      task_type="CAUSAL_LM")
    train = {k: v for k, v in stage["train"].items() if k in SHARED_TRAIN_KEYS}
    # On a GPU the optimizer stays TRL's default (fused AdamW); on CPU both sides take adamw_torch.
    train.update(benchmark_train(stage["train"]["max_length"], gpu),
                 output_dir=str(work / f"plain-{kind}"), report_to="none", seed=raw.get("seed", 0), use_cpu=not gpu)
    rows = Dataset.from_list(list(read_jsonl(data)))
    meter = throughput_meter()
    if kind == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**train), train_dataset=rows, processing_class=tok, peft_config=lora,
                             callbacks=[meter])
    else:
        model = PeftModel.from_pretrained(model, str(work / "sft-parent" / "sft"), is_trainable=True)
        trainer = DPOTrainer(model=model, args=DPOConfig(**train), train_dataset=rows, processing_class=tok, callbacks=[meter])
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = next(e["num_tokens"] for e in reversed(trainer.state.log_history) if "num_tokens" in e)
    steady = meter.tokens_per_second
    return {"tokens": tokens, "seconds": seconds, "steady_tokens_per_second": steady or math.nan}


def measure(side: str, kind: str, shape: str, work: Path, seq_len: int) -> dict:
    import torch

    model_dir = work / f"llama-{shape}"
    recipe = work / f"recipe-{shape}.yaml"
    gpu = torch.cuda.is_available()
    with device_peak() if gpu else contextlib.nullcontext({}) as peak:
        if side == "ours":
            result = run_ours(kind, recipe, work)
        else:
            result = run_plain(kind, recipe, model_dir, work / ("sft.jsonl" if kind == "sft" else "prefs.jsonl"), work)
    result["tokens_per_second"] = result["tokens"] / result["seconds"]
    if gpu:
        from transformers import AutoConfig
        from trl.trainer.utils import compute_flops_per_token, get_peak_flops

        result["device_peak_mb"] = peak["mb"]
        flops = compute_flops_per_token(AutoConfig.from_pretrained(model_dir), seq_len)
        result["mfu"] = flops * result["tokens_per_second"] / (get_peak_flops(torch.cuda.get_device_name(0), "bfloat16")
                                                                or math.nan)
    return result


def main() -> None:
    args = parse_args(__doc__, **{
        "--shapes": dict(default="1b,8b", help="comma-separated: 1b, 8b"),
        "--examples": dict(type=int, default=64, help="training examples (SFT) and pairs (DPO), one epoch"),
        "--seq-len": dict(type=int, default=2048),
        "--set": dict(action="append", default=[], metavar="KEY=VALUE", help="override in our side's recipe (alignkit run --set)"),
        "--kind": dict(help=argparse.SUPPRESS),
        "--shape": dict(help=argparse.SUPPRESS),
    })
    if args.variant:
        side, kind = args.variant.split("-")
        emit(measure(side, kind, args.shape, Path(args.work), args.seq_len))
        return

    import torch

    gpu = torch.cuda.is_available()
    if args.quick:
        args.shapes, args.examples, args.seq_len = "tiny", 8, 64
    # GPU runs are long and steady: one alternation unless --repeats is given.
    repeats = args.repeats if "--repeats" in sys.argv and not args.quick else 1
    table = []
    for shape in args.shapes.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"bench-gpu-{shape}-"))
        model = build_model(work, shape)
        data = write_data(work, args.examples, args.seq_len)
        our_recipe(work, shape, model, data, args.seq_len, gpu, args.set)
        extra = ["--shape", shape, "--work", str(work), "--seq-len", str(args.seq_len)]
        for kind in ("sft", "dpo"):
            plain, ours = compare(MODULE, f"plain-{kind}", f"ours-{kind}", extra, repeats)
            if kind == "sft":  # DPO starts from this adapter on both sides
                shutil.copytree(next(work.glob("ours-sft-*/run")), work / "sft-parent")
            tps = ratio(ours["tokens_per_second"], plain["tokens_per_second"])
            memory = "device_peak_mb" if gpu else "peak_memory_mb"
            mem = ratio(ours[memory], plain[memory])
            # Same examples on both sides, so the same real tokens (up to truncation at a different place when packed).
            print(f"{shape} {kind}: tokens/s ratio {tps}, peak memory ratio {mem} "
                  f"(real tokens: plain {plain['tokens']:.0f}, ours {ours['tokens']:.0f})", flush=True)
            table.append([shape, kind.upper(), f"{plain['tokens_per_second']:.0f}", f"{ours['tokens_per_second']:.0f}", tps,
                          ratio(ours["steady_tokens_per_second"], plain["steady_tokens_per_second"]),
                          f"{plain[memory]:.0f}", f"{ours[memory]:.0f}", mem,
                          f"{plain['peak_memory_mb']:.0f} / {ours['peak_memory_mb']:.0f}",
                          f"{plain.get('mfu', math.nan):.3f}", f"{ours.get('mfu', math.nan):.3f}",
                          f"liger {'on' if ours.get('liger') else 'off'}, {'paged 8-bit' if ours.get('paged_optim') else 'unpaged'} AdamW"])
        shutil.rmtree(work, ignore_errors=True)
    cmd = "python -m benchmarks.gpu_qlora" + (" --quick" if args.quick else f" --shapes {args.shapes}") + \
        "".join(f" --set {s}" for s in args.set)
    record("GPU QLoRA: plain TRL+PEFT vs alignkit's recipe", cmd,
           ["shape", "stage", "plain tok/s", "ours tok/s", "tok/s ratio (target ≥ 1.5 on 8b)", "steady tok/s ratio",
            "plain peak MB", "ours peak MB", "memory ratio (target ≤ 0.7)", "allocator peak MB, plain / ours (RSS on CPU)",
            "plain MFU", "ours MFU", "ours ran with"], table,
           notes=f"{args.examples} examples (DPO: pairs), one epoch, lengths log-normal up to {args.seq_len} tokens; "
                 f"tok/s = real tokens / wall seconds from model load to the end of training (tokenization, warm-up "
                 f"and DPO's reference precompute included); peak MB = GPU memory in use, sampled every 10 ms "
                 f"(paged optimizer state and CUDA context included; ru_maxrss on CPU); MFU with TRL's "
                 f"compute_flops_per_token / get_peak_flops (an upper bound for LoRA); median of {repeats} "
                 f"alternating run(s).", quick=args.quick)


if __name__ == "__main__":
    main()
