"""Many annotators at once against the real server; and a SIGKILL mid-run loses no acknowledged vote."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client.exceptions import AppError

from _labeling_server import Server, client, make_store, make_users
from alignkit.store import open_store
from alignkit.store.agreement import load_votes

pytestmark = pytest.mark.slow


def stored_votes(db):
    store = open_store(db, create=False)
    try:
        return load_votes(store)
    finally:
        store.close()


def label_loop(url, name, password, *, max_votes, served, acked, stop=None):
    """next_item -> submit_vote until the queue is empty (or stop is set); records what was served and acked."""
    c = client(url, (name, password))
    try:
        for _ in range(max_votes):
            if stop is not None and stop.is_set():
                return
            cid, _, a, b = c.predict(api_name="/next_item")
            if cid is None:
                return
            served.append(cid)
            choice = "a" if len(a) >= len(b) else "b"
            c.predict(comparison_id=cid, choice=choice, api_name="/submit_vote")
            acked.append((cid, choice))
    finally:
        c.close()


def test_24_clients_500_votes_each_stored_exactly_once(tmp_path):
    n_clients, overlap, n_comparisons = 24, 3, 180  # 540 slots
    db = make_store(str(tmp_path / "labels.db"), tmp_path, n_comparisons)
    names = [f"ann{i:02d}" for i in range(n_clients)]
    creds = make_users(tmp_path / "users.json", names)
    server = Server(db, users=tmp_path / "users.json", overlap=overlap, log=tmp_path / "server.log").start()
    served = {n: [] for n in names}
    acked = {n: [] for n in names}
    try:
        with ThreadPoolExecutor(n_clients) as pool:
            futures = [pool.submit(label_loop, server.url, n, creds[n], max_votes=10_000, served=served[n],
                                   acked=acked[n]) for n in names]
            for f in futures:
                f.result()
    finally:
        server.stop()
    total = sum(len(v) for v in acked.values())
    assert total == n_comparisons * overlap >= 500  # the whole queue, no vote lost
    for n in names:
        assert len(served[n]) == len(set(served[n])), f"{n} was served a comparison twice"
    votes = stored_votes(db)
    assert len(votes) == total
    stored = Counter((v.annotator, v.comparison_id) for v in votes)
    assert max(stored.values()) == 1  # each vote exactly once
    assert set(stored) == {(n, cid) for n in names for cid, _ in acked[n]}
    assert max(Counter(v.comparison_id for v in votes).values()) == overlap


def test_sigkill_mid_run_keeps_every_acknowledged_vote(tmp_path):
    db = make_store(str(tmp_path / "labels.db"), tmp_path, 150)
    names = [f"k{i}" for i in range(8)]
    creds = make_users(tmp_path / "users.json", names)
    server = Server(db, users=tmp_path / "users.json", overlap=2, log=tmp_path / "server.log").start()
    acked = {n: [] for n in names}
    served = {n: [] for n in names}
    stop = threading.Event()

    def run(n):
        try:
            label_loop(server.url, n, creds[n], max_votes=10_000, served=served[n], acked=acked[n], stop=stop)
        except Exception:  # the server died under this client: expected
            pass

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while sum(len(v) for v in acked.values()) < 60 and time.time() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL while clients are mid-request
    stop.set()
    for t in threads:
        t.join(30)
    n_acked = sum(len(v) for v in acked.values())
    assert n_acked >= 60

    # Restart on the same store: every acknowledged vote is there, and labeling goes on.
    server.start()
    try:
        stored = {(v.annotator, v.comparison_id): v for v in stored_votes(db)}
        for n in names:
            for cid, choice in acked[n]:
                assert (n, cid) in stored, f"acknowledged vote {n}/{cid} lost"
        # votes in flight at the kill may or may not have landed, but never twice
        assert len(stored) <= n_acked + len(names)
        c = client(server.url, (names[0], creds[names[0]]))
        cid = c.predict(api_name="/next_item")[0]
        assert cid is not None and cid not in [x for x, _ in acked[names[0]]]
        try:
            c.predict(comparison_id=cid, choice="tie", api_name="/submit_vote")
        except AppError as err:  # the restarted server still enforces the rules
            pytest.fail(f"vote after restart refused: {err}")
    finally:
        server.stop()
    assert len(stored_votes(db)) == len(stored) + 1
