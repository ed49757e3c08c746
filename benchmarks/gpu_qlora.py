"""GPU path: QLoRA SFT and DPO steps on Llama-3.2-1B- and Llama-3.1-8B-shaped models, plain TRL+PEFT vs our defaults.

    python -m benchmarks.gpu_qlora                       # on a GPU machine: both shapes, appends to RESULTS.md
    python -m benchmarks.gpu_qlora --shapes 1b           # one shape
    python -m benchmarks.gpu_qlora --quick               # CPU smoke of the same code path (tiny shape), prints only

Random weights (the shapes need no download) saved once to a local directory,
loaded in 4-bit NF4 like a real model; sequence length 2048; the tokenizer is
alignkit's tiny BPE (ids fit any vocab) with the model's real 128k vocab, so the
LM head costs what it costs in practice.
  plain: TRL + PEFT defaults — LoRA r=16 all-linear, padded batches, AdamW (fused),
         gradient checkpointing on (TRL's default), DPO with a reference forward per step.
  ours:  alignkit's recipe defaults with the speed-ups on — Liger kernels (use_liger_kernel),
         padding-free packing for SFT, precomputed reference log-probs for DPO,
         paged 8-bit AdamW, gradient checkpointing on.
MFU = 6 · N · tokens/s / peak bf16 FLOP/s (N = base parameters; the 6N convention of
Kaplan et al. — LoRA skips base weight gradients, so the true FLOPs are nearer 4N and
this MFU is an upper-bound convention, kept for comparability with published numbers).
Packages the GPU image lacks (trl, peft, bitsandbytes, liger-kernel, datasets, this
package) travel as wheels: see benchmarks/RESULTS.md for the command used.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.harness import compare, emit, parse_args, ratio, record

MODULE = "benchmarks.gpu_qlora"
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1024, tie_word_embeddings=False),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def build_model(work: Path, shape: str) -> Path:
    """Random-weight Llama of the given shape + the tiny tokenizer, saved once (bf16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.tiny import build_tokenizer, tiny_corpus

    out = work / f"llama-{shape}"
    if (out / "done").exists():
        return out
    tok = build_tokenizer(tiny_corpus(), vocab_size=512)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "done").write_text("ok")
    return out


def rows(kind: str, n: int, seq_len: int) -> list[dict]:
    """Synthetic text of about seq_len tokens per example (byte-level BPE: ~3 chars a token)."""
    from alignkit.tiny import tiny_corpus

    lines = tiny_corpus(n_lines=4000, seed=3)
    chars = seq_len * 3

    def text(i: int, share: float) -> str:
        out, j = [], i * 7
        while sum(map(len, out)) < chars * share:
            out.append(lines[j % len(lines)])
            j += 1
        return " ".join(out)

    if kind == "sft":
        return [{"prompt": text(i, 0.25), "completion": text(i + 1, 0.75)} for i in range(n)]
    return [{"prompt": text(i, 0.5), "chosen": text(i + 1, 0.5), "rejected": text(i + 2, 0.5)} for i in range(n)]


def run(variant: str, shape: str, kind: str, work: Path, steps: int, seq_len: int, batch: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available()
    path = build_model(work, shape)
    tok = AutoTokenizer.from_pretrained(path)
    compute = torch.bfloat16 if gpu else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=compute,
                                                 device_map={"": 0 if gpu else "cpu"}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    n_params = sum(p.numel() for p in model.parameters()) * (2 if shape != "tiny" else 1)  # 4-bit packs 2 per byte
    ours = variant == "ours"
    common = dict(output_dir=str(work / f"out-{variant}-{kind}"), report_to="none", max_steps=steps, per_device_train_batch_size=batch,
                  max_length=seq_len, learning_rate=1e-4, logging_steps=1, save_strategy="no", bf16=gpu, use_cpu=not gpu,
                  gradient_checkpointing=True, seed=0)
    if ours:
        common.update(optim="paged_adamw_8bit" if gpu else "adamw_torch", use_liger_kernel=gpu)
    else:
        common.update(optim="adamw_torch_fused" if gpu else "adamw_torch")
    data = Dataset.from_list(rows(kind, n=steps * batch + 8, seq_len=seq_len))
    if kind == "sft":
        args = SFTConfig(**common, **({"packing": True, "padding_free": True} if ours else {}))
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora)
    else:
        model = get_peft_model(model, lora)  # the "SFT adapter" the DPO stage continues
        args = DPOConfig(**common, beta=0.1, **({"precompute_ref_log_probs": True} if ours else {}))
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train()
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen or steps * batch * seq_len * (2 if kind == "dpo" else 1)
    result = {"tokens_per_second": tokens / seconds, "seconds": seconds, "tokens": tokens, "params": n_params}
    if gpu:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        result["mfu"] = 6 * n_params * result["tokens_per_second"] / peak if peak else float("nan")
        result["device"] = name
    return result


def main() -> None:
    args = parse_args(__doc__, **{
        "--shapes": dict(default="1b,8b", help="comma-separated: 1b, 8b"),
        "--steps": dict(type=int, default=10),
        "--seq-len": dict(type=int, default=2048),
        "--batch": dict(type=int, default=1),
        "--kind": dict(help=argparse.SUPPRESS),
        "--shape": dict(help=argparse.SUPPRESS),
    })
    if args.repeats == 3 and not args.variant:
        args.repeats = 1  # GPU runs are long and steady; one alternation is enough
    if args.quick:
        args.shapes, args.steps, args.seq_len, args.batch = "tiny", 2, 64, 2
    if args.variant:
        r = run(args.variant, args.shape, args.kind, Path(args.work), args.steps, args.seq_len, args.batch)
        emit({k: v for k, v in r.items() if k != "device"})
        return
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    rows_out = []
    for shape in args.shapes.split(","):
        for kind in ("sft", "dpo"):
            extra = ["--shape", shape, "--kind", kind, "--work", str(work), "--steps", str(args.steps),
                     "--seq-len", str(args.seq_len), "--batch", str(args.batch)]
            plain, ours = compare(MODULE, "plain", "ours", extra, args.repeats)
            tps = ratio(ours["tokens_per_second"], plain["tokens_per_second"])
            mem = ratio(ours["peak_memory_mb"], plain["peak_memory_mb"])
            print(f"{shape} {kind}: tokens/s ratio {tps}, peak memory ratio {mem}")
            rows_out.append([shape, kind.upper(), f"{plain['tokens_per_second']:.0f}", f"{ours['tokens_per_second']:.0f}", tps,
                             f"{plain['peak_memory_mb']:.0f}", f"{ours['peak_memory_mb']:.0f}", mem,
                             f"{plain.get('mfu', float('nan')):.3f}", f"{ours.get('mfu', float('nan')):.3f}"])
    cmd = "python -m benchmarks.gpu_qlora" + (" --quick" if args.quick else f" --shapes {args.shapes}")
    record("GPU QLoRA: plain TRL+PEFT vs alignkit defaults (seq 2048)", cmd,
           ["shape", "stage", "plain tok/s", "ours tok/s", "tok/s ratio (target ≥ 1.5 on 8b)", "plain peak MB", "ours peak MB",
            "memory ratio (target ≤ 0.7)", "plain MFU", "ours MFU"], rows_out,
           notes=f"{args.steps} steps, batch {args.batch}, seq {args.seq_len}; peak memory is torch.cuda.max_memory_allocated.", quick=args.quick)


if __name__ == "__main__":
    main()
