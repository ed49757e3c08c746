"""What the demo shows: its claims, demo.json's summary, the plots and report.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from alignkit.tasks import sentiment
from demo.settings import ALIGNED, DemoSettings

# The claims the demo checks; demo.json records each as true or false.
CLAIM_RM_ACCURACY = 0.85
CLAIM_WIN_RATE = 0.65


def claims_of(ev: dict) -> dict[str, bool]:
    """The demo's claims, each true or false, from evaluate()'s rm_accuracy, win_rate and kl."""

    def vs_sft(m: str, key: str) -> float:
        # None where the pair had no battles: the claim fails rather than the comparison raising TypeError.
        value = ev["win_rate"].get(m, {}).get(key)
        return float("nan") if value is None else value

    return {
        f"rm_accuracy >= {CLAIM_RM_ACCURACY}": ev["rm_accuracy"] >= CLAIM_RM_ACCURACY,
        **{f"{m} win_rate >= {CLAIM_WIN_RATE} and ci_low > 0.5 vs sft":
           vs_sft(m, "win_rate") >= CLAIM_WIN_RATE and vs_sft(m, "ci_low") > 0.5 for m in ALIGNED},
        "kl reported for every model": all(m in ev["kl"] for m in ALIGNED),
    }


def _rounded(table: dict, places: int = 4) -> dict:
    return {k: (round(v, places) if isinstance(v, float) else v) for k, v in table.items()}


def summarise(workdir: Path, records: dict, labeling: dict, ev: dict, s: DemoSettings, timings: dict,
              wall: float, quick: bool) -> dict:
    """What demo.json holds (less the final wall and CPU seconds)."""
    stage_info = {}
    for name, rec in records.items():
        metrics = rec.get("metrics", {})
        stage_info[name] = {"kind": rec.get("kind"), "wall_seconds": rec.get("wall_seconds"),
                            "train": rec.get("config", {}).get("train"),
                            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    return {
        "rm_accuracy": round(ev["rm_accuracy"], 4),
        "win_rate": {m: _rounded(w) for m, w in ev["win_rate"].items()},
        "kl": {m: round(v, 4) for m, v in ev["kl"].items() if m != "sft"},
        "kl_ci": {m: _rounded({k: v for k, v in c.items() if k != "kl"}) for m, c in ev["kl_ci"].items()},
        "wall_seconds": round(wall, 1),
        "quick": quick,
        "claims": claims_of(ev),
        "rm_heldout_pairs": ev["rm_pairs"],
        "rm_accuracy_by_oracle_gap": ev["rm_accuracy_by_gap"],
        "reward_stage_heldout_accuracy": records["reward"].get("metrics", {}).get("heldout_accuracy"),
        "ratings_oracle": ev["compare"]["ratings_oracle"],
        "ratings_warning_oracle": ev["compare"]["ratings_warning_oracle"],
        "compare": {"oracle": ev["compare"]["oracle"], "reward_model": ev["compare"]["reward_model"]},
        "win_rate_reward_model": {m: _rounded(w) for m, w in ev["win_rate_reward_model"].items()},
        "oracle_score": {m: round(v, 4) for m, v in ev["oracle_score"].items()},
        "mean_response_tokens": {m: round(v, 2) for m, v in ev["mean_length"].items()},
        "eos_fraction": {m: round(v, 3) for m, v in ev["eos_fraction"].items()},
        "eval_prompts": len(ev["prompts"]),
        "labeling": {k: labeling[k] for k in ("comparisons", "votes", "export", "label_accuracy_vs_oracle",
                                              "oracle_ties_among_pairs", "agreement", "seconds", "settings")
                     if k in labeling},
        "stages": stage_info,
        "step_seconds": {k: v for k, v in timings.items() if k != "cpu"},
        "step_cpu_seconds": timings.get("cpu", {}),
        "sampling": {"temperature": s.temperature, "top_p": 1.0, "max_new_tokens": s.eval_max_new_tokens, "seed": s.seed},
        "settings": dataclasses.asdict(s),
        "workdir": str(workdir),
    }


def claim_lines(result: dict) -> list[str]:
    """The headline numbers and whether the claims hold, as the lines `alignkit demo` ends with."""
    lines = [f"reward model accuracy vs oracle (held-out pairs): {result['rm_accuracy']:.3f}"]
    for m in ALIGNED:
        w = result["win_rate"].get(m)
        if w:
            kl = result.get("kl_ci", {}).get(m, {})
            lines.append(f"{m} vs sft (oracle): win rate {_rate_ci(w)}, KL to sft "
                         f"{result['kl'].get(m, float('nan')):.2f} [{kl.get('ci_low', float('nan')):.2f}, "
                         f"{kl.get('ci_high', float('nan')):.2f}] nats")
    failed = [c for c, ok in result["claims"].items() if not ok]
    lines.append("claims: all hold" if not failed else f"claims NOT met: {'; '.join(failed)}"
                 + (" (expected with --quick)" if result.get("quick") else ""))
    return lines


def _rate_ci(w: dict) -> str:
    """Win rate and 95% CI as text, or a dash where the pair had no battles (win_rate None)."""
    if w.get("win_rate") is None:
        return "–"
    if w.get("ci_low") is None:  # one prompt: nothing to resample
        return f"{w['win_rate']:.3f}"
    return f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"


def write_outputs(workdir: Path, result: dict, ev: dict) -> None:
    """The three plots and report.md in `workdir`."""
    import matplotlib

    matplotlib.use("Agg")
    plots = {"rm_accuracy": _plot_rm_accuracy(workdir, ev), "win_rates": _plot_win_rates(workdir, ev),
             "frontier": _plot_frontier(workdir, result, ev)}
    (workdir / "report.md").write_text(_report(workdir, result, ev, plots))


def _save(fig, workdir: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(workdir / name, dpi=110)
    plt.close(fig)
    return name


def _plot_rm_accuracy(workdir: Path, ev: dict) -> str:
    """Reward-model accuracy against the oracle, by how far apart the oracle puts the pair."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    gaps = list(ev["rm_accuracy_by_gap"].items())
    ax1.bar([g for g, _ in gaps], [v["accuracy"] for _, v in gaps], color="#4c72b0")
    for i, (_, v) in enumerate(gaps):
        ax1.text(i, v["accuracy"] + 0.01, f"n={v['pairs']}", ha="center", fontsize=8)
    ax1.axhline(ev["rm_accuracy"], color="k", ls="--", lw=1, label=f"overall {ev['rm_accuracy']:.3f}")
    ax1.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
    ax1.set_ylim(0, 1.08)
    ax1.set_xlabel("|oracle score difference| of the pair (lexicon units)")
    ax1.set_ylabel("reward model agrees with oracle")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title("Reward model vs oracle, held-out pairs")
    d = [x for x, _ in ev["rm_heldout"]]
    r = [y for _, y in ev["rm_heldout"]]
    ax2.scatter(d, r, s=8, alpha=0.5)
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.axvline(0, color="grey", lw=0.5)
    ax2.set_xlabel("oracle: score(a) - score(b)")
    ax2.set_ylabel("reward model: r(a) - r(b)")
    ax2.set_title("Score differences")
    return _save(fig, workdir, "rm_accuracy.png")


def _plot_win_rates(workdir: Path, ev: dict) -> str:
    """Win rates vs SFT with 95% CIs, oracle and reward-model judges."""
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(ev["win_rate"])
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(models) + 2), 4))
    width = 0.38
    for k, (label, table, color) in enumerate((("oracle judge", ev["win_rate"], "#4c72b0"),
                                                ("reward-model judge", ev["win_rate_reward_model"], "#dd8452"))):
        xs = [i + (k - 0.5) * width for i in range(len(models))]
        nan = float("nan")  # a pair without battles has None: drawn as no bar
        ys = [nan if table[m]["win_rate"] is None else table[m]["win_rate"] for m in models]
        # np.maximum: a Wilson bound at 0 or 1 can sit a rounding error past the rate; NaN (no battles) stays NaN.
        err = np.maximum(0.0, [[y - (table[m]["ci_low"] if table[m]["ci_low"] is not None else nan) for m, y in zip(models, ys)],
                               [(table[m]["ci_high"] if table[m]["ci_high"] is not None else nan) - y for m, y in zip(models, ys)]])
        ax.bar(xs, ys, width, yerr=err, capsize=4, label=label, color=color)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.axhline(CLAIM_WIN_RATE, color="k", ls="--", lw=1, label=f"claim: {CLAIM_WIN_RATE}")
    ax.set_xticks(range(len(models)), models)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("win rate vs sft (ties = 1/2)")
    ax.set_title(f"Win rate vs SFT on {len(ev['prompts'])} held-out prompts, 95% bootstrap CI")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, workdir, "win_rates.png")


def _plot_frontier(workdir: Path, result: dict, ev: dict) -> str:
    """Reward-vs-KL frontier: oracle score against KL to SFT, DPO points and PPO points."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    styles = {"sft": ("k", "s"), "dpo": ("#4c72b0", "o"), "ppo": ("#c44e52", "^")}
    for name in ev["policies"]:
        kind = next(k for k in ("sft", "dpo", "ppo") if name.startswith(k))
        color, marker = styles[kind]
        ax.scatter(ev["kl"][name], ev["oracle_score"][name], color=color, marker=marker, s=50,
                   label=kind if not any(n.startswith(kind) for n in ev["policies"][: ev["policies"].index(name)]) else None)
        if name in ev["kl_ci"]:
            c = ev["kl_ci"][name]
            ax.errorbar(ev["kl"][name], ev["oracle_score"][name], color=color, capsize=3, lw=1,
                        xerr=[[ev["kl"][name] - c["ci_low"]], [c["ci_high"] - ev["kl"][name]]])
        train = (result["stages"].get(name) or {}).get("train") or {}
        knob = f" (β={train['beta']})" if "beta" in train else f" (KL coef {train['init_kl_coef']})" if "init_kl_coef" in train else ""
        ax.annotate(name + knob, (ev["kl"][name], ev["oracle_score"][name]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xlabel("KL(policy || sft), nats per response (sampled), 95% CI")
    ax.set_ylabel("mean oracle sentiment score")
    ax.set_title("Reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, workdir, "frontier.png")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _report(workdir: Path, result: dict, ev: dict, plots: dict[str, str]) -> str:
    lines = [
        "# alignkit demo — controlled sentiment",
        "",
        "A miniature of the DPO paper's controlled-sentiment experiment: a tiny Llama pretrained on synthetic "
        "reviews, SFT on tone-balanced continuations, preference pairs labeled by simulated annotators (a lexicon "
        "oracle plus noise) through the real labeling server, then reward → PPO and DPO stages over QLoRA "
        "adapters, judged by the oracle.",
        "",
        f"Run {'(quick: smoke sizes, claims not expected)' if result['quick'] else ''} in {result['wall_seconds']:.0f} s; "
        f"recipe: `{workdir / 'recipe.yaml'}`; numbers: `demo.json`.",
        "",
        "## Claims",
        "",
        "| claim | holds |",
        "|---|---|",
        *[f"| {c} | {'yes' if ok else '**no**'} |" for c, ok in result["claims"].items()],
        "",
    ]
    lines += _win_rate_section(result, ev)
    lines += ["", f"![win rates]({plots['win_rates']})", "", "## Reward-vs-KL frontier", "",
              f"![frontier]({plots['frontier']})", ""]
    lines += _reward_model_and_labels_section(result, plots)
    lines += _samples_section(ev)
    lines += _stages_section(result)
    return "\n".join(lines)


def _win_rate_section(result: dict, ev: dict) -> list[str]:
    lines = [
        "## Win rates against SFT",
        "",
        f"One sample per held-out prompt ({result['eval_prompts']} prompts) from each model at temperature "
        f"{result['sampling']['temperature']}; every pair of models judged blind on every prompt (sides randomised) "
        "with `alignkit compare`'s judges and statistics; ties count half; 95% CI: the Wilson score interval over "
        "prompts. "
        "KL(policy ‖ SFT) is the mean over the policy's own samples of log π(y|x) − log π_sft(y|x) (the k1 estimate: "
        "unbiased but noisy), with a 95% percentile bootstrap CI over prompts.",
        "",
        "The length-controlled win rate is AlpacaEval 2's: the oracle's verdicts modelled on the length difference "
        "and read off at equal length (95% CI a bootstrap over prompts); a raw win far above it was bought with "
        "length.",
        "",
        "| model | oracle win rate [95% CI] | oracle, length-controlled [95% CI] | reward-model win rate [95% CI] | "
        "KL to SFT (nats) [95% CI] | mean oracle score | tokens | ended |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in ev["policies"]:
        if m == "sft":
            lines.append(f"| sft | — | — | — | 0 | {ev['oracle_score'][m]:.3f} | {ev['mean_length'][m]:.1f} | "
                         f"{ev['eos_fraction'][m]:.2f} |")
            continue
        o, r, k = ev["win_rate"][m], ev["win_rate_reward_model"][m], ev["kl_ci"][m]
        lc = {"win_rate": o.get("lc_win_rate"), "ci_low": o.get("lc_ci_low"), "ci_high": o.get("lc_ci_high")}
        lines.append(f"| {m} | {_rate_ci(o)} | {_rate_ci(lc)} | {_rate_ci(r)} | "
                     f"{ev['kl'][m]:.2f} [{k['ci_low']:.2f}, {k['ci_high']:.2f}] | "
                     f"{ev['oracle_score'][m]:.3f} | {ev['mean_length'][m]:.1f} | {ev['eos_fraction'][m]:.2f} |")
    ratings = result.get("ratings_oracle") or {}
    if ratings:
        lines += ["", "Bradley–Terry ratings under the oracle (Elo scale, 95% bootstrap CI): " + ", ".join(
            f"{m} {r['rating']:.0f} [{r['ci_low']:.0f}, {r['ci_high']:.0f}]" for m, r in ratings.items()
            if all(r.get(k) is not None for k in ("rating", "ci_low", "ci_high")))]
        if result.get("ratings_warning_oracle"):
            lines += ["", f"**Warning:** {result['ratings_warning_oracle']}"]
    return lines


def _reward_model_and_labels_section(result: dict, plots: dict[str, str]) -> list[str]:
    lab = result["labeling"]
    return ["## Reward model against the oracle", "",
            f"Held-out pairs: two SFT samples for each held-out prompt, pairs the oracle scores equal left out "
            f"({result['rm_heldout_pairs']} pairs). Accuracy: **{result['rm_accuracy']:.3f}** "
            f"(the reward stage's own held-out accuracy on annotator labels: {result['reward_stage_heldout_accuracy']}).",
            "", f"![reward model]({plots['rm_accuracy']})", "",
            "## Labels", "",
            f"{lab.get('comparisons')} comparisons (two SFT samples per prompt), {lab['votes']['votes']} votes by "
            f"{lab['settings']['annotators']} simulated annotators through the labeling server with login "
            f"(overlap {lab['settings']['overlap']}, {lab['settings']['noise']:.0%} of votes a coin flip) in "
            f"{lab['votes']['seconds']:.0f} s ({lab['votes']['votes_per_s']:.0f} votes/s). Export (majority; ties, "
            f"both-bad and disagreements dropped): {lab['export']['rows']} pairs, {lab['label_accuracy_vs_oracle']:.3f} "
            f"of them agree with the noiseless oracle. Agreement: {json.dumps(lab.get('agreement', {}).get('raw_agreement'))}.",
            ""]


def _samples_section(ev: dict) -> list[str]:
    lines = ["## Samples before and after", "", "| prompt | sft | dpo | ppo |", "|---|---|---|---|"]
    samples = ev["samples"]
    for i in range(min(8, len(ev["prompts"]))):
        cells = [_md_escape(ev["prompts"][i])] + [
            f"{_md_escape(samples[m]['texts'][i])} ({sentiment.score(samples[m]['texts'][i]):+.2f})" if m in samples else "—"
            for m in ("sft", "dpo", "ppo")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "(oracle score in brackets)", ""]


def _stages_section(result: dict) -> list[str]:
    lines = ["## Stages", "", "| stage | kind | seconds | key metrics |", "|---|---|---|---|"]
    keys = ("train_loss", "heldout_accuracy", "rewards/accuracies", "mean_reward", "mean_reward_first", "kl", "kl_coef")
    for name, st in result["stages"].items():
        metrics = ", ".join(f"{k}={st['metrics'][k]:.3g}" for k in keys if k in st["metrics"])
        lines.append(f"| {name} | {st['kind']} | {st['wall_seconds']} | {metrics} |")
    lines += ["", "Step times this run, wall (CPU) seconds: " + ", ".join(
        f"{k} {v:.0f} ({result['step_cpu_seconds'].get(k, 0):.0f})" for k, v in result["step_seconds"].items()), ""]
    return lines
