"""Arena label efficiency: battles until every adjacent pair of ratings is separated, active vs uniform allocation.

Simulated models with known Bradley–Terry ratings (spread like a leaderboard, some neighbours close) and
simulated voters who prefer model a with the BT probability `stats.expected_win_rate`. Battles come in rounds of
`--round` battles; after each round the ratings are bootstrapped (`stats.bootstrap_rating_samples`, the
leaderboard's own fit) and the next round is allocated by
- active: `selection.allocate_battles` on `selection.rating_spreads` of those samples (what
  `alignkit compare --battles N --select uncertainty` does), or
- uniform: evenly over the pairs (`compare.round_robin`, `--select uniform`).
The measure is the battles until every adjacent pair (sorted by the true ratings) has a 95% bootstrap CI of its
rating difference above 0, over several seeds. The round size is chosen on tuning seeds (1000, 1001, ...),
never on the reported ones (0, 1, ...). Pure simulation through alignkit's rating code: no store, no model.

    python -m benchmarks.bench_active_battles            # appends a section to benchmarks/RESULTS.md
    python -m benchmarks.bench_active_battles --quick    # 4 models, 1 seed, printed only
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignkit import stats
from alignkit.compare import round_robin
from alignkit.selection import PairSpread, allocate_battles, rating_spreads

# Gaps 60, 35, 70, 40, 80: like the top of a public leaderboard, two neighbours close.
RATINGS = {"m1": 1285.0, "m2": 1225.0, "m3": 1190.0, "m4": 1120.0, "m5": 1080.0, "m6": 1000.0}
QUICK_RATINGS = {"m1": 1200.0, "m2": 1100.0, "m3": 1050.0, "m4": 950.0}
TUNING_SEED = 1000


@dataclass(frozen=True)
class Run:
    rule: str  # active | uniform
    seed: int
    battles: int  # battles until every adjacent pair was separated, or the cap
    separated: bool  # False: the cap came first (`battles` is then a lower bound)
    curve: list[tuple[int, int]]  # (battles so far, adjacent pairs separated) after each round


def adjacent_separated(samples: np.ndarray, names: list[str], ratings: dict[str, float]) -> int:
    """Adjacent pairs (by true rating) whose 95% bootstrap CI of the rating difference lies above 0."""
    order = sorted(range(len(names)), key=lambda i: -ratings[names[i]])
    alpha = (1 - stats.LEVEL) / 2
    count = 0
    for hi, lo in zip(order, order[1:]):
        diff = samples[:, hi] - samples[:, lo]
        diff = diff[np.isfinite(diff)]
        count += bool(diff.size and np.quantile(diff, alpha) > 0)
    return count


def simulate(rule: str, seed: int, ratings: dict[str, float], *, round_size: int, bootstrap: int, cap: int) -> Run:
    rng = np.random.default_rng(seed)
    names = list(ratings)
    pairs = [(x, y) for k, x in enumerate(names) for y in names[k + 1:]]
    met = dict.fromkeys(pairs, 0)
    spreads = [PairSpread(p, 0, math.inf) for p in pairs]  # before any vote every pair is "never met"
    battles: list[tuple[str, str, str]] = []
    curve: list[tuple[int, int]] = []
    while len(battles) < cap:
        plan = allocate_battles(spreads, round_size) if rule == "active" else round_robin(met, round_size)
        for (x, y), k in plan.items():
            a_wins = rng.random(k) < stats.expected_win_rate(ratings[x], ratings[y])
            battles += [(x, y, "a" if w else "b") for w in a_wins]
            met[x, y] += k
        fit = stats.bootstrap_rating_samples(battles, bootstrap, seed=int(rng.integers(2**31)))
        samples = fit.samples[:, [fit.models.index(m) for m in names]]
        spreads = rating_spreads(samples, names, met)
        curve.append((len(battles), adjacent_separated(samples, names, ratings)))
        if curve[-1][1] == len(names) - 1:
            return Run(rule, seed, len(battles), True, curve)
    return Run(rule, seed, len(battles), False, curve)


def _mean_ci(values: list[float]) -> tuple[float, float, float]:
    lo, hi = stats.bootstrap_mean_ci(values, rounds=2000, seed=0) if len(values) > 1 else (math.nan, math.nan)
    return float(np.mean(values)), lo, hi


def tune(ratings: dict[str, float], sizes: list[int], seeds: int, *, bootstrap: int, cap: int) -> dict[int, float]:
    """Mean battles of the active allocator per round size, on the tuning seeds only."""
    return {size: float(np.mean([simulate("active", TUNING_SEED + s, ratings, round_size=size, bootstrap=bootstrap,
                                          cap=cap).battles for s in range(seeds)])) for size in sizes}


def plot(runs: list[Run], pairs: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        xs, ys = zip(*run.curve)
        ax.step(xs, ys, where="post", color="tab:red" if run.rule == "active" else "tab:blue", alpha=0.6,
                label=run.rule if run.seed == min(r.seed for r in runs) else None)
    ax.set_xlabel("battles (votes)")
    ax.set_ylabel(f"adjacent pairs separated (of {pairs})")
    ax.set_title("Active (allocate_battles) vs uniform allocation, one line per seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from benchmarks.harness import parse_args, record

    args = parse_args(__doc__, **{
        "--seeds": {"type": int, "default": 5, "help": "reported seeds (0, 1, ...)"},
        "--tuning-seeds": {"type": int, "default": 2, "help": "seeds the round size is chosen on (1000, ...)"},
        "--sizes": {"default": "100,200,400", "help": "round sizes tried on the tuning seeds"},
        "--bootstrap": {"type": int, "default": 100, "help": "bootstrap rounds per evaluation"},
        "--cap": {"type": int, "default": 12000, "help": "battles at most per run"},
        "--plot": {"default": None, "help": "PNG path (default benchmarks/active_battles.png; --quick: a temp file)"},
    })
    if args.plot is None:
        import tempfile

        args.plot = str(Path(tempfile.gettempdir() if args.quick else Path(__file__).resolve().parent)
                        / "active_battles.png")
    ratings = QUICK_RATINGS if args.quick else RATINGS
    seeds, sizes, cap = (1, [100], 1500) if args.quick else (args.seeds, [int(s) for s in args.sizes.split(",")],
                                                           args.cap)
    tuned = tune(ratings, sizes, 0 if args.quick else args.tuning_seeds, bootstrap=args.bootstrap, cap=cap) \
        if len(sizes) > 1 else {sizes[0]: math.nan}
    size = min(tuned, key=tuned.get)
    runs = [simulate(rule, s, ratings, round_size=size, bootstrap=args.bootstrap, cap=cap)
            for s in range(seeds) for rule in ("active", "uniform")]
    plot(runs, len(ratings) - 1, Path(args.plot))
    rows = []
    for rule in ("active", "uniform"):
        mine = [r for r in runs if r.rule == rule]
        mean, lo, hi = _mean_ci([r.battles for r in mine])
        rows.append([rule, len(mine), f"{mean:.0f} [{lo:.0f}, {hi:.0f}]", f"{np.median([r.battles for r in mine]):.0f}",
                     sum(not r.separated for r in mine)])
    by_seed = {(r.rule, r.seed): r.battles for r in runs}
    ratio, rlo, rhi = _mean_ci([by_seed["active", s] / by_seed["uniform", s] for s in range(seeds)])
    notes = (f"active/uniform battles ratio {ratio:.3f} [{rlo:.3f}, {rhi:.3f}] (mean of per-seed ratios, 95% bootstrap "
             f"CI over seeds). True ratings {', '.join(f'{v:.0f}' for v in ratings.values())}; round size {size} "
             f"chosen on tuning seeds from {', '.join(f'{k}: {v:.0f}' for k, v in tuned.items())} mean battles "
             f"(active); {args.bootstrap} bootstrap rounds per evaluation; cap {cap} battles (runs at the cap count "
             f"as the cap, a lower bound). Plot: {Path(args.plot).name}.")
    record("Arena active battles: battles until every adjacent pair is separated",
           "python -m benchmarks.bench_active_battles" + (" --quick" if args.quick else ""),
           ["allocation", "seeds", "battles, mean [95% CI]", "median", "not separated by the cap"], rows, notes,
           quick=args.quick)


if __name__ == "__main__":
    main()
