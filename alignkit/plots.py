"""PNG plots for `alignkit compare` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(plt, fig, path: str | Path, *, tight: bool = True) -> Path:
    """Write a figure as PNG and free it (pyplot keeps every open figure alive)."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def win_rates_plot(pairs: list[dict], path: str | Path, *, title: str = "Win rates") -> Path:
    """One horizontal bar per pair: model A's win rate over model B (ties half), 95% CI whiskers, 0.5 line."""
    plt = _pyplot()
    rows = [p for p in pairs if p.get("win_rate") is not None]
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(2, len(rows)) + 1.2))
    labels = [f"{p['model_a']} vs {p['model_b']}" for p in rows]
    ys = list(range(len(rows)))
    rates = [p["win_rate"] for p in rows]
    # max(0, ...): a Wilson bound at 0 or 1 can land a rounding error on the wrong side of the rate.
    err = [[max(0.0, r - p["ci_low"]) for r, p in zip(rates, rows)], [max(0.0, p["ci_high"] - r) for r, p in zip(rates, rows)]]
    ax.barh(ys, rates, color="#4c72b0", alpha=0.8)
    ax.errorbar(rates, ys, xerr=err, fmt="none", ecolor="black", capsize=4)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(ys, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate of the first model (ties = half), 95% CI over prompts")
    ax.set_title(title, fontsize=10)
    return save(plt, fig, path)


def ratings_plot(ratings: dict[str, dict], path: str | Path, *, title: str = "Ratings", warning: str | None = None) -> Path:
    """Bradley–Terry (Elo-scale) rating per model with its 95% bootstrap CI, best first.

    `warning` (stats.Connectivity.warning) is printed under the plot: a picture of ratings travels
    without its report, and these gaps may be set by a prior rather than by the data.
    """
    plt = _pyplot()
    names = sorted(ratings, key=lambda m: -ratings[m]["rating"])
    vals = [ratings[m]["rating"] for m in names]
    # A rating without a CI (one battle: stats.bootstrap_ratings) gets no bar, not a zero-width one.
    err = [[0.0 if ratings[m]["ci_low"] is None else v - ratings[m]["ci_low"] for v, m in zip(vals, names)],
           [0.0 if ratings[m]["ci_high"] is None else ratings[m]["ci_high"] - v for v, m in zip(vals, names)]]
    fig, ax = plt.subplots(figsize=(1.2 * max(3, len(names)) + 2, 4))
    ax.errorbar(range(len(names)), vals, yerr=err, fmt="o", color="#dd8452", ecolor="black", capsize=5)
    ax.axhline(1000, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("rating (400 per factor of 10 in the odds)")
    ax.set_title(title, fontsize=10)
    if warning:
        import textwrap

        lines = textwrap.wrap("Warning: " + warning, int(fig.get_figwidth() * 17))  # ~17 chars per inch at 7 pt
        fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, color="#a00000", va="bottom")
        fig.tight_layout(rect=(0, 0.02 + 0.033 * len(lines), 1, 1))
    else:
        fig.tight_layout()
    return save(plt, fig, path, tight=False)


def eval_plot(scores: dict[str, dict[str, float]], path: str | Path, *, title: str = "Eval") -> Path:
    """`alignkit eval` of several models: one panel per metric (their scales differ: perplexity, rates), a bar per model."""
    import math

    plt = _pyplot()
    models = list(scores)
    metrics = list(dict.fromkeys(k for m in models for k in scores[m]))
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 0.35 * len(models) * rows + 1.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        values = [scores[m].get(metric, float("nan")) for m in models]
        ax.barh(range(len(models)), values, color="#4c72b0", alpha=0.8)
        ax.set_yticks(range(len(models)), models)
        ax.invert_yaxis()
        ax.set_title(metric, fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return save(plt, fig, path)
