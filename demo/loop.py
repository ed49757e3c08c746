"""`alignkit demo --loop`: the loop's proof on the oracle task — rounds beat the round before, and labels spent in
rounds beat the same labels spent at once.

Two loops over the demo's recipe, labeled by the demo's simulated annotators through the real labeling server:
- `loop/`: LOOP_ROUNDS rounds of reward (an ensemble) -> DPO, each round's pairs sampled from the latest policy
  and chosen by the previous round's ensemble;
- `one-shot/`: one round from SFT with every label at once (rounds x budget pairs, all sampled from SFT, chosen
  at random) and the same DPO steps in all, so the comparison is the labels' placement, not the compute.
Every policy is judged by the oracle (oracle:sentiment). loop/run/loop.json gets `vs_one_shot`; the report is
loop-report.md with the round table and its plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from alignkit import artifacts
from demo.data import write_data, write_recipe, write_text_if_changed
from demo.settings import DemoSettings, quiet_libraries


@dataclass(frozen=True)
class LoopDemoSettings:
    """The loop's sizes on the demo's task (the demo's own settings give annotators, noise and overlap)."""

    rounds: int = 3
    budget: int = 250  # pairs a round
    candidates: int = 3
    pool: int = 800  # train prompts sampled each round
    ensemble: int = 2
    reward_steps: int = 60
    dpo_steps: int = 30  # per round; the one-shot policy gets rounds x this
    dpo_beta: float = 0.5


def _loop_recipe(workdir: Path, recipe: Path, name: str, ls: LoopDemoSettings, s: DemoSettings, *,
                 rounds: int, budget: int, select: str, dpo_steps: int) -> Path:
    """The demo's recipe (sft, reward, dpo) with a loop: section, written as workdir/NAME/recipe.yaml."""
    raw = yaml.safe_load(recipe.read_text())
    out = workdir / name
    labels = out / "labels" / "labels.db"
    labels.parent.mkdir(parents=True, exist_ok=True)
    keep = {"sft", "reward", "dpo"}
    raw["stages"] = [st for st in raw["stages"] if st["name"] in keep]
    for st in raw["stages"]:
        for key in ("train",):
            if key in st["data"]:
                st["data"][key] = str((workdir / st["data"][key]).resolve())
        if st["name"] in ("reward", "dpo"):
            st["data"] = {"labels_db": str(labels), **({"eval_fraction": 0.1} if st["name"] == "reward" else {})}
    by_name = {st["name"]: st for st in raw["stages"]}
    by_name["reward"]["train"]["max_steps"] = ls.reward_steps
    by_name["dpo"]["train"].update(max_steps=dpo_steps, beta=ls.dpo_beta)
    raw["run_dir"] = str(out / "run")
    pool = out / "pool.jsonl"
    prompts = (workdir / "data" / "prompts_train.jsonl").read_text().splitlines()[: ls.pool]
    write_text_if_changed(pool, "\n".join(prompts) + "\n")
    raw["loop"] = {"prompts": str(pool), "labels_db": str(labels), "start": "sft", "stages": ["reward", "dpo"],
                   "rounds": rounds, "candidates": ls.candidates, "budget": budget, "overlap": s.overlap,
                   "ensemble": ls.ensemble, "select": select, "max_new_tokens": s.pair_max_new_tokens,
                   "temperature": s.temperature, "eval_prompts": str(workdir / "data" / "prompts_eval.jsonl"),
                   "judge": "oracle:sentiment"}
    path = out / "recipe.yaml"
    write_text_if_changed(path, f"# Written by `alignkit demo --loop`.\n# Run by hand: alignkit loop {path}\n"
                          + yaml.safe_dump(raw, sort_keys=False))
    return path


def _label_until_done(path: Path, s: DemoSettings, *, log=print) -> dict:
    """Rerun the loop; whenever a round waits for votes, the simulated annotators give them through the server."""
    from alignkit.store import open_store
    from demo.labeling import _make_annotators, _serve_and_label
    from recipes.loop import load_loop_recipe, run_loop

    lr = load_loop_recipe(path)
    labels = Path(lr.loop.labels_db).parent
    users_path = labels / "users.json"
    state = run_loop(lr, log=log)
    users = None
    while state.waiting is not None:
        if users is None:
            users_path.unlink(missing_ok=True)
            users = _make_annotators(users_path, s.annotators)
        store = open_store(lr.loop.labels_db, overlap=s.overlap)
        try:
            _serve_and_label(store, labels, users, s, log=log)
        finally:
            store.close()
        state = run_loop(lr, log=log)
    return json.loads((lr.run_dir / "loop.json").read_text())


def run_loop_demo(workdir: str | Path, s: DemoSettings | None = None, ls: LoopDemoSettings | None = None, *,
                  log=print) -> dict:
    from alignkit.tasks.pretrain import pretrained_tiny_model

    s, ls = s or DemoSettings(), ls or LoopDemoSettings()
    start = time.time()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    base = pretrained_tiny_model(None, s.pretrain, log=log)
    write_data(workdir, s)
    recipe = write_recipe(workdir, base, s.recipe_overrides)
    rounds = _loop_recipe(workdir, recipe, "loop", ls, s, rounds=ls.rounds, budget=ls.budget, select="uncertainty",
                          dpo_steps=ls.dpo_steps)
    once = _loop_recipe(workdir, recipe, "one-shot", ls, s, rounds=1, budget=ls.rounds * ls.budget, select="random",
                        dpo_steps=ls.rounds * ls.dpo_steps)
    log("demo --loop: the rounds")
    table = _label_until_done(rounds, s, log=log)
    log("demo --loop: the one-shot policy on the same number of labels")
    one_shot = _label_until_done(once, s, log=log)
    table["vs_one_shot"] = _versus_one_shot(workdir, table, one_shot, s)
    table["one_shot"] = one_shot["rounds"][0]
    table["wall_seconds"] = round(time.time() - start, 1)
    table["claims"] = loop_claims(table)
    artifacts.write_json_atomic(workdir / "loop" / "run" / "loop.json", table)
    _report(workdir, table)
    return table


def _versus_one_shot(workdir: Path, table: dict, one_shot: dict, s: DemoSettings) -> dict:
    from alignkit.compare import compare_models
    from alignkit.generation import SamplingParams

    last = table["rounds"][-1]
    new = workdir / "loop" / "run" / last["policy"]
    old = workdir / "one-shot" / "run" / one_shot["rounds"][0]["policy"]
    prompts = [line for line in (workdir / "data" / "prompts_eval.jsonl").read_text().splitlines() if line]
    result = compare_models({"loop": str(new), "one-shot": str(old)}, [json.loads(p)["prompt"] for p in prompts],
                            "oracle:sentiment", workdir / "loop" / "compare-one-shot",
                            SamplingParams(max_new_tokens=s.eval_max_new_tokens, temperature=s.temperature,
                                           seed=s.seed + 7, batch_size=64), bootstrap=s.bootstrap)
    from recipes.loop import win_rate_of

    return {**win_rate_of(result, "loop"), "labels": one_shot["rounds"][0]["labels"], "loop_labels": last["labels"]}


def loop_claims(table: dict) -> dict[str, bool]:
    """Each round's policy beats the one before it, and the last beats the one-shot policy: win rate >= 0.6
    with a 95% CI above 0.5, by the oracle; and the whole run under 10 minutes."""
    def holds(w: dict) -> bool:
        return w["win_rate"] >= 0.6 and w["ci_low"] > 0.5

    claims = {f"round {row['round']} beats {row['vs_previous']['against']}": holds(row["vs_previous"])
              for row in table["rounds"]}
    claims["the last round beats the one-shot policy on as many labels"] = holds(table["vs_one_shot"])
    claims["under 10 minutes"] = table["wall_seconds"] < 600
    return claims


def _report(workdir: Path, table: dict) -> None:
    def ci(w: dict) -> str:
        return f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"

    lines = ["# alignkit demo --loop", "",
             f"Rounds of labels from the latest policy on the controlled-sentiment task, judged by the oracle; "
             f"{table['wall_seconds']:.0f} s.", "",
             "| round | labels | reward accuracy | vs previous | vs first (SFT) | KL to SFT | mean length |",
             "|---|---|---|---|---|---|---|"]
    for row in table["rounds"]:
        acc = f"{row['rm_accuracy']:.3f}" if row.get("rm_accuracy") is not None else "–"
        lines.append(f"| {row['round']} | {row['labels']} | {acc} | {ci(row['vs_previous'])} | {ci(row['vs_first'])} "
                     f"| {row['kl']:.2f} | {row['mean_length']:.1f} |")
    one = table["one_shot"]
    lines += ["", f"One-shot from SFT on {table['vs_one_shot']['labels']} labels: vs SFT {ci(one['vs_first'])}, "
              f"KL {one['kl']:.2f}. The last round vs the one-shot policy: {ci(table['vs_one_shot'])}.", "",
              "## Claims", ""]
    lines += [f"- {'holds' if ok else 'FAILS'}: {name}" for name, ok in table["claims"].items()]
    lines += ["", "![rounds](loop/run/loop.png)", ""]
    (workdir / "loop-report.md").write_text("\n".join(lines), encoding="utf-8")


def loop_demo_from_cli(args, s: DemoSettings) -> int:
    ls = LoopDemoSettings(rounds=2, budget=40, pool=120, reward_steps=8, dpo_steps=4) if args.quick else None
    table = run_loop_demo(args.workdir, s, ls)
    print(f"\nalignkit demo --loop: done in {table['wall_seconds']:.0f}s — {Path(args.workdir) / 'loop-report.md'}")
    for name, ok in table["claims"].items():
        print(f"  {'holds' if ok else 'FAILS'}: {name}")
    return 0
