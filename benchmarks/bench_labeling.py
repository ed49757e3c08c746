"""Labeling server under load: votes/s and submit latency (p50/p95/p99) with 10, 50, 100 annotators.

    python -m benchmarks.bench_labeling [--quick] [--backends sqlite,postgres] [--think 0,2]

For each store backend (a SQLite file; PostgreSQL in a throwaway cluster when its
binaries are installed) and each number of annotators, a fresh store is served by
the real `alignkit label serve` in its own process on loopback, and every
annotator logs in and loops next_item -> submit_vote over the documented HTTP API
(`POST /gradio_api/call/<name>` then its event stream: the same queue and handlers
gradio_client uses), each with one keep-alive connection, as a browser keeps one.
Latency is the wall time of one submit_vote call as the client sees it.

Two load shapes per cell:
  think=0   closed loop, no pause: every annotator always has a request in flight
            (a saturation test, far beyond what people do);
  think=T   an exponential pause with mean T seconds after each item is shown
            (still several times faster than people judging two responses).
After each run the store is checked: every acknowledged vote is stored exactly once.
The load generator and the server share this machine's cores.
`--client gradio_client` drives the same loop through gradio_client instead (slower
per call on the client side).

With gold items and flags on, as a real team runs: `--gold N` imports N gold items, served at
`--gold-rate` of each annotator's new items (votes on them are timed like any other); `--flags S` has an
admin poll /admin_stats (the agreement report with every annotator's flags, as the admin tab recomputes it)
every S seconds for the whole run, its latency reported beside the votes'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _labeling_server import Server, make_store, make_users  # noqa: E402


async def _call(client, name: str, data: list, session: str):
    r = await client.post(f"/gradio_api/call/{name}", json={"data": data, "session_hash": session})
    r.raise_for_status()
    event_id = r.json()["event_id"]
    async with client.stream("GET", f"/gradio_api/call/{name}/{event_id}") as s:
        event = None
        async for line in s.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = line.split(":", 1)[1].strip()
                if event == "error":
                    raise RuntimeError(f"{name}: {payload}")
                return json.loads(payload)
    raise RuntimeError(f"{name}: stream ended without a result")


async def _annotator(url, name, password, votes, think, rng, latencies, acked, errors, start_gate):
    import httpx

    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        r = await client.post("/login", data={"username": name, "password": password})
        r.raise_for_status()
        session = f"bench-{name}-{rng.random():.12f}"  # one session per annotator, as a browser tab has
        await _call(client, "progress", [], session)  # warm-up: session state, first-call imports
        await start_gate.wait()
        for _ in range(votes):
            cid, prompt, a, b = await _call(client, "next_item", [], session)
            if cid is None:
                return
            if think:
                await asyncio.sleep(rng.expovariate(1.0 / think))
            choice = "a" if len(a) >= len(b) else "b"
            t0 = time.perf_counter()
            try:
                await _call(client, "submit_vote", [cid, choice, "", None], session)  # rationale, strength
            except RuntimeError as err:
                errors.append(str(err))
                continue
            latencies.append(time.perf_counter() - t0)
            acked.append((name, cid))


async def _admin(url, password, every, latencies, stop):
    """An admin asking for the agreement report (flags per annotator) every `every` seconds until `stop`."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        (await client.post("/login", data={"username": ADMIN, "password": password})).raise_for_status()
        while not stop.is_set():
            t0 = time.perf_counter()
            await _call(client, "admin_stats", [], "bench-admin")
            latencies.append(time.perf_counter() - t0)
            try:
                await asyncio.wait_for(stop.wait(), timeout=every)
            except asyncio.TimeoutError:
                pass


async def _run_http(url, creds, votes, think, seed, *, flags_every=0.0, admin_password=None):
    latencies, acked, errors, stats_latencies = [], [], [], []
    gate, stop = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(_annotator(url, n, pw, votes, think, random.Random(seed + i), latencies, acked,
                                            errors, gate)) for i, (n, pw) in enumerate(creds.items())]
    await asyncio.sleep(2.0 + 0.05 * len(creds))  # logins (scrypt) and warm-up finish before the clock starts
    t0 = time.perf_counter()
    gate.set()
    admin = asyncio.create_task(_admin(url, admin_password, flags_every, stats_latencies, stop)) if flags_every \
        else None
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - t0
    stop.set()
    if admin is not None:
        await admin
    return latencies, acked, errors, seconds, stats_latencies


ADMIN = "bench-admin"


def _import_gold(db: str, tmp: Path, n: int) -> None:
    from alignkit.store import open_store
    from alignkit.store.importer import parse_gold_file, write_rows

    path = tmp / "gold.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"gold question {i}", "chosen": f"the right answer {i}, in full",
                                        "rejected": f"wrong {i}"}) + "\n" for i in range(n)))
    store = open_store(db, create=False)
    try:
        write_rows(store, parse_gold_file(path))
    finally:
        store.close()


def _run_gradio_client(url, creds, votes, think, seed):
    from labeling_ui.simulate import length_judge, run_simulated_annotators

    if think:
        raise SystemExit("--client gradio_client supports --think 0 only")
    r = run_simulated_annotators(url, list(creds.items()), length_judge, votes * len(creds), 0.0, seed)
    return r


def _stored(db):
    from alignkit.store import open_store
    from alignkit.store.agreement import load_votes

    store = open_store(db, create=False)
    try:
        return load_votes(store)
    finally:
        store.close()


def run_cell(backend_url, tmp: Path, n: int, votes: int, think: float, overlap: int, args, users_file, creds_all):
    creds = dict([kv for kv in creds_all.items() if kv[0] != ADMIN][:n])
    load_before = os.getloadavg()[0]  # other work on the machine shows up here
    n_comparisons = math.ceil(n * votes / overlap) + n
    db = make_store(backend_url, tmp, n_comparisons)
    extra = ["--concurrency-limit", str(args.concurrency_limit)] if args.concurrency_limit else []
    if args.gold:
        _import_gold(db, tmp, args.gold)
    extra += ["--gold-rate", str(args.gold_rate if args.gold else 0.0)]
    server = Server(db, users=users_file, overlap=overlap, extra=extra, log=tmp / "server.log").start()
    try:
        if args.client == "http":
            lat, acked, errors, seconds, stats = asyncio.run(_run_http(
                server.url, creds, votes, think, args.seed, flags_every=args.flags,
                admin_password=creds_all.get(ADMIN)))
            lat_ms = np.asarray(lat) * 1000
            pct = {f"p{q}": float(np.percentile(lat_ms, q)) for q in (50, 95, 99)} if len(lat) else {}
            if stats:
                pct["stats_calls"], pct["stats_p95"] = len(stats), float(np.percentile(np.asarray(stats) * 1000, 95))
            n_acked = len(acked)
        else:
            r = _run_gradio_client(server.url, creds, votes, think, args.seed)
            pct, n_acked, errors, seconds = r["submit_latency_ms"], r["votes"], r["errors"], r["seconds"]
    finally:
        server.stop()
    stored = _stored(db)
    dup = sum(c - 1 for c in Counter((v.annotator, v.comparison_id) for v in stored).values() if c > 1)
    lost = n_acked - len(stored) if args.client == "gradio_client" else \
        len({(a, c) for a, c in acked} - {(v.annotator, v.comparison_id) for v in stored})
    return {"annotators": n, "think_s": think, "load1": load_before, "votes": n_acked, "seconds": seconds,
            "votes_per_s": n_acked / seconds if seconds else None, **pct, "lost": lost, "duplicates": dup,
            "errors": len(errors),
            # gold items go to every annotator, outside the overlap
            "over_overlap": max(Counter(v.comparison_id for v in stored if v.gold is None).values()) > overlap}


def options(args) -> str:
    """The command line's options beyond the defaults, as the record shows them."""
    given = [("--annotators", args.annotators, "10,50,100"), ("--backends", args.backends, "sqlite,postgres"),
             ("--think", args.think, "0,2"), ("--gold", args.gold, 0), ("--flags", args.flags, 0.0)]
    return "".join(f" {flag} {value:g}" if isinstance(value, float) else f" {flag} {value}"
                   for flag, value, default in given if value != default)


def markdown(results: list[dict], args, env: dict) -> str:
    lines = [
        "## Labeling server: votes/s and submit latency",
        "",
        f"`python -m benchmarks.bench_labeling{' --quick' if args.quick else ''}{options(args)}` — {env['when']}, "
        f"{env['machine']}; server and load generator on the same machine (loopback), "
        f"concurrency limit {env['concurrency_limit']}, overlap {args.overlap}, client: {args.client}.",
        "Each annotator: log in, then next_item -> submit_vote; latency = one submit_vote call. "
        "think=0: closed loop with no pause (saturation); think=T: exponential pause, mean T s, before each vote.",
        "",
        "load = the machine's 1-minute load average before the cell (2 cores: above ~2 means other work competed).",
        *([f"Gold items: {args.gold}, served at gold rate {args.gold_rate:g}."] if args.gold else []),
        *([f"Flags: an admin polls /admin_stats (agreement report, flags per annotator) every {args.flags:g} s; "
           f"stats p95 = its latency."] if args.flags else []),
        "",
        "| store | annotators | think (s) | votes | votes/s | p50 ms | p95 ms | p99 ms | lost | duplicates | refused | load |"
        + (" stats calls | stats p95 ms |" if args.flags else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.flags else ""),
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['backend']} | – | – | – | – | – | – | – | – | – | skipped: {r['skipped']} | – |")
            continue
        f = lambda k: f"{r[k]:.0f}" if r.get(k) is not None else "–"  # noqa: E731
        lines.append(f"| {r['backend']} | {r['annotators']} | {r['think_s']:g} | {r['votes']} | "
                     f"{r['votes_per_s']:.0f} | {f('p50')} | {f('p95')} | {f('p99')} | {r['lost']} | "
                     f"{r['duplicates']} | {r['errors']} | {r['load1']:.1f} |"
                     + (f" {r.get('stats_calls', 0)} | {f('stats_p95')} |" if args.flags else ""))
    target = [r for r in results if r.get("annotators") == 50 and "p95" in r]
    if target:
        lines += ["", "Target: 50 concurrent annotators at p95 <= 150 ms with nothing lost — " + "; ".join(
            f"{r['backend']} think={r['think_s']:g}: p95 {r['p95']:.0f} ms, lost {r['lost']} "
            f"({'met' if r['p95'] <= 150 and r['lost'] == 0 else 'NOT met'})" for r in target) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer votes per annotator")
    p.add_argument("--annotators", default="10,50,100")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--think", default="0,2", help="comma-separated mean pauses (s) before each vote")
    p.add_argument("--votes", type=int, default=None, help="votes per annotator (default 20, quick 6)")
    p.add_argument("--overlap", type=int, default=3)
    p.add_argument("--concurrency-limit", type=int, default=None)
    p.add_argument("--client", choices=["http", "gradio_client"], default="http")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gold", type=int, default=0, help="gold items in each store (default 0: none)")
    p.add_argument("--gold-rate", type=float, default=0.1, help="share of new items that are gold, with --gold")
    p.add_argument("--flags", type=float, default=0.0,
                   help="an admin polls the agreement report with flags every this many seconds (default 0: off)")
    p.add_argument("--out", default=None, help="markdown file to write (default benchmarks/results_labeling.md; "
                   "--quick runs only print unless --out is given)")
    args = p.parse_args(argv)
    from labeling_ui.app import DEFAULT_CONCURRENCY_LIMIT

    votes = args.votes or (6 if args.quick else 20)
    sizes = [int(x) for x in args.annotators.split(",")]
    thinks = [float(x) for x in args.think.split(",")]
    env = {"when": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, {platform.python_version()}",
           "concurrency_limit": args.concurrency_limit or DEFAULT_CONCURRENCY_LIMIT}
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-labeling-") as tmpd:
        tmp = Path(tmpd)
        users_file = tmp / "users.json"
        creds_all = make_users(users_file, [f"b{i:03d}" for i in range(max(sizes))] + [ADMIN], admins=(ADMIN,))
        for backend in args.backends.split(","):
            cluster = None
            try:
                if backend == "postgres":
                    import _pg

                    try:
                        cluster = _pg.postgres_cluster()
                        base_url = cluster.__enter__()
                    except BaseException as err:  # pytest.skip raises its own exception type
                        results.append({"backend": backend, "skipped": str(err).splitlines()[0][:120]})
                        print(f"postgres: skipped ({err})", flush=True)
                        cluster = None
                        continue
                for n in sizes:
                    for think in thinks:
                        cell_tmp = tmp / f"{backend}-{n}-{think}"
                        cell_tmp.mkdir()
                        url = str(cell_tmp / "labels.db") if backend == "sqlite" else _pg.create_database(base_url)
                        r = {"backend": backend, **run_cell(url, cell_tmp, n, votes, think, args.overlap, args,
                                                            users_file, creds_all)}
                        results.append(r)
                        print(json.dumps(r), flush=True)
            finally:
                if cluster is not None:
                    cluster.__exit__(None, None, None)
    md = markdown(results, args, env)
    print("\n" + md)
    out = args.out or (None if args.quick else str(REPO / "benchmarks" / "results_labeling.md"))
    if out:
        Path(out).write_text(md)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
