"""Controlled sentiment: a miniature of the DPO paper's IMDb experiment with a known oracle.

Everything here is deterministic for a seed and needs no download:

  - a small grammar of short movie reviews, mixed sentiment, built from a
    lexicon of positive, negative and neutral words (`review`, `corpus`);
  - prompts = review openings ("the acting was", "I watched the movie last
    night and") split into train and eval sets by a stable hash (`prompts`);
  - SFT rows = openings with balanced continuations: the SFT policy writes
    positive, negative and mixed reviews alike, so alignment has room to move it
    (`sft_rows`);
  - the oracle `score(text)`: the signed sum of lexicon word weights, squashed
    to [-1, 1] with tanh — the stand-in for the sentiment classifier the DPO
    paper used as ground-truth reward;
  - `oracle_judge(prompt, a, b)` and `NoisyAnnotator`, the judge that simulated
    annotators use to vote through the labeling server (AlpacaFarm-style noise).

The oracle depends only on the words: unknown words, punctuation, case and
garbage are ignored, so it scores anything a model writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
from dataclasses import dataclass
from typing import Iterable

NAME = "sentiment"

# ---------------------------------------------------------------------------
# Lexicon. Weights are the oracle's; the grammar only uses the groups.
# ---------------------------------------------------------------------------

POSITIVE_ADJECTIVES = {
    "brilliant": 3, "wonderful": 3, "superb": 3, "excellent": 3,
    "great": 2, "lovely": 2, "charming": 2, "delightful": 2,
    "good": 1, "nice": 1, "fun": 1, "clever": 1,
}
NEGATIVE_ADJECTIVES = {
    "awful": -3, "terrible": -3, "horrible": -3, "dreadful": -3,
    "bad": -2, "poor": -2, "boring": -2, "annoying": -2,
    "dull": -1, "weak": -1, "bland": -1, "silly": -1,
}
NEUTRAL_ADJECTIVES = [
    "long", "short", "loud", "quiet", "simple", "typical", "ordinary", "familiar", "modern", "old",
    "dark", "bright", "strange", "serious", "busy", "calm", "plain", "new", "complex", "different",
]
POSITIVE_VERBS = {"loved": 3, "adored": 3, "enjoyed": 2, "liked": 1}
NEGATIVE_VERBS = {"hated": -3, "loathed": -3, "disliked": -2, "doubted": -1}
NEUTRAL_VERBS = ["noticed", "remembered", "watched", "followed", "discussed", "saw"]
POSITIVE_NOUNS = {"masterpiece": 3, "gem": 2, "treat": 1}
NEGATIVE_NOUNS = {"disaster": -3, "mess": -2, "letdown": -1}
NEUTRAL_NOUNS = ["film", "story", "drama", "comedy", "thriller", "sequel"]

LEXICON: dict[str, int] = {
    **POSITIVE_ADJECTIVES, **NEGATIVE_ADJECTIVES, **POSITIVE_VERBS, **NEGATIVE_VERBS,
    **POSITIVE_NOUNS, **NEGATIVE_NOUNS,
}

# ---------------------------------------------------------------------------
# Grammar.
# ---------------------------------------------------------------------------

ASPECTS = ["film", "movie", "acting", "plot", "story", "ending", "music", "script", "cast", "dialogue",
           "camera work", "pacing", "soundtrack", "lead actor", "villain", "humour", "second half",
           "opening scene", "costumes", "direction", "editing", "lighting", "final act", "romance",
           "hero", "sequel", "premise", "score", "set design", "twist"]
LINKING_VERBS = ["was", "felt", "seemed", "looked", "sounded", "became", "is", "remained"]
LEAD_INS = ["", "honestly, ", "to be fair, ", "in my opinion ", "after an hour ", "overall "]
INTENSIFIERS = ["very", "really", "quite", "rather", "truly", "so", "a bit", "somewhat"]
CONNECTIVES = [", and", " and", ", but", " but", "; also", ", while"]
MEDIA = ["movie", "film", "show", "series"]
WHEN = ["yesterday", "last week", "last night", "on friday", "with friends", "at the cinema", "at home",
        "on a plane", "this morning", "twice"]
PEOPLE = ["friend", "sister", "brother", "dad", "mum", "neighbour", "teacher", "boss", "cousin", "uncle"]
TONES = ("positive", "negative", "mixed", "neutral")
# P(positive, negative, neutral) for each sentiment-bearing slot, by the review's latent tone.
_TONE_MIX = {
    "positive": (0.70, 0.10, 0.20),
    "negative": (0.10, 0.70, 0.20),
    "mixed": (0.40, 0.40, 0.20),
    "neutral": (0.15, 0.15, 0.70),
}


def _openings() -> list[tuple[str, str]]:
    """Every review opening as (text, kind); kind 'adj' continues with an adjective, 'clause' with a clause."""
    out = []
    for lead in LEAD_INS:
        for aspect in ASPECTS:
            for verb in LINKING_VERBS:
                out.append((f"{lead}the {aspect} {verb}", "adj"))
    for medium in MEDIA:
        for when in WHEN:
            out.append((f"I watched the {medium} {when} and", "clause"))
            out.append((f"we saw the {medium} {when} and", "clause"))
        for person in PEOPLE:
            out.append((f"my {person} said the {medium} was", "adj"))
    return out


OPENINGS: list[tuple[str, str]] = _openings()
_OPENING_KIND = dict(OPENINGS)


def _is_eval_prompt(text: str, eval_fraction: float) -> bool:
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return (h % 10_000) < eval_fraction * 10_000


def prompts(split: str = "train", eval_fraction: float = 0.25) -> list[str]:
    """Review openings for one split ('train', 'eval' or 'all'); the split is a stable hash of the text."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', not {split!r}")
    texts = [t for t, _ in OPENINGS]
    if split == "all":
        return texts
    want_eval = split == "eval"
    return [t for t in texts if _is_eval_prompt(t, eval_fraction) == want_eval]


def _pick(rng: random.Random, tone: str, positive, negative, neutral) -> str:
    p_pos, p_neg, _ = _TONE_MIX[tone]
    u = rng.random()
    pool = positive if u < p_pos else negative if u < p_pos + p_neg else neutral
    return rng.choice(sorted(pool) if isinstance(pool, dict) else pool)


def _adjective_phrase(rng: random.Random, tone: str) -> str:
    adj = _pick(rng, tone, POSITIVE_ADJECTIVES, NEGATIVE_ADJECTIVES, NEUTRAL_ADJECTIVES)
    return f"{rng.choice(INTENSIFIERS)} {adj}" if rng.random() < 0.35 else adj


def _clause(rng: random.Random, tone: str) -> str:
    r = rng.random()
    if r < 0.55:
        return f"the {rng.choice(ASPECTS)} {rng.choice(LINKING_VERBS)} {_adjective_phrase(rng, tone)}"
    if r < 0.85:
        verb = _pick(rng, tone, POSITIVE_VERBS, NEGATIVE_VERBS, NEUTRAL_VERBS)
        return f"I {verb} the {rng.choice(ASPECTS)}"
    noun = _pick(rng, tone, POSITIVE_NOUNS, NEGATIVE_NOUNS, NEUTRAL_NOUNS)
    article = "an" if noun[0] in "aeiou" else "a"
    return f"it was {article} {noun}"


def continuation(opening: str, rng: random.Random, tone: str | None = None) -> str:
    """A continuation of `opening` (starting with a space) in the given or a random tone."""
    tone = tone or rng.choice(TONES)
    kind = _OPENING_KIND.get(opening, "adj")
    first = _adjective_phrase(rng, tone) if kind == "adj" else _clause(rng, tone)
    parts = [f" {first}"]
    n_more = rng.choices([0, 1, 2], weights=[0.3, 0.5, 0.2])[0]
    for _ in range(n_more):
        parts.append(f"{rng.choice(CONNECTIVES)} {_clause(rng, tone)}")
    text = "".join(parts) + "."
    if rng.random() < 0.3:
        text += f" {_clause(rng, tone).capitalize()}."
    return text


def review(rng: random.Random, tone: str | None = None) -> tuple[str, str]:
    """(opening, continuation) of one review."""
    opening = rng.choice(OPENINGS)[0]
    return opening, continuation(opening, rng, tone)


def corpus(n: int = 20_000, seed: int = 0) -> list[str]:
    """`n` full reviews for pretraining the tiny model, deterministic for a seed."""
    rng = random.Random(f"corpus-{seed}")
    return ["".join(review(rng)) for _ in range(n)]


def sft_rows(n: int = 2_000, seed: int = 0, split: str = "train") -> list[dict]:
    """Prompt / completion rows: openings from `split` with tone-balanced continuations."""
    rng = random.Random(f"sft-{seed}")
    pool = prompts(split)
    rows = []
    for i in range(n):
        opening = pool[i % len(pool)] if i < len(pool) else rng.choice(pool)
        rows.append({"prompt": opening, "completion": continuation(opening, rng, TONES[i % len(TONES)])})
    return rows


# ---------------------------------------------------------------------------
# Oracle and judges.
# ---------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")
SCALE = 4.0


def raw_score(text: str) -> int:
    """Signed sum of the lexicon weights of the words in `text` (unknown words count 0)."""
    if not isinstance(text, str):
        raise TypeError(f"score() takes text, not {type(text).__name__}")
    return sum(LEXICON.get(w, 0) for w in _WORD.findall(text.lower()))


def score(text: str) -> float:
    """Oracle sentiment in [-1, 1]: tanh(raw_score / 4). 0.0 for text with no sentiment words.

    Monotone in `raw_score`, so rankings (and the oracle judge) follow the raw sum exactly.
    """
    return math.tanh(raw_score(text) / SCALE)


def oracle_judge(prompt: str, a: str, b: str) -> str:
    """'a' or 'b' for the response the oracle scores higher, 'tie' when equal. The prompt is not scored."""
    sa, sb = raw_score(a), raw_score(b)
    return "a" if sa > sb else "b" if sb > sa else "tie"


@dataclass
class NoisyAnnotator:
    """A simulated annotator: the oracle's verdict, replaced by a coin flip with probability `noise`.

    `tie_rate` is the chance of answering `tie` when the oracle sees no difference
    (otherwise a coin flip between a and b, as a hurried person would).

    The randomness is a hash of (seed, prompt, the two responses in a canonical
    order, how many times this judge has seen the pair), not a shared stream: the
    k-th vote on a comparison is the same whichever thread asks first and
    whichever side the server shows each response on, so simulated labeling
    through a concurrent server is reproducible. Safe to call from many threads.
    """

    noise: float = 0.2
    seed: int = 0
    tie_rate: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        if not 0.0 <= self.tie_rate <= 1.0:
            raise ValueError(f"tie_rate must be in [0, 1], got {self.tie_rate}")
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def _uniforms(self, prompt: str, first: str, second: str) -> tuple[float, float, float]:
        pair = json.dumps([str(prompt), first, second])
        with self._lock:
            k = self._seen.get(pair, 0)
            self._seen[pair] = k + 1
        digest = hashlib.sha256(f"{self.seed}|{k}|{pair}".encode()).digest()
        return tuple(int.from_bytes(digest[i : i + 8], "big") / 2**64 for i in (0, 8, 16))  # type: ignore[return-value]

    def __call__(self, prompt: str, a: str, b: str) -> str:
        swapped = b < a  # decide in a canonical order, then map back to the sides as shown
        first, second = (b, a) if swapped else (a, b)
        u_noise, u_coin, u_tie = self._uniforms(prompt, first, second)
        verdict = oracle_judge(prompt, first, second)
        if u_noise < self.noise or (verdict == "tie" and u_tie >= self.tie_rate):
            verdict = "a" if u_coin < 0.5 else "b"
        if swapped and verdict != "tie":
            verdict = "b" if verdict == "a" else "a"
        return verdict


def noisy_judge(noise: float = 0.2, seed: int = 0, tie_rate: float = 1.0) -> NoisyAnnotator:
    """A judge callable (prompt, a, b) -> 'a' | 'b' | 'tie' for simulated annotators."""
    return NoisyAnnotator(noise=noise, seed=seed, tie_rate=tie_rate)


def mean_score(texts: Iterable[str]) -> float:
    texts = list(texts)
    return sum(score(t) for t in texts) / max(1, len(texts))
