"""PPO roles: one 4-bit base with four role adapters vs four separately loaded models of identical shape.

    python -m benchmarks.bench_ppo_roles            # full: appends a section to benchmarks/RESULTS.md
    python -m benchmarks.bench_ppo_roles --quick    # smoke: tiny model, two steps, prints only

Both variants run the same PPOTrainer (alignkit/ppo/trainer.py) on the same SFT
and reward stages, with the same seed and settings. `one_base` is what the PPO
stage does: policy, reference, reward and value are LoRA adapters on one base.
`four_models` is the classic layout: the policy keeps the first base, and the
reference, reward and value roles each get their own freshly loaded base with
their adapter (weights copied from the one-base setup, so the math is
identical); the trainer's role switch then picks a model instead of an adapter.

Measured per variant, each in a fresh process, alternating, median of repeats:
  - peak memory: on a GPU torch.cuda.max_memory_allocated; on CPU the peak
    anonymous resident memory (RssAnon) sampled every 10 ms during the PPO
    steps, minus the same after imports and before any model was loaded (the
    Python runtime and torch's libraries, ~0.5 GB that neither variant can
    avoid, would water the ratio down). Weights that transformers leaves as views
    of the memory-mapped checkpoint (embeddings, LM head, norms) are copied into
    the process first (`materialize`), in both variants, since on a GPU every
    base copy holds its own; otherwise four CPU copies would share one set of
    page-cache pages. The whole-process ru_maxrss is reported too;
  - step time: mean seconds per PPO iteration (rollout + scoring + optimisation),
    first iteration excluded (warm-up);
  - base copies: Linear4bit modules alive in the process / Linear4bit modules in one base.

Target: peak memory ratio (one_base / four_models) <= 0.4 at a step time ratio <= 1.2.
The model is a tiny-architecture Llama with random weights, wide enough that
weights dominate memory (alignkit.tiny.build_tiny_model(hidden_size, num_layers)).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import os
import shutil
import tempfile
import threading
import time
import types
from pathlib import Path

import yaml

from benchmarks.harness import compare, emit, machine, parse_args, ratio, record

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data"
MODULE = "benchmarks.bench_ppo_roles"


def settings(quick: bool) -> dict:
    if quick:
        return {"hidden": 64, "layers": 2, "heads": 4, "vocab": None, "steps": 2, "rollout": 4, "mini": 2, "epochs": 1,
                "new_tokens": 8}
    # Llama-3.2-1B's width (hidden 2048) at half its depth, with Llama 2's 32,000-token vocabulary (Llama 3 has
    # 128,256): the embeddings and LM head are part of every copy of a base, as in real models.
    return {"hidden": 2048, "layers": 8, "heads": 16, "vocab": 32_000, "steps": 3, "rollout": 8, "mini": 2, "epochs": 1,
            "new_tokens": 16}


def widen_vocabulary(base: Path, vocab: int) -> None:
    """Pad the tiny BPE tokenizer (trained on a small corpus, ~500 tokens) with placeholder tokens up to `vocab`,
    and the model's embeddings and LM head with it, so the base has a real model's vocabulary size."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(base)
    if len(tokenizer) >= vocab:
        return
    tokenizer.add_tokens([f"<v{i}>" for i in range(vocab - len(tokenizer))])
    model = LlamaForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)


def model_settings(base: Path):
    from alignkit.modeling import ModelSettings

    return ModelSettings(base=str(base), quantization="4bit", compute_dtype="float32")


def peft_settings():
    from alignkit.modeling import PeftSettings

    return PeftSettings(method="lora", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def prepare(work: Path, s: dict) -> None:
    """Base model + SFT stage + reward stage (a few steps each: PPO needs them to exist, not to be good)."""
    from alignkit.tiny import build_tiny_model
    from recipes.runner import run_recipe

    base = build_tiny_model(work / "base", hidden_size=s["hidden"], num_layers=s["layers"], num_heads=s["heads"])
    if s["vocab"]:
        widen_vocabulary(base, s["vocab"])
    train = {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 96, "logging_steps": 1,
             "save_steps": 10_000, "gradient_checkpointing": False, "learning_rate": 1e-3}
    raw = {
        "model": {"base": str(base), "quantization": "4bit", "compute_dtype": "float32"},
        "peft": {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "run_dir": str(work / "run"),
        "seed": 0,
        "stages": [
            {"name": "sft", "kind": "sft", "data": {"train": str(DATA / "tiny_sft.jsonl")}, "train": train},
            {"name": "reward", "kind": "reward", "after": "sft",
             "data": {"train": str(DATA / "tiny_rlhf_prefs.jsonl"), "eval_fraction": 0.1}, "train": train},
        ],
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_recipe(path, log=lambda *_: None)


def _trim() -> None:
    """Hand freed heap back to the OS, so RSS reflects live memory rather than loading transients."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def anon_rss() -> int:
    """Anonymous resident memory in bytes (Linux RssAnon): what the process allocated, without file-backed pages.

    transformers keeps the safetensors checkpoint memory-mapped after loading; the pages read while quantizing stay
    resident as clean, reclaimable page cache and would count as ~4 bytes per parameter per loaded copy in plain RSS.
    """
    import psutil

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


class PeakRSS:
    """Samples the process's anonymous RSS in a thread; `peak` is the highest value seen while running."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = anon_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss())


def materialize(model) -> None:
    """Copy the weights that are still views of the memory-mapped checkpoint (embeddings, norms, LM head: loaded
    without a dtype change, transformers keeps them mmapped) into the process's own memory, as a GPU would.
    Without this every CPU copy of a base shares one set of page-cache pages and the baseline's extra copies
    look almost free. Shared (tied) tensors stay shared."""
    import bitsandbytes as bnb

    copies: dict[int, object] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if isinstance(t, bnb.nn.Params4bit):
            continue  # quantized at load time: already the process's own memory
        ptr = t.data.data_ptr()
        if ptr not in copies:
            copies[ptr] = t.data.clone()
        t.data = copies[ptr]


def split_into_four_models(trainer, settings) -> None:
    """Turn a one-base PPOTrainer into the four-model baseline: reference, reward and value each on its own base."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from alignkit.modeling import load_base_model, prepare_for_training

    main = trainer.model
    models = {"policy": main}
    for role in ("reference", "reward", "value"):
        base = prepare_for_training(load_base_model(settings), settings, gradient_checkpointing=False)
        materialize(base)
        config = copy.deepcopy(main.peft_config[role])
        config.inference_mode = role != "value"
        model = get_peft_model(base, config, adapter_name=role)
        set_peft_model_state_dict(model, get_peft_model_state_dict(main, adapter_name=role), adapter_name=role)
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(role == "value" and "lora_" in name)
        models[role] = model
    for role in ("reference", "reward", "value"):
        main.delete_adapter(role)
    main.set_adapter("policy")
    trainable = [p for n, p in main.named_parameters() if "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    trainable += [p for p in models["value"].parameters() if p.requires_grad] + list(trainer.value_head.parameters())
    trainer.optimizer = torch.optim.AdamW(trainable, lr=trainer.config.learning_rate,
                                          weight_decay=trainer.config.weight_decay)  # as ours

    def use(self, role: str) -> None:  # the trainer's role switch: a model per role instead of an adapter per role
        self.model = models[role]

    trainer._use = types.MethodType(use, trainer)
    trainer.separate_models = models


def count_4bit_linears() -> int:
    import bitsandbytes as bnb

    return sum(1 for o in gc.get_objects() if isinstance(o, bnb.nn.Linear4bit))


def run(variant: str, work: Path, s: dict) -> dict:
    import resource

    import psutil
    import torch

    from alignkit.data.formats import prompt_of
    from alignkit.data.io import read_jsonl
    from alignkit.ppo.config import PPOConfig
    from alignkit.ppo.trainer import PPOTrainer

    base = work / "base"
    prompts = [prompt_of(r) for r in read_jsonl(DATA / "tiny_prompts.jsonl")]
    config = PPOConfig(steps=s["steps"], rollout_batch_size=s["rollout"], mini_batch_size=s["mini"], ppo_epochs=s["epochs"],
                       max_new_tokens=s["new_tokens"], learning_rate=1e-4, save_steps=10_000, logging_steps=1,
                       min_reward_accuracy=0.0, seed=0)
    import bitsandbytes  # noqa: F401  everything loading imports, imported before the baseline RSS is taken
    import peft  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    _trim()
    rss0 = anon_rss()
    out_dir = Path(tempfile.mkdtemp(dir=work))
    trainer = PPOTrainer(config, model_settings(base), peft_settings(), prompts=prompts, stage_dir=out_dir,
                         reward=work / "run" / "reward", policy_adapter=work / "run" / "sft", seed=0)
    import bitsandbytes as bnb

    per_base = sum(1 for m in trainer.model.get_base_model().modules() if isinstance(m, bnb.nn.Linear4bit))
    materialize(trainer.model)
    if variant == "four_models":
        split_into_four_models(trainer, model_settings(base))
    _trim()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as peak:
        trainer.train()
        copies = count_4bit_linears() / per_base
    step_seconds = [h["step_seconds"] for h in trainer.history]
    timed = step_seconds[1:] or step_seconds
    result = {
        "seconds_per_step": sum(timed) / len(timed),
        "model_memory_mb": (peak.peak - rss0) / 2**20,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_copies": copies,
        "mean_reward": trainer.history[-1]["mean_reward"],
    }
    if torch.cuda.is_available():
        result["model_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    args = parse_args(__doc__)
    s = settings(args.quick)
    if args.variant:
        emit(run(args.variant, Path(args.work), s))
        return
    # glibc keeps freed blocks below a dynamic mmap threshold (up to 32 MB) on its heaps, so per-layer transients
    # (4-bit weights dequantized for each matmul) would stay resident and read as model memory. A fixed threshold
    # hands large blocks back to the OS when freed: RSS then tracks live memory. Same for both variants.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    work = Path(tempfile.mkdtemp(prefix="bench-ppo-roles-"))
    try:
        prepare(work, s)
        repeats = 1 if args.quick else args.repeats
        extra = ["--work", str(work)] + (["--quick"] if args.quick else [])
        four, one = compare(MODULE, "four_models", "one_base", extra, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mem_ratio = one["model_memory_mb"] / four["model_memory_mb"]
    time_ratio = one["seconds_per_step"] / four["seconds_per_step"]
    cmd = "python -m benchmarks.bench_ppo_roles" + (" --quick" if args.quick else "")
    verdict = "meets" if mem_ratio <= 0.4 and time_ratio <= 1.2 else "misses"
    vocab = f"vocabulary {s['vocab']:,}" if s["vocab"] else "the tiny tokenizer's vocabulary"
    notes = (f"Model: 4-bit NF4 Llama, hidden {s['hidden']}, {s['layers']} layers, {vocab}, random weights; LoRA r=16 on all linear "
             f"layers for every role. PPO: {s['steps']} iterations of {s['rollout']} rollouts x {s['new_tokens']} new tokens, "
             f"minibatch {s['mini']}, {s['epochs']} PPO epochs; step time excludes the first iteration. Memory: "
             + ("torch.cuda.max_memory_allocated." if "cuda" in machine().lower() or "GPU" in machine() else
                "peak anonymous RSS (RssAnon) during the PPO steps, sampled every 10 ms, minus the same after imports and "
                "before loading; weights left as views of the memory-mapped checkpoint are first copied into the process "
                "in both variants, as every base copy on a GPU holds its own; "
                "process peak = ru_maxrss of the whole process (imports, loading transients included).")
             + " glibc MALLOC_MMAP_THRESHOLD_=131072 (freed large blocks go back to the OS, so RSS is live memory)."
             + f" Median of {repeats} alternating runs, each variant in a fresh process. "
             f"Target memory ratio <= 0.4 at step-time ratio <= 1.2: {verdict}.")
    record(
        "PPO roles: one base with four adapters vs four loaded models", cmd,
        ["variant", "base copies", "model memory MB", "process peak RSS MB", "s/step"],
        [["four models", f"{four['base_copies']:.0f}", f"{four['model_memory_mb']:.0f}", f"{four['process_peak_rss_mb']:.0f}",
          f"{four['seconds_per_step']:.3f}"],
         ["one base (ours)", f"{one['base_copies']:.0f}", f"{one['model_memory_mb']:.0f}", f"{one['process_peak_rss_mb']:.0f}",
          f"{one['seconds_per_step']:.3f}"],
         ["ratio (ours / four)", "", ratio(one["model_memory_mb"], four["model_memory_mb"]),
          ratio(one["process_peak_rss_mb"], four["process_peak_rss_mb"]), ratio(one["seconds_per_step"], four["seconds_per_step"])]],
        notes=notes, quick=args.quick)
    print(f"peak memory ratio {mem_ratio:.3f}, step time ratio {time_ratio:.3f}")


if __name__ == "__main__":
    main()
