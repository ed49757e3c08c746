"""Simulated annotators: label through the real server's API endpoints with gradio_client.

A judge is a callable (prompt, response_a, response_b) -> "a" | "b" | "tie" | "both_bad",
where a is the response shown first. Each annotator runs in its own thread with
its own logged-in client: /next_item, judge, /submit_vote, until the queue is
empty for them or the vote budget is spent; one whose votes are refused
MAX_REFUSED_IN_A_ROW times in a row, or whose /next_item is refused, stops and is
listed under `stopped`. With `noise`, that share of votes is
replaced by a uniformly random choice. With `arena`, they vote on the Arena's blind
battles instead (/arena_next, /arena_vote), as `compare --judge human:DB` queued them.
"""

from __future__ import annotations

import importlib
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from alignkit.errors import UserError
from alignkit.store.models import CHOICES

Judge = Callable[[str, str, str], str]

# An annotator whose votes are refused this many times in a row stops (and says so in the result):
# the server keeps serving a held item it refuses, so retrying would loop forever without --votes.
MAX_REFUSED_IN_A_ROW = 5


def length_judge(prompt: str, response_a: str, response_b: str) -> str:
    """Prefers the longer response; equal lengths are a tie."""
    if len(response_a) == len(response_b):
        return "tie"
    return "a" if len(response_a) > len(response_b) else "b"


def load_judge(spec: str) -> Judge:
    """`length`, `random`, or `python:module:function` (a callable with the judge signature)."""
    if spec == "length":
        return length_judge
    if spec == "random":
        rng = random.Random(0)
        lock = threading.Lock()

        def random_judge(prompt, a, b):
            with lock:
                return rng.choice(CHOICES)

        return random_judge
    if spec.startswith("python:"):
        parts = spec.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise UserError(f"judge {spec!r}: expected python:module:function")
        try:
            fn = getattr(importlib.import_module(parts[1]), parts[2])
        except (ImportError, AttributeError) as err:
            raise UserError(f"judge {spec!r}: cannot load ({err})") from None
        if not callable(fn):
            raise UserError(f"judge {spec!r} is not callable")
        return fn
    raise UserError(f"unknown judge {spec!r}: use length, random or python:module:function")


def _percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p95": None, "p99": None}
    import numpy as np

    a = np.asarray(xs) * 1000.0
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 95, 99)}


def connect(url: str, auth: tuple[str, str] | None):
    from gradio_client import Client

    try:
        # ssl_verify only matters for https; for plain http turning it off skips building a TLS
        # context (loading the CA bundle) on every call, which costs tens of ms per request.
        return Client(url, auth=auth, verbose=False, download_files=False, ssl_verify=url.startswith("https://"))
    except Exception as err:  # connection refused, bad login, not a Gradio app
        who = f" as {auth[0]}" if auth else ""
        raise UserError(f"cannot connect to {url}{who}: {str(err).strip().splitlines()[0] if str(err) else type(err).__name__}") from None


def run_simulated_annotators(url: str, users: Sequence[tuple[str, str]] | None, judge: Judge, n_votes_max: int | None = None,
                             noise: float = 0.0, seed: int = 0, *, clients_without_auth: int = 1, arena: bool = False,
                             dwell: float = 0.0) -> dict:
    """Label through the server at `url` as each of `users` (name, password) at once.

    users=None: a server started with --no-auth; `clients_without_auth` clients then all
    act as its one local annotator. `dwell`: seconds each item is looked at before the vote
    (a server refuses votes sooner than its --min-display-seconds). Returns counts,
    throughput and submit latencies (ms).
    """
    from gradio_client.exceptions import AppError

    if not 0.0 <= noise <= 1.0:
        raise UserError(f"noise must be between 0 and 1, got {noise}")
    next_api, vote_api = ("/arena_next", "/arena_vote") if arena else ("/next_item", "/submit_vote")
    logins: list[tuple[str, str] | None] = list(users) if users else [None] * clients_without_auth
    if not logins:
        raise UserError("no annotators to simulate")
    lock = threading.Lock()
    state = {"reserved": 0}
    latencies: list[float] = []
    per: dict[str, int] = {}
    errors: list[str] = []
    stopped: list[str] = []  # annotators that gave up: refused votes in a row, or the server refused them

    def reserve() -> bool:
        with lock:
            if n_votes_max is not None and state["reserved"] >= n_votes_max:
                return False
            state["reserved"] += 1
            return True

    def release() -> None:
        with lock:
            state["reserved"] -= 1

    def annotate(i: int) -> None:
        auth = logins[i]
        name = auth[0] if auth else f"local#{i}"
        rng = random.Random(seed * 1000 + i)
        client = connect(url, auth)
        done = refused = 0
        try:
            while reserve():
                try:
                    cid, prompt, a, b = client.predict(api_name=next_api)
                except AppError as err:  # e.g. the user was removed from the users file
                    release()
                    with lock:
                        errors.append(f"{name}: {err}")
                        stopped.append(name)
                    break
                if cid is None:
                    release()
                    break
                choice = judge(prompt, a, b)
                if choice not in CHOICES:
                    raise UserError(f"judge returned {choice!r}, expected one of {', '.join(CHOICES)}")
                if noise and rng.random() < noise:
                    choice = rng.choice(CHOICES)
                if dwell:
                    time.sleep(dwell)
                t0 = time.perf_counter()
                try:
                    extra = {} if arena else {"rationale": ""}
                    client.predict(comparison_id=cid, choice=choice, api_name=vote_api, **extra)
                except AppError as err:
                    release()
                    refused += 1
                    give_up = refused >= MAX_REFUSED_IN_A_ROW
                    with lock:
                        errors.append(f"{name}: {err}")
                        if give_up:
                            stopped.append(name)
                    if give_up:
                        break
                    continue
                dt = time.perf_counter() - t0
                done, refused = done + 1, 0
                with lock:
                    latencies.append(dt)
        finally:
            with lock:
                per[name] = done
            client.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(logins)) as pool:
        for f in [pool.submit(annotate, i) for i in range(len(logins))]:
            f.result()
    seconds = time.perf_counter() - t0
    votes = sum(per.values())
    return {"votes": votes, "per_annotator": per, "errors": errors, "stopped": sorted(stopped), "seconds": seconds,
            "votes_per_s": votes / seconds if seconds else None, "submit_latency_ms": _percentiles(latencies)}
