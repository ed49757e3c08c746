"""PPO against the PPO people used: alignkit's `kind: ppo` vs TRL 0.29.1's PPOTrainer (trl.experimental.ppo).

    python -m benchmarks.bench_ppo_peer             # full: appends sections to benchmarks/RESULTS.md
    python -m benchmarks.bench_ppo_peer --quick     # smoke: the quick demo's stages, 2 steps, prints only
    python -m benchmarks.bench_ppo_peer --shape large --repeats 1   # hidden 2048, 8 layers, 32k vocabulary

TRL removed PPOTrainer from its main namespace; 0.29.1 is the last release with it, so the TRL side runs in a
separate, cached virtual environment (benchmarks/peer_setup.py: the pins and why) through
benchmarks/peer_trl_ppo.py, set up as TRL's own PEFT example script: policy = the SFT checkpoint in 4-bit NF4
with a fresh LoRA adapter, reference = that adapter disabled, reward and value = sequence classifiers loaded
from the reward checkpoint in full precision (the value model trained in full). TRL loads plain checkpoints,
so the demo's SFT and reward stages are merged for it (alignkit.merge: float32, onto the base's original
weights). alignkit's side is its PPOTrainer as the `kind: ppo` stage builds it: one 4-bit base, the policy and
reference as the SFT adapter, reward and value as adapters initialised from the reward stage.

Both sides, same settings from the demo recipe's `ppo` stage: prompts, rollout batch, minibatch, PPO epochs,
KL coefficient (fixed), learning rate (constant), max new tokens, temperature, missing-EOS penalty, seed,
LoRA r / alpha. Each run is a fresh process, TRL and ours alternating; medians over repeats. Measured:
  - peak memory as bench_ppo_roles measures it: peak anonymous RSS (RssAnon) sampled every 10 ms during the
    PPO steps minus the same after imports, every model's weights first copied out of the mmapped checkpoint;
  - seconds per PPO step, the first step excluded (warm-up), checkpoint saves excluded;
  - the quality curve: every few steps the policy adapter is saved; afterwards each is sampled on the demo's
    eval prompts (temperature 1), scored by the oracle (alignkit.tasks.sentiment) and its KL to its own
    starting SFT policy estimated from the same samples (mean of log pi - log pi_sft);
  - final oracle win rate vs SFT with 95% CIs: `alignkit compare --judge oracle:sentiment`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from benchmarks.harness import emit, parse_args, ratio, record
from benchmarks.peer_setup import RUNS, DemoModels, ensure_peer_venv, peer_python, peer_versions, prepare_demo

REPO = Path(__file__).resolve().parents[1]
MODULE = "benchmarks.bench_ppo_peer"
PEER_SCRIPT = REPO / "benchmarks" / "peer_trl_ppo.py"
PLOT = REPO / "benchmarks" / "ppo_peer_quality.png"


@dataclass(frozen=True)
class PPOSettings:
    """The settings both sides share, read from the demo recipe's `ppo` stage."""

    steps: int
    rollout_batch_size: int
    mini_batch_size: int
    ppo_epochs: int
    learning_rate: float
    kl_coef: float
    max_new_tokens: int
    temperature: float
    missing_eos_penalty: float | None
    seed: int
    lora_r: int
    lora_alpha: int


@dataclass(frozen=True)
class RunSpec:
    """One side's run: what it loads, its settings, where it writes. Written as JSON for the side's process."""

    sft_model: str  # merged SFT checkpoint (TRL) / SFT stage (alignkit)
    reward_model: str  # merged reward checkpoint (TRL) / reward stage (alignkit)
    base: str  # alignkit's base model
    prompts: str
    out_dir: str
    checkpoints: str
    eval_every: int
    threads: int
    settings: PPOSettings


@dataclass
class SideResult:
    """One run's measurements (as the side's process reports them)."""

    seconds_per_step: float
    model_memory_mb: float
    process_peak_rss_mb: float
    mean_reward: float
    train_kl: float
    checkpoints: dict[str, str] = field(default_factory=dict)


def demo_settings(recipe: Path) -> PPOSettings:
    import yaml

    raw = yaml.safe_load(recipe.read_text())
    train = next(st for st in raw["stages"] if st["name"] == "ppo")["train"]
    return PPOSettings(steps=train["steps"], rollout_batch_size=train["rollout_batch_size"],
                       mini_batch_size=train["mini_batch_size"], ppo_epochs=train["ppo_epochs"],
                       learning_rate=float(train["learning_rate"]), kl_coef=float(train["init_kl_coef"]),
                       max_new_tokens=train["max_new_tokens"], temperature=float(train["temperature"]),
                       missing_eos_penalty=train.get("missing_eos_penalty"), seed=raw.get("seed", 0),
                       lora_r=raw["peft"]["r"], lora_alpha=raw["peft"]["lora_alpha"])


def base_of(recipe: Path) -> str:
    import yaml

    return yaml.safe_load(recipe.read_text())["model"]["base"]


# -- alignkit's side (a fresh process of this module) ---------------------------------------------------------


def run_alignkit(spec: RunSpec) -> dict:
    """alignkit's PPOTrainer as recipes/ppo.py builds it, measured as bench_ppo_roles measures it."""
    import resource

    import torch

    from alignkit.data.formats import prompt_of
    from alignkit.data.io import read_jsonl
    from alignkit.modeling import ModelSettings, PeftSettings
    from alignkit.ppo.config import PPOConfig
    from alignkit.ppo.trainer import PPOTrainer
    from alignkit.training import save_policy
    from benchmarks.bench_ppo_roles import PeakRSS, _trim, anon_rss, materialize

    torch.set_num_threads(spec.threads)
    s = spec.settings
    import bitsandbytes  # noqa: F401  everything loading imports, before the baseline RSS is taken
    import peft  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    config = PPOConfig(steps=s.steps, rollout_batch_size=s.rollout_batch_size, mini_batch_size=s.mini_batch_size,
                       ppo_epochs=s.ppo_epochs, learning_rate=s.learning_rate, init_kl_coef=s.kl_coef,
                       max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                       missing_eos_penalty=s.missing_eos_penalty, save_steps=10_000, logging_steps=1,
                       min_reward_accuracy=0.0, seed=s.seed)
    prompts = [prompt_of(r) for r in read_jsonl(spec.prompts)]
    checkpoints: dict[str, str] = {}

    def save_every(trainer, step: int, _metrics: dict) -> None:  # after the step's clock stopped
        if spec.eval_every and (step % spec.eval_every == 0 or step == s.steps):
            out = Path(spec.checkpoints) / f"step-{step}"
            save_policy(trainer.model, trainer.tokenizer, out, adapter_name="policy")
            checkpoints[str(step)] = str(out)

    _trim()
    rss0 = anon_rss()
    trainer = PPOTrainer(config, ModelSettings(base=spec.base), PeftSettings(r=s.lora_r, lora_alpha=s.lora_alpha,
                         lora_dropout=0.0), prompts=prompts, stage_dir=spec.out_dir, reward=spec.reward_model,
                         policy_adapter=spec.sft_model, seed=s.seed, on_step=save_every)
    materialize(trainer.model)
    _trim()
    with PeakRSS() as peak:
        trainer.train()
    timed = [h["step_seconds"] for h in trainer.history][1:] or [trainer.history[0]["step_seconds"]]
    return {"seconds_per_step": sum(timed) / len(timed), "model_memory_mb": (peak.peak - rss0) / 2**20,
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "mean_reward": trainer.history[-1]["mean_reward"], "train_kl": trainer.history[-1]["kl"],
            "checkpoints": checkpoints}


# -- running both sides ---------------------------------------------------------------------------------------


def _run_process(cmd: list[str], what: str) -> SideResult:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{what} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    raw = json.loads(lines[-1][len("RESULT "):])
    return SideResult(**{k: raw[k] for k in SideResult.__dataclass_fields__ if k in raw})


def run_side(side: str, spec: RunSpec, work: Path, peer: Path | None) -> SideResult:
    path = work / f"spec-{side}-{Path(spec.out_dir).name}.json"
    path.write_text(json.dumps(asdict(spec)))
    if side == "trl":
        return _run_process([str(peer), str(PEER_SCRIPT), "--spec", str(path)], "TRL 0.29.1's PPOTrainer")
    return _run_process([sys.executable, "-m", MODULE, "--variant", "alignkit", "--work", str(path)], "alignkit's PPO")


def specs_for(shape: "ShapeModels", s: PPOSettings, work: Path, repeat: int,
              eval_every: int, threads: int) -> dict[str, RunSpec]:
    common = dict(prompts=str(shape.prompts), eval_every=eval_every if repeat == 0 else 0, threads=threads, settings=s)
    return {
        "trl": RunSpec(sft_model=str(shape.sft_merged), reward_model=str(shape.reward_merged), base=shape.base,
                       out_dir=str(work / f"trl-{repeat}"), checkpoints=str(work / "ckpt" / "trl"), **common),
        "alignkit": RunSpec(sft_model=str(shape.sft_stage), reward_model=str(shape.reward_stage), base=shape.base,
                            out_dir=str(work / f"alignkit-{repeat}"), checkpoints=str(work / "ckpt" / "alignkit"), **common),
    }


@dataclass(frozen=True)
class ShapeModels:
    """The stages a run starts from, in both forms (adapters for alignkit, merged checkpoints for TRL)."""

    base: str
    sft_stage: Path
    reward_stage: Path
    sft_merged: Path
    reward_merged: Path
    prompts: Path
    eval_prompts: Path


def alternate(shape: ShapeModels, s: PPOSettings, work: Path, peer: Path | None, repeats: int, eval_every: int,
              threads: int, log=print) -> dict[str, list[SideResult]]:
    """TRL, ours, TRL, ours, ... each a fresh process; repeat 0 also saves the policies for the quality curve."""
    runs: dict[str, list[SideResult]] = {"trl": [], "alignkit": []}
    for repeat in range(repeats):
        specs = specs_for(shape, s, work, repeat, eval_every, threads)
        for side in ("trl", "alignkit"):
            if side == "trl" and peer is None:
                continue
            result = run_side(side, specs[side], work, peer)
            log(f"  repeat {repeat + 1}/{repeats} {side}: {result.seconds_per_step:.2f} s/step, "
                f"{result.model_memory_mb:.0f} MB, reward {result.mean_reward:.3f}, KL {result.train_kl:.3f}")
            runs[side].append(result)
    return runs


def median_of(results: list[SideResult], key: str) -> float:
    return statistics.median(getattr(r, key) for r in results)


def demo_shape(models: DemoModels) -> ShapeModels:
    return ShapeModels(base_of(models.recipe), models.sft_stage, models.reward_stage, models.sft_merged,
                       models.reward_merged, models.prompts, models.eval_prompts)


def main() -> None:
    args = parse_args(__doc__, **{"--shape": {"choices": ["demo", "large"], "default": "demo"},
                                  "--root": {"default": str(RUNS), "help": "where the peer venv and workdirs are cached"},
                                  "--no-peer": {"action": "store_true", "help": "alignkit's side only"}})
    if args.variant:
        spec_raw = json.loads(Path(args.work).read_text())
        spec = RunSpec(**{**spec_raw, "settings": PPOSettings(**spec_raw["settings"])})
        emit(run_alignkit(spec))
        return
    from benchmarks import bench_ppo_peer_report as report

    root = Path(args.root)
    peer = None if args.no_peer else (peer_python(root) if args.quick else ensure_peer_venv(root))
    if args.shape == "large":
        report.run_large(args, root, peer)
    else:
        report.run_demo(args, root, peer)


if __name__ == "__main__":
    main()
