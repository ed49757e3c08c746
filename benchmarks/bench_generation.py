"""Generation: alignkit's batched sampling (length-sorted, left-padded) vs a naive per-prompt `generate` loop.

    python -m benchmarks.bench_generation            # full: appends to benchmarks/RESULTS.md
    python -m benchmarks.bench_generation --quick    # smoke: prints only

PPO rollouts, label import and compare all sample through alignkit.generation.generate_batch.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.harness import compare, emit, parse_args, ratio, record

MODULE = "benchmarks.bench_generation"


def settings(quick: bool) -> dict:
    if quick:
        return {"hidden": 64, "layers": 2, "prompts": 8, "new_tokens": 8, "batch": 8}
    return {"hidden": 256, "layers": 4, "prompts": 64, "new_tokens": 32, "batch": 16}


def prompts(n: int) -> list[str]:
    from alignkit.tiny import tiny_corpus

    return [line for line in tiny_corpus(n_lines=n, seed=1)][:n]


def run(variant: str, work: Path, s: dict) -> dict:
    import torch

    from alignkit.generation import SamplingParams, encode_prompt, generate_batch
    from alignkit.modeling import load_model_for_inference
    from alignkit.tiny import build_tiny_model

    base = build_tiny_model(work / f"base-{s['hidden']}x{s['layers']}", hidden_size=s["hidden"], num_layers=s["layers"])
    model, tok, _ = load_model_for_inference(str(base), quantization="4bit")
    texts = prompts(s["prompts"])
    # Greedy, the same prompt tokens and the same EOS stop on both sides: the same responses, up to
    # padding's float rounding (tokens/s is per generated token either way).
    params = SamplingParams(max_new_tokens=s["new_tokens"], temperature=0.0, batch_size=s["batch"])
    start = time.perf_counter()
    if variant == "batched":
        out = generate_batch(model, tok, texts, params)
        tokens = sum(len(r) for r in out.response_ids)
    else:
        tokens = 0
        for t in texts:
            ids = torch.tensor([encode_prompt(tok, t)])
            with torch.no_grad():
                gen = model.generate(input_ids=ids, max_new_tokens=s["new_tokens"], do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            tokens += gen.shape[1] - ids.shape[1]
    seconds = time.perf_counter() - start
    return {"tokens_per_second": tokens / seconds, "tokens": tokens, "seconds": seconds}


def main() -> None:
    args = parse_args(__doc__)
    s = settings(args.quick)
    if args.variant:
        emit(run(args.variant, Path(args.work), s))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    repeats = 1 if args.quick else args.repeats
    naive, batched = compare(MODULE, "naive", "batched", ["--work", str(work)] + (["--quick"] if args.quick else []), repeats)
    cmd = "python -m benchmarks.bench_generation" + (" --quick" if args.quick else "")
    record("Generation: batched vs per-prompt generate (tokens/s)", cmd,
           ["naive tokens/s", "batched tokens/s", "speed-up", "naive peak MB", "batched peak MB"],
           [[f"{naive['tokens_per_second']:.1f}", f"{batched['tokens_per_second']:.1f}", ratio(batched["tokens_per_second"], naive["tokens_per_second"]),
             f"{naive['peak_memory_mb']:.0f}", f"{batched['peak_memory_mb']:.0f}"]],
           notes=f"Model: 4-bit Llama {s['hidden']}x{s['layers']}; {s['prompts']} prompts x {s['new_tokens']} new tokens, greedy, "
                 f"batch {s['batch']}; median of {repeats} alternating runs.", quick=args.quick)


if __name__ == "__main__":
    main()
