"""The label store on SQLite and PostgreSQL: queue rules, votes exactly once, import, agreement, export."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, inspect, select, text

from _pg import create_database, postgres_cluster
from alignkit.errors import UserError
from alignkit.store import db as store_db
from alignkit.store import next_item, open_store, progress, skip, submit_vote, undo_last_vote
from alignkit.store.agreement import agreement_report, cohen_pairs, fleiss, load_votes
from alignkit.store.export import aggregate, export_dataset, preference_rows, unpaired_rows
from alignkit.store.importer import import_file, parse_import_file
from alignkit.store.models import Assignment, Comparison, Prompt, Vote


@pytest.fixture(scope="module")
def pg_cluster():
    with postgres_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "labels.db")
    return create_database(request.getfixturevalue("pg_cluster"))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def populate(store, tmp_path, n_prompts=6, n_responses=2):
    rows = [{"prompt": f"question {i}", "responses": [f"answer {i}-{k}" + "!" * k for k in range(n_responses)]}
            for i in range(n_prompts)]
    return import_file(store, write_jsonl(tmp_path / "in.jsonl", rows))


def count(store, model):
    with store.read() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_import_and_overlap_never_twice(store_url, tmp_path):
    store = open_store(store_url, overlap=2)
    summary = populate(store, tmp_path, n_prompts=5, n_responses=3)
    assert (summary.prompts, summary.responses, summary.comparisons) == (5, 15, 15)
    served = {u: [] for u in ("ann", "bob", "cat")}
    for _ in range(40):
        for u in served:
            item = next_item(store, u)
            if item is not None:
                served[u].append(item.comparison_id)
                submit_vote(store, u, item.comparison_id, random.choice(["a", "b", "tie", "both_bad"]))
    for u, ids in served.items():
        assert len(ids) == len(set(ids)), f"{u} was served a comparison twice"
    per_comp = Counter(c for ids in served.values() for c in ids)
    assert set(per_comp.values()) == {2} and len(per_comp) == 15  # every comparison to exactly K=2 annotators
    assert count(store, Vote) == 30
    assert progress(store, "ann").remaining == 0
    # importing the same file again adds nothing
    again = populate(store, tmp_path, n_prompts=5, n_responses=3)
    assert again.new_comparisons == 0 and count(store, Comparison) == 15
    store.close()


def test_held_item_is_returned_again_and_lease_expiry_reserves(store_url, tmp_path):
    store = open_store(store_url, overlap=1, lease_seconds=60)
    populate(store, tmp_path, n_prompts=1)
    first = next_item(store, "ann", now=1000.0)
    assert next_item(store, "ann", now=1001.0).comparison_id == first.comparison_id  # reload: same lease
    assert next_item(store, "bob", now=1001.0) is None  # the only slot is leased
    abandoned = next_item(store, "bob", now=1061.0)  # ann's lease ran out: served again
    assert abandoned is not None and abandoned.comparison_id == first.comparison_id
    # ann's late vote is refused because the slot went to bob; bob's vote counts
    with pytest.raises(UserError, match="expired"):
        submit_vote(store, "ann", first.comparison_id, "a", now=1062.0)
    submit_vote(store, "bob", first.comparison_id, "b", now=1062.0)
    assert count(store, Vote) == 1
    # an expired lease whose slot nobody took is still honoured
    store.overlap = 2
    populate(store, tmp_path, n_prompts=2)
    it = next_item(store, "cat", now=2000.0)
    submit_vote(store, "cat", it.comparison_id, "a", now=5000.0)
    store.close()


def test_concurrent_leases_and_votes_never_exceed_overlap(store_url, tmp_path):
    store = open_store(store_url, overlap=3)
    populate(store, tmp_path, n_prompts=10)  # 10 comparisons, 30 slots
    names = [f"u{i}" for i in range(24)]
    barrier = threading.Barrier(len(names))

    def grab(name):
        barrier.wait()
        got = []
        while (item := next_item(store, name)) is not None:
            got.append(item.comparison_id)
            submit_vote(store, name, item.comparison_id, "a")
        return got

    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(grab, names))
    for got in results:
        assert len(got) == len(set(got))
    per_comp = Counter(c for got in results for c in got)
    assert sum(per_comp.values()) == 30 and max(per_comp.values()) == 3
    with store.read() as s:
        per_vote = Counter(s.scalars(select(Vote.comparison_id)).all())
    assert max(per_vote.values()) == 3 and sum(per_vote.values()) == 30
    with store.read() as s:  # the stored per-comparison vote count matches the votes
        assert dict(s.execute(select(Comparison.id, Comparison.n_votes)).all()) == dict(per_vote)

    store.close()


def test_simultaneous_submits_never_exceed_overlap(store_url, tmp_path):
    """Leases expired and re-served in waves; then every lease holder submits at once: exactly K votes land."""
    store = open_store(store_url, overlap=2, lease_seconds=10)
    populate(store, tmp_path, n_prompts=1)
    voters = [f"v{i}" for i in range(8)]
    for wave in range(4):
        for v in voters[2 * wave: 2 * wave + 2]:
            assert next_item(store, v, now=20.0 * wave).comparison_id == 1
    gate = threading.Barrier(len(voters))

    def vote(v):
        gate.wait()
        try:
            submit_vote(store, v, 1, "b", now=61.0)
            return v
        except UserError:
            return None

    with ThreadPoolExecutor(len(voters)) as pool:
        ok = [v for v in pool.map(vote, voters) if v]
    assert sorted(ok) == ["v6", "v7"]  # the two live leases; expired ones whose slots were re-served are refused
    assert count(store, Vote) == 2
    store.close()


def test_own_expired_lease_is_renewed_not_orphaned(store_url, tmp_path):
    """A reload after the lease ran out brings back the item the annotator was reading while its slot is free;
    with a team of `overlap` annotators every comparison still gets all its votes."""
    store = open_store(store_url, overlap=2, lease_seconds=10)
    populate(store, tmp_path, n_prompts=2)
    first = next_item(store, "alice", now=0.0)
    again = next_item(store, "alice", now=100.0)  # long past the lease
    assert (again.comparison_id, again.swapped, again.left) == (first.comparison_id, first.swapped, first.left)
    assert again.expires_at == 110.0 and progress(store, "alice", now=100.0).remaining == 2
    for name, t in (("alice", 101.0), ("bob", 200.0)):
        while (item := next_item(store, name, now=t)) is not None:
            submit_vote(store, name, item.comparison_id, "a", now=t + 1)
            t += 2
    with store.read() as s:
        assert dict(s.execute(select(Comparison.id, Comparison.n_votes)).all()) == {1: 2, 2: 2}
    assert count(store, Assignment) == 4  # renewed in place: still one assignment per (comparison, annotator)

    # When the slot went to someone else meanwhile, the expired lease is not served back: something else is.
    store.close()
    store = open_store(store_url, overlap=1, lease_seconds=10)
    populate(store, tmp_path, n_prompts=4)  # comparisons 3, 4 are new and open
    held = next_item(store, "cat", now=1000.0)
    assert next_item(store, "dan", now=1011.0).comparison_id == held.comparison_id  # cat's lease ran out
    assert next_item(store, "cat", now=1012.0).comparison_id not in (None, held.comparison_id)
    store.close()


def test_one_annotators_simultaneous_requests_lease_one_comparison(store_url, tmp_path):
    """Several tabs (or a script) of one annotator asking at once get the same lease, never several."""
    store = open_store(store_url, overlap=1)
    populate(store, tmp_path, n_prompts=12)
    # Known already: a first sight serializes on inserting the annotator, which would hide the race.
    assert next_item(store, "dup", overlap=0) is None
    gate = threading.Barrier(8)

    def ask(_):
        gate.wait()
        return next_item(store, "dup").comparison_id

    with ThreadPoolExecutor(8) as pool:
        for _ in range(4):
            got = list(pool.map(ask, range(8)))
            assert len(set(got)) == 1, got
            with store.read() as s:
                active = s.scalar(select(func.count()).select_from(Assignment).where(Assignment.status == "active"))
            assert active == 1
            submit_vote(store, "dup", got[0], "a")
    store.close()


def test_bad_votes_store_nothing(store_url, tmp_path):
    store = open_store(store_url, overlap=2)
    populate(store, tmp_path, n_prompts=3)
    item = next_item(store, "ann")
    other = next_item(store, "bob")
    with pytest.raises(UserError, match="unknown choice"):
        submit_vote(store, "ann", item.comparison_id, "left")
    with pytest.raises(UserError, match="does not exist"):
        submit_vote(store, "ann", 999_999, "a")
    for huge in (2**70, -1):  # beyond BIGINT the driver raised OverflowError
        with pytest.raises(UserError, match=f"comparison {huge} does not exist"):
            submit_vote(store, "ann", huge, "a")
    unassigned = [c for c in (1, 2, 3) if c != item.comparison_id][0]
    with pytest.raises(UserError, match="not assigned"):
        submit_vote(store, "ann", unassigned, "a")
    with pytest.raises(UserError, match="comparison id"):
        submit_vote(store, "ann", "1; DROP TABLE votes", "a")
    with pytest.raises(UserError, match="comparison id must be an integer, got '1'"):
        skip(store, "ann", "1")
    with pytest.raises(UserError, match="rationale must be a string, got int"):
        submit_vote(store, "ann", item.comparison_id, "a", rationale=42)
    assert count(store, Vote) == 0
    submit_vote(store, "ann", item.comparison_id, "tie", rationale="  same  ")
    with pytest.raises(UserError, match="already voted"):
        submit_vote(store, "ann", item.comparison_id, "a")
    skip(store, "bob", other.comparison_id)
    with pytest.raises(UserError, match="skipped"):
        submit_vote(store, "bob", other.comparison_id, "a")
    with pytest.raises(UserError, match="not on lease"):
        skip(store, "bob", other.comparison_id)
    assert next_item(store, "bob").comparison_id != other.comparison_id  # never served again after a skip
    votes = load_votes(store)
    assert [(v.annotator, v.choice, v.rationale) for v in votes] == [("ann", "tie", "same")]
    store.close()


def test_sides_are_recorded_and_votes_stored_canonically(store_url, tmp_path):
    store = open_store(store_url, overlap=50)
    populate(store, tmp_path, n_prompts=1)
    with store.read() as s:
        comp = s.scalars(select(Comparison)).one()
        a_text = comp.response_a.text
    rng = random.Random(0)
    swaps = []
    for i in range(30):
        item = next_item(store, f"x{i}", rng=rng)
        swaps.append(item.swapped)
        left_is_a = item.left == a_text
        assert left_is_a != item.swapped
        submit_vote(store, f"x{i}", item.comparison_id, "a")  # "the left one"
    assert 5 < sum(swaps) < 25  # sides randomised per assignment
    with store.read() as s:
        rows = s.execute(select(Vote.choice, Vote.swapped)).all()
    assert all((choice == "b") == swapped for choice, swapped in rows)
    store.close()


def test_undo_last_vote(store_url, tmp_path):
    store = open_store(store_url, overlap=1)
    populate(store, tmp_path, n_prompts=3)
    assert undo_last_vote(store, "ann") is None
    first = next_item(store, "ann")
    submit_vote(store, "ann", first.comparison_id, "a")
    second = next_item(store, "ann")
    submit_vote(store, "ann", second.comparison_id, "b")
    assert progress(store, "ann").done == 2
    undone = undo_last_vote(store, "ann")
    assert undone.comparison_id == second.comparison_id and undone.swapped == second.swapped
    assert progress(store, "ann").done == 1
    with store.read() as s:
        assert s.get(Comparison, second.comparison_id).n_votes == 0
    assert next_item(store, "ann").comparison_id == second.comparison_id  # served again to re-vote
    submit_vote(store, "ann", second.comparison_id, "tie")
    assert sorted(v.choice for v in load_votes(store)) == sorted(["tie", "a" if not first.swapped else "b"])
    store.close()


def test_schema_version_and_forward_migration(store_url, tmp_path, monkeypatch):
    store = open_store(store_url)
    assert store_db.schema_version(store) == store_db.SCHEMA_VERSION
    store.close()

    # A newer alignkit (one more version, with a migration to it) opens this older store and upgrades it.
    current = store_db.SCHEMA_VERSION

    def add_column(conn):
        conn.execute(text("ALTER TABLE votes ADD COLUMN flagged BOOLEAN NOT NULL DEFAULT FALSE"))

    monkeypatch.setattr(store_db, "SCHEMA_VERSION", current + 1)
    monkeypatch.setitem(store_db.MIGRATIONS, current, add_column)
    store = open_store(store_url)
    assert store_db.schema_version(store) == current + 1
    with store.read() as s:
        s.execute(text("SELECT flagged FROM votes"))
    store.close()

    # ... and this alignkit refuses that newer store instead of misreading it.
    monkeypatch.setattr(store_db, "SCHEMA_VERSION", current)
    with pytest.raises(UserError, match="newer than this alignkit"):
        open_store(store_url)


def comparisons_schema(store):
    """The comparisons table's columns (in order) and indexes, as the database reports them."""
    with store.read() as s:
        insp = inspect(s.connection())
        columns = [(c["name"], type(c["type"]).__name__, c["nullable"]) for c in insp.get_columns("comparisons")]
        indexes = sorted((i["name"], tuple(i["column_names"])) for i in insp.get_indexes("comparisons"))
    return columns, indexes


def table_columns(store, table):
    with store.read() as s:
        return [(c["name"], type(c["type"]).__name__, c["nullable"]) for c in inspect(s.connection()).get_columns(table)]


def annotators_schema(store):
    return table_columns(store, "annotators")


def votes_schema(store):
    return table_columns(store, "votes")


# What schema 5 added, dropped to make a store what an older schema wrote.
V5_DROPS = ("DROP TABLE adjudications", "ALTER TABLE comparisons DROP COLUMN ranking_json",
            "ALTER TABLE votes DROP COLUMN revealed_at", "ALTER TABLE votes DROP COLUMN ranking_json",
            "ALTER TABLE votes DROP COLUMN criteria_json")
# What schema 4 added, and everything later.
V4_DROPS = (*V5_DROPS, "ALTER TABLE comparisons DROP COLUMN loop_round",
            "ALTER TABLE comparisons DROP COLUMN source_stage", "ALTER TABLE comparisons DROP COLUMN selection_score")


def test_schema_4_store_upgrades_to_reveals_rankings_and_adjudication(store_url, tmp_path):
    """A store written by schema 4 opens, gains the v5 columns (its arena votes count as revealed, as they were
    shown at once; no ranking, no criteria) and the adjudications table (empty), and keeps its votes."""
    from alignkit.store.importer import write_rows
    from alignkit.store.models import Adjudication

    store = open_store(store_url, overlap=2)
    populate(store, tmp_path, n_prompts=2)
    write_rows(store, arena_rows(1), arena=True)
    submit_vote(store, "ann", next_item(store, "ann").comparison_id, "a")
    submit_vote(store, "ann", next_item(store, "ann", arena=True).comparison_id, "b", arena=True)
    fresh = comparisons_schema(store), votes_schema(store), table_columns(store, "adjudications")
    store.write(lambda s: [s.execute(text(sql)) for sql in (*V5_DROPS, "UPDATE schema_version SET version = 4")])
    store.close()
    store = open_store(store_url, overlap=2)
    assert store_db.schema_version(store) == 5
    assert (comparisons_schema(store), votes_schema(store), table_columns(store, "adjudications")) == fresh
    with store.read() as s:
        rows = s.execute(select(Comparison.arena, Vote.revealed_at.is_not(None), Vote.ranking_json, Vote.criteria_json)
                         .join(Comparison, Comparison.id == Vote.comparison_id).order_by(Vote.id)).all()
        assert rows == [(False, False, None, None), (True, True, None, None)]
        assert s.scalars(select(Comparison.ranking_json)).all() == [None] * 3 and count(store, Adjudication) == 0
    with pytest.raises(UserError, match="cannot be taken back after the reveal"):
        undo_last_vote(store, "ann", arena=True)
    store.close()


def test_schema_3_store_upgrades_to_loop_tags(store_url, tmp_path):
    """A store written by schema 3 opens, gains the loop's tags (no comparison has them) and keeps its votes."""
    store = open_store(store_url, overlap=2)
    populate(store, tmp_path, n_prompts=2)
    item = next_item(store, "ann")
    submit_vote(store, "ann", item.comparison_id, "a")
    fresh = comparisons_schema(store)
    store.write(lambda s: [s.execute(text(sql)) for sql in (*V4_DROPS, "UPDATE schema_version SET version = 3")])
    store.close()
    store = open_store(store_url, overlap=2)
    assert store_db.schema_version(store) == store_db.SCHEMA_VERSION
    assert comparisons_schema(store) == fresh
    with store.read() as s:
        assert s.execute(select(Comparison.loop_round, Comparison.source_stage, Comparison.selection_score)).all() \
            == [(None, None, None)] * 2
    assert [v.comparison_id for v in load_votes(store)] == [item.comparison_id]
    store.close()


def test_schema_2_store_upgrades_to_gold_items_and_exclusion(store_url, tmp_path):
    """A store written by schema 2 opens, gains `gold` (no gold items), `excluded` (nobody), vote strengths (none)
    and the settings table (empty), and keeps its votes."""
    store = open_store(store_url, overlap=2)
    populate(store, tmp_path, n_prompts=2)
    item = next_item(store, "ann")
    submit_vote(store, "ann", item.comparison_id, "b")
    fresh = comparisons_schema(store), annotators_schema(store), votes_schema(store)

    def to_v2(s):
        for sql in (*V4_DROPS, "ALTER TABLE comparisons DROP COLUMN gold", "ALTER TABLE annotators DROP COLUMN excluded",
                    "ALTER TABLE votes DROP COLUMN strength", "DROP TABLE store_settings",
                    "UPDATE schema_version SET version = 2"):
            s.execute(text(sql))

    store.write(to_v2)
    store.close()
    store = open_store(store_url, overlap=2)
    assert store_db.schema_version(store) == store_db.SCHEMA_VERSION
    assert (comparisons_schema(store), annotators_schema(store), votes_schema(store)) == fresh
    from alignkit.store import settings

    assert settings.scale(store) == 1 and settings.guidelines(store) == ""
    with store.read() as s:
        assert s.scalars(select(Comparison.gold)).all() == [None, None]
    (vote,) = load_votes(store)
    assert (vote.annotator, vote.choice, vote.excluded) == ("ann", "a" if vote.swapped else "b", False)
    store.close()


def test_schema_1_store_upgrades_to_arena_battles(store_url, tmp_path):
    """A store written by schema 1 (before arena battles) opens, gains the arena flag and the pool index, and
    keeps its comparisons, leases and votes in the Label pool."""
    store = open_store(store_url, overlap=2)
    populate(store, tmp_path, n_prompts=3)
    voted = next_item(store, "ann")
    submit_vote(store, "ann", voted.comparison_id, "a")
    held = next_item(store, "ann")
    fresh = comparisons_schema(store)

    # Make it what schema 1 wrote: no `arena` column, the queue index without it, version 1 (and none of
    # schema 3's columns).
    def to_v1(s):
        for sql in (*V4_DROPS, "ALTER TABLE comparisons DROP COLUMN gold", "ALTER TABLE annotators DROP COLUMN excluded",
                    "ALTER TABLE votes DROP COLUMN strength", "DROP TABLE store_settings",
                    "DROP INDEX ix_comparison_open", "ALTER TABLE comparisons DROP COLUMN arena",
                    "CREATE INDEX ix_comparison_open ON comparisons (n_votes, id)",
                    "UPDATE schema_version SET version = 1"):
            s.execute(text(sql))

    store.write(to_v1)
    columns, indexes = comparisons_schema(store)
    assert [c[0] for c in columns] == ["id", "prompt_id", "response_a_id", "response_b_id", "n_votes", "created_at"]
    assert ("ix_comparison_open", ("n_votes", "id")) in indexes
    store.close()

    store = open_store(store_url, overlap=2)
    assert store_db.schema_version(store) == store_db.SCHEMA_VERSION == 5
    assert comparisons_schema(store) == fresh  # the same schema as a store created at the current version
    with store.read() as s:
        assert s.scalars(select(Comparison.arena)).all() == [False] * 3
    assert [(v.annotator, v.comparison_id) for v in load_votes(store)] == [("ann", voted.comparison_id)]
    assert next_item(store, "ann").comparison_id == held.comparison_id  # the lease survived
    assert next_item(store, "ann", arena=True) is None  # nothing became a battle
    assert progress(store, "bob").remaining == 3
    store.close()


def test_import_validation_names_line_and_imports_nothing(store_url, tmp_path):
    store = open_store(store_url)
    good = {"prompt": "p", "responses": ["x", "y"]}
    cases = [
        ("{not json", "malformed JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"prompt": "p", "responses": ["only one"]}, "at least 2"),
        ({"prompt": "", "responses": ["x", "y"]}, "non-empty string"),
        ({"prompt": "p", "messages": [], "responses": ["x", "y"]}, "exactly one of"),
        ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "responses": ["x", "y"]},
         "last message in 'prompt' is the assistant's"),
        ({"messages": [{"role": "robot", "content": "hi"}], "responses": ["x", "y"]}, 'unknown role "robot"'),
        ({"prompt": "p", "respones": ["x", "y"]}, "unknown key"),
        ({"prompt": "p", "responses": ["x", "x"]}, "duplicates"),
        ({"prompt": "p", "responses": ["x", "y"], "models": ["m"]}, "one per response"),
    ]
    for bad, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [good, good | {"prompt": "q"}, bad])
        with pytest.raises(UserError, match=message) as err:
            import_file(store, path)
        assert str(err.value).startswith(f"{path}:3: ")
    with pytest.raises(UserError, match="not found"):
        import_file(store, tmp_path / "missing.jsonl")
    assert count(store, Prompt) == 0 and count(store, Comparison) == 0
    # chat prompts and recorded model specs
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
         "responses": ["hello", "hey", "yo"], "models": ["m1", "m2", None]}])
    assert import_file(store, path).comparisons == 3
    # a prompt given as a message list (TRL's conversational prompt, the PPO prompts file's format) is a chat prompt
    path = write_jsonl(tmp_path / "ppo_style.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "responses": ["a", "b"]}])
    assert import_file(store, path).comparisons == 1
    item = next_item(store, "ann")
    assert item.prompt[1] == {"role": "user", "content": "hi"} and "user: hi" in item.prompt_text
    store.close()


def test_parse_allows_prompts_alone_when_generating(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}])
    rows = parse_import_file(path, responses_required=False)
    assert [r.responses for r in rows] == [[], []]
    with pytest.raises(UserError, match="p.jsonl:1: needs at least 2"):
        parse_import_file(path)


def test_open_store_errors(tmp_path):
    with pytest.raises(UserError, match="no label store"):
        open_store(tmp_path / "nope.db", create=False)
    with pytest.raises(UserError, match="does not exist"):
        open_store(tmp_path / "no" / "dir.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(UserError, match="not a SQLite database"):
        open_store(junk)
    with pytest.raises(UserError, match="not supported"):
        open_store("mysql://x/y")
    for url in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(UserError, match="in-memory SQLite database is not supported"):
            open_store(url)
    with pytest.raises(UserError, match="no label store"):  # a sqlite:/// URL is the file it names
        open_store(f"sqlite:///{tmp_path}/missing.db", create=False)
    store = open_store(f"sqlite:///{tmp_path}/by-url.db")
    store.close()
    assert (tmp_path / "by-url.db").exists()


def test_import_summary_counts_distinct_items(tmp_path):
    store = open_store(tmp_path / "l.db")
    same = {"prompt": "p", "responses": ["x", "y"]}
    path = write_jsonl(tmp_path / "in.jsonl", [same, same, same, {"prompt": "q", "responses": ["x", "y", "z"]}])
    summary = import_file(store, path)
    assert str(summary) == "2 prompts, 5 responses, 4 comparisons (4 new)"
    assert str(import_file(store, path)) == "2 prompts, 5 responses, 4 comparisons (0 new)"
    store.close()


def test_sqlite_read_then_write_transactions_do_not_fail_under_contention(tmp_path):
    """64 threads each doing a read-then-write transaction at once: BEGIN IMMEDIATE + retry, no 'locked'."""
    store = open_store(tmp_path / "c.db")
    populate(store, tmp_path, n_prompts=1)
    barrier = threading.Barrier(64)

    def work(i):
        barrier.wait()
        for _ in range(5):
            def run(s):
                n = s.scalar(select(func.count()).select_from(Prompt))
                s.add(Prompt(key=f"k{i}-{random.random()}", content_json='"x"', created_at=float(n)))
            store.write(run)

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(work, range(64)))
    assert count(store, Prompt) == 1 + 64 * 5
    with store.read() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    store.close()


def test_aggregation_policy(tmp_path):
    assert aggregate(["a", "a", "b"]) == ("a", 2 / 3, "kept")
    assert aggregate(["a", "b"])[2] == "no_majority"
    assert aggregate(["tie", "tie", "a"])[2] == "tie"
    assert aggregate(["tie", "tie", "a"], ties="ignore") == ("a", 1.0, "kept")
    assert aggregate(["both_bad", "both_bad", "b"])[2] == "both_bad"
    assert aggregate(["both_bad", "both_bad", "b"], both_bad="ignore") == ("b", 1.0, "kept")
    assert aggregate(["a", "a", "b"], min_agreement=0.7)[2] == "below_min_agreement"
    assert aggregate(["a"], min_votes=2)[2] == "too_few_votes"
    # Agreement needs two votes: with a minimum agreement set, one vote (agreement 1.0 by itself) is dropped.
    assert aggregate(["a"]) == ("a", 1.0, "kept")
    assert aggregate(["a"], min_agreement=1.0) == (None, 1.0, "single_vote")
    assert aggregate(["tie", "tie", "b"], ties="ignore", min_agreement=0.5)[2] == "single_vote"  # one considered
    assert aggregate(["a", "a"], min_agreement=1.0) == ("a", 1.0, "kept")
    with open_store(tmp_path / "empty.db") as store, pytest.raises(UserError, match="min votes must be an integer"):
        preference_rows(store, min_votes=None)


def test_agreement_matches_libraries():
    from sklearn.metrics import cohen_kappa_score

    from alignkit.store.agreement import VoteRow

    x = ["a", "b", "a", "tie", "b", "a", "both_bad", "a"]
    y = ["a", "b", "b", "tie", "b", "a", "a", "a"]
    votes = [VoteRow(i, "x", c, False, 1.0, None) for i, c in enumerate(x)] + \
            [VoteRow(i, "y", c, False, 1.0, None) for i, c in enumerate(y)]
    (pair,) = cohen_pairs(votes)
    assert pair["kappa"] == pytest.approx(cohen_kappa_score(x, y)) and pair["n"] == 8
    assert pair["agreement"] == pytest.approx(6 / 8)
    # Fleiss on a textbook-sized table: perfect agreement on varied labels is 1
    result = fleiss({0: ["a", "a", "a"], 1: ["b", "b", "b"], 2: ["tie", "tie", "tie"], 3: ["a", "a"]})
    assert result == {"kappa": pytest.approx(1.0), "n_items": 3, "raters_per_item": 3}
    assert fleiss({0: ["a"]}) is None


def test_export_writes_dataset_and_jsonl(store_url, tmp_path):
    import datasets

    store = open_store(store_url, overlap=3)
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "p0", "responses": ["short", "much longer"]},
        {"prompt": "p1", "responses": ["x", "y"]},
        {"messages": [{"role": "user", "content": "p2"}], "responses": ["u", "v"]},
        {"prompt": "p3", "responses": ["m", "n"]},
    ])
    import_file(store, path)
    # comparison 1: a,a,b -> chosen "short"; 2: tie majority -> dropped; 3: b,b,b -> "v"; 4: both_bad -> dropped
    plan = {1: ["a", "a", "b"], 2: ["tie", "tie", "a"], 3: ["b", "b", "b"], 4: ["both_bad", "both_bad", "a"]}
    for cid, labels in plan.items():
        for i, label in enumerate(labels):
            u = f"u{i}"
            item = next_item(store, u)
            assert item.comparison_id == cid
            shown = {"a": "b", "b": "a"}.get(label, label) if item.swapped else label
            submit_vote(store, u, cid, shown)
    rows = preference_rows(store_url)
    assert [(r["prompt"], r["chosen"], r["rejected"], r["n_annotators"]) for r in rows] == [
        ("p0", "short", "much longer", 3), ([{"role": "user", "content": "p2"}], "v", "u", 3)]
    assert rows[0]["agreement"] == pytest.approx(2 / 3)
    assert len(preference_rows(store_url, min_agreement=0.9)) == 1
    assert len(preference_rows(store_url, ties="ignore", both_bad="ignore")) == 4
    with pytest.raises(UserError, match="ties policy"):
        preference_rows(store_url, ties="keep-ish")

    out = tmp_path / "export"
    summary = export_dataset(store, out)
    assert summary["rows"] == 2 and summary["per_reason"] == {"kept": 2, "tie": 1, "both_bad": 1}
    ds = datasets.load_from_disk(str(out))
    assert ds.num_rows == 2 and {"prompt", "chosen", "rejected", "n_annotators", "agreement"} <= set(ds.column_names)
    lines = [json.loads(line) for line in open(out / "preferences.jsonl")]
    assert lines[0]["chosen"] == "short" and lines[1]["prompt"] == [{"role": "user", "content": "p2"}]
    # a second export over the first replaces it; a non-export directory is refused
    assert export_dataset(store, out, min_agreement=0.9)["rows"] == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an earlier export"):
        export_dataset(store, tmp_path / "other")
    report = agreement_report(store)
    assert report["n_votes"] == 12 and set(report["annotators"]) == {"u0", "u1", "u2"}
    store.close()


def test_unpaired_rows_for_kto_keep_both_bad_votes_as_undesirable(store_url, tmp_path):
    """Two rows per kept comparison (the chosen response desirable, the rejected not); with both_bad="undesirable"
    a both-bad plurality gives both responses as undesirable, which no paired export can hold."""
    store = open_store(store_url, overlap=2)
    import_file(store, write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "p0", "responses": ["good", "worse"]},
        {"prompt": "p1", "responses": ["meh", "awful"]},
        {"prompt": "p2", "responses": ["u", "v"]}]))
    plan = {1: ["a", "a"], 2: ["both_bad", "both_bad"], 3: ["tie", "tie"]}
    for cid, labels in plan.items():
        for i, label in enumerate(labels):
            item = next_item(store, f"u{i}")
            assert item.comparison_id == cid
            submit_vote(store, f"u{i}", cid, {"a": "b", "b": "a"}.get(label, label) if item.swapped else label)
    rows = unpaired_rows(store, both_bad="undesirable")
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ("p0", "good", True), ("p0", "worse", False), ("p1", "meh", False), ("p1", "awful", False)]
    assert [(r["completion"], r["label"]) for r in unpaired_rows(store)] == [("good", True), ("worse", False)]
    assert len(unpaired_rows(store, both_bad="undesirable", min_agreement=0.5)) == 4  # unanimous, two votes each
    with pytest.raises(UserError, match="'undesirable' makes unpaired rows"):
        preference_rows(store, both_bad="undesirable")
    # `label export --unpaired`: the same rows as a dataset TRL's KTOTrainer reads
    import datasets

    from alignkit.cli import main as alignkit_main

    out = tmp_path / "kto"
    assert alignkit_main(["label", "export", "--db", store_url, "--out", str(out), "--unpaired", "--both-bad", "undesirable"]) == 0
    ds = datasets.load_from_disk(str(out))
    assert ds["label"] == [True, False, False, False] and ds["completion"][0] == "good"
    assert json.loads((out / "export.json").read_text())["format"].startswith("unpaired")
    assert alignkit_main(["label", "export", "--db", store_url, "--out", str(tmp_path / "pairs"), "--both-bad", "undesirable"]) == 2
    store.close()


def arena_rows(n_prompts, models=("alpha", "beta")):
    """Rows as `alignkit compare --judge human:DB` writes them: one response per named model."""
    from alignkit.store.importer import ImportRow

    return [ImportRow(prompt=f"battle {i}", source=f"compare {i}",
                      responses=[f"answer {k} to battle {i}" for k in range(len(models))],
                      models=[f"/specs/{m}" for m in models],
                      sampling=[{"model_name": m} for m in models]) for i in range(n_prompts)]


def test_arena_battles_are_their_own_pool(store_url, tmp_path):
    from alignkit.store.arena import reveal
    from alignkit.store.importer import write_rows

    store = open_store(store_url, overlap=2)
    populate(store, tmp_path, n_prompts=2)  # comparisons 1, 2: the Label pool
    assert write_rows(store, arena_rows(2), arena=True).new_comparisons == 2  # 3, 4: battles
    with store.read() as s:
        assert dict(s.execute(select(Comparison.id, Comparison.arena)).all()) == {1: False, 2: False, 3: True, 4: True}
    assert (progress(store, "ann").remaining, progress(store, "ann", arena=True).remaining) == (2, 2)

    # One lease per pool at once, each returned again by its own pool only.
    label = next_item(store, "ann")
    battle = next_item(store, "ann", arena=True)
    assert (label.comparison_id, battle.comparison_id) == (1, 3)
    assert next_item(store, "ann").comparison_id == 1 and next_item(store, "ann", arena=True).comparison_id == 3
    # A call for one pool refuses the other's comparisons and stores nothing.
    with pytest.raises(UserError, match="comparison 3 is an arena battle"):
        submit_vote(store, "ann", 3, "a")
    with pytest.raises(UserError, match="comparison 1 is not an arena battle"):
        submit_vote(store, "ann", 1, "a", arena=True)
    with pytest.raises(UserError, match="arena battle"):
        skip(store, "ann", 3)
    with pytest.raises(UserError, match="has not voted on comparison 3"):
        reveal(store, "ann", 3)  # names only after the vote
    assert count(store, Vote) == 0

    submit_vote(store, "ann", 1, "a")
    submit_vote(store, "ann", 3, "b", arena=True)
    # Until the models are revealed the battle vote can be taken back; after, never.
    assert undo_last_vote(store, "ann", arena=True).comparison_id == 3
    submit_vote(store, "ann", 3, "b", arena=True)
    r = reveal(store, "ann", 3)
    # "answer 0" is alpha's; the names follow the sides the annotator saw.
    shown = ("beta", "alpha") if battle.swapped else ("alpha", "beta")
    assert battle.left.startswith(f"answer {int(battle.swapped)}")
    assert (r.model_left, r.model_right, r.left, r.right, r.choice) == (*shown, battle.left, battle.right, "b")
    with pytest.raises(UserError, match="not an arena battle"):
        reveal(store, "ann", 1)
    assert (progress(store, "ann").done, progress(store, "ann", arena=True).done) == (1, 1)
    # Undo takes back the latest vote of its own pool (the battle vote came later), not a revealed battle's.
    assert undo_last_vote(store, "ann").comparison_id == 1
    with pytest.raises(UserError, match="models of battle 3 were shown to ann"):
        undo_last_vote(store, "ann", arena=True)
    submit_vote(store, "ann", 1, "a")

    # Battles are kept out of the preference export; agreement counts every vote and says how many were battles.
    assert [r["comparison_id"] for r in preference_rows(store)] == [1]
    report = agreement_report(store)
    assert (report["n_votes"], report["n_arena_votes"]) == (2, 1)

    # Sending an existing ordinary comparison as a battle makes it one; an import never turns one back.
    from alignkit.store.importer import ImportRow

    with store.read() as s:
        c2 = s.get(Comparison, 2)
        row = ImportRow(prompt="question 1", source="x", responses=[c2.response_a.text, c2.response_b.text],
                        models=["m1", "m2"], sampling=[None, None])
        votes_on_2 = c2.n_votes
    # ... and says so (compare --judge human prints it): those votes leave the training export.
    sent = write_rows(store, [row], arena=True)
    assert (sent.new_comparisons, sent.converted, sent.converted_votes) == (0, 1, votes_on_2)
    assert write_rows(store, [row], arena=True).converted == 0
    assert write_rows(store, arena_rows(2)).new_comparisons == 0
    with store.read() as s:
        battles = s.scalars(select(Comparison.id).where(Comparison.arena.is_(True)).order_by(Comparison.id)).all()
    assert battles == [2, 3, 4]
    store.close()


def test_arena_serves_one_battle_per_prompt_to_each_annotator(store_url, tmp_path):
    """With three models every two battles of a prompt share a response, whose model the first reveal named:
    an annotator gets one battle per prompt, and annotators spread over the pairs. Label comparisons don't."""
    from alignkit.store.importer import write_rows

    store = open_store(store_url, overlap=2)
    populate(store, tmp_path, n_prompts=1, n_responses=3)  # comparisons 1-3: one prompt, Label pool
    write_rows(store, arena_rows(5, models=("alpha", "beta", "gamma")), arena=True)  # 15 battles, 3 per prompt
    with store.read() as s:
        prompt_of = dict(s.execute(select(Comparison.id, Comparison.prompt_id).where(Comparison.arena.is_(True))).all())
    assert progress(store, "u0", arena=True).remaining == 5  # one per prompt, not 15
    served = {}
    for name in [f"u{i}" for i in range(6)]:
        served[name] = []
        while (item := next_item(store, name, arena=True)) is not None:
            served[name].append(item.comparison_id)
            submit_vote(store, name, item.comparison_id, "a", arena=True)
        assert len(served[name]) == 5
        assert len({prompt_of[c] for c in served[name]}) == 5, f"{name} got two battles of one prompt"
    with store.read() as s:  # 6 annotators x 5 prompts fill all 15 battles x 2 slots: every pair is judged
        assert set(s.execute(select(Comparison.n_votes).where(Comparison.arena.is_(True))).scalars()) == {2}

    # Holding or skipping a battle bars the prompt's other battles too; a renewed own lease does not.
    store.overlap = 3
    held = next_item(store, "v", arena=True)
    skip(store, "v", held.comparison_id, arena=True)
    others = next_item(store, "v", arena=True)
    assert prompt_of[others.comparison_id] != prompt_of[held.comparison_id]
    renewed = next_item(store, "v", arena=True, now=others.expires_at + 1)
    assert renewed.comparison_id == others.comparison_id
    # The Label pool is unaffected: one annotator judges all three pairs of one prompt.
    for cid in (1, 2, 3):
        assert next_item(store, "w").comparison_id == cid
        submit_vote(store, "w", cid, "a")
    store.close()


def test_export_cleans_up_after_a_failure_and_concurrent_exports_are_safe(tmp_path, monkeypatch):
    import datasets

    store = open_store(tmp_path / "l.db", overlap=3)
    populate(store, tmp_path, n_prompts=3)
    for name in ("u0", "u1"):
        for _ in range(3):
            item = next_item(store, name)
            submit_vote(store, name, item.comparison_id, "b" if item.swapped else "a")
    item = next_item(store, "u2")  # comparison 1 gets a third vote: 3 of 3 agree
    submit_vote(store, "u2", item.comparison_id, "b" if item.swapped else "a")
    out = tmp_path / "exports" / "prefs"
    assert export_dataset(store, out, min_agreement=1.0, min_votes=3)["per_reason"] == {"kept": 1, "too_few_votes": 2}
    before = sorted(p.name for p in out.iterdir())

    def broken(self, path, **kwargs):
        (Path(path) / "partial.arrow").write_text("half")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(datasets.Dataset, "save_to_disk", broken)
        with pytest.raises(OSError, match="disk full"):
            export_dataset(store, out)
    assert [p.name for p in out.parent.iterdir()] == ["prefs"]  # no temp dir left behind
    assert sorted(p.name for p in out.iterdir()) == before and datasets.load_from_disk(str(out)).num_rows == 1

    gate = threading.Barrier(4)

    def export(i):
        gate.wait()
        return export_dataset(store, out, min_votes=3 if i % 2 else 1)["rows"]

    real_replace = os.replace

    def slow_replace(src, dst):  # widens the gap between the swap's two renames, where two exports could collide
        time.sleep(0.01)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", slow_replace)
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            assert sorted(pool.map(export, range(4))) == [1, 1, 3, 3]
        assert [p.name for p in out.parent.iterdir()] == ["prefs"]
        assert datasets.load_from_disk(str(out)).num_rows in (1, 3)
    store.close()


def test_generated_import_skips_prompts_whose_samples_are_alike(tmp_path, tiny_model_dir):
    """Two samples of a prompt can be the same text (short answers, low temperature): that prompt makes no
    comparison and is skipped and named; only when every prompt is skipped is the import refused."""
    from alignkit.generation import SamplingParams
    from alignkit.store.importer import import_rows, parse_import_file

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"the film was {w}"}
                                               for w in ("good", "bad", "fine", "odd", "long", "short", "dull", "grand")])
    store = open_store(str(tmp_path / "labels.db"))
    rows = parse_import_file(path, responses_required=False)
    # One-token samples at temperature 0.5 (seed 0): one of these eight prompts draws the same token twice.
    summary = import_rows(store, rows, generate=[str(tiny_model_dir)], progress=False,
                          params=SamplingParams(max_new_tokens=1, temperature=0.5, seed=0))
    assert len(summary.skipped) == 1 and summary.prompts == 7 and count(store, Comparison) == 7
    assert "1 prompt(s) skipped" in str(summary) and summary.skipped[0].startswith(f"{path}:")
    # The same model twice, greedy: the two responses of every prompt agree.
    with pytest.raises(UserError, match="for every prompt"):
        import_rows(open_store(str(tmp_path / "other.db")), parse_import_file(path, responses_required=False),
                    generate=[str(tiny_model_dir)] * 2, progress=False, params=SamplingParams(max_new_tokens=2, temperature=0))
    # One model, greedy, cannot give two responses (transformers refused with a traceback).
    with pytest.raises(UserError, match="greedy decoding"):
        import_rows(open_store(str(tmp_path / "third.db")), parse_import_file(path, responses_required=False),
                    generate=[str(tiny_model_dir)], progress=False, params=SamplingParams(max_new_tokens=2, temperature=0))
    store.close()


def test_a_database_that_is_not_a_label_store_is_refused_untouched(store_url, tmp_path):
    """`label export` on an app's own SQLite file (or PostgreSQL database) created alignkit's tables in it and
    switched it to WAL: any database with other tables is refused, byte for byte untouched; an empty one
    becomes a store only when asked to create one (import), never on export / serve / stats."""
    import sqlalchemy

    if store_url.startswith("postgresql"):
        engine = sqlalchemy.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://", 1))
        with pytest.raises(UserError, match="the database is empty"):
            open_store(store_url, create=False)
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE customers (x integer)"))
        with pytest.raises(UserError, match=r"not an alignkit label store \(it has other tables: customers\)"):
            open_store(store_url)
        assert set(sqlalchemy.inspect(engine).get_table_names()) == {"customers"}
        engine.dispose()
        return
    other = tmp_path / "app.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE customers (x)")
    before = other.read_bytes()
    for create in (False, True):
        with pytest.raises(UserError, match=r"not an alignkit label store \(it has other tables: customers\)"):
            open_store(other, create=create)
    assert other.read_bytes() == before and not list(tmp_path.glob("app.sqlite-*"))  # no WAL switch either
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(UserError, match="no label store in .*empty.db: the database is empty"):
        open_store(empty, create=False)
    assert empty.stat().st_size == 0
    open_store(empty).close()
    open_store(empty, create=False).close()


def test_nul_characters_are_refused_in_files_and_replaced_in_samples(store_url, tmp_path):
    """PostgreSQL text cannot hold NUL (it crashed with the whole INSERT printed); SQLite can, so the backends
    differed. An imported response with NUL is one line; a sampled one (a byte token) is stored as U+FFFD on both,
    under the key compare --collect looks it up by."""
    from alignkit.store.importer import ImportRow, storable_text, store_key, write_rows
    from alignkit.store.models import Response

    path = write_jsonl(tmp_path / "nul.jsonl", [{"prompt": "p", "responses": ["a\u0000b", "c"]}])
    with pytest.raises(UserError, match=r"nul.jsonl:1: a response contains a NUL character"):
        parse_import_file(path)
    store = open_store(store_url)
    write_rows(store, [ImportRow("p", "sampled", ["a\u0000b", "c"], ["m", "m"], [None, None])])
    with store.read() as s:
        texts = {r.text: r.key for r in s.scalars(select(Response))}
    assert texts == {"a\ufffdb": store_key(storable_text("a\u0000b")), "c": store_key("c")}
    item = next_item(store, "ann")
    submit_vote(store, "ann", item.comparison_id, "a", "why\u0000not")  # a pasted NUL in a rationale
    with store.read() as s:
        assert s.scalars(select(Vote.rationale)).one() == "why\ufffdnot"
    store.close()


def test_urls_are_printed_without_their_password():
    from alignkit.store.db import display_name

    assert display_name("postgresql+psycopg://ak:s3cret@db.example:5432/labels") == \
        "postgresql+psycopg://ak:***@db.example:5432/labels"
    assert display_name("labels.db") == "labels.db"


def test_label_stats_show_a_length_bias_in_the_labels_and_the_preference_without_it(tmp_path, capsys):
    """Two equally good models, one writes longer; annotators prefer the longer response by construction."""
    import numpy as np

    from alignkit.cli import main as alignkit_main
    from alignkit.store import next_item, open_store, submit_vote

    rng = np.random.default_rng(2)
    rows = [{"prompt": f"prompt {i}", "models": ["long-model", "short-model"],
             "responses": ["l" * max(1, int(rng.normal(150, 40))) + str(i), "s" * max(1, int(rng.normal(100, 40))) + str(i)]}
            for i in range(240)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = str(tmp_path / "labels.db")
    assert alignkit_main(["label", "import", "--db", db, str(path)]) == 0
    store = open_store(db, overlap=1)
    diffs = [len(r["responses"][0]) - len(r["responses"][1]) for r in rows]
    sd = float(np.std(diffs))
    sides = random.Random(0)
    while (item := next_item(store, "ann", overlap=1, rng=sides)) is not None:
        d = len(item.left) - len(item.right)
        left_wins = rng.random() < 1 / (1 + np.exp(-2.0 * np.tanh(d / sd)))
        submit_vote(store, "ann", item.comparison_id, "a" if left_wins else "b", overlap=1)
    store.close()
    capsys.readouterr()
    assert alignkit_main(["label", "stats", "--db", db]) == 0
    length = json.loads(capsys.readouterr().out)["length"]
    assert length["votes"] == 240 and length["longer_preferred_rate"] > 0.65 and length["ci_low"] > 0.58
    assert length["length_coef"] > 1.0
    (pair,) = length["model_pairs"]
    assert (pair["model_a"], pair["model_b"]) == ("long-model", "short-model") and pair["win_rate"] > 0.6
    assert pair["lc_ci_low"] < 0.5 < pair["lc_ci_high"]  # at equal length neither model is preferred


def gold_file(tmp_path, n=2):
    return write_jsonl(tmp_path / "gold.jsonl", [{"prompt": f"gold question {i}", "chosen": f"right {i}",
                                                  "rejected": f"wrong {i}"} for i in range(n)])


def test_gold_items_reach_every_annotator_outside_the_overlap_and_never_an_export(store_url, tmp_path):
    from alignkit.store.importer import parse_gold_file, write_rows

    store = open_store(store_url, overlap=1, gold_rate=1.0)
    populate(store, tmp_path, n_prompts=3)
    write_rows(store, parse_gold_file(gold_file(tmp_path)))
    served: dict[str, list] = {}
    for name, right in (("u0", True), ("u1", False)):
        for _ in range(2):  # gold first (rate 1), each annotator both gold items though overlap is 1
            item = next_item(store, name)
            served.setdefault(name, []).append(item.prompt)
            shown_right = "a" if item.left.startswith("right") else "b"
            submit_vote(store, name, item.comparison_id, shown_right if right else {"a": "b", "b": "a"}[shown_right])
    assert served == {"u0": ["gold question 0", "gold question 1"], "u1": ["gold question 0", "gold question 1"]}
    assert progress(store, "u0").remaining == 3  # gold items are not counted as work
    # Ordinary work goes on at overlap 1; once it is done no gold item is served alone.
    for name in ("u0", "u1", "u0", "u1"):
        item = next_item(store, name)
        if item is not None:
            assert item.prompt.startswith("question")
            submit_vote(store, name, item.comparison_id, "a")
    assert next_item(store, "u2", gold_rate=1.0) is None  # nothing ordinary left: no gold for a newcomer either
    report = agreement_report(store)
    assert report["n_gold_votes"] == 4
    assert report["annotators"]["u0"]["gold_accuracy"] == 1.0 and report["annotators"]["u1"]["gold_accuracy"] == 0.0
    rows = preference_rows(store)
    assert len(rows) == 3 and not [r for r in rows if r["prompt"].startswith("gold")]
    store.close()


def test_a_gold_row_on_a_pair_with_votes_is_refused_and_nothing_is_imported(store_url, tmp_path):
    from alignkit.store.importer import ImportRow, parse_gold_file, write_rows

    store = open_store(store_url, overlap=1)
    write_rows(store, [ImportRow("gold question 1", "x:1", ["right 1", "wrong 1"], [None, None], [None, None])])
    item = next_item(store, "ann")
    submit_vote(store, "ann", item.comparison_id, "a")
    before = count(store, Comparison)
    with pytest.raises(UserError, match=r"gold.jsonl:2: this pair is already a comparison with 1 vote"):
        write_rows(store, parse_gold_file(gold_file(tmp_path)))
    assert count(store, Comparison) == before  # gold question 0 was not imported either
    with pytest.raises(UserError, match="same text"):
        parse_gold_file(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}]))
    store.close()


def test_an_excluded_annotators_votes_leave_the_export_and_come_back(store_url, tmp_path):
    from alignkit.store.export import excluded_annotators, set_excluded

    store = open_store(store_url, overlap=2)
    populate(store, tmp_path, n_prompts=2)
    for name, choice in (("good", "a"), ("spam", "b")):
        for _ in range(2):
            item = next_item(store, name)
            submit_vote(store, name, item.comparison_id, choice if not item.swapped else {"a": "b", "b": "a"}[choice])
    assert preference_rows(store) == []  # one a and one b on each: no majority
    set_excluded(store, "spam", True)
    rows = preference_rows(store)
    assert len(rows) == 2 and all(r["n_annotators"] == 1 for r in rows) and excluded_annotators(store) == ["spam"]
    summary = export_dataset(store, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "export.json").read_text())["policy"]["excluded_annotators"] == ["spam"]
    assert summary["rows"] == 2 and agreement_report(store)["annotators"]["spam"]["excluded"] is True
    assert len(load_votes(store)) == 4  # nothing deleted
    set_excluded(store, "spam", False)
    assert preference_rows(store) == []
    with pytest.raises(UserError, match="no annotator 'nobody'"):
        set_excluded(store, "nobody", True)
    store.close()


def test_flags_name_what_to_look_at_worked_by_hand():
    from alignkit.store.agreement import flags

    calm = {"votes": 40, "median_seconds": 25.0, "left": 21, "decided": 40, "left_rate": 21 / 40, "tie_rate": 0.1,
            "both_bad_rate": 0.05, "kappa_vs_others": 0.6, "shared_with_others": 30, "gold_votes": 8,
            "gold_accuracy": 0.875}
    assert flags(calm) == []
    hasty = {**calm, "median_seconds": 1.2, "left": 34, "left_rate": 0.85, "tie_rate": 0.4, "both_bad_rate": 0.2,
             "kappa_vs_others": 0.05, "gold_accuracy": 0.5}
    # 34 of 40 on the left: two-sided binomial p ~ 1e-5 < 0.01; 60% undecided > 50%; kappa 0.05 < 0.2.
    assert [f.split(":")[0] for f in flags(hasty)] == ["fast", "side", "undecided", "disagrees", "gold"]
    few = {**hasty, "votes": 5, "decided": 5, "left": 5, "shared_with_others": 3, "gold_votes": 2}
    assert flags(few) == []  # too few votes to say anything


def test_a_skipped_item_comes_back_when_asked_while_it_has_a_slot(store_url, tmp_path):
    from alignkit.store import skipped, unskip

    store = open_store(store_url, overlap=1)
    populate(store, tmp_path, n_prompts=3)
    first = next_item(store, "ann")
    skip(store, "ann", first.comparison_id)
    second = next_item(store, "ann")
    assert [i.comparison_id for i in skipped(store, "ann")] == [first.comparison_id] and skipped(store, "bob") == []
    back = unskip(store, "ann", first.comparison_id)
    assert (back.comparison_id, back.left, back.swapped) == (first.comparison_id, first.left, first.swapped)
    assert next_item(store, "ann").comparison_id == first.comparison_id  # the one on screen now
    submit_vote(store, "ann", first.comparison_id, "a")
    assert skipped(store, "ann") == [] and progress(store, "ann").skipped == 0
    with pytest.raises(UserError, match="is not one ann skipped"):
        unskip(store, "ann", first.comparison_id)
    # One that went to someone else since (overlap 1) cannot come back.
    skip(store, "ann", second.comparison_id)
    taken = next_item(store, "bob")
    assert taken.comparison_id == second.comparison_id
    with pytest.raises(UserError, match="gone to other annotators"):
        unskip(store, "ann", second.comparison_id)
    store.close()
