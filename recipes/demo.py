"""`alignkit demo`: the whole loop offline, on a task with a known oracle, with numbers that could have come out badly.

A miniature of the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023):

  1. the tiny Llama, pretrained on a synthetic review corpus (cached), and SFT on
     tone-balanced continuations of review openings;
  2. candidate pairs sampled from the SFT stage, imported into a label store, and
     labeled by simulated annotators (the lexicon oracle + noise) through the real
     labeling server on loopback, with overlap; the votes exported as a
     preference dataset;
  3. reward, PPO and DPO stages — plus a small DPO-beta / PPO-KL sweep — from
     recipes/configs/demo/demo.yaml, through the same runner as `alignkit run`;
  4. SFT vs each aligned policy judged blind by the oracle and by the reward model,
     win rates with bootstrap CIs, KL to the SFT policy on sampled responses, and
     the reward model's accuracy against the oracle on held-out pairs;
  5. DIR/report.md, DIR/demo.json and PNG plots.

Every step is reused on a second run: the pretrained model by its settings hash,
the labels by the SFT stage's hash and the labeling settings, the stages by the
runner's skip logic, and evaluations by the evaluated stages' hashes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit import artifacts
from alignkit.tasks import sentiment
from alignkit.tasks.pretrain import PretrainSettings, pretrained_tiny_model

TEMPLATE = Path(__file__).resolve().parent / "configs" / "demo" / "demo.yaml"
BASE_PLACEHOLDER = "PRETRAINED_TINY_MODEL"
ALIGNED = ("dpo", "ppo")  # the models the claims are about; sweep stages are named <kind>_<knob><value>

# The claims the demo checks (issue 6); demo.json records each as true or false.
CLAIM_RM_ACCURACY = 0.85
CLAIM_WIN_RATE = 0.65


@dataclass
class DemoSettings:
    """Sizes of everything the demo does outside the recipe (the recipe holds the training settings)."""

    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    sft_rows: int = 1200
    label_prompts: int = 1300  # comparisons to label (one pair of SFT samples per prompt)
    overlap: int = 2  # votes per comparison, from distinct annotators (a split vote is dropped)
    annotators: int = 6
    noise: float = 0.2  # share of votes replaced by a coin flip
    pair_max_new_tokens: int = 32
    eval_prompts: int = 0  # 0: every eval-split prompt
    eval_max_new_tokens: int = 48
    temperature: float = 1.0  # sampling for pairs and evaluation: the policies' own distributions
    bootstrap: int = 1000
    seed: int = 0
    # Processes training stages at once after labeling: the reward -> PPO lane beside the DPO lane.
    workers: int = int(os.environ.get("ALIGNKIT_DEMO_WORKERS", "2"))
    recipe_overrides: list[str] = field(default_factory=list)  # --set style, applied to the template

    @classmethod
    def quick(cls) -> "DemoSettings":
        """A smoke run: same code path, tiny sizes; the claims are not expected to hold."""
        return cls(
            pretrain=PretrainSettings(corpus_size=3000, steps=80),
            sft_rows=200, label_prompts=60, overlap=2, annotators=3, eval_prompts=48, bootstrap=200,
            recipe_overrides=[
                "stages.sft.train.max_steps=6",
                "stages.reward.train.max_steps=8",
                "stages.reward.data.eval_fraction=0.2",
                "stages.ppo.train.steps=2", "stages.ppo.train.rollout_batch_size=8",
                "stages.ppo.train.min_reward_accuracy=0",
                "stages.ppo_kl03.train.steps=2", "stages.ppo_kl03.train.rollout_batch_size=8",
                "stages.ppo_kl03.train.min_reward_accuracy=0",
                "stages.dpo.train.max_steps=4", "stages.dpo_beta01.train.max_steps=4",
            ],
        )


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def demo_from_cli(args) -> int:
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    result = run_demo(args.workdir, settings, quick=args.quick)
    print(f"\nalignkit demo: done in {result['wall_seconds']:.0f}s — {Path(args.workdir) / 'report.md'}")
    for line in _claim_lines(result):
        print("  " + line)
    return 0


def run_demo(workdir: str | Path, settings: DemoSettings | None = None, *, quick: bool = False, log=print) -> dict:
    """Run (or reuse) every step of the demo in `workdir`; returns what demo.json holds."""
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    start, cpu_start = time.time(), _cpu_seconds()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _quiet_libraries()
    timings: dict[str, float] = {}

    def step(name: str):
        return _Step(name, timings, log)

    log(f"alignkit demo{' (quick)' if quick else ''}: workdir {workdir}")
    with step("pretrained model"):
        base = pretrained_tiny_model(None, settings.pretrain, log=log)
    with step("data"):
        _write_data(workdir, settings)
        recipe = _write_recipe(workdir, base, settings.recipe_overrides)

    from recipes.runner import run_recipe

    with step("sft stage"):
        records = run_recipe(recipe.with_name("recipe.sft.yaml"), log=log)
    with step("labeling"):
        labeling = label_pairs(workdir, workdir / "run" / "sft", records["sft"]["config_hash"], settings, log=log)
    with step("reward, ppo, dpo stages"):
        records = run_stages(recipe, workers=settings.workers, log=log)
    with step("evaluation"):
        evaluation = evaluate(workdir, records, settings, log=log)
    wall = time.time() - start
    result = _summarise(workdir, records, labeling, evaluation, settings, timings, wall, quick)
    with step("report"):
        _write_outputs(workdir, result, evaluation)
    result["wall_seconds"] = round(time.time() - start, 1)
    result["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 1)
    artifacts.write_json_atomic(workdir / "demo.json", result)
    return result


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (lanes, the labeling server)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class _Step:
    """Times a step (wall and CPU) and prints a header, so progress reads as a list of steps.

    CPU seconds are recorded beside wall seconds because on a shared machine the wall time depends on
    what else runs; the CPU time of a step barely does.
    """

    def __init__(self, name: str, timings: dict, log):
        self.name, self.timings, self.log = name, timings, log

    def __enter__(self):
        self.log(f"\n== {self.name}")
        self.t0, self.c0 = time.time(), _cpu_seconds()

    def __exit__(self, *exc):
        self.timings[self.name] = round(time.time() - self.t0, 1)
        self.timings.setdefault("cpu", {})[self.name] = round(_cpu_seconds() - self.c0, 1)
        if exc[0] is None:
            self.log(f"== {self.name}: {self.timings[self.name]:.0f}s")


def _quiet_libraries() -> None:
    """Threads and log levels for a small model on a small CPU."""
    import torch

    # A 1M-parameter model gains nothing from intra-op threads, and on a shared 2-core machine extra
    # threads spin against each other (a forward pass measured 20x slower with 2 threads under load).
    torch.set_num_threads(int(os.environ.get("ALIGNKIT_DEMO_THREADS", "1")))
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------------
# 1. Data and recipe
# ---------------------------------------------------------------------------------------------


def _write_jsonl_if_changed(path: Path, rows: list[dict]) -> None:
    """Write rows unless the file already holds exactly them (so fingerprints and mtimes stay put)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_data(workdir: Path, s: DemoSettings) -> None:
    data = workdir / "data"
    _write_jsonl_if_changed(data / "sft.jsonl", sentiment.sft_rows(s.sft_rows, seed=s.seed))
    _write_jsonl_if_changed(data / "prompts_train.jsonl", [{"prompt": p} for p in sentiment.prompts("train")])
    _write_jsonl_if_changed(data / "prompts_eval.jsonl", [{"prompt": p} for p in _eval_prompts(s)])


def _eval_prompts(s: DemoSettings) -> list[str]:
    prompts = sentiment.prompts("eval")
    return prompts[: s.eval_prompts] if s.eval_prompts else prompts


def _write_recipe(workdir: Path, base: Path, overrides: list[str]) -> Path:
    """The template with the pretrained model as base and the settings' overrides applied, as workdir/recipe.yaml."""
    from alignkit.config import apply_override

    raw = yaml.safe_load(TEMPLATE.read_text())
    raw["model"]["base"] = str(base)
    for item in overrides:
        apply_override(raw, item)
    header = (f"# Written by `alignkit demo` from {TEMPLATE.relative_to(TEMPLATE.parents[3])}"
              f"{' with ' + ', '.join(overrides) if overrides else ''}.\n"
              f"# Re-run by hand: alignkit run {workdir / 'recipe.yaml'}\n")
    path = workdir / "recipe.yaml"
    _write_text_if_changed(path, header + yaml.safe_dump(raw, sort_keys=False))
    # The runner fingerprints every stage's data up front, and the preference data does not exist until the
    # labels are in: the SFT stage runs from a copy holding only it (same stage, so the same hash and directory).
    sft_only = dict(raw, stages=[st for st in raw["stages"] if st["name"] == "sft"])
    _write_text_if_changed(workdir / "recipe.sft.yaml", "# The SFT stage of recipe.yaml alone (run before labeling).\n"
                           + yaml.safe_dump(sft_only, sort_keys=False))
    return path


def _write_text_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# ---------------------------------------------------------------------------------------------
# 2. Labeling through the real server
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    key = artifacts.stable_hash({"sft": sft_hash, "prompts": s.label_prompts, "overlap": s.overlap,
                                 "annotators": s.annotators, "noise": s.noise, "seed": s.seed,
                                 "max_new_tokens": s.pair_max_new_tokens, "temperature": s.temperature})
    done_path = labels / "labeling.json"
    if done_path.exists() and (labels / "export" / "preferences.jsonl").exists():
        done = json.loads(done_path.read_text())
        if done.get("key") == key:
            log(f"labels: complete, reused ({done['export']['rows']} preference pairs in {labels / 'export'})")
            return done
    # A fresh store: the old one (if any) was made from another SFT stage or other settings.
    if labels.exists():
        shutil.rmtree(labels)
    labels.mkdir(parents=True)
    t0 = time.time()

    # Candidate pairs: two samples per prompt from the SFT policy.
    rng = random.Random(f"label-prompts-{s.seed}")
    pool = sentiment.prompts("train")
    rng.shuffle(pool)
    prompts = [pool[i % len(pool)] for i in range(s.label_prompts)]
    log(f"labels: sampling {len(prompts)} pairs from {sft_dir.name}")
    sampled = sample_continuations(sft_dir, prompts, n=2, max_new_tokens=s.pair_max_new_tokens,
                                   temperature=s.temperature, seed=s.seed + 1)
    t_sample = time.time() - t0

    from alignkit.store import open_store
    from alignkit.store.export import export_dataset
    from alignkit.store.importer import ImportRow, import_rows

    rows = []
    for i, prompt in enumerate(prompts):
        a, b = sampled["texts"][2 * i], sampled["texts"][2 * i + 1]
        if not a.strip() or not b.strip() or a == b:
            continue  # nothing to compare
        sampling = [{**sampled["params"], "sample_index": k} for k in (0, 1)]
        rows.append(ImportRow(prompt=prompt, source=f"demo:{i}", responses=[a, b], models=[str(sft_dir)] * 2,
                              sampling=sampling))
    db = labels / "labels.db"
    store = open_store(str(db), overlap=s.overlap, pool_size=s.annotators + 8)
    try:
        summary = import_rows(store, rows, progress=False)
        log(f"labels: imported into {db}: {summary}")
        users = _make_annotators(labels / "users.json", s.annotators, s.seed)
        votes = _serve_and_label(store, labels, users, s, log=log)
        from alignkit.store.agreement import agreement_report

        agreement = agreement_report(store)
        exported = export_dataset(store, labels / "export")  # majority; ties, both-bad and disagreements dropped
    finally:
        store.close()
    pref = [json.loads(line) for line in (labels / "export" / "preferences.jsonl").read_text().splitlines()]
    correct = sum(sentiment.raw_score(r["chosen"]) > sentiment.raw_score(r["rejected"]) for r in pref)
    done = {
        "key": key,
        "comparisons": summary.comparisons,
        "votes": votes,
        "export": {k: v for k, v in exported.items() if k != "store"},
        "label_accuracy_vs_oracle": correct / len(pref) if pref else None,
        "oracle_ties_among_pairs": sum(sentiment.oracle_judge(r.prompt, *r.responses) == "tie" for r in rows) / max(1, len(rows)),
        "agreement": {k: agreement.get(k) for k in ("n_votes", "raw_agreement", "fleiss", "overall") if k in agreement},
        "seconds": {"sampling": round(t_sample, 1), "total": round(time.time() - t0, 1)},
        "settings": {"prompts": s.label_prompts, "overlap": s.overlap, "annotators": s.annotators, "noise": s.noise},
    }
    artifacts.write_json_atomic(done_path, done)
    log(f"labels: {exported['rows']} preference pairs exported to {labels / 'export'} "
        f"(agree with the oracle: {done['label_accuracy_vs_oracle']:.3f}; dropped: {exported['per_reason']})")
    return done


def _make_annotators(users_path: Path, n: int, seed: int) -> list[tuple[str, str]]:
    import secrets

    from labeling_ui.users import add_user

    users = [(f"annotator-{i + 1}", secrets.token_urlsafe(12)) for i in range(n)]
    for name, password in users:
        add_user(users_path, name, password)
    return users


def _serve_and_label(store, labels: Path, users: list[tuple[str, str]], s: DemoSettings, *, log=print) -> dict:
    """Start `alignkit label serve` (login, loopback, a free port), run the annotators through it, stop it.

    The server is its own process, exactly as a user starts it, so it and the annotators' clients do not
    share one interpreter lock (measured: 30 vs 23 votes/s here).
    """
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from sqlalchemy import func, select

    from alignkit.store.models import Comparison
    from labeling_ui.simulate import run_simulated_annotators

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "-m", "alignkit.cli", "label", "serve", "--db", str(labels / "labels.db"),
           "--users", str(labels / "users.json"), "--host", "127.0.0.1", "--port", str(port),
           "--overlap", str(s.overlap), "--export-dir", str(labels / "admin-exports"),
           # The annotators are scripts that vote as soon as an item arrives; people get the 0.3 s minimum.
           "--min-display-seconds", "0"]
    server_log = open(labels / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the labeling server exited with status {proc.returncode}; see {labels / 'server.log'}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (a login page or a refusal): it is up
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"the labeling server did not answer on {url} within 120 s") from None
                time.sleep(0.3)
        with store.read() as session:
            total = session.scalar(select(func.count(Comparison.id))) * s.overlap
        log(f"labels: `alignkit label serve` on {url} (login required, overlap {s.overlap}); {len(users)} simulated "
            f"annotators (oracle + {s.noise:.0%} coin flips) voting through /next_item and /submit_vote")
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_votes, args=(store, total, stop), daemon=True)
        watcher.start()
        judge = sentiment.noisy_judge(noise=s.noise, seed=s.seed)
        try:
            result = run_simulated_annotators(url, users, judge, None, 0.0, s.seed)
        finally:
            stop.set()
            watcher.join()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server_log.close()
    if result.get("errors"):
        log(f"labels: {len(result['errors'])} votes refused by the server, e.g. {result['errors'][0]}")
    log(f"labels: {result['votes']} votes in {result['seconds']:.0f}s ({result['votes_per_s']:.0f}/s, "
        f"submit p95 {result['submit_latency_ms']['p95']:.0f} ms)")
    return {k: result[k] for k in ("votes", "per_annotator", "seconds", "votes_per_s", "submit_latency_ms")} | {
        "errors": len(result.get("errors") or []), "expected": total}


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


# ---------------------------------------------------------------------------------------------
# 3. Stages after labeling: two lanes in parallel
# ---------------------------------------------------------------------------------------------


def stage_lanes(recipe: Path) -> list[list[str]]:
    """The recipe's stages after SFT split into independent lanes: reward and the stages needing it; the rest."""
    from alignkit.config import load_recipe, order_stages
    from recipes.runner import RECIPES

    cfg = load_recipe(recipe, stage_kinds=RECIPES)
    ordered = [st for st in order_stages(cfg.stages) if st.name != "sft"]
    rewards = {st.name for st in ordered if st.kind == "reward"}
    lane_a = [st.name for st in ordered if st.name in rewards or st.reward in rewards]
    lane_b = [st.name for st in ordered if st.name not in lane_a]
    return [lane for lane in (lane_a, lane_b) if lane]


def run_stages(recipe: Path, *, workers: int = 2, log=print) -> dict[str, dict]:
    """Run every stage of the recipe through the runner; with workers > 1, independent lanes in parallel processes.

    Each lane is `run_recipe(recipe, only=lane)` in a spawned process (the runner's library entry point, one
    thread each): on two cores the reward -> PPO lane and the DPO lane take about half the time one after the
    other would. Afterwards the runner is called once more here: every stage is complete, so it only collects
    the records (and would train anything a lane left undone).
    """
    from recipes.runner import run_recipe

    lanes = stage_lanes(recipe)
    todo: list[str] = []
    run_recipe(recipe, dry_run=True, log=lambda line: todo.append(line) if "would train" in line else None)
    if workers > 1 and len(lanes) > 1 and todo:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        threads = int(os.environ.get("ALIGNKIT_DEMO_THREADS", "1"))
        procs = []
        for tag, lane in zip("AB", lanes):
            log(f"lane {tag}: {' -> '.join(lane)}")
            proc = ctx.Process(target=_run_lane, args=(str(recipe), lane, f"[lane {tag}] ", threads), daemon=False)
            proc.start()
            procs.append((tag, lane, proc))
        run_dir = recipe.parent / "run"
        seen: dict[str, str] = {}
        try:
            while any(p.is_alive() for _, _, p in procs):
                time.sleep(3)
                for _, lane, _ in procs:
                    for name in lane:
                        status = _stage_status(run_dir / name)
                        if status and seen.get(name) != status:
                            seen[name] = status
                            log(f"  {name}: {status}")
        except KeyboardInterrupt:
            for _, _, p in procs:
                p.terminate()
            raise
        for tag, lane, p in procs:
            p.join()
            if p.exitcode != 0:
                from alignkit.errors import TrainingDiverged, UserError

                what = f"lane {tag} ({', '.join(lane)}) failed with exit status {p.exitcode}; see its output above"
                raise (TrainingDiverged if p.exitcode == 3 else UserError)(what)
    if not todo:
        log("every stage is complete with this recipe and data: skipped")
    return run_recipe(recipe, log=lambda line: None if "complete, skipped" in line else log(line))


def _stage_status(stage_dir: Path) -> str | None:
    """A one-line progress note for a stage being trained by a lane (PPO logs per step; Trainer stages print their own)."""
    if artifacts.is_complete(stage_dir):
        return "complete"
    log_path = stage_dir / "ppo_log.jsonl"
    if log_path.exists():
        lines = log_path.read_text().splitlines()
        if lines:
            try:
                last = json.loads(lines[-1])
                return f"PPO step {last['step']}: mean reward {last['mean_reward']:.3g}, KL {last['kl']:.3g}"
            except (json.JSONDecodeError, KeyError):
                return None
    return "training" if (stage_dir / artifacts.PENDING_JSON).exists() else None


def _lane_log(prefix: str, message: str) -> None:
    if "complete, skipped" not in message:
        print(prefix + message, flush=True)


def _run_lane(recipe: str, lane: list[str], prefix: str, threads: int) -> None:
    """Body of a lane process: the runner on these stages (their parents are complete or in the lane)."""
    import functools
    import sys

    os.environ["TQDM_DISABLE"] = "1"  # two processes' progress bars would overwrite each other
    os.environ["ALIGNKIT_DEMO_THREADS"] = str(threads)
    _quiet_libraries()
    from alignkit.errors import TrainingDiverged, UserError
    from recipes.runner import run_recipe

    try:
        run_recipe(recipe, only=lane, log=functools.partial(_lane_log, prefix))
    except UserError as err:
        print(f"{prefix}alignkit: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingDiverged as err:
        print(f"{prefix}alignkit: training diverged: {err}", file=sys.stderr, flush=True)
        sys.exit(3)


# ---------------------------------------------------------------------------------------------
# 4. Evaluation: oracle and reward-model judges, KL to SFT, reward-model accuracy
# ---------------------------------------------------------------------------------------------


def _sequence_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                       batch_size: int = 64) -> list[float]:
    """log p(response | prompt) under `model`, summed over the response's tokens (EOS included)."""
    import torch

    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            P, R = prompt_ids[start : start + batch_size], response_ids[start : start + batch_size]
            seqs = [p + r for p, r in zip(P, R)]
            width = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, x in enumerate(seqs):
                ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            for i, (p, r) in enumerate(zip(P, R)):
                out.append(logp[i, len(p) - 1 : len(p) - 1 + len(r)].sum().item())
    return out


def rm_agrees(heldout: list[tuple[float, float]]) -> list[bool]:
    """Per (oracle difference, reward-model difference) of a pair the oracle does not tie: same sign.

    A reward-model tie (difference 0) picks neither side, so it is not correct whichever the oracle prefers.
    """
    return [r != 0 and (d > 0) == (r > 0) for d, r in heldout]


def _sample_seed(seed: int, name: str) -> int:
    """The sampling seed of one policy: from its name, not its place in the list, so adding or reordering
    stages leaves every other policy's samples (and their cache) as they were."""
    return int(artifacts.stable_hash({"seed": seed, "model": name})[:8], 16)


def kl_to_reference(logp: list[float], logp_ref: list[float], *, temperature: float, top_p: float,
                    rounds: int = 1000, seed: int = 0) -> dict:
    """KL(π ‖ π_ref) in nats per response: the k1 estimate, mean of log π(y|x) − log π_ref(y|x) over y ~ π.

    Returns {kl, ci_low, ci_high (95% percentile bootstrap over prompts), se, n}. k1 is unbiased but
    noisy, and on few samples can even come out negative: the interval says how far to trust it. It is
    unbiased only for samples drawn from π itself; with temperature != 1 or top_p < 1 they come from a
    reshaped distribution and the mean is not KL(π ‖ π_ref), so such samples are refused.
    """
    import numpy as np
    from scipy.stats import sem

    from alignkit.errors import UserError
    from alignkit.stats import bootstrap_mean_ci

    if temperature != 1.0 or top_p < 1.0:
        raise UserError(f"KL to the reference needs samples from the policy itself (temperature 1, top_p 1), "
                        f"got temperature={temperature}, top_p={top_p}")
    d = np.asarray(logp, dtype=float) - np.asarray(logp_ref, dtype=float)
    if d.size == 0:
        raise UserError("KL to the reference: no samples")
    lo, hi = bootstrap_mean_ci(d, rounds, seed)
    return {"kl": float(d.mean()), "ci_low": lo, "ci_high": hi,
            "se": float(sem(d)) if d.size > 1 else float("nan"), "n": int(d.size)}


def _compare_vs_sft(workdir: Path, policies: list[str], prompts: list[str], samples: dict[str, dict], judge: str,
                    s: DemoSettings, *, log=print) -> dict:
    """Blind A/B of every policy pair with `alignkit compare`'s judging and statistics, on the demo's samples.

    `alignkit.compare.judge_all` randomises sides per (pair, prompt) and asks the judge; `summarise` gives
    wins / losses / ties, the win rate with a bootstrap CI and Bradley–Terry ratings. The responses are the
    ones the KL is measured on, so the win rates and the frontier describe the same samples (and a
    continuation keeps its leading space, which the reward model needs to see the review as written).
    """
    from alignkit.compare import judge_all, summarise
    from alignkit.judges import load_judge

    kind = judge.split(":", 1)[0]
    out = workdir / "compare" / f"{kind}.json"
    names = [n for n in policies if n != "sft"] + ["sft"]  # SFT last: each pair (model, sft) counts the model's wins
    responses = {n: samples[n]["texts"] for n in names}
    # "statistics" names the method, so results computed by an older one (battle bootstrap) are recomputed.
    key = artifacts.stable_hash({"judge": judge, "responses": responses, "bootstrap": s.bootstrap, "seed": s.seed,
                                 "judge_stage": _stage_hash_of(judge), "statistics": "prompt-clusters"})
    cached = json.loads(out.read_text()) if out.exists() else None
    if cached and cached.get("key") == key:
        result = cached
    else:
        log(f"eval: compare {', '.join(names)} with judge {judge}")
        battles = judge_all(load_judge(judge), prompts, responses, s.seed)
        result = {"key": key, "judge": judge, "n_prompts": len(prompts), "seed": s.seed, "bootstrap": s.bootstrap,
                  **summarise(names, battles, responses, bootstrap=s.bootstrap, seed=s.seed)}
        out.parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_json_atomic(out, result)
    vs_sft = {p["model_a"]: {k: p.get(k) for k in ("win_rate", "ci_low", "ci_high", "ci_method", "wins", "losses", "ties", "n")}
              for p in result["pairs"] if p["model_b"] == "sft"}
    return {"vs_sft": vs_sft, "dir": str(out), "ratings": result.get("ratings"),
            "ratings_warning": result.get("ratings_warning")}


def _stage_hash_of(judge: str) -> str | None:
    kind, _, arg = judge.partition(":")
    return (artifacts.read_stage(arg) or {}).get("config_hash") if kind == "reward" else None


def evaluate(workdir: Path, records: dict[str, dict], s: DemoSettings, *, log=print) -> dict:
    """Samples from every policy stage on the eval prompts; oracle / RM win rates vs SFT; KL to SFT; RM accuracy."""
    from alignkit.modeling import load_model_for_inference
    from alignkit.reward_model import load_reward_scorer

    eval_dir = workdir / "eval"
    eval_dir.mkdir(exist_ok=True)
    prompts = _eval_prompts(s)
    policies = [name for name, rec in records.items() if rec.get("kind") in ("sft", "dpo", "ppo")]
    run_dir = workdir / "run"
    knobs = {"prompts": prompts, "max_new_tokens": s.eval_max_new_tokens, "temperature": s.temperature, "seed": s.seed}
    sft_hash = records["sft"]["config_hash"]

    # Samples and log-probabilities, cached per stage hash: a warm run re-evaluates nothing.
    samples: dict[str, dict] = {}
    sft_model = sft_tok = None
    for name in policies:
        seed = _sample_seed(s.seed, name)
        key = artifacts.stable_hash({"stage": records[name]["config_hash"], "sft": sft_hash, **knobs, "sample_seed": seed})
        path = eval_dir / f"samples_{name}.json"
        cached = json.loads(path.read_text()) if path.exists() else None
        if cached and cached.get("key") == key:
            samples[name] = cached
            continue
        log(f"eval: sampling {len(prompts)} responses from {name}")
        model, tok, _ = load_model_for_inference(str(run_dir / name))
        sampled = sample_continuations(run_dir / name, prompts, n=1, max_new_tokens=s.eval_max_new_tokens,
                                       temperature=s.temperature, seed=seed, model=model, tokenizer=tok)
        own = _sequence_logprobs(model, sampled["prompt_ids"], sampled["response_ids"], tok.pad_token_id)
        if name == "sft":
            sft_model, sft_tok, ref = model, tok, own
        else:
            if sft_model is None:
                sft_model, sft_tok, _ = load_model_for_inference(str(run_dir / "sft"))
            ref = _sequence_logprobs(sft_model, sampled["prompt_ids"], sampled["response_ids"], sft_tok.pad_token_id)
            del model
        samples[name] = {"key": key, "texts": sampled["texts"], "finished": sampled["finished"],
                         "lengths": [len(r) for r in sampled["response_ids"]], "logp": own, "logp_sft": ref,
                         "params": sampled["params"]}
        artifacts.write_json_atomic(path, samples[name])

    # Reward-model accuracy against the oracle: fresh SFT pairs on the eval prompts, oracle ties left out.
    reward_dir = run_dir / "reward"
    rm_key = artifacts.stable_hash({"reward": records["reward"]["config_hash"], **knobs})
    rm_path = eval_dir / "reward_model.json"
    rm = json.loads(rm_path.read_text()) if rm_path.exists() else None
    if not rm or rm.get("key") != rm_key:
        log("eval: reward model vs oracle on held-out pairs")
        if sft_model is None:
            sft_model, sft_tok, _ = load_model_for_inference(str(run_dir / "sft"))
        pairs = sample_continuations(run_dir / "sft", prompts, n=2, max_new_tokens=s.eval_max_new_tokens,
                                     temperature=s.temperature, seed=s.seed + 2, model=sft_model, tokenizer=sft_tok)
        scorer = load_reward_scorer(reward_dir, batch_size=64)
        a_texts, b_texts = pairs["texts"][0::2], pairs["texts"][1::2]
        rm = {"key": rm_key, "a": a_texts, "b": b_texts,
              "rm_a": scorer.score(prompts, a_texts), "rm_b": scorer.score(prompts, b_texts)}
        artifacts.write_json_atomic(rm_path, rm)
        del scorer
    del sft_model
    heldout = [(sentiment.raw_score(a) - sentiment.raw_score(b), ra - rb)
               for a, b, ra, rb in zip(rm["a"], rm["b"], rm["rm_a"], rm["rm_b"])
               if sentiment.raw_score(a) != sentiment.raw_score(b)]
    rm_correct = rm_agrees(heldout)
    by_gap: dict[str, list[bool]] = {}
    for (d, _), ok in zip(heldout, rm_correct):
        by_gap.setdefault(str(min(abs(d), 5)) + ("+" if abs(d) >= 5 else ""), []).append(ok)

    # Win rates vs SFT: `alignkit compare` with the oracle judge and with the reward-model judge.
    win_oracle = _compare_vs_sft(workdir, policies, prompts, samples, "oracle:sentiment", s, log=log)
    win_rm = _compare_vs_sft(workdir, policies, prompts, samples, f"reward:{reward_dir}", s, log=log)

    kl, kl_ci, oracle_score = {}, {}, {}
    for name in policies:
        m = samples[name]
        oracle_score[name] = statistics.fmean(sentiment.score(t) for t in m["texts"])
        if name == "sft":
            kl[name] = 0.0
            continue
        est = kl_to_reference(m["logp"], m["logp_sft"], temperature=m["params"]["temperature"],
                              top_p=m["params"]["top_p"], rounds=s.bootstrap, seed=s.seed)
        kl[name], kl_ci[name] = est["kl"], est
    return {
        "prompts": prompts,
        "policies": policies,
        "samples": samples,
        "rm_accuracy": statistics.fmean(rm_correct) if rm_correct else float("nan"),
        "rm_pairs": len(rm_correct),
        "rm_accuracy_by_gap": {k: {"accuracy": statistics.fmean(v), "pairs": len(v)} for k, v in sorted(by_gap.items())},
        "rm_heldout": heldout,
        "win_rate": win_oracle["vs_sft"],
        "win_rate_reward_model": win_rm["vs_sft"],
        "compare": {"oracle": win_oracle["dir"], "reward_model": win_rm["dir"],
                    "ratings_oracle": win_oracle.get("ratings"), "ratings_reward_model": win_rm.get("ratings"),
                    "ratings_warning_oracle": win_oracle.get("ratings_warning"),
                    "ratings_warning_reward_model": win_rm.get("ratings_warning")},
        "kl": kl,
        "kl_ci": kl_ci,
        "oracle_score": oracle_score,
        "mean_length": {n: statistics.fmean(samples[n]["lengths"]) for n in policies},
        "eos_fraction": {n: statistics.fmean(samples[n]["finished"]) for n in policies},
    }


# ---------------------------------------------------------------------------------------------
# 5. demo.json, report.md, plots
# ---------------------------------------------------------------------------------------------


def claims_of(ev: dict) -> dict[str, bool]:
    """The demo's claims (issue 6), each true or false, from evaluate()'s rm_accuracy, win_rate and kl."""

    def vs_sft(m: str, key: str) -> float:
        # None where the pair had no battles: the claim fails rather than the comparison raising TypeError.
        value = ev["win_rate"].get(m, {}).get(key)
        return float("nan") if value is None else value

    return {
        f"rm_accuracy >= {CLAIM_RM_ACCURACY}": ev["rm_accuracy"] >= CLAIM_RM_ACCURACY,
        **{f"{m} win_rate >= {CLAIM_WIN_RATE} and ci_low > 0.5 vs sft":
           vs_sft(m, "win_rate") >= CLAIM_WIN_RATE and vs_sft(m, "ci_low") > 0.5 for m in ALIGNED},
        "kl reported for every model": all(m in ev["kl"] for m in ALIGNED),
    }


def _summarise(workdir: Path, records: dict, labeling: dict, ev: dict, s: DemoSettings, timings: dict,
               wall: float, quick: bool) -> dict:
    claims = claims_of(ev)
    stage_info = {}
    for name, rec in records.items():
        metrics = rec.get("metrics", {})
        stage_info[name] = {"kind": rec.get("kind"), "wall_seconds": rec.get("wall_seconds"),
                            "train": rec.get("config", {}).get("train"),
                            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    return {
        "rm_accuracy": round(ev["rm_accuracy"], 4),
        "win_rate": {m: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in w.items()} for m, w in ev["win_rate"].items()},
        "kl": {m: round(v, 4) for m, v in ev["kl"].items() if m != "sft"},
        "kl_ci": {m: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items() if k != "kl"}
                  for m, c in ev["kl_ci"].items()},
        "wall_seconds": round(wall, 1),
        "quick": quick,
        "claims": claims,
        "rm_heldout_pairs": ev["rm_pairs"],
        "rm_accuracy_by_oracle_gap": ev["rm_accuracy_by_gap"],
        "reward_stage_heldout_accuracy": records["reward"].get("metrics", {}).get("heldout_accuracy"),
        "ratings_oracle": ev["compare"]["ratings_oracle"],
        "ratings_warning_oracle": ev["compare"]["ratings_warning_oracle"],
        "compare": {"oracle": ev["compare"]["oracle"], "reward_model": ev["compare"]["reward_model"]},
        "win_rate_reward_model": {m: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in w.items()}
                                  for m, w in ev["win_rate_reward_model"].items()},
        "oracle_score": {m: round(v, 4) for m, v in ev["oracle_score"].items()},
        "mean_response_tokens": {m: round(v, 2) for m, v in ev["mean_length"].items()},
        "eos_fraction": {m: round(v, 3) for m, v in ev["eos_fraction"].items()},
        "eval_prompts": len(ev["prompts"]),
        "labeling": {k: labeling[k] for k in ("comparisons", "votes", "export", "label_accuracy_vs_oracle",
                                              "oracle_ties_among_pairs", "agreement", "seconds", "settings")
                     if k in labeling},
        "stages": stage_info,
        "step_seconds": {k: v for k, v in timings.items() if k != "cpu"},
        "step_cpu_seconds": timings.get("cpu", {}),
        "sampling": {"temperature": s.temperature, "top_p": 1.0, "max_new_tokens": s.eval_max_new_tokens, "seed": s.seed},
        "settings": dataclasses.asdict(s),
        "workdir": str(workdir),
    }


def _claim_lines(result: dict) -> list[str]:
    lines = [f"reward model accuracy vs oracle (held-out pairs): {result['rm_accuracy']:.3f}"]
    for m in ALIGNED:
        w = result["win_rate"].get(m)
        if w:
            kl = result.get("kl_ci", {}).get(m, {})
            lines.append(f"{m} vs sft (oracle): win rate {_rate_ci(w)}, KL to sft "
                         f"{result['kl'].get(m, float('nan')):.2f} [{kl.get('ci_low', float('nan')):.2f}, "
                         f"{kl.get('ci_high', float('nan')):.2f}] nats")
    failed = [c for c, ok in result["claims"].items() if not ok]
    lines.append("claims: all hold" if not failed else f"claims NOT met: {'; '.join(failed)}"
                 + (" (expected with --quick)" if result.get("quick") else ""))
    return lines


def _rate_ci(w: dict) -> str:
    """Win rate and 95% CI as text, or a dash where the pair had no battles (win_rate None)."""
    if w.get("win_rate") is None:
        return "–"
    return f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"


def _write_outputs(workdir: Path, result: dict, ev: dict) -> None:
    plots = _plots(workdir, result, ev)
    (workdir / "report.md").write_text(_report(workdir, result, ev, plots))


def _plots(workdir: Path, result: dict, ev: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out: dict[str, str] = {}

    # Reward-model accuracy against the oracle, by how far apart the oracle puts the pair.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    gaps = list(ev["rm_accuracy_by_gap"].items())
    ax1.bar([g for g, _ in gaps], [v["accuracy"] for _, v in gaps], color="#4c72b0")
    for i, (_, v) in enumerate(gaps):
        ax1.text(i, v["accuracy"] + 0.01, f"n={v['pairs']}", ha="center", fontsize=8)
    ax1.axhline(ev["rm_accuracy"], color="k", ls="--", lw=1, label=f"overall {ev['rm_accuracy']:.3f}")
    ax1.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
    ax1.set_ylim(0, 1.08)
    ax1.set_xlabel("|oracle score difference| of the pair (lexicon units)")
    ax1.set_ylabel("reward model agrees with oracle")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title("Reward model vs oracle, held-out pairs")
    d = [x for x, _ in ev["rm_heldout"]]
    r = [y for _, y in ev["rm_heldout"]]
    ax2.scatter(d, r, s=8, alpha=0.5)
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.axvline(0, color="grey", lw=0.5)
    ax2.set_xlabel("oracle: score(a) - score(b)")
    ax2.set_ylabel("reward model: r(a) - r(b)")
    ax2.set_title("Score differences")
    fig.tight_layout()
    out["rm_accuracy"] = "rm_accuracy.png"
    fig.savefig(workdir / out["rm_accuracy"], dpi=110)
    plt.close(fig)

    # Win rates vs SFT with 95% CIs, oracle and reward-model judges.
    models = list(ev["win_rate"])
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(models) + 2), 4))
    width = 0.38
    for k, (label, table, color) in enumerate((("oracle judge", ev["win_rate"], "#4c72b0"),
                                                ("reward-model judge", ev["win_rate_reward_model"], "#dd8452"))):
        xs = [i + (k - 0.5) * width for i in range(len(models))]
        nan = float("nan")  # a pair without battles has None: drawn as no bar
        ys = [nan if table[m]["win_rate"] is None else table[m]["win_rate"] for m in models]
        # np.maximum: a Wilson bound at 0 or 1 can sit a rounding error past the rate; NaN (no battles) stays NaN.
        err = np.maximum(0.0, [[y - (table[m]["ci_low"] if table[m]["ci_low"] is not None else nan) for m, y in zip(models, ys)],
                            [(table[m]["ci_high"] if table[m]["ci_high"] is not None else nan) - y for m, y in zip(models, ys)]])
        ax.bar(xs, ys, width, yerr=err, capsize=4, label=label, color=color)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.axhline(CLAIM_WIN_RATE, color="k", ls="--", lw=1, label=f"claim: {CLAIM_WIN_RATE}")
    ax.set_xticks(range(len(models)), models)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("win rate vs sft (ties = 1/2)")
    ax.set_title(f"Win rate vs SFT on {len(ev['prompts'])} held-out prompts, 95% bootstrap CI")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out["win_rates"] = "win_rates.png"
    fig.savefig(workdir / out["win_rates"], dpi=110)
    plt.close(fig)

    # Reward-vs-KL frontier: oracle score against KL to SFT, DPO points and PPO points.
    fig, ax = plt.subplots(figsize=(6, 4.5))
    styles = {"sft": ("k", "s"), "dpo": ("#4c72b0", "o"), "ppo": ("#c44e52", "^")}
    for name in ev["policies"]:
        kind = next(k for k in ("sft", "dpo", "ppo") if name.startswith(k))
        color, marker = styles[kind]
        ax.scatter(ev["kl"][name], ev["oracle_score"][name], color=color, marker=marker, s=50,
                   label=kind if not any(n.startswith(kind) for n in ev["policies"][: ev["policies"].index(name)]) else None)
        if name in ev["kl_ci"]:
            c = ev["kl_ci"][name]
            ax.errorbar(ev["kl"][name], ev["oracle_score"][name], color=color, capsize=3, lw=1,
                        xerr=[[ev["kl"][name] - c["ci_low"]], [c["ci_high"] - ev["kl"][name]]])
        train = (result["stages"].get(name) or {}).get("train") or {}
        knob = f" (β={train['beta']})" if "beta" in train else f" (KL coef {train['init_kl_coef']})" if "init_kl_coef" in train else ""
        ax.annotate(name + knob, (ev["kl"][name], ev["oracle_score"][name]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xlabel("KL(policy || sft), nats per response (sampled), 95% CI")
    ax.set_ylabel("mean oracle sentiment score")
    ax.set_title("Reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out["frontier"] = "frontier.png"
    fig.savefig(workdir / out["frontier"], dpi=110)
    plt.close(fig)
    return out


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _report(workdir: Path, result: dict, ev: dict, plots: dict[str, str]) -> str:
    lab = result["labeling"]
    lines = [
        "# alignkit demo — controlled sentiment",
        "",
        "A miniature of the DPO paper's controlled-sentiment experiment: a tiny Llama pretrained on synthetic "
        "reviews, SFT on tone-balanced continuations, preference pairs labeled by simulated annotators (a lexicon "
        "oracle plus noise) through the real labeling server, then reward → PPO and DPO stages over QLoRA "
        "adapters, judged by the oracle.",
        "",
        f"Run {'(quick: smoke sizes, claims not expected)' if result['quick'] else ''} in {result['wall_seconds']:.0f} s; "
        f"recipe: `{workdir / 'recipe.yaml'}`; numbers: `demo.json`.",
        "",
        "## Claims",
        "",
        "| claim | holds |",
        "|---|---|",
        *[f"| {c} | {'yes' if ok else '**no**'} |" for c, ok in result["claims"].items()],
        "",
        "## Win rates against SFT",
        "",
        f"One sample per held-out prompt ({result['eval_prompts']} prompts) from each model at temperature "
        f"{result['sampling']['temperature']}; every pair of models judged blind on every prompt (sides randomised) "
        "with `alignkit compare`'s judges and statistics; ties count half; 95% CI: the Wilson score interval over "
        "prompts. "
        "KL(policy ‖ SFT) is the mean over the policy's own samples of log π(y|x) − log π_sft(y|x) (the k1 estimate: "
        "unbiased but noisy), with a 95% percentile bootstrap CI over prompts.",
        "",
        "| model | oracle win rate [95% CI] | reward-model win rate [95% CI] | KL to SFT (nats) [95% CI] | mean oracle score | tokens | ended |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in ev["policies"]:
        if m == "sft":
            lines.append(f"| sft | — | — | 0 | {ev['oracle_score'][m]:.3f} | {ev['mean_length'][m]:.1f} | {ev['eos_fraction'][m]:.2f} |")
            continue
        o, r, k = ev["win_rate"][m], ev["win_rate_reward_model"][m], ev["kl_ci"][m]
        lines.append(f"| {m} | {_rate_ci(o)} | {_rate_ci(r)} | {ev['kl'][m]:.2f} [{k['ci_low']:.2f}, {k['ci_high']:.2f}] | "
                     f"{ev['oracle_score'][m]:.3f} | {ev['mean_length'][m]:.1f} | {ev['eos_fraction'][m]:.2f} |")
    ratings = result.get("ratings_oracle") or {}
    if ratings:
        lines += ["", "Bradley–Terry ratings under the oracle (Elo scale, 95% bootstrap CI): " + ", ".join(
            f"{m} {r['rating']:.0f} [{r['ci_low']:.0f}, {r['ci_high']:.0f}]" for m, r in ratings.items()
            if all(r.get(k) is not None for k in ("rating", "ci_low", "ci_high")))]
        if result.get("ratings_warning_oracle"):
            lines += ["", f"**Warning:** {result['ratings_warning_oracle']}"]
    lines += ["", f"![win rates]({plots['win_rates']})", "", "## Reward-vs-KL frontier", "",
              f"![frontier]({plots['frontier']})", "",
              "## Reward model against the oracle", "",
              f"Held-out pairs: two SFT samples for each held-out prompt, pairs the oracle scores equal left out "
              f"({result['rm_heldout_pairs']} pairs). Accuracy: **{result['rm_accuracy']:.3f}** "
              f"(the reward stage's own held-out accuracy on annotator labels: {result['reward_stage_heldout_accuracy']}).",
              "", f"![reward model]({plots['rm_accuracy']})", "",
              "## Labels", "",
              f"{lab.get('comparisons')} comparisons (two SFT samples per prompt), {lab['votes']['votes']} votes by "
              f"{lab['settings']['annotators']} simulated annotators through the labeling server with login "
              f"(overlap {lab['settings']['overlap']}, {lab['settings']['noise']:.0%} of votes a coin flip) in "
              f"{lab['votes']['seconds']:.0f} s ({lab['votes']['votes_per_s']:.0f} votes/s). Export (majority; ties, "
              f"both-bad and disagreements dropped): {lab['export']['rows']} pairs, {lab['label_accuracy_vs_oracle']:.3f} "
              f"of them agree with the noiseless oracle. Agreement: {json.dumps(lab.get('agreement', {}).get('raw_agreement'))}.",
              "", "## Samples before and after", "",
              "| prompt | sft | dpo | ppo |", "|---|---|---|---|"]
    samples = ev["samples"]
    for i in range(min(8, len(ev["prompts"]))):
        cells = [_md_escape(ev["prompts"][i])] + [
            f"{_md_escape(samples[m]['texts'][i])} ({sentiment.score(samples[m]['texts'][i]):+.2f})" if m in samples else "—"
            for m in ("sft", "dpo", "ppo")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "(oracle score in brackets)", "", "## Stages", "", "| stage | kind | seconds | key metrics |", "|---|---|---|---|"]
    keys = ("train_loss", "heldout_accuracy", "rewards/accuracies", "mean_reward", "mean_reward_first", "kl", "kl_coef")
    for name, st in result["stages"].items():
        metrics = ", ".join(f"{k}={st['metrics'][k]:.3g}" for k in keys if k in st["metrics"])
        lines.append(f"| {name} | {st['kind']} | {st['wall_seconds']} | {metrics} |")
    lines += ["", "Step times this run, wall (CPU) seconds: " + ", ".join(
        f"{k} {v:.0f} ({result['step_cpu_seconds'].get(k, 0):.0f})" for k, v in result["step_seconds"].items()), ""]
    return "\n".join(lines)
