"""Judges for A/B comparison: given prompts and two responses each, say "a", "b" or "tie".

A judge string names one (the `--judge` of `alignkit compare`):

  oracle:length       the longer response (in characters, whitespace-trimmed) wins; equal lengths tie.
                      A deliberately naive judge: it is what a length-biased judge would say.
  oracle:sentiment    alignkit.tasks.sentiment.oracle_judge: the higher lexicon sentiment wins.
  reward:STAGE_DIR    a reward stage scores both responses (alignkit.reward_model.load_reward_scorer);
                      a score difference within --tie-margin is a tie.
  llm:MODEL_SPEC      a local instruction-tuned model is asked which response is better; the
                      next-token log-probs of "A" and "B" decide. Both orders are scored and a pair on
                      which the two orders disagree is a tie, which cancels position bias; how often
                      that happened is reported per pair by alignkit.compare (`both_orders` and
                      `last_position_disagreement` on the judge).
  human:DB            handled by alignkit.compare (pairs go to the label store, votes are collected later).

Oracle and reward judges score each response on its own, so the side a response is shown
on cannot matter; `alignkit.compare` still randomises sides per pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from alignkit.errors import UserError

OUTCOMES = ("a", "b", "tie")
JUDGE_KINDS = ("reward", "oracle", "llm", "human")
ORACLES = ("length", "sentiment")

LLM_JUDGE_PROMPT = (
    "You are comparing two responses to the same request. Decide which response is better: "
    "more helpful, correct, relevant and well written. Ignore the order in which they are shown "
    "and do not prefer a response for being longer.\n\n"
    "[Request]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Answer with a single letter: A or B."
)
LLM_ANSWER_PREFIX = "The better response is"


def prompt_text(prompt: Any) -> str:
    """A prompt (string or chat messages) as plain text for a judge to read."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def parse_judge(spec: str | None) -> tuple[str, str]:
    """(kind, argument) of a judge string; UserError for anything malformed."""
    if not spec:
        raise UserError("--judge is required: reward:STAGE_DIR | oracle:NAME | llm:MODEL_SPEC | human:DB")
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in JUDGE_KINDS or not arg:
        raise UserError(f"--judge {spec!r}: expected reward:STAGE_DIR, oracle:NAME ({', '.join(ORACLES)}), "
                        f"llm:MODEL_SPEC or human:DB")
    if kind == "oracle" and arg not in ORACLES:
        raise UserError(f"--judge {spec!r}: unknown oracle {arg!r}; one of {', '.join(ORACLES)}")
    return kind, arg


def _verdict(sa: float, sb: float, margin: float = 0.0) -> str:
    if abs(sa - sb) <= margin:
        return "tie"
    return "a" if sa > sb else "b"


@dataclass
class PointwiseJudge:
    """A judge that scores each response alone; the higher score wins, differences within `margin` tie."""

    name: str
    scorer: Callable[[Sequence[Any], Sequence[str]], list[float]]
    margin: float = 0.0
    _memo: dict = field(default_factory=dict, repr=False)

    def scores(self, prompts: Sequence[Any], texts: Sequence[str]) -> list[float]:
        import json

        keys = [(json.dumps(p, sort_keys=True), t) for p, t in zip(prompts, texts)]
        todo = [i for i, k in enumerate(keys) if k not in self._memo]
        if todo:
            fresh = self.scorer([prompts[i] for i in todo], [texts[i] for i in todo])
            for i, s in zip(todo, fresh):
                self._memo[keys[i]] = float(s)
        return [self._memo[k] for k in keys]

    def judge(self, prompts: Sequence[Any], a: Sequence[str], b: Sequence[str]) -> list[str]:
        sa, sb = self.scores(prompts, a), self.scores(prompts, b)
        return [_verdict(x, y, self.margin) for x, y in zip(sa, sb)]


def _length_scores(prompts, texts) -> list[float]:
    return [float(len(t.strip())) for t in texts]


def _sentiment_scores(prompts, texts) -> list[float]:
    from alignkit.tasks import sentiment

    # raw_score is what sentiment.oracle_judge compares; score() is a monotone squash of it.
    return [float(sentiment.raw_score(t)) for t in texts]


def _reward_judge(stage_dir: str, margin: float) -> PointwiseJudge:
    if not Path(stage_dir).exists():
        raise UserError(f"reward judge: stage directory does not exist: {stage_dir}")
    try:
        from alignkit.reward_model import load_reward_scorer
    except ImportError as err:
        raise UserError(f"reward judge: the reward model module is not available ({err})") from None
    scorer = load_reward_scorer(stage_dir)
    return PointwiseJudge(f"reward:{stage_dir}", scorer.score, margin)


@dataclass
class LLMJudge:
    """A causal LM asked "which is better, A or B?"; decided by next-token log-probs, in both orders."""

    name: str
    model: Any
    tokenizer: Any
    batch_size: int = 8
    last_margins: list[tuple[float, float]] = field(default_factory=list, repr=False)
    # Per item of the last judge() call: both orders gave a preference, for opposite positions.
    last_position_disagreement: list[bool] = field(default_factory=list, repr=False)
    both_orders: ClassVar[bool] = True  # tells alignkit.compare to report last_position_disagreement

    @classmethod
    def load(cls, spec: str, batch_size: int = 8) -> "LLMJudge":
        from alignkit.modeling import load_model_for_inference

        model, tokenizer, _ = load_model_for_inference(spec, padding_side="left")
        return cls(f"llm:{spec}", model, tokenizer, batch_size)

    def _letter_id(self, letter: str) -> int:
        ids = self.tokenizer.encode(f" {letter}", add_special_tokens=False)
        ids = ids or self.tokenizer.encode(letter, add_special_tokens=False)
        return ids[-1]  # " A" can be [" ", "A"] in small vocabularies; the letter is last

    def render(self, prompt: Any, a: str, b: str) -> str:
        content = LLM_JUDGE_PROMPT.format(prompt=prompt_text(prompt), a=a, b=b)
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
        return text + LLM_ANSWER_PREFIX

    def margins(self, prompts: Sequence[Any], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """log p("A") - log p("B") for each (prompt, a shown as A, b shown as B)."""
        import torch

        id_a, id_b = self._letter_id("A"), self._letter_id("B")
        texts = [self.render(p, x, y) for p, x, y in zip(prompts, a, b)]
        out: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                 add_special_tokens=False)
            with torch.no_grad():
                logits = self.model(input_ids=enc["input_ids"].to(device),
                                    attention_mask=enc["attention_mask"].to(device)).logits[:, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            out.extend((logp[:, id_a] - logp[:, id_b]).cpu().tolist())
        return out

    def judge(self, prompts: Sequence[Any], a: Sequence[str], b: Sequence[str]) -> list[str]:
        forward = self.margins(prompts, a, b)  # a shown as "A"
        backward = self.margins(prompts, b, a)  # a shown as "B"
        self.last_margins = list(zip(forward, backward))
        verdicts, disagreements = [], []
        for f, r in zip(forward, backward):
            prefers_a_first = f > 0
            prefers_a_second = r < 0
            undecided = f == 0 or r == 0 or math.isnan(f) or math.isnan(r)
            disagreements.append(not undecided and prefers_a_first != prefers_a_second)
            if undecided or prefers_a_first != prefers_a_second:
                verdicts.append("tie")  # the orders disagree: position, not content, decided
            else:
                verdicts.append("a" if prefers_a_first else "b")
        self.last_position_disagreement = disagreements
        return verdicts


def load_judge(spec: str, *, tie_margin: float = 0.0):
    """A judge object with `.name` and `.judge(prompts, a_texts, b_texts) -> list of "a"|"b"|"tie"`.

    `human:DB` is not an automatic judge; alignkit.compare handles it.
    """
    kind, arg = parse_judge(spec)
    if tie_margin < 0:
        raise UserError(f"--tie-margin must be >= 0, got {tie_margin}")
    if kind == "oracle":
        scorer = _length_scores if arg == "length" else _sentiment_scores
        return PointwiseJudge(spec, scorer, 0.0)
    if kind == "reward":
        return _reward_judge(arg, tie_margin)
    if kind == "llm":
        return LLMJudge.load(arg)
    raise UserError("human judge: use alignkit.compare (pairs go to the label store; --collect reads the votes)")
