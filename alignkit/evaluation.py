"""Task metrics: each model answers every prompt of a file, scored against the prompt's reference.

    alignkit eval SPEC [NAME=SPEC ...] --data FILE --metric NAME [--metric NAME ...] --out DIR
    stages: - {name: scorecard, kind: eval, after: dpo, data: {eval: FILE}, train: {metrics: [...]}}  (recipes/eval.py)

Rows: `prompt` (text or a chat) with `reference` (or `answer`, or `completion`), or `messages` whose last
assistant turn is the reference. Answers are greedy. A metric is anything `evaluate.load` takes: a name
(exact_match, rouge, bleu, chrf, accuracy: from the Hugging Face hub) or a local metric script or its
directory. Before scoring, predictions and references go through the same answer extraction (`extract`:
GSM8K's "#### 42", the last number, or a regex's first group) and normalisation (`normalize`), so exact
match means "the same answer". Metrics whose inputs are integers (accuracy) get the answers as ids of one
shared vocabulary. Held-out perplexity (of the references, given the prompts) and, with a reward stage,
the mean reward of the answers come with every model.

DIR gets eval.json (the results with evaluate.save's metadata: time, git commit, versions), eval.md (a
table), predictions.jsonl (every answer, as extracted), and eval.png when several models are evaluated.
"""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignkit.errors import UserError

Extract = Literal["none", "gsm8k", "last_number", "regex"]
Normalize = Literal["lowercase", "punctuation", "whitespace", "articles"]
REFERENCE_KEYS = ("reference", "answer", "completion")


@dataclass
class EvalConfig:
    """How answers are produced and compared: the `train:` section of a `kind: eval` stage, and the flags of
    `alignkit eval`."""

    metrics: list[str] = field(default_factory=lambda: ["exact_match"], metadata={
        "help": "evaluate metrics by name (exact_match, rouge, bleu, chrf, accuracy) or local metric script paths"})
    extract: Extract = field(default="none", metadata={
        "help": "answer extraction before scoring: none, gsm8k (the text after '####'), last_number, or regex "
                "(the first group of answer_pattern)"})
    answer_pattern: str | None = field(default=None, metadata={"help": "the regex of extract: regex"})
    normalize: list[Normalize] = field(default_factory=lambda: ["whitespace"], metadata={
        "help": "applied in order after extraction: lowercase, punctuation (removed), whitespace (collapsed), "
                "articles (a, an, the removed)"})
    max_new_tokens: int = field(default=64, metadata={"help": "answer length limit in tokens (greedy decoding)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generate() batch"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N rows"})
    perplexity: bool = field(default=True, metadata={"help": "also report the perplexity of the references"})

    def __post_init__(self):
        if self.extract == "regex":
            if not self.answer_pattern:
                raise ValueError("extract: regex needs answer_pattern")
            try:
                re.compile(self.answer_pattern)
            except re.error as err:
                raise ValueError(f"answer_pattern {self.answer_pattern!r} is not a regex: {err}") from None
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.metrics and not self.perplexity:
            raise ValueError("no metrics and perplexity off: nothing to report")


@dataclass
class EvalRow:
    prompt: Any  # text, or a chat up to the reply
    reference: str


@dataclass
class ModelScores:
    name: str
    spec: str
    metrics: dict[str, float]
    predictions: list[str]


def read_eval_rows(path: str | Path, limit: int | None = None) -> list[EvalRow]:
    from alignkit.data.io import load_rows, where

    rows = load_rows(path, what="eval data")
    out = []
    for row in rows[:limit] if limit else rows:
        key = next((k for k in REFERENCE_KEYS if isinstance(row.get(k), (str, int, float))), None)
        if "prompt" in row and key is not None:
            out.append(EvalRow(row["prompt"], str(row[key])))
        elif isinstance(row.get("messages"), list) and row["messages"] and row["messages"][-1].get("role") == "assistant":
            out.append(EvalRow(row["messages"][:-1], str(row["messages"][-1].get("content", ""))))
        else:
            raise UserError(f"{where(path, row)}: an eval row needs `prompt` and `reference` (or `answer`), or "
                            "`messages` ending in the assistant's reference reply")
    if not out:
        raise UserError(f"{path}: no eval rows")
    return out


def extract_answer(text: str, config: EvalConfig) -> str:
    """The answer in a text, as `extract` finds it, then normalised; "" when there is none to find."""
    if config.extract == "gsm8k":
        text = text.split("####", 1)[1] if "####" in text else ""
        text = text.strip().splitlines()[0] if text.strip() else ""
        text = text.replace(",", "").rstrip(".")
    elif config.extract == "last_number":
        numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
        text = numbers[-1].replace(",", "") if numbers else ""
    elif config.extract == "regex":
        match = re.search(config.answer_pattern, text)
        text = (match.group(1) if match and match.groups() else match.group(0) if match else "")
    for step in config.normalize:
        if step == "lowercase":
            text = text.lower()
        elif step == "punctuation":
            text = text.translate(str.maketrans("", "", string.punctuation))
        elif step == "articles":
            text = re.sub(r"\b(a|an|the)\b", " ", text, flags=re.IGNORECASE)
        elif step == "whitespace":
            text = " ".join(text.split())
    return text


def load_metric(name: str):
    """`evaluate.load` of a hub name or a local script / directory, with a one-line error when it cannot."""
    import evaluate

    try:
        return evaluate.load(name)
    except Exception as err:  # the hub unreachable, a script that does not import: not the user's traceback
        local = Path(name).exists()
        hint = "" if local else " (a hub metric needs the network once; or give a local metric script directory)"
        raise UserError(f"--metric {name}: evaluate.load failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}{hint}") from None


def _inputs(module, predictions: list[str], references: list[str]) -> dict:
    """predictions / references shaped as the metric's features take them: strings, lists of reference
    strings (BLEU, chrF), or integer ids of one vocabulary shared by both (accuracy)."""
    from datasets import Sequence, Value

    options = module.features if isinstance(module.features, list) else [module.features]
    features = next((f for f in options if isinstance(f.get("predictions"), Value) and f["predictions"].dtype == "string"),
                    options[0])
    vocab = {a: i for i, a in enumerate(dict.fromkeys(references + predictions))}

    def shaped(feature, values):
        if isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
            return [vocab[v] for v in values]
        if isinstance(feature, Sequence) or isinstance(feature, list):
            return [[v] for v in values]
        return values

    return {"predictions": shaped(features["predictions"], predictions),
            "references": shaped(features["references"], references)}


def metric_scores(config: EvalConfig, predictions: list[str], references: list[str], modules: dict) -> dict[str, float]:
    """Every metric's numbers on the extracted answers; a key two metrics share is prefixed `metric/`."""
    preds = [extract_answer(p, config) for p in predictions]
    refs = [extract_answer(r, config) for r in references]
    scores: dict[str, float] = {}
    for name, module in modules.items():
        result = module.compute(**_inputs(module, preds, refs)) or {}
        for key, value in result.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scores[f"{name}/{key}" if key in scores else key] = float(value)
    return scores


def perplexity(model, tokenizer, rows: list[EvalRow]) -> float:
    """exp(mean negative log-likelihood per reference token), each reference given its prompt."""
    import torch

    from alignkit.generation import encode_prompt

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = encode_prompt(tokenizer, row.prompt)
            reply = tokenizer(row.reference, add_special_tokens=False)["input_ids"]
            if not reply:
                continue
            ids = torch.tensor([prompt + reply], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="sum").item()
            tokens += len(reply)
    return math.exp(total / tokens) if tokens else float("nan")


def evaluate_model(name: str, spec: str, rows: list[EvalRow], config: EvalConfig, modules: dict,
                   reward: str | Path | None = None) -> ModelScores:
    """One model's answers and scores: metrics, perplexity, and the reward stage's mean score if given."""
    import gc

    from alignkit.generation import SamplingParams, generate_batch
    from alignkit.modeling import load_model_for_inference

    model, tokenizer, _ = load_model_for_inference(spec)
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0, batch_size=config.batch_size)
    predictions = generate_batch(model, tokenizer, [r.prompt for r in rows], params).texts
    scores = metric_scores(config, predictions, [r.reference for r in rows], modules)
    if config.perplexity:
        scores["perplexity"] = perplexity(model, tokenizer, rows)
    del model
    gc.collect()
    if reward is not None:
        from alignkit.reward_model import load_reward_scorer

        rewards = load_reward_scorer(reward).score([r.prompt for r in rows], predictions)
        scores["mean_reward"] = float(sum(rewards) / len(rewards))
    return ModelScores(name, spec, scores, predictions)


def write_report(out: Path, results: list[ModelScores], rows: list[EvalRow], config: EvalConfig, data: str) -> dict:
    """eval.json (evaluate.save's metadata), eval.md, predictions.jsonl, and eval.png for several models."""
    import evaluate

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for res in results:
            for row, text in zip(rows, res.predictions):
                f.write(json.dumps({"model": res.name, "prompt": row.prompt, "reference": row.reference,
                                    "prediction": text, "extracted": extract_answer(text, config),
                                    "reference_extracted": extract_answer(row.reference, config)}) + "\n")
    summary = {"data": str(data), "rows": len(rows), "config": asdict(config),
               "models": [{"name": r.name, "spec": r.spec, "metrics": r.metrics} for r in results]}
    evaluate.save(str(out / "eval.json"), **summary)
    keys = list(dict.fromkeys(k for r in results for k in r.metrics))
    table = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    table += [f"| {r.name} | " + " | ".join(f"{r.metrics[k]:.4g}" if k in r.metrics else "" for k in keys) + " |"
              for r in results]
    (out / "eval.md").write_text(f"# Eval: {Path(data).name} ({len(rows)} rows)\n\n" + "\n".join(table) + "\n")
    if len(results) > 1:
        from alignkit.plots import eval_plot

        eval_plot({r.name: r.metrics for r in results}, out / "eval.png", title=f"Eval on {Path(data).name}")
    return json.loads((out / "eval.json").read_text())


def run_eval(models: list[tuple[str, str]], data: str, config: EvalConfig, out: Path, *,
             reward: str | Path | None = None, rows: list[EvalRow] | None = None, log=print) -> dict:
    """Evaluate every (name, spec) on `data` (its `rows`, when already read); returns what eval.json holds."""
    rows = rows if rows is not None else read_eval_rows(data, config.limit)
    modules = {Path(m).stem if Path(m).exists() else m: load_metric(m) for m in config.metrics}
    results = []
    for name, spec in models:
        log(f"eval: {name} ({spec}) on {len(rows)} rows")
        results.append(evaluate_model(name, spec, rows, config, modules, reward))
    report = write_report(Path(out), results, rows, config, data)
    log(f"eval: wrote {Path(out) / 'eval.json'} and {Path(out) / 'eval.md'}")
    return report


def eval_from_cli(args) -> int:
    models = []
    for item in args.models:
        name, _, spec = item.rpartition("=") if "=" in item else (Path(item.rstrip("/")).name, "", item)
        models.append((name or Path(spec.rstrip("/")).name, spec))
    if len({n for n, _ in models}) < len(models):
        raise UserError("two models share a name; give them NAME=SPEC")
    try:
        config = EvalConfig(metrics=args.metrics, extract=args.extract, answer_pattern=args.answer_pattern,
                            normalize=args.normalize if args.normalize is not None else ["whitespace"],
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                            perplexity=args.perplexity)
    except ValueError as err:
        raise UserError(f"eval: {err}") from None
    report = run_eval(models, args.data, config, Path(args.out), reward=args.reward)
    print((Path(args.out) / "eval.md").read_text())
    return 0 if report else 1
