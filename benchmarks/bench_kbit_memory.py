"""k-bit preparation memory: peft's prepare_model_for_kbit_training vs alignkit's, on a bf16 Llama-3.2-1B shape.

    python -m benchmarks.bench_kbit_memory            # 1B shape, 2048 tokens: appends to benchmarks/RESULTS.md
    python -m benchmarks.bench_kbit_memory --quick    # smoke: tiny shape, prints only

Bytes, not seconds, so the CPU measures what a GPU would hold: the parameters after
preparation and a LoRA r=16 all-linear adapter (4-bit block constants included), and the
distinct tensors autograd saves in one training forward of the decoder under bf16 autocast
with gradient checkpointing, as the recipes train (the LM head and loss are left out: TRL's
fused head decides those, the same on both sides). Both variants load the same NF4 model;
only the preparation differs. Each runs in a fresh process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.harness import compare, emit, parse_args, ratio, record

MODULE = "benchmarks.bench_kbit_memory"


def measure(variant: str, model_dir: Path, seq_len: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from alignkit.estimate import parameter_bytes, saved_activation_bytes
    from alignkit.modeling import ModelSettings, keep_4bit_differentiable, load_base_model, prepare_for_training

    settings = ModelSettings(base=str(model_dir), quantization="4bit", dtype="bfloat16", compute_dtype="bfloat16")
    model = load_base_model(settings)
    if variant == "peft":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        keep_4bit_differentiable(model)  # the CPU-only kernel fix both sides need to train (see alignkit.modeling)
    else:
        model = prepare_for_training(model, settings, gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()

    decoder = model.get_base_model().model
    ids = torch.randint(0, decoder.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved, hidden = saved_activation_bytes(model, lambda: decoder(input_ids=ids).last_hidden_state)
    hidden.float().pow(2).mean().backward()  # the saved tensors are real: backward through them must work
    lora_grads = sum(1 for n, p in model.named_parameters() if "lora_" in n and p.grad is not None)
    return {"parameter_mb": parameter_bytes(model) / 2**20, "saved_mb": saved / 2**20, "lora_grads": lora_grads}


def main() -> None:
    import argparse

    args = parse_args(__doc__, **{"--seq-len": dict(type=int, default=2048), "--model": dict(help=argparse.SUPPRESS)})
    shape, seq_len = ("tiny", 64) if args.quick else ("1b", args.seq_len)
    if args.variant:
        emit(measure(args.variant, Path(args.model), seq_len))
        return
    from benchmarks.gpu_qlora import SHAPES, build_model

    model_dir = build_model(Path(tempfile.mkdtemp(prefix="bench-kbit-")), shape)
    extra = ["--model", str(model_dir), "--seq-len", str(seq_len)] + (["--quick"] if args.quick else [])
    peft_side, ours = compare(MODULE, "peft", "ours", extra, 1)  # bytes: one run each is exact
    total = {s: r["parameter_mb"] + r["saved_mb"] for s, r in (("peft", peft_side), ("ours", ours))}
    print(f"parameters ratio {ratio(ours['parameter_mb'], peft_side['parameter_mb'])}, saved activations ratio "
          f"{ratio(ours['saved_mb'], peft_side['saved_mb'])}, together {ratio(total['ours'], total['peft'])} "
          f"(LoRA tensors with gradients: peft {peft_side['lora_grads']:.0f}, ours {ours['lora_grads']:.0f})")
    s = SHAPES[shape]
    cmd = "python -m benchmarks.bench_kbit_memory" + (" --quick" if args.quick else "")
    record("k-bit preparation memory: peft's vs alignkit's (bytes)", cmd,
           ["part", "peft MiB", "alignkit MiB", "ratio"],
           [["parameters (NF4 base + bf16/fp32 rest + LoRA)", f"{peft_side['parameter_mb']:.1f}", f"{ours['parameter_mb']:.1f}",
             ratio(ours["parameter_mb"], peft_side["parameter_mb"])],
            ["saved for backward, decoder forward", f"{peft_side['saved_mb']:.1f}", f"{ours['saved_mb']:.1f}",
             ratio(ours["saved_mb"], peft_side["saved_mb"])],
            ["together", f"{total['peft']:.1f}", f"{total['ours']:.1f}", ratio(total["ours"], total["peft"])]],
           notes=f"Llama shape {shape}: hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, vocabulary {s['vocab_size']}, "
                 f"tied embeddings {s['tie_word_embeddings']}; random bf16 weights loaded in NF4 (double quant); LoRA r=16 "
                 f"all-linear; {seq_len} tokens, bf16 autocast, gradient checkpointing; bytes are exact, not sampled.",
           quick=args.quick)


if __name__ == "__main__":
    main()
