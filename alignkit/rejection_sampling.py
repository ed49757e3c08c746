"""Rejection sampling (best-of-N): N responses per prompt from a policy, scored by a reward stage, the best kept.

The data step of rejection-sampling fine-tuning as Llama 2 (Touvron et al. 2023, section 3.2.3) and
open-instruct do it; recipes/best_of_n.py then trains on the kept responses with the SFT body.

    sample_from_parent   the parent stage's policy, loaded for inference, samples N responses per prompt
    score_with_reward    the reward stage scores every (prompt, response) as its trainer scored pairs
    write_samples        every sample, its score and which one was kept, for stage.json's numbers to be checked
    distribution_summary what stage.json records: the scores of all samples and of the kept ones

A kept text is exactly the decoded sample (no strip): prompt + text re-tokenizes as it was generated.
Each loader frees its model before the next one loads, so the policy, the reward model and the trainer's
model are never in memory together.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.generation import SamplingParams, generate_batch

if TYPE_CHECKING:
    from alignkit.stage import StageRun


@dataclass
class Candidates:
    """One prompt's N samples, in sampling order, with the reward stage's score of each."""

    prompt: Any  # a string or a list of chat messages
    texts: list[str]
    finished: list[bool]  # the sample ended with EOS within max_new_tokens
    scores: list[float] | None = None

    @property
    def best(self) -> int:
        """Index of the top-scored sample; the first of equal ones."""
        assert self.scores is not None, "score the candidates first"
        return max(range(len(self.scores)), key=lambda i: (self.scores[i], -i))


@dataclass(frozen=True)
class RewardDistribution:
    """Scores summarised: population std; quantiles by linear interpolation (numpy's default)."""

    count: int
    mean: float
    std: float
    min: float
    q25: float
    median: float
    q75: float
    max: float

    @classmethod
    def of(cls, scores: list[float]) -> RewardDistribution:
        import numpy as np

        s = np.asarray(scores, dtype=float)
        q = np.quantile(s, [0.0, 0.25, 0.5, 0.75, 1.0])
        return cls(int(s.size), float(s.mean()), float(s.std()), *(float(v) for v in q))


def _free_memory() -> None:
    """After the caller dropped its last reference to a model: its memory back before the next one loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_from_parent(stage: StageRun, prompts: list, params: SamplingParams) -> list[Candidates]:
    """params.num_return_sequences samples per prompt from the `after:` stage: the base as the recipe loads
    it plus the parent's adapter, frozen (or the parent's own weights when it was fully fine-tuned)."""
    from alignkit.modeling import attach_adapter, load_base_model
    from alignkit.training import stage_tokenizer

    parent = stage.parents["after"]
    has_adapter = (Path(parent) / "adapter_config.json").exists()
    model = load_base_model(stage.model if has_adapter else replace(stage.model, base=str(parent)))
    if has_adapter:
        model = attach_adapter(model, parent, trainable=False)
    model.eval()
    out = generate_batch(model, stage_tokenizer(stage, padding_side="left"), prompts, params)
    del model
    _free_memory()
    n = params.num_return_sequences
    return [Candidates(p, out.texts[i * n:(i + 1) * n], out.finished[i * n:(i + 1) * n]) for i, p in enumerate(prompts)]


def score_with_reward(reward_stage: Path, candidates: list[Candidates], *, batch_size: int) -> None:
    """Fill each candidate's scores with the reward stage's, scored in batches across prompts."""
    from alignkit.reward_model import load_reward_scorer

    scorer = load_reward_scorer(reward_stage, batch_size=batch_size)
    prompts = [c.prompt for c in candidates for _ in c.texts]
    scores = scorer.score(prompts, [t for c in candidates for t in c.texts])
    del scorer
    _free_memory()
    start = 0
    for c in candidates:
        c.scores, start = scores[start:start + len(c.texts)], start + len(c.texts)


def write_samples(path: Path, candidates: list[Candidates]) -> None:
    """One line per prompt: its samples (text, score, finished) and `best`, the index trained on. Written
    whole or not at all: under accelerate every rank writes the same file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        for c in candidates:
            samples = [{"text": t, "score": s, "finished": e} for t, s, e in zip(c.texts, c.scores, c.finished)]
            f.write(json.dumps({"prompt": c.prompt, "samples": samples, "best": c.best}) + "\n")
    os.replace(tmp, path)


def read_samples(path: Path) -> list[Candidates]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [Candidates(r["prompt"], [s["text"] for s in r["samples"]], [s["finished"] for s in r["samples"]],
                       [s["score"] for s in r["samples"]]) for r in rows]


def distribution_summary(candidates: list[Candidates]) -> dict:
    """stage.json's record of the selection: N, prompts, the distribution of all scores and of the kept ones."""
    every = [s for c in candidates for s in c.scores]
    kept = [c.scores[c.best] for c in candidates]
    return {"num_samples": len(candidates[0].texts), "prompts": len(candidates),
            "all": asdict(RewardDistribution.of(every)), "chosen": asdict(RewardDistribution.of(kept)),
            "chosen_unfinished": sum(not c.finished[c.best] for c in candidates)}
