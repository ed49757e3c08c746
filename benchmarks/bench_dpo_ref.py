"""DPO reference log-probs: precomputed once (the reference is a frozen adapter) vs a reference forward each step.

    python -m benchmarks.bench_dpo_ref            # full: appends to benchmarks/RESULTS.md
    python -m benchmarks.bench_dpo_ref --quick    # smoke: prints only

Both variants run our DPO stage; only `precompute_ref_log_probs` differs. The
step-time ratio counts the one-off precompute pass in the precomputed variant's
total, so the number is what a user's wall clock sees.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.bench_stage_overhead import base_model, recipe, settings
from benchmarks.harness import compare, emit, parse_args, ratio, record

MODULE = "benchmarks.bench_dpo_ref"


def run(variant: str, work: Path, s: dict) -> dict:
    from alignkit.artifacts import read_stage
    from recipes.runner import run_recipe

    run_dir = Path(tempfile.mkdtemp(dir=work)) / "run"
    shutil.copytree(work / "sft-parent", run_dir)
    overrides = [f"stages.dpo.train.precompute_ref_log_probs={'true' if variant == 'precomputed' else 'false'}"]
    start = time.perf_counter()
    run_recipe(recipe(work, base_model(work, s), s, run_dir), overrides, only=["dpo"], log=lambda *_: None)
    wall = time.perf_counter() - start
    m = read_stage(run_dir / "dpo")["metrics"]
    return {"seconds_per_step": m["train_runtime"] / m["global_step"], "stage_seconds": wall}


def main() -> None:
    args = parse_args(__doc__)
    s = settings(args.quick)
    if args.variant:
        emit(run(args.variant, Path(args.work), s))
        return
    from recipes.runner import run_recipe

    work = Path(tempfile.mkdtemp(prefix="bench-dporef-"))
    run_recipe(recipe(work, base_model(work, s), s, work / "sft-parent"), only=["sft"], log=lambda *_: None)
    repeats = 1 if args.quick else args.repeats
    default, pre = compare(MODULE, "default", "precomputed", ["--work", str(work)] + (["--quick"] if args.quick else []), repeats)
    cmd = "python -m benchmarks.bench_dpo_ref" + (" --quick" if args.quick else "")
    record("DPO: precomputed reference log-probs vs reference forward per step", cmd,
           ["ref forward s/step", "precomputed s/step", "step-time ratio", "stage wall (default)", "stage wall (precomputed)", "wall ratio"],
           [[f"{default['seconds_per_step']:.3f}", f"{pre['seconds_per_step']:.3f}", ratio(pre["seconds_per_step"], default["seconds_per_step"]),
             f"{default['stage_seconds']:.1f}", f"{pre['stage_seconds']:.1f}", ratio(pre["stage_seconds"], default["stage_seconds"])]],
           notes=f"Model: 4-bit Llama {s['hidden']}x{s['layers']}, {s['steps']} DPO steps, batch {s['batch']}; s/step is the Trainer's "
                 f"train_runtime / steps (precompute pass excluded), wall includes it; median of {repeats} alternating runs.", quick=args.quick)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
