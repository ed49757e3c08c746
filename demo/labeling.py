"""Labels through the real server: SFT pairs -> label store -> `alignkit label serve` -> simulated annotators -> export."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from alignkit import artifacts
from alignkit.tasks import sentiment
from demo.cache import KeyedCache
from demo.settings import DemoSettings


@dataclass(frozen=True)
class Annotator:
    """A login of the labeling server, used by one simulated annotator."""

    name: str
    password: str


def sample_continuations(spec: str | Path, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float,
                         seed: int, model=None, tokenizer=None) -> dict:
    """Sampled continuations of plain-text prompts, keeping their leading space (prompt + text is the review).

    Returns texts, prompt/response token ids (for log-probabilities) and whether each ended with EOS.
    """
    from alignkit.generation import SamplingParams, generate_batch
    from alignkit.modeling import load_model_for_inference

    if model is None:
        model, tokenizer, _ = load_model_for_inference(str(spec))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=64,
                            num_return_sequences=n)
    out = generate_batch(model, tokenizer, prompts, params)
    eos = tokenizer.eos_token_id
    texts = [tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True).rstrip() for ids in out.response_ids]
    return {"texts": texts, "prompt_ids": out.prompt_ids, "response_ids": out.response_ids, "finished": out.finished,
            "params": params.to_dict()}


def label_pairs(workdir: Path, sft_dir: Path, sft_hash: str, s: DemoSettings, *, log=print) -> dict:
    """Pairs from the SFT stage -> label store -> server on loopback -> simulated annotators -> exported dataset."""
    labels = workdir / "labels"
    cache = KeyedCache(labels / "labeling.json", artifacts.stable_hash({
        "sft": sft_hash, "prompts": s.label_prompts, "overlap": s.overlap, "annotators": s.annotators,
        "noise": s.noise, "seed": s.seed, "max_new_tokens": s.pair_max_new_tokens, "temperature": s.temperature}))
    done = cache.load() if (labels / "export" / "preferences.jsonl").exists() else None
    if done:
        log(f"labels: complete, reused ({done['export']['rows']} preference pairs in {labels / 'export'})")
        return done
    # A fresh store: the old one (if any) was made from another SFT stage or other settings.
    if labels.exists():
        shutil.rmtree(labels)
    labels.mkdir(parents=True)
    t0 = time.time()
    rows = _candidate_pairs(sft_dir, s, log=log)
    t_sample = time.time() - t0
    done = cache.save(_label_and_export(labels, rows, s, log=log)
                      | {"seconds": {"sampling": round(t_sample, 1), "total": round(time.time() - t0, 1)},
                         "settings": {"prompts": s.label_prompts, "overlap": s.overlap, "annotators": s.annotators,
                                      "noise": s.noise}})
    log(f"labels: {done['export']['rows']} preference pairs exported to {labels / 'export'} "
        f"(agree with the oracle: {done['label_accuracy_vs_oracle']:.3f}; dropped: {done['export']['per_reason']})")
    return done


def _candidate_pairs(sft_dir: Path, s: DemoSettings, *, log=print) -> list:
    """Two samples per prompt from the SFT policy, as import rows (pairs with nothing to compare left out)."""
    from alignkit.store.importer import ImportRow

    rng = random.Random(f"label-prompts-{s.seed}")
    pool = sentiment.prompts("train")
    rng.shuffle(pool)
    prompts = [pool[i % len(pool)] for i in range(s.label_prompts)]
    log(f"labels: sampling {len(prompts)} pairs from {sft_dir.name}")
    sampled = sample_continuations(sft_dir, prompts, n=2, max_new_tokens=s.pair_max_new_tokens,
                                   temperature=s.temperature, seed=s.seed + 1)
    rows = []
    for i, prompt in enumerate(prompts):
        a, b = sampled["texts"][2 * i], sampled["texts"][2 * i + 1]
        if not a.strip() or not b.strip() or a == b:
            continue  # nothing to compare
        sampling = [{**sampled["params"], "sample_index": k} for k in (0, 1)]
        rows.append(ImportRow(prompt=prompt, source=f"demo:{i}", responses=[a, b], models=[str(sft_dir)] * 2,
                              sampling=sampling))
    return rows


def _label_and_export(labels: Path, rows: list, s: DemoSettings, *, log=print) -> dict:
    """Import the pairs, label them through the server, export the majority votes; what labeling.json records."""
    from alignkit.store import open_store
    from alignkit.store.agreement import agreement_report
    from alignkit.store.export import export_dataset
    from alignkit.store.importer import import_rows

    db = labels / "labels.db"
    store = open_store(str(db), overlap=s.overlap, pool_size=s.annotators + 8)
    try:
        summary = import_rows(store, rows, progress=False)
        log(f"labels: imported into {db}: {summary}")
        users = _make_annotators(labels / "users.json", s.annotators)
        votes = _serve_and_label(store, labels, users, s, log=log)
        agreement = agreement_report(store)
        exported = export_dataset(store, labels / "export")  # majority; ties, both-bad and disagreements dropped
    finally:
        store.close()
    pref = [json.loads(line) for line in (labels / "export" / "preferences.jsonl").read_text().splitlines()]
    correct = sum(sentiment.raw_score(r["chosen"]) > sentiment.raw_score(r["rejected"]) for r in pref)
    return {
        "comparisons": summary.comparisons,
        "votes": votes,
        "export": {k: v for k, v in exported.items() if k != "store"},
        "label_accuracy_vs_oracle": correct / len(pref) if pref else None,
        "oracle_ties_among_pairs": sum(sentiment.oracle_judge(r.prompt, *r.responses) == "tie" for r in rows) / max(1, len(rows)),
        "agreement": {k: agreement.get(k) for k in ("n_votes", "raw_agreement", "fleiss", "overall") if k in agreement},
    }


def _make_annotators(users_path: Path, n: int) -> list[Annotator]:
    import secrets

    from labeling_ui.users import add_user

    users = [Annotator(f"annotator-{i + 1}", secrets.token_urlsafe(12)) for i in range(n)]
    for user in users:
        add_user(users_path, user.name, user.password)
    return users


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(labels: Path, port: int, s: DemoSettings, server_log) -> subprocess.Popen:
    """`alignkit label serve` with login on loopback, as its own process, exactly as a user starts it.

    Its own process, so it and the annotators' clients do not share one interpreter lock (measured: 30 vs
    23 votes/s here).
    """
    cmd = [sys.executable, "-m", "alignkit.cli", "label", "serve", "--db", str(labels / "labels.db"),
           "--users", str(labels / "users.json"), "--host", "127.0.0.1", "--port", str(port),
           "--overlap", str(s.overlap), "--export-dir", str(labels / "admin-exports"),
           # The annotators are scripts that vote as soon as an item arrives; people get the 0.3 s minimum.
           "--min-display-seconds", "0"]
    return subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def _wait_until_up(proc: subprocess.Popen, url: str, labels: Path) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the labeling server exited with status {proc.returncode}; see {labels / 'server.log'}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (a login page or a refusal): it is up
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"the labeling server did not answer on {url} within 120 s") from None
            time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _serve_and_label(store, labels: Path, users: list[Annotator], s: DemoSettings, *, log=print) -> dict:
    """Start the server on a free port, run the annotators through it, stop it; the votes' numbers."""
    from sqlalchemy import func, select

    from alignkit.store.models import Comparison

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    with open(labels / "server.log", "w") as server_log:
        proc = _start_server(labels, port, s, server_log)
        try:
            _wait_until_up(proc, url, labels)
            with store.read() as session:
                total = session.scalar(select(func.count(Comparison.id))) * s.overlap
            log(f"labels: `alignkit label serve` on {url} (login required, overlap {s.overlap}); {len(users)} simulated "
                f"annotators (oracle + {s.noise:.0%} coin flips) voting through /next_item and /submit_vote")
            result = _annotate(store, url, users, total, s)
        finally:
            _stop(proc)
    if result.get("errors"):
        log(f"labels: {len(result['errors'])} votes refused by the server, e.g. {result['errors'][0]}")
    log(f"labels: {result['votes']} votes in {result['seconds']:.0f}s ({result['votes_per_s']:.0f}/s, "
        f"submit p95 {result['submit_latency_ms']['p95']:.0f} ms)")
    return {k: result[k] for k in ("votes", "per_annotator", "seconds", "votes_per_s", "submit_latency_ms")} | {
        "errors": len(result.get("errors") or []), "expected": total}


def _annotate(store, url: str, users: list[Annotator], total: int, s: DemoSettings) -> dict:
    """The simulated annotators' run against the server, with a progress bar of the votes stored."""
    from labeling_ui.simulate import run_simulated_annotators

    stop = threading.Event()
    watcher = threading.Thread(target=_watch_votes, args=(store, total, stop), daemon=True)
    watcher.start()
    judge = sentiment.noisy_judge(noise=s.noise, seed=s.seed)
    try:
        return run_simulated_annotators(url, [(u.name, u.password) for u in users], judge, None, 0.0, s.seed)
    finally:
        stop.set()
        watcher.join()


def _watch_votes(store, total: int, stop: threading.Event) -> None:
    from sqlalchemy import func, select
    from tqdm.auto import tqdm

    from alignkit.store.models import Vote

    with tqdm(total=total, desc="votes", unit="vote") as bar:
        while not stop.wait(0.5):
            with store.read() as session:
                n = session.scalar(select(func.count(Vote.id)))
            bar.update(n - bar.n)
        with store.read() as session:
            bar.update(session.scalar(select(func.count(Vote.id))) - bar.n)
