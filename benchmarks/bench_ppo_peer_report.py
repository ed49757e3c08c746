"""bench_ppo_peer's evaluation and report: the quality curve, `alignkit compare` win rates, the plot, RESULTS.md.

Kept apart from bench_ppo_peer.py so the measured processes import nothing of this.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_ppo_peer import (PLOT, REPO, PPOSettings, ShapeModels, SideResult, alternate, demo_settings,
                                       demo_shape, median_of)
from benchmarks.harness import ratio, record
from benchmarks.peer_setup import PINS, peer_versions, prepare_demo

EVAL_MAX_NEW_TOKENS = 48  # the demo's evaluation length


@dataclass(frozen=True)
class CurvePoint:
    step: int
    kl: float
    score: float


@dataclass(frozen=True)
class WinRate:
    win_rate: float
    ci_low: float
    ci_high: float


def _policy_points(model, tokenizer, adapters: dict[int, str], prompts: list[str], reference, seed: int) -> list[CurvePoint]:
    """Oracle score and KL to the reference of each saved policy adapter, on the same prompts and seed."""
    from alignkit.generation import SamplingParams, generate_batch
    from alignkit.policy_stats import kl_to_reference, sequence_logprobs
    from alignkit.tasks import sentiment

    params = SamplingParams(max_new_tokens=EVAL_MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, seed=seed, batch_size=64)
    points = []
    for step, path in sorted(adapters.items()):
        model.load_adapter(path, adapter_name=f"step{step}")
        model.set_adapter(f"step{step}")
        gen = generate_batch(model, tokenizer, prompts, params)
        own = sequence_logprobs(model, gen.prompt_ids, gen.response_ids, tokenizer.pad_token_id)
        with reference(model):
            ref = sequence_logprobs(model, gen.prompt_ids, gen.response_ids, tokenizer.pad_token_id)
        kl = kl_to_reference(own, ref, temperature=1.0, top_p=1.0, rounds=200)["kl"]
        points.append(CurvePoint(step, kl, sum(sentiment.score(t) for t in gen.texts) / len(gen.texts)))
        model.delete_adapter(f"step{step}")
    return points


def quality_curve(side: str, shape: ShapeModels, adapters: dict[int, str], prompts: list[str], seed: int) -> list[CurvePoint]:
    """Step 0 is the starting SFT policy itself (KL 0); each side's KL is to its own start, loaded as it trained:
    TRL's policy on the merged SFT checkpoint in 4-bit, its reference the adapter disabled; ours on the 4-bit base,
    its reference the SFT adapter."""
    import contextlib

    from peft import PeftModel

    from alignkit.generation import SamplingParams, generate_batch
    from alignkit.modeling import ModelSettings, load_base_model, load_tokenizer
    from alignkit.tasks import sentiment

    tokenizer = load_tokenizer(str(shape.sft_stage), padding_side="left")
    base = load_base_model(ModelSettings(base=str(shape.sft_merged if side == "trl" else shape.base)))
    if side == "trl":
        model = PeftModel.from_pretrained(base, adapters[min(adapters)], adapter_name="start")

        def reference(m):
            return m.disable_adapter()
    else:
        model = PeftModel.from_pretrained(base, str(shape.sft_stage), adapter_name="sft")

        @contextlib.contextmanager
        def reference(m):
            active = m.active_adapter
            m.set_adapter("sft")
            try:
                yield
            finally:
                m.set_adapter(active)
    model.eval()
    params = SamplingParams(max_new_tokens=EVAL_MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, seed=seed, batch_size=64)
    with reference(model):
        start = generate_batch(model, tokenizer, prompts, params)
    points = [CurvePoint(0, 0.0, sum(sentiment.score(t) for t in start.texts) / len(start.texts))]
    return points + _policy_points(model, tokenizer, adapters, prompts, reference, seed)


def score_at_kl(curve: list[CurvePoint], kl: float) -> float | None:
    """The curve's oracle score at `kl`, linearly interpolated between its points (None outside their range)."""
    pts = sorted(curve, key=lambda p: p.kl)
    for a, b in zip(pts, pts[1:]):
        if a.kl <= kl <= b.kl:
            return a.score if b.kl == a.kl else a.score + (b.score - a.score) * (kl - a.kl) / (b.kl - a.kl)
    return None


def win_rates(shape: ShapeModels, finals: dict[str, str], out: Path, seed: int) -> dict[str, WinRate]:
    """`alignkit compare` of each final policy against SFT, judged by the sentiment oracle."""
    cmd = [sys.executable, "-m", "alignkit.cli", "compare", "--model", f"sft={shape.sft_stage}",
           *[a for name, path in finals.items() for a in ("--model", f"{name}={path}")],
           "--prompts", str(shape.eval_prompts), "--judge", "oracle:sentiment", "--out", str(out),
           "--max-new-tokens", str(EVAL_MAX_NEW_TOKENS), "--seed", str(seed), "--bootstrap", "200"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={"TQDM_DISABLE": "1", **__import__("os").environ})
    if done.returncode != 0:
        raise SystemExit(f"alignkit compare failed:\n{done.stderr[-3000:]}")
    result = json.loads((out / "compare.json").read_text())
    rates = {}
    for p in result["pairs"]:
        a, b = p["model_a"], p["model_b"]
        if "sft" in (a, b):
            other = b if a == "sft" else a
            wr, lo, hi = p["win_rate"], p["ci_low"], p["ci_high"]
            rates[other] = WinRate(wr, lo, hi) if a == other else WinRate(1 - wr, 1 - hi, 1 - lo)
    return rates


def plot(curves: dict[str, list[CurvePoint]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for side, pts in curves.items():
        ax.plot([p.kl for p in pts], [p.score for p in pts], marker="o", label=side)
        for p in pts[-1:]:
            ax.annotate(f"step {p.step}", (p.kl, p.score), fontsize=8)
    ax.set_xlabel("KL(policy ‖ its SFT start), nats per response")
    ax.set_ylabel("mean oracle sentiment score (eval prompts)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(args, root: Path, peer: Path | None) -> None:
    """The demo's controlled-sentiment PPO, both sides, then the curve, win rates, plot and RESULTS.md."""
    from alignkit.data.formats import prompt_of
    from alignkit.data.io import read_jsonl

    models = prepare_demo(root / ("demo-quick" if args.quick else "demo"), args.quick)
    shape = demo_shape(models)
    s = demo_settings(models.recipe)
    work = root / ("work-quick" if args.quick else "work")
    _fresh(work)
    repeats = 1 if args.quick else args.repeats
    eval_every = 1 if args.quick else 5
    runs = alternate(shape, s, work, peer, repeats, eval_every, threads=1)
    prompts = [prompt_of(r) for r in read_jsonl(shape.eval_prompts)][: 48 if args.quick else None]
    curves = {side: quality_curve(side, shape, {int(k): v for k, v in rs[0].checkpoints.items()}, prompts, s.seed)
              for side, rs in runs.items() if rs}
    finals = {side: rs[0].checkpoints[str(max(int(k) for k in rs[0].checkpoints))] for side, rs in runs.items() if rs}
    rates = win_rates(shape, finals, work / "compare", s.seed)
    plot(curves, work / "quality.png" if args.quick else PLOT,
         f"PPO on the demo's sentiment task: alignkit vs TRL {PINS.trl} ({s.steps} steps x {s.rollout_batch_size})")
    report_demo(args, s, runs, curves, rates, peer, repeats)


def _fresh(work: Path) -> None:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)


def _cells(rs: list[SideResult] | None, rate: WinRate | None, curve: list[CurvePoint] | None) -> list[str]:
    if not rs:
        return ["skipped (no TRL 0.29.1 venv)"] + [""] * 5
    final = curve[-1] if curve else None
    return [f"{median_of(rs, 'model_memory_mb'):.0f}", f"{median_of(rs, 'process_peak_rss_mb'):.0f}",
            f"{median_of(rs, 'seconds_per_step'):.3f}",
            f"{final.score:.3f} @ KL {final.kl:.2f}" if final else "",
            f"{rate.win_rate:.3f} [{rate.ci_low:.3f}, {rate.ci_high:.3f}]" if rate else "", f"{median_of(rs, 'mean_reward'):.3f}"]


def report_demo(args, s: PPOSettings, runs: dict[str, list[SideResult]], curves: dict[str, list[CurvePoint]],
                rates: dict[str, WinRate], peer: Path | None, repeats: int) -> None:
    ours, trl = runs["alignkit"], runs["trl"]
    rows = [[f"TRL {PINS.trl} PPOTrainer", *_cells(trl, rates.get("trl"), curves.get("trl"))],
            ["alignkit kind: ppo", *_cells(ours, rates.get("alignkit"), curves.get("alignkit"))]]
    mem = time = matched = "n/a"
    if trl:
        mem = ratio(median_of(ours, "model_memory_mb"), median_of(trl, "model_memory_mb"))
        time = ratio(median_of(ours, "seconds_per_step"), median_of(trl, "seconds_per_step"))
        kl = curves["trl"][-1].kl
        at = score_at_kl(curves["alignkit"], kl)
        matched = f"{at:.3f} vs {curves['trl'][-1].score:.3f} at KL {kl:.2f}" if at is not None else "no common KL"
        rows.append(["ratio (ours / TRL)", mem, ratio(median_of(ours, "process_peak_rss_mb"), median_of(trl, "process_peak_rss_mb")),
                     time, matched, "", ""])
    curve_txt = "; ".join(f"{side}: " + ", ".join(f"step {p.step} KL {p.kl:.2f} score {p.score:.3f}" for p in pts)
                          for side, pts in curves.items())
    notes = (f"Settings (the demo recipe's ppo stage, both sides): {s.steps} steps x {s.rollout_batch_size} rollouts, "
             f"minibatch {s.mini_batch_size}, {s.ppo_epochs} PPO epochs, lr {s.learning_rate} constant, KL coef "
             f"{s.kl_coef} fixed (k1), {s.max_new_tokens} new tokens, temperature {s.temperature}, missing-EOS penalty "
             f"{s.missing_eos_penalty}, LoRA r {s.lora_r} / alpha {s.lora_alpha}, seed {s.seed}; one torch thread per "
             f"process. Peer venv: {peer_versions(peer) if peer else 'absent'}. Median of {repeats} alternating runs "
             f"(TRL, ours, ...), each in a fresh process; the curve and win rates are from the first run of each. "
             f"Quality curve: {curve_txt}. Plot: benchmarks/{PLOT.name}. Load average at the end (2 shared cores): "
             f"{', '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}.")
    cmd = "python -m benchmarks.bench_ppo_peer" + (" --quick" if args.quick else "")
    record("PPO vs TRL 0.29.1's PPOTrainer: the demo's controlled-sentiment task", cmd,
           ["side", "model memory MB", "process peak RSS MB", "s/step", "oracle score (final)", "win rate vs SFT [95% CI]",
            "train reward (last step)"], rows, notes=notes, quick=args.quick)
    print(f"ppo peer: memory ratio {mem}, step time ratio {time}, matched-KL oracle score {matched}")


def large_settings() -> PPOSettings:
    """bench_ppo_roles' larger run: few steps (a 2-core CPU), the first excluded from the step time."""
    from benchmarks.bench_ppo_roles import settings

    r = settings(False)
    return PPOSettings(steps=r["steps"], rollout_batch_size=r["rollout"], mini_batch_size=r["mini"], ppo_epochs=r["epochs"],
                       learning_rate=1e-4, kl_coef=0.05, max_new_tokens=r["new_tokens"], temperature=1.0,
                       missing_eos_penalty=None, seed=0, lora_r=16, lora_alpha=32)


def run_large(args, root: Path, peer: Path | None) -> None:
    """Memory and step time on hidden 2048, 8 layers, 32k vocabulary (random weights: quality means nothing here)."""
    from benchmarks.bench_ppo_roles import DATA, prepare, settings
    from benchmarks.peer_setup import merge_stages

    work = root / "large"
    prepare(work, settings(False))  # cached: the base and both 2-step stages are reused when complete
    run = work / "run"
    shape = ShapeModels(str(work / "base"), run / "sft", run / "reward", work / "merged" / "sft", work / "merged" / "reward",
                        DATA / "tiny_prompts.jsonl", DATA / "tiny_prompts.jsonl")
    merge_stages(shape)
    s = large_settings()
    out = work / "runs"
    _fresh(out)
    runs = alternate(shape, s, out, peer, args.repeats, eval_every=0, threads=2)
    ours, trl = runs["alignkit"], runs["trl"]
    rows = [[name, f"{median_of(rs, 'model_memory_mb'):.0f}", f"{median_of(rs, 'process_peak_rss_mb'):.0f}",
             f"{median_of(rs, 'seconds_per_step'):.2f}"] for name, rs in ((f"TRL {PINS.trl} PPOTrainer", trl),
                                                                        ("alignkit kind: ppo", ours)) if rs]
    mem = time = "n/a"
    if trl:
        mem = ratio(median_of(ours, "model_memory_mb"), median_of(trl, "model_memory_mb"))
        time = ratio(median_of(ours, "seconds_per_step"), median_of(trl, "seconds_per_step"))
        rows.append(["ratio (ours / TRL)", mem, ratio(median_of(ours, "process_peak_rss_mb"), median_of(trl, "process_peak_rss_mb")), time])
    notes = (f"4-bit NF4 Llama, hidden 2048, 8 layers, vocabulary 32,000, random weights (bench_ppo_roles' larger shape); "
             f"SFT and reward stages of 2 steps each, merged to float32 for TRL. PPO: {s.steps} steps x {s.rollout_batch_size} "
             f"rollouts x {s.max_new_tokens} new tokens, minibatch {s.mini_batch_size}, {s.ppo_epochs} epoch, LoRA r "
             f"{s.lora_r}; two torch threads per process; step time excludes the first step, so it is the mean of "
             f"{s.steps - 1} steps — few, since a step takes tens of seconds on this CPU. Median of {args.repeats} "
             f"alternating runs. Peer venv: {peer_versions(peer) if peer else 'absent'}. Load average at the end: "
             f"{', '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}.")
    record("PPO vs TRL 0.29.1's PPOTrainer: hidden 2048, 8 layers, 32k vocabulary (memory, step time)",
           "python -m benchmarks.bench_ppo_peer --shape large" + (f" --repeats {args.repeats}" if args.repeats != 3 else ""),
           ["side", "model memory MB", "process peak RSS MB", "s/step"], rows, notes=notes, quick=args.quick)
    print(f"ppo peer (large): memory ratio {mem}, step time ratio {time}")
