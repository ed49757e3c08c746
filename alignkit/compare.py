"""`alignkit compare`: blind A/B comparison of models with a judge; win rates, ratings, plots.

    alignkit compare --model sft=runs/x/sft --model dpo=runs/x/dpo --prompts prompts.jsonl \
        --judge reward:runs/x/reward --out runs/x/compare

1. Models are model specs (`alignkit.modeling`: stage dir, adapter dir, model dir, hub id), each
   with an optional display name (`NAME=SPEC`).
2. Responses are sampled with pinned SamplingParams (recorded in compare.json) and
   cached in OUT/cache/<key>.jsonl, one file per (model identity, sampling params),
   one line per prompt. The model identity (`model_identity`) is what the weights are:
   the content fingerprint of the adapter for a stage or adapter directory (plus the
   stage's config hash), and for a local model directory — a base included — the name,
   size and mtime of each of its files; a hub id is taken as is. Adding a model later
   samples only that model.
3. Every pair of models meets on every prompt. Sides are randomised per (pair, prompt)
   with the seed; the judge sees "a" and "b" only. Automatic judges whose verdict
   could depend on the order (llm:) score both orders (see alignkit.judges).
4. Statistics (alignkit.stats): per pair wins/losses/ties, win rate with a 95% CI; with
   >= 3 models Bradley–Terry ratings on the Elo scale with CIs, and `ratings_warning`
   when some models never lost or never won (no finite MLE) or never met; the pairwise
   win matrix; mean response length per model; for judges that score both orders, the
   share of battles on which the two orders disagreed. Every pair meets on every prompt,
   so the bootstrap resamples prompts (a response is in K-1 battles), not battles.
5. Output: OUT/compare.json, OUT/compare.md, OUT/battles.jsonl, OUT/win_rates.png,
   OUT/ratings.png (>= 3 models).

With `--judge human:DB` the pairs go into the label store as arena battles (responses
recorded with their model spec and display name, which annotators see only after their
vote, in the labeling app's Arena tab) and OUT/human.json records what was sent;
`--collect` later reads the votes and writes the results, computed by the same functions as the
labeling app's leaderboard (alignkit.store.arena), so the two agree. There every battle (prompt,
pair) counts once: a vote weighs 1/(votes on its battle); wins/losses/ties still count votes. A
prompt on which two models gave the same text is no battle (the store keeps that text once, under
the model that stored it, and nobody votes on it): it is counted in `human.identical_responses`,
not rated. Before any vote there is nothing to rate, and --collect says so (exit status 2).

`--battles N` (human judge only) sends N battles instead, each one pair on a prompt that pair has not met on in
the store (seeded order; a prompt where the pair's texts coincide, or where one is credited to another model, is
skipped for the next). `--select uncertainty` (default) allocates them with `selection.allocate_battles` on the
spreads of the rating differences (`selection.rating_spreads` over `stats.bootstrap_rating_samples`) of the votes
the store holds between these models, found by model identity whatever run sent them; before any vote every pair
is "never met" and the battles spread over the pairs. `uniform` splits N evenly (`round_robin`). Each model samples
only its battles' prompts. Votes not yet cast count for nothing, so a round is best allocated once the last one's
votes are in. human.json adds each round's allocation (pair -> battles, and the spreads used) to the earlier
rounds of OUT, whose battles --collect rates together.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from alignkit import stats
from alignkit.artifacts import file_fingerprint, stable_hash, write_json_atomic
from alignkit.data.formats import prompt_from
from alignkit.data.io import read_jsonl
from alignkit.errors import UserError
from alignkit.generation import SamplingParams
from alignkit.selection import PairSpread, allocate_battles, rating_spreads

if TYPE_CHECKING:
    from alignkit.store.arena import ArenaBattles
    from alignkit.store.importer import ImportSummary

CACHE_DIR = "cache"
HUMAN_JSON = "human.json"
SELECT_RULES = ("uncertainty", "uniform")


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def parse_model_args(values: Sequence[str]) -> dict[str, str]:
    """`[NAME=]SPEC` strings -> {name: spec}, names unique; at least two models."""
    from alignkit.modeling import resolve_model_spec

    if len(values) < 2:
        raise UserError(f"compare needs at least 2 --model arguments, got {len(values)}")
    models: dict[str, str] = {}
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name or not spec or os.path.exists(value):
            name, spec = "", value
        if not name:
            name = resolve_model_spec(spec).display_name
        base, k = name, 2
        while name in models:
            name, k = f"{base}-{k}", k + 1
        models[name] = spec
    return models


def read_prompts(path: str | Path | None, limit: int | None = None) -> list[Any]:
    """Prompts from JSONL: each line an object with `prompt` (text or messages) or `messages` (formats.prompt_from)."""
    if not path:
        raise UserError("--prompts is required (a JSONL file with a `prompt` or `messages` field per line)")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    prompts: list[Any] = []
    for row in read_jsonl(path, what="prompts"):
        prompts.append(prompt_from(row, path))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _file_listing(directory: Path) -> str:
    """Hash of (relative name, size, mtime_ns) of every file under a model directory.

    Not the contents: hashing a 16 GB model on every compare takes minutes, and rewritten weights
    change size or mtime. (HF snapshot files are symlinks; stat follows them to the blobs.)
    """
    rows = []
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            st = f.stat()
            rows.append((f.relative_to(directory).as_posix(), st.st_size, st.st_mtime_ns))
    return stable_hash(rows)


def _adapter_fingerprint(adapter_dir: Path) -> str:
    """Content hash of the adapter's weights and config: small files, and what training actually changed."""
    files = sorted(adapter_dir.glob("adapter_model*")) + [adapter_dir / "adapter_config.json"]
    return stable_hash([(f.name, file_fingerprint(f)) for f in files if f.is_file()])


def model_identity(spec: str) -> dict[str, str]:
    """What makes a model's responses the same: the weights (see the module docstring), not where they came from.

    A stage's config hash alone is not enough: two runs of one recipe (CPU and GPU, or before and
    after a code fix) share it and would share cached responses. The arena leaderboard counts models
    by a hash of this too (send_to_store), so one model gets one row however it is named.
    """
    from alignkit.modeling import resolve_model_spec

    resolved = resolve_model_spec(spec)
    base = Path(resolved.base)
    if base.exists():
        identity = {"base": str(base.resolve()), "base_files": _file_listing(base)}
    else:
        # A hub id is taken at its word: no revision is pinned, so weights re-published under the same
        # id would reuse old responses. Pass a local snapshot directory to have its files checked.
        identity = {"base": resolved.base}
    if resolved.stage is not None and resolved.stage.get("config_hash"):
        identity["stage_config_hash"] = resolved.stage["config_hash"]
    if resolved.adapter_dir is not None:
        identity["adapter_fingerprint"] = _adapter_fingerprint(resolved.adapter_dir)
    return identity


def _sampling_key(params: SamplingParams) -> dict:
    d = params.to_dict()
    d.pop("batch_size", None)  # a throughput knob; the cached responses are what make a run reproducible
    return d


def _prompt_key(prompt: Any) -> str:
    return stable_hash(prompt)


# ---------------------------------------------------------------------------
# Generation with a cache
# ---------------------------------------------------------------------------


def _read_cache(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if path.exists():
        # split("\n"), not splitlines(): a response may hold U+2028 or U+0085, which JSON leaves unescaped
        for line in path.read_text(encoding="utf-8").split("\n"):
            try:
                row = json.loads(line)
                out[row["prompt_key"]] = row["response"]
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line from an interrupted run is just regenerated
    return out


def generate_cached(models: dict[str, str], prompts: list[Any], params: SamplingParams, out_dir: Path,
                    *, progress: bool = False) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """{name: responses in prompt order}, {name: {identity, cache_file, generated, cached}}."""
    from alignkit.generation import generate_batch
    from alignkit.modeling import load_model_for_inference

    cache_root = out_dir / CACHE_DIR
    cache_root.mkdir(parents=True, exist_ok=True)
    pkeys = [_prompt_key(p) for p in prompts]
    responses: dict[str, list[str]] = {}
    info: dict[str, dict] = {}
    for name, spec in models.items():
        identity = model_identity(spec)
        key = stable_hash({"model": identity, "sampling": _sampling_key(params)})[:32]
        path = cache_root / f"{key}.jsonl"
        cached = _read_cache(path)
        missing = [i for i, k in enumerate(pkeys) if k not in cached]
        # The same prompt twice in the file is sampled once.
        todo = list(dict.fromkeys(pkeys[i] for i in missing))
        if todo:
            first = {k: prompts[pkeys.index(k)] for k in todo}
            model, tokenizer, _ = load_model_for_inference(spec)
            result = generate_batch(model, tokenizer, [first[k] for k in todo], params, progress=progress)
            del model
            with open(path, "a", encoding="utf-8") as f:
                for k, text in zip(todo, result.texts):
                    f.write(json.dumps({"prompt_key": k, "prompt": first[k], "response": text,
                                        "spec": spec, "sampling": params.to_dict()}, ensure_ascii=False) + "\n")
                    cached[k] = text
        responses[name] = [cached[k] for k in pkeys]
        info[name] = {"spec": spec, "identity": identity, "cache_file": str(path.relative_to(out_dir)),
                      "generated": len(todo), "cached": len(prompts) - len(missing)}
    return responses, info


# ---------------------------------------------------------------------------
# Judging and statistics
# ---------------------------------------------------------------------------


def _pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(names, 2))


def judge_all(judge, prompts: list[Any], responses: dict[str, list[str]], seed: int) -> list[dict]:
    """Every pair on every prompt, sides randomised per (pair, prompt); one battle record each.

    A judge that scores both orders (`both_orders`, e.g. the LLM judge) also marks the battles on
    which the orders disagreed (`position_disagreement`): its verdict there is a tie.
    """
    rng = np.random.default_rng(seed)
    battles = []
    for x, y in _pairs(list(responses)):
        swap = rng.random(len(prompts)) < 0.5
        shown_a = [y if s else x for s in swap]
        shown_b = [x if s else y for s in swap]
        verdicts = judge.judge(prompts, [responses[m][i] for i, m in enumerate(shown_a)],
                               [responses[m][i] for i, m in enumerate(shown_b)])
        disagree = judge.last_position_disagreement if getattr(judge, "both_orders", False) else None
        for i, v in enumerate(verdicts):
            if v not in stats.OUTCOMES:
                raise RuntimeError(f"judge {judge.name} returned {v!r}")
            record = {"prompt_index": i, "model_a": shown_a[i], "model_b": shown_b[i], "winner": v}
            if disagree is not None:
                record["position_disagreement"] = bool(disagree[i])
            battles.append(record)
    return battles


def summarise(names: Sequence[str], battles: list[dict], responses: dict[str, list[str]] | None,
              *, bootstrap: int, seed: int) -> dict:
    """pairs / ratings / win_matrix / mean_length from battle records (keys as in compare.json).

    Battles are clustered by `prompt_index` (every pair meets on every prompt, so a response is in
    K-1 battles) and weighted by `weight` (default 1).
    """
    if bootstrap < stats.MIN_BOOTSTRAP:
        raise UserError(f"--bootstrap must be >= {stats.MIN_BOOTSTRAP}, got {bootstrap}")
    tuples = [(b["model_a"], b["model_b"], b["winner"]) for b in battles]
    clusters = [b.get("prompt_index", ("battle", k)) for k, b in enumerate(battles)]
    weights = [float(b.get("weight", 1.0)) for b in battles]
    pairs = []
    for k, (x, y) in enumerate(_pairs(names)):
        rows = [j for j, (a, b, _) in enumerate(tuples) if {a, b} == {x, y}]
        # Orient every battle of the pair as (x, y) so wins/losses are x's.
        oriented = [(x, y, w) if a == x else (x, y, {"a": "b", "b": "a", "tie": "tie"}[w])
                    for a, b, w in (tuples[j] for j in rows)]
        if not oriented:
            pairs.append({"model_a": x, "model_b": y, "wins": 0, "losses": 0, "ties": 0, "n": 0, "units": 0,
                          "win_rate": None, "ci_low": None, "ci_high": None, "ci_method": None})
            continue
        s = stats.pair_stats(oriented, clusters=[clusters[j] for j in rows],
                             weights=[weights[j] for j in rows])[(x, y)]
        entry = {"model_a": x, "model_b": y, **s}
        flags = [battles[j]["position_disagreement"] for j in rows if "position_disagreement" in battles[j]]
        if flags:
            entry["position_disagreements"] = int(sum(flags))
            entry["position_disagreement_rate"] = sum(flags) / len(flags)
        pairs.append(entry)
    out: dict[str, Any] = {"pairs": pairs,
                           "win_matrix": stats.win_matrix(tuples, names, weights=weights) if tuples else {}}
    if len(names) >= 3 and tuples:
        boot = stats.bootstrap_ratings(tuples, rounds=bootstrap, seed=seed, clusters=clusters, weights=weights)
        graph = stats.connectivity(tuples, weights=weights)
        out["ratings"] = {m: boot[m] for m in sorted(boot, key=lambda m: -boot[m]["rating"])}
        out["ratings_warning"] = graph.warning
        out["ratings_connectivity"] = graph.as_dict()
    if responses is not None:
        out["mean_length"] = _mean_length(names, responses)
        out.update(length_control(names, battles, responses, pairs, bootstrap=bootstrap, seed=seed))
    return out


def length_control(names: Sequence[str], battles: list[dict], responses: dict[str, list[str]], pairs: list[dict],
                   *, bootstrap: int, seed: int) -> dict:
    """Adds `lc_win_rate`, `lc_ci_low`, `lc_ci_high` and `length_coef` to each pair (AlpacaEval 2's length-
    controlled win rate, bootstrap CI over prompts) and returns `ratings_length_controlled` /
    `length_coef` for three or more models (Bradley–Terry with Chatbot Arena's style term). Lengths are
    characters of the responses the judge saw; see alignkit.stats for the models."""
    # None: no response to that prompt (compare --battles samples a model only where it has a battle).
    length = {(m, i): len(t) for m, texts in responses.items() for i, t in enumerate(texts) if t is not None}
    for pair in pairs:
        x, y = pair["model_a"], pair["model_b"]
        rows = [b for b in battles if {b["model_a"], b["model_b"]} == {x, y}]
        if not rows:
            continue
        flip = {"a": "b", "b": "a", "tie": "tie"}
        outcome = [b["winner"] if b["model_a"] == x else flip[b["winner"]] for b in rows]
        lc = stats.length_controlled_win_rate(
            [{"a": 1.0, "b": 0.0, "tie": 0.5}[o] for o in outcome],
            [length[x, b["prompt_index"]] - length[y, b["prompt_index"]] for b in rows],
            rounds=bootstrap, seed=seed, clusters=[b["prompt_index"] for b in rows],
            weights=[float(b.get("weight", 1.0)) for b in rows])
        pair.update(lc_win_rate=lc.win_rate, lc_ci_low=lc.ci_low, lc_ci_high=lc.ci_high, length_coef=lc.length_coef)
    if len(names) < 3 or not battles:
        return {}
    styled = stats.style_controlled_ratings(
        [(b["model_a"], b["model_b"], b["winner"]) for b in battles],
        [length[b["model_a"], b["prompt_index"]] for b in battles],
        [length[b["model_b"], b["prompt_index"]] for b in battles],
        rounds=bootstrap, seed=seed, clusters=[b["prompt_index"] for b in battles],
        weights=[float(b.get("weight", 1.0)) for b in battles])
    if styled is None:
        return {"ratings_length_controlled": None}
    order = sorted(styled["ratings"], key=lambda m: -styled["ratings"][m]["rating"])
    return {"ratings_length_controlled": {m: styled["ratings"][m] for m in order},
            "ratings_length_coef": styled["length_coef"]}


def _mean_length(names: Sequence[str], responses: dict[str, list[str | None]]) -> dict[str, dict[str, float | None]]:
    texts = {m: [t for t in responses[m] if t is not None] for m in names}  # None: not sampled (--battles)
    return {m: {"chars": float(np.mean([len(t) for t in texts[m]])) if texts[m] else None,
                "words": float(np.mean([len(t.split()) for t in texts[m]])) if texts[m] else None} for m in names}


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------


def _fmt(x: float | None, nd: int = 3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def write_markdown(result: dict, path: Path) -> None:
    s = result["sampling"]
    rounds = result.get("human", {}).get("rounds")
    design = (f"{len(rounds)} round(s) of `--battles` ({', '.join(r['rule'] for r in rounds)}), each battle a pair on "
              "a prompt it had not met on" if rounds else "every pair of models on every prompt")
    lines = [
        "# Model comparison", "",
        f"Judge: `{result['judge']}`. {result['n_prompts']} prompts; {design}, "
        f"sides randomised per pair (seed {s['seed']}). Sampling: max_new_tokens={s['max_new_tokens']}, "
        f"temperature={s['temperature']}, top_p={s['top_p']}, seed={s['seed']}. "
        f"Ties count half a win. CIs count prompts, not battles: a response to a prompt is in every battle its "
        "model fights on that prompt, so those battles are not independent. A win rate's 95% CI is the Wilson "
        "score interval over the pair's prompts (conservative with ties; it never collapses to a point); the "
        f"ratings' CIs are a percentile bootstrap over prompts ({result['bootstrap']} rounds)."
        + (f" {result['duplicate_prompts_dropped']} duplicate prompts in the prompts file were dropped."
           if result.get("duplicate_prompts_dropped") else ""), "",
    ]
    if "human" in result:
        h = result["human"]
        lines += [f"Human judge: {h['votes']} votes on {h['battles']} battles ({h['battles_without_votes']} battles "
                  "without a vote yet). Wins / losses / ties count votes, but the win rate, its CI, the ratings and the "
                  "win matrix weigh each vote 1/(votes on its battle), so every (prompt, pair) counts once however "
                  f"many people voted on it. {h['identical_responses']} (prompt, pair)s where both models gave the "
                  "same text are not rated: nobody voted on them"
                  + (f"; nor are {h['shared_responses']} (prompt, pair)s where one model gave the text another model "
                     "also gave: the store credits that text, and its votes, to one of them"
                     if h.get("shared_responses") else "") + ".", ""]
    lines += ["## Models", "", "| name | spec | mean length (chars) | mean length (words) | generated | cached |",
              "|---|---|---:|---:|---:|---:|"]
    for m, info in result["models"].items():
        ml = result.get("mean_length", {}).get(m, {})
        lines.append(f"| {m} | `{info['spec']}` | {_fmt(ml.get('chars'), 1)} | {_fmt(ml.get('words'), 1)} | "
                     f"{info.get('generated', '–')} | {info.get('cached', '–')} |")
    position = any("position_disagreement_rate" in p for p in result["pairs"])
    win_rate_label = "weighted win rate of A" if "human" in result else "win rate of A"
    lines += ["", "## Pairs", "",
              f"| model A | model B | wins | losses | ties | prompts | {win_rate_label} | 95% CI | CI method | "
              "length-controlled | 95% CI |" + (" orders disagree |" if position else ""),
              "|---|---|---:|---:|---:|---:|---:|---|---|---:|---|" + ("---:|" if position else "")]
    for p in result["pairs"]:
        row = (f"| {p['model_a']} | {p['model_b']} | {p['wins']} | {p['losses']} | {p['ties']} | {p.get('units', '–')} | "
               f"{_fmt(p['win_rate'])} | [{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}] | {p.get('ci_method') or '–'} | "
               f"{_fmt(p.get('lc_win_rate'))} | [{_fmt(p.get('lc_ci_low'))}, {_fmt(p.get('lc_ci_high'))}] |")
        if position:
            row += f" {_fmt(p.get('position_disagreement_rate'))} |"
        lines.append(row)
    if position:
        lines += ["", "*Orders disagree*: the share of battles on which the judge, asked with the responses in both "
                  "orders, preferred whichever was shown in one position — those verdicts are ties. A high share means "
                  "the judge's position bias, not the responses, decided much of this pair."]
    if "ratings" in result:
        lines += ["", "## Ratings", "",
                  "Bradley–Terry by maximum likelihood on the Elo scale (400 points per factor of 10 in the odds, "
                  "centred on 1000), as Chatbot Arena computes it; 95% CIs resample prompts.", ""]
        if result.get("ratings_warning"):
            lines += [f"**Warning:** {result['ratings_warning']}", ""]
        lines += ["| model | rating | 95% CI |", "|---|---:|---|"]
        for m, r in result["ratings"].items():
            lines.append(f"| {m} | {r['rating']:.1f} | [{_fmt(r['ci_low'], 1)}, {_fmt(r['ci_high'], 1)}] |")
    if result.get("ratings_length_controlled"):
        lines += ["", "## Ratings at equal length", "",
                  "The same regression with a length term, as Chatbot Arena's style control: (len A - len B) / "
                  f"(len A + len B), scaled by its spread; its coefficient is {result['ratings_length_coef']:.2f} "
                  "(log-odds per unit; above 0: the judge prefers longer responses).", "",
                  "| model | rating | 95% CI |", "|---|---:|---|"]
        for m, r in result["ratings_length_controlled"].items():
            lines.append(f"| {m} | {r['rating']:.1f} | [{_fmt(r['ci_low'], 1)}, {_fmt(r['ci_high'], 1)}] |")
    if result.get("win_matrix"):
        names = list(result["models"])
        lines += ["", "## Win matrix (row's win rate over column)", "", "| | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for x in names:
            lines.append(f"| {x} | " + " | ".join(_fmt(result["win_matrix"][x][y], 2) for y in names) + " |")
    lines += ["", "Length bias is the most common way reward models and people are fooled, so every pair also has "
              "a *length-controlled* win rate (AlpacaEval 2's: a logistic model of the verdict on tanh(length "
              "difference / its SD), read off at zero difference; 95% CI a bootstrap over prompts). A raw win rate "
              "far above its length-controlled one was bought with length.", ""]
    path.write_text("\n".join(lines))


def _write_outputs(result: dict, out_dir: Path) -> dict:
    from alignkit import plots

    result["plots"] = {"win_rates": "win_rates.png"}
    plots.win_rates_plot(result["pairs"], out_dir / "win_rates.png", title=f"Win rates, judge {result['judge']}")
    if "ratings" in result:
        result["plots"]["ratings"] = "ratings.png"
        plots.ratings_plot(result["ratings"], out_dir / "ratings.png", title=f"Bradley–Terry ratings, judge {result['judge']}",
                           warning=result.get("ratings_warning"))
    write_json_atomic(out_dir / "compare.json", result)
    write_markdown(result, out_dir / "compare.md")
    return result


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def _store_name(db: str) -> str:
    """How human.json and messages name the store: a file by its absolute path (so --collect works from any
    directory), a URL without its password (compare.json and compare.md get shared)."""
    from sqlalchemy.engine import make_url

    from alignkit.store.db import display_name

    if db.startswith("sqlite") and "://" in db:  # sqlite:///labels.db is the file labels.db
        db = make_url(db).database or db
    return display_name(db) if "://" in db else os.path.abspath(db)


def _arena_identity(info: dict) -> str:
    """The `model_identity` a human-judged model's responses carry in the store (the leaderboard counts models by it):
    a hash of what its weights are, else of its spec."""
    return stable_hash(info.get("identity") or {"spec": info["spec"]})[:16]


def _identities(models: dict[str, str], info: dict[str, dict]) -> dict[str, str]:
    """name -> the model identity its responses carry in the store (names repeat across runs: `dpo`, `sft`)."""
    specs = [models[m] for m in models]
    if len(set(specs)) != len(specs):
        raise UserError("human judge: two --model arguments name the same spec; the store records responses by spec")
    return {m: _arena_identity({**info[m], "spec": models[m]}) for m in models}


def _sampling_record(params: SamplingParams, out_dir: Path, name: str, identity: str) -> dict:
    # model_name: the display name the Arena reveals after a vote (alignkit.store.arena.model_name).
    return {**params.to_dict(), "compare_out": str(out_dir), "model_name": name, "model_identity": identity}


def _write_battles(db: str, rows: list) -> ImportSummary:
    from alignkit.store import open_store
    from alignkit.store.importer import write_rows

    store = open_store(db, create=True)
    try:
        return write_rows(store, rows, arena=True)
    finally:
        store.close()


def _sent_message(summary: ImportSummary, name: str, out_dir: Path) -> str:
    message = f"human judge: {summary.comparisons} comparisons in {name} ({summary.new_comparisons} new); "
    if summary.converted:
        # The same pair was already queued for labeling (imported from these models' responses): its votes now
        # count in the Arena, and `label export` no longer exports it as training data.
        message += (f"{summary.converted} of them were labeling comparisons ({summary.converted_votes} votes) and are "
                    "arena battles now, no longer exported by `alignkit label export`; ")
    return message + (f"annotators vote blind in the labeling app's Arena tab (alignkit label serve --db {name}); "
                      f"then run `alignkit compare --judge human:{name} --out {out_dir} --collect`")


def send_to_store(out_dir: Path, db: str, models: dict[str, str], prompts: list[Any],
                  responses: dict[str, list[str]], info: dict[str, dict], params: SamplingParams) -> dict:
    """Human judge, step 1: put every pair into the label store for blind voting; record what was sent."""
    from alignkit.store.importer import ImportRow

    identity = _identities(models, info)
    rows = []
    for i, prompt in enumerate(prompts):
        # Identical responses collapse into one in the store (no comparison): counted as ties at --collect.
        rows.append(ImportRow(prompt=prompt, source=f"alignkit compare {out_dir} prompt {i}",
                              responses=[responses[m][i] for m in models], models=[models[m] for m in models],
                              sampling=[_sampling_record(params, out_dir, m, identity[m]) for m in models]))
    summary = _write_battles(db, rows)
    name = _store_name(db)
    write_json_atomic(out_dir / HUMAN_JSON, {"db": name, "models": info, "prompts": prompts, "responses": responses,
                                             "sampling": params.to_dict(), "comparisons": summary.comparisons,
                                             "new_comparisons": summary.new_comparisons})
    return {"pending": True, "message": _sent_message(summary, name, out_dir), "comparisons": summary.comparisons,
            "new_comparisons": summary.new_comparisons, "models": info}


def collect_from_store(out_dir: Path, db: str, bootstrap: int) -> dict:
    """Human judge, step 2: read the votes on the pairs `send_to_store` queued; write the results.

    The votes are read and rated by the same functions as the labeling app's leaderboard
    (alignkit.store.arena.arena_battles / summarise_votes), restricted to this run's battles and
    named as this run named its models, so both report the same numbers for the same votes.
    """
    from sqlalchemy import select

    from alignkit.store import open_store
    from alignkit.store.arena import arena_battles, model_key, summarise_votes
    from alignkit.store.importer import storable_text, store_key
    from alignkit.store.models import Comparison, Prompt, Response

    path = out_dir / HUMAN_JSON
    if not path.exists():
        raise UserError(f"--collect: {path} does not exist; run compare with --judge human:DB first")
    sent = json.loads(path.read_text())
    name = _store_name(db)
    if _store_name(str(sent["db"])) != name:
        raise UserError(f"--collect: {out_dir} was sent to {sent['db']}, not {name}")
    names = list(sent["models"])
    prompts, responses = sent["prompts"], sent["responses"]
    params = SamplingParams(**sent["sampling"])
    identity = {_arena_identity(sent["models"][m]): m for m in names}
    store = open_store(db, create=False)
    try:
        named: dict[int, str] = {}  # response id -> the model of this run it counts for
        prompt_index: dict[int, int] = {}
        comparisons, identical, shared = set(), 0, 0
        with store.read() as s:
            for i, prompt in enumerate(prompts):
                pid = s.scalars(select(Prompt.id).where(Prompt.key == store_key(prompt))).first()
                if pid is None:
                    raise UserError(f"--collect: prompt {i} of {path} is not in {name}")
                prompt_index.setdefault(pid, i)
                gave: dict[int, list[str]] = {}  # response id -> the models that gave that text
                for m in names:
                    if responses[m][i] is None:  # --battles: this model had no battle on this prompt
                        continue
                    r = s.scalars(select(Response).where(Response.prompt_id == pid,
                                                         Response.key == store_key(storable_text(responses[m][i])))).first()
                    if r is None:
                        raise UserError(f"--collect: {m}'s response to prompt {i} of {path} is not in {name}")
                    if r.id not in gave:
                        gave[r.id] = []
                        # Models that gave one text share one response, which the store (and the leaderboard)
                        # credits to the model that stored it; nobody votes between them.
                        named[r.id] = identity.get(model_key(r), m)
                    gave[r.id].append(m)
                identical += sum(len(ms) * (len(ms) - 1) // 2 for ms in gave.values())
                # A text two models gave counts for one of them; the other's pairs with the rest go unrated.
                sizes = [len(ms) for ms in gave.values()]
                shared += sum(x * y for x, y in itertools.combinations(sizes, 2)) - len(sizes) * (len(sizes) - 1) // 2
                for lo, hi in itertools.combinations(sorted(gave), 2):
                    cid = s.scalars(select(Comparison.id).where(Comparison.response_a_id == lo,
                                                                Comparison.response_b_id == hi)).first()
                    if cid is not None:
                        comparisons.add(cid)
        ab = arena_battles(store, comparisons=comparisons, names=named)
    finally:
        store.close()
    if not ab.votes:
        raise UserError(f"--collect: no votes yet on the {ab.without_votes} battles {out_dir} sent to {name}; "
                        f"annotators vote in the labeling app's Arena tab (alignkit label serve --db {name})")
    summary = summarise_votes(ab, models=names, bootstrap=bootstrap, seed=params.seed, ratings=len(names) >= 3)
    prompt_of = dict(zip(ab.comparisons, ab.prompts))
    records = [{"prompt_index": prompt_index[prompt_of[cid]], "comparison_id": cid, "model_a": a, "model_b": b,
                "winner": winner, "weight": weight}
               for (a, b, winner), cid, weight in zip(ab.battles, ab.comparisons, ab.weights)]
    with open(out_dir / "battles.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    met = {(p["model_a"], p["model_b"]): p for p in summary.pairs}
    pairs = [met.get((x, y)) or {"model_a": x, "model_b": y, "wins": 0, "losses": 0, "ties": 0, "n": 0, "battles": 0,
                                 "units": 0, "win_rate": None, "ci_low": None, "ci_high": None, "ci_method": None}
             for x, y in _pairs(names)]
    result = {
        "judge": f"human:{name}", "tie_margin": 0.0, "bootstrap": bootstrap, "n_prompts": len(prompts),
        "sampling": params.to_dict(), "seed": params.seed, "models": sent["models"],
        "human": {"votes": summary.votes, "battles": summary.battles, "battles_without_votes": summary.without_votes,
                  "identical_responses": identical, "shared_responses": shared,
                  "weighting": "each vote 1/(votes on its battle); identical responses are not rated",
                  **({"rounds": sent["allocations"]} if sent.get("allocations") else {})},
        "pairs": pairs, "win_matrix": summary.win_matrix,
    }
    if len(names) >= 3:
        result["ratings"] = {m["model"]: {k: m[k] for k in ("rating", "ci_low", "ci_high", "median")}
                             for m in summary.models if m["rating"] is not None}
        result["ratings_warning"] = summary.warning
        result["ratings_connectivity"] = summary.connectivity
    elif summary.warning:
        result["warning"] = summary.warning
    result["mean_length"] = _mean_length(names, responses)
    result.update(length_control(names, records, responses, pairs, bootstrap=bootstrap, seed=params.seed))
    return _write_outputs(result, out_dir)


# ---------------------------------------------------------------------------
# Human judge, N battles at a time (--battles): where the ratings are least certain
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreHistory:
    """The arena battles between two of these models (counted by model identity) that the store already holds."""

    met: dict[tuple[str, str], set[str]]  # pair (in --model order) -> store keys of the prompts it met on
    votes: ArenaBattles  # the votes on them, named by this run's model names
    # (prompt key, response key) -> the model the store credits that text to (a name here, else its model_key)
    owners: dict[tuple[str, str], str]


@dataclass(frozen=True)
class Allocation:
    rule: str  # uncertainty | uniform
    battles: dict[tuple[str, str], int]  # pair -> battles sent now (pairs given none left out)
    spreads: list[PairSpread]  # per pair, from the votes so far: what `uncertainty` allocates by

    def as_dict(self) -> dict:
        return {"rule": self.rule, "pairs": [
            {"model_a": s.models[0], "model_b": s.models[1], "battles": self.battles.get(s.models, 0),
             "voted_battles_before": s.battles,
             "spread": s.spread if math.isfinite(s.spread) else None}  # None: never met (infinitely uncertain)
            for s in self.spreads]}


def store_history(db: str, identity: dict[str, str], prompts: list[Any]) -> StoreHistory:
    """Every arena battle between two of these models (name -> `_arena_identity`) in the store, with its votes, and
    whose the stored responses to these prompts are."""
    from sqlalchemy import select

    from alignkit.store import open_store
    from alignkit.store.arena import arena_battles, model_key
    from alignkit.store.importer import store_key
    from alignkit.store.models import Comparison, Prompt, Response

    name_of = {key: m for m, key in identity.items()}
    rank = {m: k for k, m in enumerate(identity)}
    met: dict[tuple[str, str], set[str]] = {pair: set() for pair in _pairs(list(identity))}
    named: dict[int, str] = {}  # response id -> model name, as compare --collect names them
    comparisons: set[int] = set()
    store = open_store(db, create=True)
    try:
        with store.read() as s:
            for comp in s.scalars(select(Comparison).where(Comparison.arena.is_(True))):
                x, y = (name_of.get(model_key(r)) for r in (comp.response_a, comp.response_b))
                if x is None or y is None or x == y:
                    continue
                met[tuple(sorted((x, y), key=rank.get))].add(comp.prompt.key)
                named[comp.response_a_id], named[comp.response_b_id] = x, y
                comparisons.add(comp.id)
            keys = {store_key(p) for p in prompts}
            owners = {(pk, r.key): name_of.get(model_key(r), model_key(r)) for r, pk in s.execute(
                select(Response, Prompt.key).join(Prompt, Prompt.id == Response.prompt_id).where(Prompt.key.in_(keys)))}
        votes = arena_battles(store, comparisons=comparisons, names=named)
    finally:
        store.close()
    return StoreHistory(met, votes, owners)


def pair_spreads(names: Sequence[str], votes: ArenaBattles, *, bootstrap: int, seed: int) -> list[PairSpread]:
    """`selection.rating_spreads` from the bootstrap over the votes' prompts (stats.bootstrap_rating_samples, as
    the leaderboard's CIs): before any vote every pair is "never met"."""
    pair_of = {cid: (a, b) for (a, b, _), cid in zip(votes.battles, votes.comparisons)}
    voted: dict[tuple[str, str], int] = {}
    for pair in pair_of.values():
        voted[pair] = voted.get(pair, 0) + 1
    samples = np.full((bootstrap, len(names)), np.nan)
    if votes.battles:
        fit = stats.bootstrap_rating_samples(votes.battles, bootstrap, seed, clusters=votes.prompts,
                                             weights=votes.weights)
        if fit.units >= 2:  # a single vote has no spread to resample (its CI is None): it stays "never met"
            for k, m in enumerate(fit.models):
                samples[:, list(names).index(m)] = fit.samples[:, k]
    return rating_spreads(samples, names, voted)


def round_robin(met: dict[tuple[str, str], int], n: int) -> dict[tuple[str, str], int]:
    """`uniform`: n // pairs battles to every pair, the rest one each to the pairs with the fewest battles in the
    store (ties in pair order), so that repeated small rounds do not keep favouring the first pairs."""
    base, rest = divmod(n, len(met))
    extra = set(sorted(met, key=lambda p: met[p])[:rest])  # sorted is stable: ties stay in pair order
    given = {p: base + (p in extra) for p in met}
    return {p: k for p, k in given.items() if k}


def allocate(rule: str, names: Sequence[str], history: StoreHistory, n: int, *, bootstrap: int,
             seed: int) -> Allocation:
    spreads = pair_spreads(names, history.votes, bootstrap=bootstrap, seed=seed)
    if rule == "uncertainty":
        battles = allocate_battles(spreads, n)
    else:
        battles = round_robin({pair: len(keys) for pair, keys in history.met.items()}, n)
    return Allocation(rule, battles, spreads)


def unmet_prompts(prompts: list[Any], allocation: Allocation, met: dict[tuple[str, str], set[str]],
                  seed: int) -> dict[tuple[str, str], list[int]]:
    """Per pair given battles: the prompts (indices) it has not met on in the store, in a seeded order.

    Each pair's order depends on the seed and the pair only, not on which other pairs got battles."""
    from alignkit.store.importer import store_key

    keys = [store_key(p) for p in prompts]
    order = {}
    for k, pair in enumerate(met):
        if pair not in allocation.battles:
            continue
        left = [i for i, key in enumerate(keys) if key not in met[pair]]
        if len(left) < allocation.battles[pair]:
            raise UserError(f"--battles: {pair[0]} vs {pair[1]} would get {allocation.battles[pair]} battles "
                            f"({allocation.rule}) but has met on all but {len(left)} of the {len(prompts)} prompts; "
                            "add prompts or ask for fewer battles")
        rng = np.random.default_rng((seed % 2**32, k))
        order[pair] = [left[j] for j in rng.permutation(len(left))]
    return order


def sample_battles(models: dict[str, str], prompts: list[Any], plan: dict[tuple[str, str], int],
                   order: dict[tuple[str, str], list[int]], owners: dict[tuple[str, str], str], params: SamplingParams,
                   out_dir: Path, *, progress: bool = False
                   ) -> tuple[dict[tuple[str, str], list[int]], dict[str, dict[int, str]], dict]:
    """(pair -> its battles' prompts, model -> {prompt: response}, generate_cached's info per model).

    Each model samples (generate_cached) only the prompts of its battles. The store keeps a text once, credited to
    the model that stored it first (`owners`, which this adds to): a prompt on which the pair gave one text, or
    either gave a text credited to another model, is no battle of this pair, which takes the next in its order."""
    from alignkit.store.importer import storable_text, store_key

    def credited(m: str, i: int) -> bool:
        key = (prompt_keys[i], store_key(storable_text(texts[m][i])))
        return owners.setdefault(key, m) == m

    prompt_keys = [store_key(p) for p in prompts]

    info = generate_cached(models, [], params, out_dir)[1]  # identity and cache file, nothing sampled
    chosen: dict[tuple[str, str], list[int]] = {pair: [] for pair in plan}
    tried = dict.fromkeys(plan, 0)
    texts: dict[str, dict[int, str]] = {m: {} for m in models}
    while True:
        want = {}
        for pair, k in plan.items():
            want[pair] = order[pair][tried[pair]:tried[pair] + k - len(chosen[pair])]
            tried[pair] += len(want[pair])
            if len(chosen[pair]) + len(want[pair]) < k:
                raise UserError(f"--battles: {pair[0]} and {pair[1]} gave the same text on too many of the prompts "
                                f"they have not met on: {len(chosen[pair])} battles possible, {k} asked for")
        if not any(want.values()):
            return chosen, texts, info
        for m, spec in models.items():
            need = sorted({i for pair, idx in want.items() if m in pair for i in idx} - set(texts[m]))
            if need:
                got, got_info = generate_cached({m: spec}, [prompts[i] for i in need], params, out_dir,
                                                progress=progress)
                texts[m].update(zip(need, got[m]))
                for key in ("generated", "cached"):
                    info[m][key] += got_info[m][key]
        for (x, y), idx in want.items():
            chosen[x, y] += [i for i in idx if storable_text(texts[x][i]) != storable_text(texts[y][i])
                             and credited(x, i) and credited(y, i)]


def _merge_sent(path: Path, name: str, info: dict[str, dict], prompts: list[Any],
                sent: dict[str, dict[int, str]]) -> tuple[list[Any], dict[str, list[str | None]], list[dict]]:
    """(prompts, responses per model aligned with them, None where not sent, earlier allocations): this round's
    battles added to what earlier rounds of OUT sent to the same store, so --collect rates every round."""
    earlier = json.loads(path.read_text()) if path.exists() else {}
    if not earlier or _store_name(str(earlier["db"])) != name:
        earlier = {"prompts": [], "responses": {}, "models": {}}
    all_prompts = list(earlier["prompts"])
    index = {_prompt_key(p): k for k, p in enumerate(all_prompts)}
    for p in prompts:
        if _prompt_key(p) not in index:
            index[_prompt_key(p)] = len(all_prompts)
            all_prompts.append(p)
    responses: dict[str, list[str | None]] = {}
    for m in info:
        before = earlier["models"].get(m)
        same = before is not None and _arena_identity(before) == _arena_identity(info[m])
        responses[m] = list(earlier["responses"][m]) if same else [None] * len(earlier["prompts"])
        responses[m] += [None] * (len(all_prompts) - len(responses[m]))
        for i, text in sent[m].items():
            responses[m][index[_prompt_key(prompts[i])]] = text
    return all_prompts, responses, earlier.get("allocations", [])


def send_battles(out_dir: Path, db: str, models: dict[str, str], prompts: list[Any], params: SamplingParams, *,
                 n: int, rule: str, bootstrap: int, progress: bool = False) -> dict:
    """Human judge, `--battles N`: N battles, each one pair of models on a prompt that pair has not met on in the
    store, allocated by `rule` from the votes so far; human.json records the allocation and the spreads it used."""
    from alignkit.store.importer import ImportRow

    identity = _identities(models, {m: {"identity": model_identity(spec)} for m, spec in models.items()})
    history = store_history(db, identity, prompts)
    allocation = allocate(rule, list(models), history, n, bootstrap=bootstrap, seed=params.seed)
    order = unmet_prompts(prompts, allocation, history.met, params.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen, texts, info = sample_battles(models, prompts, allocation.battles, order, history.owners, params, out_dir,
                                         progress=progress)
    rows, sent = [], {m: {} for m in models}
    for (x, y), idx in chosen.items():
        for i in idx:
            rows.append(ImportRow(prompt=prompts[i], source=f"alignkit compare {out_dir} prompt {i}",
                                  responses=[texts[x][i], texts[y][i]], models=[models[x], models[y]],
                                  sampling=[_sampling_record(params, out_dir, m, identity[m]) for m in (x, y)]))
            sent[x][i], sent[y][i] = texts[x][i], texts[y][i]
    summary = _write_battles(db, rows)
    name = _store_name(db)
    all_prompts, responses, earlier = _merge_sent(out_dir / HUMAN_JSON, name, info, prompts, sent)
    write_json_atomic(out_dir / HUMAN_JSON, {
        "db": name, "models": info, "prompts": all_prompts, "responses": responses, "sampling": params.to_dict(),
        "comparisons": summary.comparisons, "new_comparisons": summary.new_comparisons,
        "allocation": allocation.as_dict(), "allocations": [*earlier, allocation.as_dict()]})
    split = ", ".join(f"{x} vs {y}: {k}" for (x, y), k in allocation.battles.items())
    return {"pending": True, "message": f"{rule} allocation of {n} battles ({split}); "
            + _sent_message(summary, name, out_dir), "comparisons": summary.comparisons,
            "new_comparisons": summary.new_comparisons, "models": info, "allocation": allocation.as_dict()}


def _check_battles(kind: str, battles: int, select: str) -> None:
    if kind != "human":
        raise UserError("--battles needs a human judge (--judge human:DB); other judges judge every pair on every prompt")
    if battles < 1:
        raise UserError(f"--battles must be >= 1, got {battles}")
    if select not in SELECT_RULES:
        raise UserError(f"--select must be one of {', '.join(SELECT_RULES)}, got {select!r}")


def compare_models(models: dict[str, str], prompts: list, judge: str, out_dir: str | Path, params: SamplingParams,
                   tie_margin: float = 0.0, bootstrap: int = 1000, *, progress: bool = False,
                   battles: int | None = None, select: str = "uncertainty") -> dict:
    """Generate (cached), judge every pair on every prompt, write compare.json / .md / plots; returns compare.json.

    With a `human:DB` judge the pairs go to the label store instead and the return value has
    `pending: True` (collect the votes later with `collect_from_store`); with `battles` only that many,
    allocated by `select` (`send_battles`).
    """
    from alignkit.judges import load_judge, parse_judge

    if len(models) < 2:
        raise UserError(f"compare needs at least 2 models, got {len(models)}")
    if not prompts:
        raise UserError("compare needs at least one prompt")
    kind, arg = parse_judge(judge)
    if battles is not None:
        _check_battles(kind, battles, select)
    if bootstrap < stats.MIN_BOOTSTRAP:
        raise UserError(f"--bootstrap must be >= {stats.MIN_BOOTSTRAP}, got {bootstrap}")
    out_dir = Path(out_dir)
    # Fail before generating: a judge that cannot load, or a label store that cannot be opened.
    if kind == "human":
        from alignkit.store.db import check_store

        judge_obj = None
        check_store(arg, create=True)
    else:
        judge_obj = load_judge(judge, tie_margin=tie_margin)
    # A prompt listed twice would be counted as two independent prompts and narrow every CI.
    unique = list({stable_hash(p): p for p in prompts}.values())
    duplicates, prompts = len(prompts) - len(unique), unique
    if battles is not None:
        sent = send_battles(out_dir, arg, models, prompts, params, n=battles, rule=select, bootstrap=bootstrap,
                            progress=progress)
        if duplicates:
            sent["message"] += f" ({duplicates} duplicate prompts dropped)"
        return sent
    out_dir.mkdir(parents=True, exist_ok=True)
    responses, info = generate_cached(models, prompts, params, out_dir, progress=progress)
    if kind == "human":
        sent = send_to_store(out_dir, arg, models, prompts, responses, info, params)
        if duplicates:
            sent["message"] += f" ({duplicates} duplicate prompts dropped)"
        return sent
    battles = judge_all(judge_obj, prompts, responses, params.seed)
    with open(out_dir / "battles.jsonl", "w", encoding="utf-8") as f:
        for b in battles:
            f.write(json.dumps(b) + "\n")
    result = {
        "judge": judge,
        "tie_margin": tie_margin,
        "bootstrap": bootstrap,
        "n_prompts": len(prompts),
        "duplicate_prompts_dropped": duplicates,
        "sampling": params.to_dict(),
        "seed": params.seed,
        "models": info,
        "generated": sum(i["generated"] for i in info.values()),
        "cached": sum(i["cached"] for i in info.values()),
        **summarise(list(models), battles, responses, bootstrap=bootstrap, seed=params.seed),
    }
    return _write_outputs(result, out_dir)


def compare_from_cli(args) -> int:
    from alignkit.judges import parse_judge

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, batch_size=args.batch_size)
    kind, arg = parse_judge(args.judge)
    if args.collect:
        if kind != "human":
            raise UserError("--collect is only for --judge human:DB")
        if args.bootstrap < stats.MIN_BOOTSTRAP:
            raise UserError(f"--bootstrap must be >= {stats.MIN_BOOTSTRAP}, got {args.bootstrap}")
        result = collect_from_store(Path(args.out), arg, args.bootstrap)
    else:
        battles, select = args.battles, args.select
        if select is not None and battles is None:
            raise UserError("--select chooses how --battles N are allocated; give --battles N too")
        models = parse_model_args(args.models)
        prompts = read_prompts(args.prompts, args.limit)
        result = compare_models(models, prompts, args.judge, args.out, params, args.tie_margin, args.bootstrap,
                                progress=True, battles=battles, select=select or "uncertainty")
    if result.get("pending"):
        print(result["message"])
        return 0
    print(Path(args.out) / "compare.md")
    for p in result["pairs"]:
        print(f"{p['model_a']} vs {p['model_b']}: {p['wins']}-{p['losses']}-{p['ties']} "
              f"win rate {_fmt(p['win_rate'])} [{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}]")
    for m, r in result.get("ratings", {}).items():
        print(f"{m}: {r['rating']:.0f} [{_fmt(r['ci_low'], 0)}, {_fmt(r['ci_high'], 0)}]")
    if result.get("ratings_warning") or result.get("warning"):
        print(f"warning: {result.get('ratings_warning') or result['warning']}")
    if "generated" in result:
        print(f"responses: {result['generated']} generated, {result['cached']} from cache")
    if result.get("duplicate_prompts_dropped"):
        print(f"{result['duplicate_prompts_dropped']} duplicate prompts dropped: each prompt counts once")
    return 0
