"""Which labels to ask people for: pairs a reward ensemble is least sure of, battles whose outcome is least known.

Pure functions over scores (no models, no store), so the rules are checked against arithmetic by hand.

Pairs (`select_pairs`). Each of K reward models scores both responses of a candidate pair; member k's
preference is p_k = sigmoid(r_k(A) - r_k(B)) (the Bradley-Terry probability a reward model is trained on).
A pair's selection score under each rule:
- `disagreement`: the standard deviation of p_k over members: the members learned different things here;
- `margin`: 1 - |2 * mean_k(p_k) - 1|: the ensemble as a whole puts this pair near a coin flip;
- `bald`: H(mean p) - mean H(p_k) (the mutual information of BALD): uncertainty the members disagree on,
  not the noise every member sees alike.
The budget goes to the highest scores with at most `per_prompt` pairs per prompt, so it is not spent on one
prompt's near-identical variants; `random` orders pairs by a seeded shuffle under the same rule (the round-0
baseline, when no reward model exists yet). Every selected pair carries its score, stored with its comparison.

Battles (`allocate_battles`). Given bootstrap samples of the ratings, a pair of models is as uncertain as the
spread of its rating difference; m more battles on top of the pair's n shrink that spread by about
sqrt(n / (n + m)). Battles are handed out one at a time to the pair whose spread would be largest,
Chatbot Arena's active sampling in greedy form; pairs that never met come first.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Hashable, Literal, Sequence

import numpy as np

Rule = Literal["disagreement", "margin", "bald", "random"]
RULES: tuple[str, ...] = ("disagreement", "margin", "bald", "random")


@dataclass(frozen=True)
class CandidatePair:
    """Two candidate responses to one prompt, with every ensemble member's reward for each."""

    prompt: Hashable  # what "one prompt" means for the per-prompt cap (a prompt key)
    a: int  # the responses' positions in the caller's list
    b: int
    rewards_a: Sequence[float]  # one reward per ensemble member
    rewards_b: Sequence[float]


@dataclass(frozen=True)
class Selected:
    pair: CandidatePair
    score: float  # the rule's selection score (for `random`: the pair's rank in the shuffle, negated)


def member_preferences(pair: CandidatePair) -> np.ndarray:
    """p_k = P(A preferred) under each member: sigmoid of the reward difference."""
    diff = np.asarray(pair.rewards_a, dtype=float) - np.asarray(pair.rewards_b, dtype=float)
    return 1.0 / (1.0 + np.exp(-diff))


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def uncertainty(pair: CandidatePair, rule: Rule) -> float:
    """The pair's selection score under `rule` (higher: asked first)."""
    p = member_preferences(pair)
    if rule == "disagreement":
        return float(p.std())
    if rule == "margin":
        return float(1.0 - abs(2.0 * p.mean() - 1.0))
    if rule == "bald":
        return float(_entropy(np.array(p.mean())) - _entropy(p).mean())
    raise ValueError(f"unknown selection rule {rule!r}: expected one of {', '.join(RULES)}")


def select_pairs(candidates: Sequence[CandidatePair], budget: int, *, rule: Rule, per_prompt: int = 1,
                 seed: int = 0) -> list[Selected]:
    """Up to `budget` pairs, highest selection score first, at most `per_prompt` of any one prompt."""
    if budget < 0 or per_prompt < 1:
        raise ValueError(f"budget must be >= 0 and per_prompt >= 1, got {budget} and {per_prompt}")
    if rule == "random":
        order = list(range(len(candidates)))
        random.Random(seed).shuffle(order)
        scored = [(-float(rank), candidates[i]) for rank, i in enumerate(order)]
    else:
        if any(len(c.rewards_a) < 2 for c in candidates):
            raise ValueError(f"selection rule {rule!r} needs an ensemble of 2 or more reward models")
        scored = [(uncertainty(c, rule), c) for c in candidates]
    # Stable: ties keep the candidates' order, so a rerun selects the same pairs.
    scored.sort(key=lambda sc: -sc[0])
    taken: dict[Hashable, int] = {}
    out: list[Selected] = []
    for score, pair in scored:
        if len(out) == budget:
            break
        if taken.get(pair.prompt, 0) < per_prompt:
            taken[pair.prompt] = taken.get(pair.prompt, 0) + 1
            out.append(Selected(pair, score))
    return out


@dataclass(frozen=True)
class PairSpread:
    models: tuple[str, str]
    battles: int  # battles this pair has had
    spread: float  # standard deviation of the rating difference over bootstrap rounds (inf: never met)


def rating_spreads(samples: np.ndarray, models: Sequence[str], battles: dict[tuple[str, str], int]) -> list[PairSpread]:
    """Per pair of models: how uncertain their rating difference is, from bootstrap rating samples
    (rounds x models; NaN where a round had no battle of that model)."""
    out = []
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            key = (models[i], models[j])
            n = battles.get(key, 0) + battles.get((models[j], models[i]), 0)
            diff = samples[:, i] - samples[:, j]
            diff = diff[np.isfinite(diff)]
            spread = float(diff.std()) if n and diff.size >= 2 else math.inf
            out.append(PairSpread(key, n, spread))
    return out


def allocate_battles(spreads: Sequence[PairSpread], n: int) -> dict[tuple[str, str], int]:
    """Hand out `n` battles one at a time, each to the pair whose rating difference would stay least certain."""
    given = {s.models: 0 for s in spreads}

    def after_one_more(s: PairSpread) -> float:
        if not math.isfinite(s.spread):
            return math.inf if given[s.models] == 0 else 1e12 / (1 + given[s.models])
        return s.spread * math.sqrt(s.battles / (s.battles + given[s.models] + 1))

    for _ in range(n):
        best = max(spreads, key=after_one_more)
        given[best.models] += 1
    return {k: v for k, v in given.items() if v}
