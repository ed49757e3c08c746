"""Importing prompts and candidate responses into a label store.

A JSONL line is an object with
  - `prompt` (a non-empty string, or a list of {"role", "content"} messages) or `messages`
    (alignkit.data.formats.prompt_from: the one rule for prompt files),
  - `responses`: two or more distinct non-empty strings (optional with `--generate`),
  - optionally `models`: one model spec per response (recorded with it), `id`, `meta`.
Every pair of a prompt's responses becomes a comparison; imported with `rank=True` (`label import --rank`),
a prompt's MIN_RANK..MAX_RANK responses become one ranking task instead (a comparison whose `ranking_json`
lists them; response_a / response_b are its two lowest ids), ranked in one vote.

The whole file is validated before anything is generated or written; a bad line is
a UserError naming file:line and the problem, and nothing is imported. All rows go
in one transaction, so an import is all or nothing. With --generate, a prompt whose
samples are all alike makes no comparison and is skipped (counted in the summary).
Importing the same prompt or response again reuses its row (prompts and responses
are keyed by content hash).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from alignkit.data.formats import prompt_from
from alignkit.data.io import read_jsonl
from alignkit.errors import UserError
from alignkit.store.db import Store
from alignkit.store.models import Comparison, Prompt, Response

KEYS = {"prompt", "messages", "responses", "models", "id", "meta"}
MIN_RANK, MAX_RANK = 3, 9  # a ranking of 2 is a pair; keys 1..9 rank up to 9


@dataclass
class ImportRow:
    prompt: Any  # str or list of messages
    source: str  # file:line
    responses: list[str] = field(default_factory=list)
    models: list[str | None] = field(default_factory=list)
    sampling: list[dict | None] = field(default_factory=list)
    gold: bool = False  # a gold item (parse_gold_file): its first response is the known answer
    # Where `alignkit loop` chose the row's pair (schema v4): stored on a new comparison, never re-tagged.
    loop_round: int | None = None
    source_stage: str | None = None
    selection_score: float | None = None
    rank: bool = False  # one ranking task of all its responses instead of every pair



@dataclass
class ImportSummary:
    """Distinct prompts, responses and comparisons the rows name (new or already stored)."""

    prompts: int
    responses: int
    comparisons: int
    new_comparisons: int
    skipped: list[str] = field(default_factory=list)  # file:line of prompts whose samples were all alike
    converted: int = 0  # arena=True: labeling comparisons that became arena battles
    converted_votes: int = 0  # the votes they had

    def __str__(self) -> str:
        text = (f"{self.prompts} prompts, {self.responses} responses, {self.comparisons} comparisons "
                f"({self.new_comparisons} new)")
        if self.skipped:
            text += (f"; {len(self.skipped)} prompt(s) skipped, fewer than 2 distinct responses after generation "
                     f"(first: {self.skipped[0]})")
        return text


def store_key(value: Any) -> str:
    """A prompt's or response's key in the store: sha256 of its canonical JSON (a response's after storable_text)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def storable_text(text: str) -> str:
    """A sampled response (or a vote's rationale) as the store keeps it: PostgreSQL text cannot hold NUL, which a model can sample
    (a byte token), so NUL becomes U+FFFD on every backend alike. Imported files with NUL are refused instead."""
    return text.replace("\x00", "\ufffd")


def _refuse_nul(where: str, texts: Sequence[str]) -> None:
    if any("\x00" in t for t in texts):
        raise UserError(f"{where}: a response contains a NUL character (\\u0000), which a label store cannot hold")


def _checked_rows(path: str | Path, what: str, keys: set[str], expected: str):
    """(file:line, row, its prompt) for every row of a JSONL file whose keys are all in `keys`."""
    for obj in read_jsonl(path, what=what):
        where = f"{path}:{obj['_line']}"
        unknown = sorted(set(obj) - keys - {"_line"})
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (expected {expected})")
        yield where, obj, prompt_from(obj, path, exclusive=True)


def parse_import_file(path: str | Path, *, responses_required: bool = True, rank: bool = False) -> list[ImportRow]:
    """Validate the whole file; the first bad line raises UserError("FILE:LINE: problem"). rank: every row is a
    ranking task of MIN_RANK..MAX_RANK responses."""
    rows: list[ImportRow] = []
    for where, obj, prompt in _checked_rows(path, "import", KEYS, "prompt or messages, responses, models, id, meta"):
        responses = obj.get("responses", [])
        if not isinstance(responses, list) or not all(isinstance(r, str) and r.strip() for r in responses):
            raise UserError(f"{where}: `responses` must be a list of non-empty strings")
        _refuse_nul(where, responses)
        if len(set(responses)) != len(responses):
            raise UserError(f"{where}: `responses` has duplicates")
        if responses_required and len(responses) < 2:
            raise UserError(f"{where}: needs at least 2 `responses` (or import with --generate MODEL_SPEC)")
        if rank and not MIN_RANK <= len(responses) <= MAX_RANK:
            raise UserError(f"{where}: --rank needs {MIN_RANK} to {MAX_RANK} `responses` per prompt, got "
                            f"{len(responses)}" + (" (import it without --rank: a pair)" if len(responses) == 2 else ""))
        models = obj.get("models", [None] * len(responses))
        if not isinstance(models, list) or len(models) != len(responses) or \
                not all(m is None or isinstance(m, str) for m in models):
            raise UserError(f"{where}: `models` must be a list of model specs, one per response")
        rows.append(ImportRow(prompt, where, list(responses), list(models), [None] * len(responses), rank=rank))
    if not rows:
        raise UserError(f"{path}: no prompts in file")
    return rows


GOLD_KEYS = {"prompt", "messages", "chosen", "rejected", "id", "meta"}


def parse_gold_file(path: str | Path) -> list[ImportRow]:
    """Gold items: JSONL rows of prompt (or messages) / chosen / rejected, chosen being the known answer. As
    ImportRows whose first response is the chosen one; the first bad line raises UserError("FILE:LINE: ...")."""
    rows: list[ImportRow] = []
    for where, obj, prompt in _checked_rows(path, "gold", GOLD_KEYS, "prompt or messages, chosen, rejected, id, meta"):
        pair = [obj.get("chosen"), obj.get("rejected")]
        if not all(isinstance(r, str) and r.strip() for r in pair):
            raise UserError(f"{where}: `chosen` and `rejected` must be non-empty strings")
        _refuse_nul(where, pair)
        if pair[0] == pair[1]:
            raise UserError(f"{where}: `chosen` and `rejected` are the same text")
        rows.append(ImportRow(prompt, where, pair, [None, None], [None, None], gold=True))
    if not rows:
        raise UserError(f"{path}: no gold items in file")
    return rows


def check_generate(specs: Sequence[str], params) -> None:
    """Refuse settings that cannot give two different responses, before any store is opened."""
    if len(specs) == 1 and params.temperature == 0:
        raise UserError("one --generate model with greedy decoding (--temperature 0) gives the same response twice: "
                        "sample with a temperature above 0, or give a second model")


def generate_responses(rows: Sequence[ImportRow], specs: Sequence[str], params, *, progress: bool = True,
                       loader: Callable | None = None) -> None:
    """Add sampled responses to each row: one per spec, or two samples when one spec is given."""
    from alignkit.generation import generate_batch
    from alignkit.modeling import load_model_for_inference

    loader = loader or load_model_for_inference
    check_generate(specs, params)
    n_ret = 2 if len(specs) == 1 else 1
    prompts = [r.prompt for r in rows]
    for spec in specs:
        model, tokenizer, _ = loader(spec)
        p = type(params)(**{**params.to_dict(), "num_return_sequences": n_ret})
        result = generate_batch(model, tokenizer, prompts, p, progress=progress)
        for i, row in enumerate(rows):
            for k in range(n_ret):
                text = result.texts[i * n_ret + k]
                if not text.strip() or text in row.responses:
                    continue  # an empty or duplicate sample makes no comparison
                row.responses.append(text)
                row.models.append(spec)
                row.sampling.append({**p.to_dict(), "sample_index": k})
        del model


def write_rows(store: Store, rows: Sequence[ImportRow], *, arena: bool = False) -> ImportSummary:
    """Insert prompts, responses and all pairwise comparisons in one transaction.

    arena=True (`alignkit compare --judge human:DB`): the comparisons are arena battles, served
    only in the Arena tab; one that already exists becomes a battle too (votes it has stay and
    count as battle votes). arena=False never turns a battle back into an ordinary comparison.
    A gold row (from parse_gold_file) makes its pair a gold item whose known answer is its first
    response; an existing comparison with votes, or a battle, is refused rather than turned gold (its
    votes would silently leave every export), and then nothing of the file is imported.
    """

    def run(session: Session) -> ImportSummary:
        now = time.time()
        # Distinct rows, not lines: the same prompt on three lines is one prompt.
        prompt_ids: set[int] = set()
        response_ids: set[int] = set()
        pairs: set[tuple[int, int]] = set()
        new_comp, converted, converted_votes = 0, 0, 0
        for row in rows:
            prompt = _prompt_row(session, row, now)
            prompt_ids.add(prompt.id)
            ids = _response_ids(session, prompt.id, row, now)
            response_ids.update(ids)
            if row.rank:
                pairs.add(tuple(sorted(ids))[:2])
                new_comp += _ranking_task(session, prompt.id, ids, row, now)
                continue
            for x, y in itertools.combinations(sorted(set(ids)), 2):
                pairs.add((x, y))
                comp = session.scalars(select(Comparison).where(Comparison.response_a_id == x,
                                                                Comparison.response_b_id == y)).first()
                if comp is not None and comp.ranking_json is not None:
                    raise UserError(f"{row.source}: these responses are a ranking task in the store already "
                                    f"(imported with --rank)")
                answer = ("a" if ids[0] == x else "b") if row.gold else None
                if row.gold and comp is not None and comp.gold is None:
                    _check_can_turn_gold(comp, row.source)
                    comp.gold = answer
                if comp is None:
                    session.add(Comparison(prompt_id=prompt.id, response_a_id=x, response_b_id=y, arena=arena,
                                           gold=answer, loop_round=row.loop_round, source_stage=row.source_stage,
                                           selection_score=row.selection_score, created_at=now))
                    new_comp += 1
                elif arena and not comp.arena:
                    session.execute(update(Comparison).where(Comparison.id == comp.id).values(arena=True))
                    converted += 1
                    converted_votes += comp.n_votes
        session.flush()
        return ImportSummary(len(prompt_ids), len(response_ids), len(pairs), new_comp,
                             converted=converted, converted_votes=converted_votes)

    return store.write(run)


def _prompt_row(session: Session, row: ImportRow, now: float) -> Prompt:
    key = store_key(row.prompt)
    prompt = session.scalars(select(Prompt).where(Prompt.key == key)).one_or_none()
    if prompt is None:
        prompt = Prompt(key=key, content_json=json.dumps(row.prompt, ensure_ascii=False), source=row.source,
                        created_at=now)
        session.add(prompt)
        session.flush()
    return prompt


def _response_ids(session: Session, prompt_id: int, row: ImportRow, now: float) -> list[int]:
    """The ids of the row's responses in its order, each stored once per prompt."""
    ids = []
    for text, model, sampling in zip(row.responses, row.models, row.sampling):
        text = storable_text(text)
        rkey = store_key(text)
        resp = session.scalars(select(Response).where(Response.prompt_id == prompt_id,
                                                      Response.key == rkey)).one_or_none()
        if resp is None:
            resp = Response(prompt_id=prompt_id, key=rkey, text=text, model_spec=model,
                            sampling_json=json.dumps(sampling) if sampling else None, created_at=now)
            session.add(resp)
            session.flush()
        ids.append(resp.id)
    return ids


def _ranking_task(session: Session, prompt_id: int, ids: list[int], row: ImportRow, now: float) -> int:
    """Store the row's ranking task (1) or find it stored already (0). Its two lowest ids are its pair in the
    table's terms, so an ordinary comparison of those two, or a ranking of another set holding them, is refused."""
    x, y = sorted(ids)[:2]
    comp = session.scalars(select(Comparison).where(Comparison.response_a_id == x,
                                                    Comparison.response_b_id == y)).first()
    if comp is None:
        session.add(Comparison(prompt_id=prompt_id, response_a_id=x, response_b_id=y, ranking_json=json.dumps(ids),
                               loop_round=row.loop_round, source_stage=row.source_stage,
                               selection_score=row.selection_score, created_at=now))
        return 1
    if comp.ranking_json is None or sorted(json.loads(comp.ranking_json)) != sorted(ids):
        raise UserError(f"{row.source}: two of these responses are already "
                        f"{'in another ranking task' if comp.ranking_json else 'a pairwise comparison'} in the store; "
                        f"a ranking task takes responses of its own")
    return 0


def _check_can_turn_gold(comp: Comparison, source: str) -> None:
    if comp.arena:
        raise UserError(f"{source}: this pair is an arena battle already; a gold item must be an ordinary comparison")
    if comp.n_votes:
        raise UserError(f"{source}: this pair is already a comparison with {comp.n_votes} vote(s); as a gold item "
                        f"its votes would leave every export (use another pair)")


def import_file(store: Store, path: str | Path, *, generate: Sequence[str] = (), params=None,
                progress: bool = True, rank: bool = False) -> ImportSummary:
    """Validate `path`, sample responses with each `generate` spec if given, and import everything."""
    rows = parse_import_file(path, responses_required=not generate, rank=rank)
    return import_rows(store, rows, generate=generate, params=params, progress=progress)


def prepare_rows(rows: list[ImportRow], *, generate: Sequence[str] = (), params=None,
                 progress: bool = True) -> tuple[list[ImportRow], list[str]]:
    """Sample responses with each `generate` spec if given; (rows to import, file:line of prompts skipped).

    `alignkit label import` runs it before opening the store, so a failed or interrupted generation leaves no
    store behind."""
    if generate:
        from alignkit.generation import SamplingParams

        generate_responses(rows, list(generate), params or SamplingParams(), progress=progress)
    # Models may sample the same text for a prompt (greedy decoding, short answers): that prompt makes no
    # comparison, which is no reason to refuse the others. Skipped prompts are counted and named.
    short = [r.source for r in rows if len(r.responses) < 2]
    if len(short) == len(rows):
        raise UserError(f"{short[0]}: fewer than 2 distinct responses after generation for every prompt "
                        f"({len(short)}); nothing imported (sample with --temperature above 0, or more models)")
    return [r for r in rows if len(r.responses) >= 2], short


def import_rows(store: Store, rows: list[ImportRow], *, generate: Sequence[str] = (), params=None,
                progress: bool = True) -> ImportSummary:
    """Import rows from `parse_import_file`, first sampling responses with each `generate` spec if given."""
    kept, skipped = prepare_rows(rows, generate=generate, params=params, progress=progress)
    summary = write_rows(store, kept)
    summary.skipped = skipped
    return summary
