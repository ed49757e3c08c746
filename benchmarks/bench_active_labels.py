"""Label efficiency: reward-model accuracy against the oracle as labels are spent, random vs uncertainty selection.

    python -m benchmarks.bench_active_labels [--quick] [--seeds 0 1 2] [--tune-seed 100]

On the demo's controlled-sentiment task: the demo's SFT policy samples `candidates` responses for each pool
prompt; a round starts with `start` random pairs (one per prompt), and each step adds `step` more, chosen at
random or by the uncertainty of a reward ensemble (alignkit.selection, `ensemble` reward stages on bootstrap
resamples, exactly as `alignkit loop` trains them) trained on the labels so far. A label is the oracle's
choice with 20% coin flips, as the demo's simulated annotators vote (ties cost a label and train nothing).
After every step the ensemble's mean reward is scored on held-out pairs from eval prompts, against the oracle.

The rule is chosen on --tune-seed (the one with the highest mean accuracy over the steps), then reported on
--seeds against random selection: mean accuracy per budget with a t interval over seeds, and how many labels
the chosen rule needs to reach the accuracy random selection has at the full budget (target: <= 0.7x).
Writes benchmarks/active_labels.png and appends to RESULTS.md (not with --quick).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
RULES = ("disagreement", "margin", "bald")


@dataclass(frozen=True)
class Sizes:
    pool_prompts: int = 500
    candidates: int = 3
    heldout_prompts: int = 300
    start: int = 100
    step: int = 100
    steps: int = 4  # labels: start, start + step, ..., start + (steps - 1) * step
    ensemble: int = 2
    epochs: int = 3
    noise: float = 0.2

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(pool_prompts=60, candidates=3, heldout_prompts=40, start=20, step=20, steps=2, ensemble=2, epochs=1)

    def budgets(self) -> list[int]:
        return [self.start + i * self.step for i in range(self.steps)]


@dataclass
class Task:
    """The demo's SFT stage, its candidates for the pool prompts, and held-out pairs with the oracle's answer."""

    work: Path
    recipe: dict  # the demo recipe, with sft and a reward stage template
    pool: list[dict]  # {"prompt", "texts"}
    heldout: list[tuple[str, str, str, int]]  # (prompt, a, b, 1 if the oracle prefers a else 0)


def setup(work: Path, sizes: Sizes, *, log=print) -> Task:
    from alignkit.generation import SamplingParams, generate_from_spec
    from alignkit.tasks import sentiment
    from alignkit.tasks.pretrain import pretrained_tiny_model
    from demo.data import write_data, write_recipe
    from demo.settings import DemoSettings, quiet_libraries
    from recipes.runner import run_recipe

    quiet_libraries()
    # A quick run is the demo's own smoke sizes (a smaller pretraining, fewer SFT steps).
    s = DemoSettings.quick() if sizes.pool_prompts < Sizes().pool_prompts else DemoSettings()
    base = pretrained_tiny_model(None, s.pretrain, log=log)
    write_data(work, s)
    recipe = write_recipe(work, base, s.recipe_overrides)
    records = run_recipe(work / "recipe.sft.yaml", log=log)
    cache = work / "task.json"
    key = {"sft": records["sft"]["run_id"], "sizes": dataclasses.asdict(sizes)}
    task = json.loads(cache.read_text()) if cache.exists() else {}
    if task.get("key") != key:
        sft = str(work / "run" / "sft")
        pool_prompts = sentiment.prompts("train")[: sizes.pool_prompts]
        texts = generate_from_spec(sft, pool_prompts, SamplingParams(max_new_tokens=32, temperature=1.0, seed=1,
                                                                     num_return_sequences=sizes.candidates, batch_size=64))
        n = sizes.candidates
        pool = [{"prompt": p, "texts": texts[i * n:(i + 1) * n]} for i, p in enumerate(pool_prompts)]
        held = sentiment.prompts("eval")[: sizes.heldout_prompts]
        pairs = generate_from_spec(sft, held, SamplingParams(max_new_tokens=32, temperature=1.0, seed=2,
                                                             num_return_sequences=2, batch_size=64))
        heldout = []
        for i, p in enumerate(held):
            a, b = pairs[2 * i], pairs[2 * i + 1]
            if sentiment.raw_score(a) != sentiment.raw_score(b):
                heldout.append([p, a, b, int(sentiment.raw_score(a) > sentiment.raw_score(b))])
        task = {"key": key, "pool": pool, "heldout": heldout}
        cache.write_text(json.dumps(task))
    raw = yaml.safe_load(recipe.read_text())
    return Task(work, raw, task["pool"], [tuple(h) for h in task["heldout"]])


def oracle_vote(prompt: str, a: str, b: str, rng: random.Random, noise: float) -> str:
    """The demo's simulated annotator: the oracle's choice, replaced by a coin flip with probability `noise`."""
    from alignkit.tasks import sentiment

    if rng.random() < noise:
        return rng.choice(("a", "b"))
    return sentiment.oracle_judge(prompt, a, b)


def train_ensemble(task: Task, run: Path, name: str, labeled: list[dict], sizes: Sizes, *, log=print) -> list[Path]:
    """`ensemble` reward stages on bootstrap resamples of `labeled`, after the demo's SFT, through the runner."""
    from recipes.runner import run_recipe

    data = run / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in labeled))
    raw = json.loads(json.dumps(task.recipe))
    sft = next(st for st in raw["stages"] if st["name"] == "sft")
    sft["data"]["train"] = str(task.work / "data" / "sft.jsonl")
    reward = next(st for st in raw["stages"] if st["name"] == "reward")
    members = []
    for k in range(sizes.ensemble):
        train = {**reward["train"], "num_train_epochs": sizes.epochs}
        train.pop("max_steps", None)
        members.append({"name": f"{name}-{k}", "kind": "reward", "after": "sft",
                        "data": {"train": str(data), "eval_fraction": 0.0, "resample": k}, "train": train})
    raw["stages"] = [sft, *members]
    raw["run_dir"] = str(run)
    path = run / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_recipe(path, log=lambda line: None)
    return [run / m["name"] for m in members]


def ensemble_rewards(dirs: list[Path], prompts: list[str], texts: list[str]):
    import gc

    from alignkit.reward_model import load_reward_ensemble

    ensemble = load_reward_ensemble(dirs)
    try:
        return ensemble.scores(prompts, texts)
    finally:
        del ensemble
        gc.collect()


def heldout_accuracy(dirs: list[Path], task: Task) -> float:
    prompts = [p for p, *_ in task.heldout for _ in (0, 1)]
    texts = [t for _, a, b, _ in task.heldout for t in (a, b)]
    mean = ensemble_rewards(dirs, prompts, texts).mean(axis=0)
    right = [(mean[2 * i] > mean[2 * i + 1]) == bool(label) for i, (*_, label) in enumerate(task.heldout)]
    return sum(right) / len(right)


def _choose(task: Task, taken: set[int], n: int, rule: str, seed: int, dirs: list[Path] | None) -> list[tuple]:
    """n new (prompt index, i, j) pairs from prompts not labeled yet, by `rule`."""
    from alignkit.selection import CandidatePair, select_pairs

    open_prompts = [p for p in range(len(task.pool)) if p not in taken]
    triples = [(p, i, j) for p in open_prompts for i in range(len(task.pool[p]["texts"]))
               for j in range(i + 1, len(task.pool[p]["texts"])) if task.pool[p]["texts"][i] != task.pool[p]["texts"][j]]
    if rule == "random" or dirs is None:
        pairs = [CandidatePair(p, i, j, (), ()) for p, i, j in triples]
        chosen = select_pairs(pairs, n, rule="random", seed=seed)
    else:
        flat = [(p, k) for p in open_prompts for k in range(len(task.pool[p]["texts"]))]
        index = {pk: c for c, pk in enumerate(flat)}
        scores = ensemble_rewards(dirs, [task.pool[p]["prompt"] for p, _ in flat],
                                  [task.pool[p]["texts"][k] for p, k in flat])
        pairs = [CandidatePair(p, i, j, scores[:, index[(p, i)]], scores[:, index[(p, j)]]) for p, i, j in triples]
        chosen = select_pairs(pairs, n, rule=rule, seed=seed)
    return [(c.pair.prompt, c.pair.a, c.pair.b) for c in chosen]


def curve(task: Task, rule: str, seed: int, sizes: Sizes, *, log=print) -> list[float]:
    """Held-out accuracy of the ensemble after each budget, selecting by `rule` after the random start."""
    run = task.work / f"{rule}-s{seed}"
    run.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"votes-{seed}")
    labeled: list[dict] = []
    taken: set[int] = set()
    accs, dirs = [], None
    for step, budget in enumerate(sizes.budgets()):
        n = budget - len(taken)
        for p, i, j in _choose(task, taken, n, rule if step else "random", seed * 1000 + step, dirs):
            taken.add(p)
            prompt, a, b = task.pool[p]["prompt"], task.pool[p]["texts"][i], task.pool[p]["texts"][j]
            vote = oracle_vote(prompt, a, b, rng, sizes.noise)
            if vote in ("a", "b"):
                chosen, rejected = (a, b) if vote == "a" else (b, a)
                labeled.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        dirs = train_ensemble(task, run, f"step{step}", labeled, sizes, log=log)
        accs.append(heldout_accuracy(dirs, task))
        log(f"{rule} seed {seed}: {budget} labels ({len(labeled)} pairs) -> accuracy {accs[-1]:.3f}")
    return accs


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% t interval over seeds."""
    from scipy import stats as st

    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, m, m
    half = st.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def labels_to_reach(budgets: list[int], accs: list[float], target: float) -> float | None:
    """The labels at which a mean accuracy curve first reaches `target`, linearly interpolated; None if never."""
    for k, (b, a) in enumerate(zip(budgets, accs)):
        if a >= target:
            if k == 0:
                return float(b)
            b0, a0 = budgets[k - 1], accs[k - 1]
            return b0 + (target - a0) / (a - a0) * (b - b0)
    return None


def plot(budgets: list[int], curves: dict[str, list[list[float]]], path: Path) -> None:
    from alignkit.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        stats = [t_interval([r[k] for r in runs]) for k in range(len(budgets))]
        ax.plot(budgets, [s[0] for s in stats], marker="o", label=name)
        ax.fill_between(budgets, [s[1] for s in stats], [s[2] for s in stats], alpha=0.2)
    ax.set(xlabel="labels spent", ylabel="reward ensemble accuracy vs oracle (held out)",
           title=f"random vs uncertainty selection, mean and 95% t interval over {len(next(iter(curves.values())))} seeds")
    ax.title.set_fontsize(9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = harness.parse_args(__doc__, **{"--seeds": dict(type=int, nargs="+", default=[0, 1, 2]),
                                         "--tune-seed": dict(type=int, default=100),
                                         "--rules": dict(nargs="+", default=list(RULES))})
    sizes = Sizes.quick() if args.quick else Sizes()
    work = Path(args.work or REPO / "runs" / ("bench_active_labels_quick" if args.quick else "bench_active_labels"))
    start = time.time()
    task = setup(work, sizes)
    budgets = sizes.budgets()
    tuned = {rule: curve(task, rule, args.tune_seed, sizes) for rule in (args.rules[:1] if args.quick else args.rules)}
    rule = max(tuned, key=lambda r: statistics.mean(tuned[r]))
    seeds = args.seeds[:1] if args.quick else args.seeds
    curves = {name: [curve(task, name, seed, sizes) for seed in seeds] for name in ("random", rule)}
    means = {name: [statistics.mean(r[k] for r in runs) for k in range(len(budgets))] for name, runs in curves.items()}
    target = means["random"][-1]
    reach = labels_to_reach(budgets, means[rule], target)
    rows = []
    for k, b in enumerate(budgets):
        cells = [t_interval([r[k] for r in curves[name]]) for name in ("random", rule)]
        rows.append([b, *(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in cells)])
    ratio = f"{reach / budgets[-1]:.2f}x" if reach is not None else "not reached"
    png = REPO / "benchmarks" / "active_labels.png"
    if not args.quick:
        plot(budgets, curves, png)
    notes = (f"The rule `{rule}` was chosen on seed {args.tune_seed} (mean accuracy over the budgets: "
             + ", ".join(f"{r} {statistics.mean(a):.3f}" for r, a in tuned.items())
             + f"); reported seeds {', '.join(map(str, seeds))}. Random selection's accuracy at {budgets[-1]} labels "
             f"is {target:.3f}; `{rule}` " + (f"reaches it at {ratio} the labels" if reach is not None else
                                              "does not reach it within the budget") + " (target <= 0.7x). Ensemble of "
             f"{sizes.ensemble} reward stages on bootstrap resamples, {sizes.epochs} epochs each; a pool of "
             f"{sizes.pool_prompts} prompts x {sizes.candidates} candidates from the demo's SFT policy; "
             f"{len(task.heldout)} held-out pairs; votes: the oracle with {sizes.noise:.0%} coin flips. "
             f"{time.time() - start:.0f} s. Plot: benchmarks/active_labels.png.")
    print(f"labels to reach random's full-budget accuracy: {ratio}")
    harness.record("Label efficiency: uncertainty vs random selection (reward-model accuracy vs oracle)",
                   "python -m benchmarks.bench_active_labels", ["labels", "random", rule], rows, notes,
                   quick=args.quick)


if __name__ == "__main__":
    main()
