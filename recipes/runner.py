"""The pipeline runner: a recipe's stages in dependency order, each into its own stage directory.

    alignkit run recipes/configs/tiny_sft_dpo.yaml [--set stages.dpo.train.beta=0.2] [--resume]

For each stage, in order: hash its resolved config, its data and its parents'
hashes; if `<run_dir>/<name>/stage.json` is complete with that hash, skip it;
otherwise train it and write stage.json last. Changing one stage's config
changes its hash and so its descendants' — they re-run, nothing else does.
All stages' configs and data are checked before any stage trains, so bad input
leaves every stage directory as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit import artifacts
from alignkit.config import RecipeConfig, StageConfig, load_recipe, order_stages
from alignkit.errors import UserError
from alignkit.modeling import TINY_SPEC, ModelSettings, PeftSettings, check_model

# kind -> the recipe file that trains it. Each module defines TRAIN_CONFIG, DATA_KEYS, train_config(stage)
# and run(stage), and optionally load_data(stage); the runner calls train_config and load_data for every
# stage it will train before any trains, so a bad value anywhere stops the run with nothing touched.
STAGE_RECIPES = {
    "sft": "recipes.sft",
    "dpo": "recipes.dpo",
    "kto": "recipes.kto",
    "reward": "recipes.reward",
    "ppo": "recipes.ppo",
    "rloo": "recipes.rloo",
    "grpo": "recipes.grpo",
}


class _RecipeModules(dict):
    """kind -> imported recipe module, imported on first use (so `sft` never imports PPO code)."""

    def __contains__(self, kind) -> bool:
        return kind in STAGE_RECIPES

    def __iter__(self):
        return iter(STAGE_RECIPES)

    def __getitem__(self, kind):
        if kind not in STAGE_RECIPES:
            raise KeyError(kind)
        try:
            return importlib.import_module(STAGE_RECIPES[kind])
        except ModuleNotFoundError as err:
            if err.name == STAGE_RECIPES[kind]:
                raise UserError(f"stage kind {kind!r} is not available in this version of alignkit") from None
            raise


RECIPES = _RecipeModules()


@dataclass
class StageRun:
    """Everything a recipe's run() needs; built by the runner, never by the recipe."""

    name: str
    kind: str
    stage_dir: Path
    model: ModelSettings
    peft: PeftSettings
    data: dict
    train: dict
    parents: dict[str, Path]  # role ("after", "reward") -> complete stage directory
    seed: int
    config_hash: str = ""
    resume_from: Path | None = None
    prepared: Any = None  # what the recipe's load_data returned
    extra: dict = field(default_factory=dict)


# Settings that change what is logged, saved or evaluated, never the trained weights: changing them
# must not retrain a stage (unless the best checkpoint is loaded at the end, when eval and save pick it).
BOOKKEEPING_TRAIN_KEYS = frozenset({
    "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "save_steps",
    "save_strategy", "save_total_limit", "save_only_model", "eval_steps", "eval_strategy", "eval_on_start",
    "per_device_eval_batch_size", "eval_accumulation_steps", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "disable_tqdm", "sample_log_count",
})


def hashed_train_settings(train: dict) -> dict:
    if train.get("load_best_model_at_end"):
        return dict(train)
    return {k: v for k, v in train.items() if k not in BOOKKEEPING_TRAIN_KEYS}


def stage_hashes(cfg: RecipeConfig, stage: StageConfig, parents: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The stage's config hash under each formula, given its parents' (same formula, same position); the first
    is the one a completed stage records. The data is fingerprinted once.

    Earlier formulas are kept so that a stage completed under one is still complete, not retrained by an upgrade:
    [1] (2026-11-28 to 12-04) held a local `model.base` as an absolute path, so a moved project retrained;
    [2] (before 2026-11-28) also took data paths and every train key.
    """
    from alignkit.data.sources import FINGERPRINTED_KEYS, data_fingerprint

    model = dataclasses.asdict(cfg.model)
    common = {"kind": stage.kind, "peft": dataclasses.asdict(cfg.peft), "seed": cfg.seed,
              "data_fingerprint": data_fingerprint(stage.data, stage.name)}
    # Paths whose contents the fingerprint holds are left out: a moved project is not retrained.
    data = {k: v for k, v in stage.data.items() if k not in FINGERPRINTED_KEYS or str(v).startswith("hf:")}

    def parent_hashes(i: int) -> dict:
        return {role: parents[ref][i] for role, ref in stage.references().items()}

    return (
        artifacts.stable_hash({**common, "model": {**model, "base": _portable_base(cfg)}, "data": data,
                               "train": hashed_train_settings(stage.train), "parents": parent_hashes(0)}),
        artifacts.stable_hash({**common, "model": model, "data": data, "train": hashed_train_settings(stage.train),
                               "parents": parent_hashes(1)}),
        artifacts.stable_hash({**common, "model": model, "data": stage.data, "train": stage.train,
                               "parents": parent_hashes(2)}),
    )


def _portable_base(cfg: RecipeConfig) -> str:
    """model.base as hashed: a local directory inside the recipe's directory relative to it (the project moves
    with it; its weights are not hashed, like compare's identity it would take minutes), one outside as its
    absolute path (it stays where it is when the project moves), a hub id or alignkit-tiny as given."""
    base = Path(cfg.model.base)
    if base.is_absolute() and base.exists():
        relative = os.path.relpath(base, cfg.path.resolve().parent)
        if not relative.startswith(".."):
            return relative
    return cfg.model.base


def make_stage_run(cfg: RecipeConfig, stage: StageConfig, config_hash: str) -> StageRun:
    return StageRun(
        name=stage.name,
        kind=stage.kind,
        stage_dir=cfg.run_dir / stage.name,
        model=cfg.model,
        peft=cfg.peft,
        data=stage.data,
        train=stage.train,
        parents={role: cfg.run_dir / ref for role, ref in stage.references().items()},
        seed=cfg.seed,
        config_hash=config_hash,
    )


def _lineage(cfg: RecipeConfig, stage: StageConfig) -> list[str]:
    chain, current = [], stage
    while current.after:
        chain.append(current.after)
        current = cfg.stage(current.after)
    return chain


def _record(cfg: RecipeConfig, stage: StageConfig, run: StageRun, result: dict, hashes: dict, wall: float) -> dict:
    from alignkit.modeling import resolve_base

    return {
        "name": stage.name,
        "kind": stage.kind,
        "base": cfg.model.base,
        "base_resolved": resolve_base(cfg.model.base),
        "model": dataclasses.asdict(cfg.model),
        "peft": dataclasses.asdict(cfg.peft),
        "parents": {role: {"name": ref, "path": str(cfg.run_dir / ref), "config_hash": hashes[ref][0],
                           "run_id": (artifacts.read_stage(cfg.run_dir / ref) or {}).get("run_id")}
                    for role, ref in stage.references().items()},
        "lineage": _lineage(cfg, stage),
        "recipe": str(cfg.path.resolve()),
        "config": {"kind": stage.kind, "after": stage.after, "reward": stage.reward, "data": stage.data,
                   "train": stage.train, "seed": cfg.seed},
        "config_hash": run.config_hash,
        "data": result.get("data", {}),
        "metrics": result.get("metrics", {}),
        "memory": result.get("memory", {}),
        "wall_seconds": round(wall, 2),
    }


def run_recipe(
    config: str | Path,
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
    only: list[str] | None = None,
    dry_run: bool = False,
    launcher: str = "local",
    accelerate_config: str | None = None,
    num_processes: int | None = None,
    log=print,
) -> dict[str, dict]:
    """Run (or skip) every stage; returns {stage name: stage.json record}."""
    cfg = load_recipe(config, overrides, stage_kinds=RECIPES)
    ordered = order_stages(cfg.stages)
    if only:
        for name in only:
            cfg.stage(name)  # unknown names are errors
    # Hash and check everything up front: bad data anywhere stops us before any stage is touched.
    hashes: dict[str, tuple[str, ...]] = {}  # stage -> its hash under each formula (stage_hashes)
    runs: dict[str, StageRun] = {}
    for stage in ordered:
        hashes[stage.name] = stage_hashes(cfg, stage, hashes)
        runs[stage.name] = make_stage_run(cfg, stage, hashes[stage.name][0])
    stale: dict[str, str] = {}  # stage -> why it must be trained
    for stage in ordered:
        reason = _staleness(cfg, stage, hashes[stage.name], stale)
        if reason:
            stale[stage.name] = reason
    todo = [s for s in ordered if s.name in stale and (not only or s.name in only)]
    if todo and (cfg.model.base != TINY_SPEC or isinstance(cfg.peft.target_modules, list)):
        # A mistyped model path, an unreachable hub id or a target module the model lacks must not cost a
        # complete stage its stage.json: checked on the config alone, before any stage directory is touched.
        try:
            check_model(cfg.model, cfg.peft)
        except UserError as err:
            at = cfg.where("peft.target_modules" if str(err).startswith("peft.") else "model.base")
            raise UserError(f"{at}: {err}") from None
    for stage in todo:
        for role, parent_dir in runs[stage.name].parents.items():
            parent = parent_dir.name
            if parent in stale:
                continue  # trained again in this run before its child
            problem = artifacts.weights_problem(parent_dir) if artifacts.is_complete(parent_dir) else None
            if problem:
                raise UserError(f"stage {stage.name}: its {role} stage {parent_dir} is marked complete but {problem}; "
                                f"remove {parent_dir / artifacts.STAGE_JSON} to train it again")
    for stage in todo:
        module = RECIPES[stage.kind]
        try:
            module.train_config(runs[stage.name])  # TRL validates its settings when the config is built
        except UserError as err:
            key = getattr(err, "key", None)
            at = cfg.where(f"stages.{stage.name}.train.{key}") if key else str(cfg.path)
            raise UserError(f"{at}: {err}") from None
        if hasattr(module, "load_data"):
            try:
                runs[stage.name].prepared = module.load_data(runs[stage.name])
            except UserError as err:
                # "stages.dpo.data.eval_fraction=0.99 leaves no training rows": name where it was set, too
                # (errors about a data file already start with FILE:LINE).
                key = str(err).split("=", 1)[0].split(":", 1)[0].split(" ", 1)[0]
                if key.startswith(f"stages.{stage.name}."):
                    raise UserError(f"{cfg.where(key)}: {err}") from None
                raise
    for stage in todo:
        for role, parent_dir in runs[stage.name].parents.items():
            parent = next(s for s in ordered if cfg.run_dir / s.name == parent_dir)
            if parent not in todo and parent.name in stale:
                raise UserError(f"stage {stage.name} needs {role} stage {parent.name} complete first (run without --only)")

    records: dict[str, dict] = {}
    # One runner per stage on this machine: a second one would remove the first one's logs and checkpoints as
    # it begins the same stage. Runners of disjoint `--only` sets may share a run_dir (the demo's lanes do);
    # nodes of one multi-node run each hold their own lock. Held until this run ends.
    with contextlib.ExitStack() as locks:
        for i, stage in enumerate(ordered, 1):
            run = runs[stage.name]
            tag = f"[{i}/{len(ordered)}] {stage.name} ({stage.kind})"
            if stage not in todo:
                if stage.name not in stale:
                    log(f"{tag}: complete, skipped ({run.stage_dir})")
                    records[stage.name] = artifacts.read_stage(run.stage_dir)
                elif artifacts.is_complete(run.stage_dir):
                    log(f"{tag}: not selected by --only, left as it is although {stale[stage.name]}")
                continue
            # Checkpoints of an unfinished earlier run go unless --resume continues them: say so before, in a
            # dry run, and after, naming the last one, so hours of training are not lost without a word.
            last = artifacts.last_complete_checkpoint(run.stage_dir)
            started = artifacts.started_config_hash(run.stage_dir)  # None once a run completed
            same_config = last is not None and started in hashes[stage.name]
            dropped, could_resume = "", False
            if last is not None and not (resume and same_config):
                if started is None:
                    dropped = f"the checkpoints of its earlier, completed run (up to {last.name})"
                else:
                    could_resume = same_config
                    dropped = f"the checkpoints of its unfinished earlier run (up to {last.name})" + (
                        "" if same_config else ", made under another config")
            if dry_run:
                log(f"{tag}: would train into {run.stage_dir}" + (f", resuming from {last.name}" if resume and same_config else "")
                    + (f", removing {dropped}" + (", which --resume continues" if could_resume else "") if dropped else ""))
                continue
            locks.enter_context(_stage_lock(cfg.run_dir, stage.name))
            can_resume = artifacts.begin_stage(run.stage_dir, run.config_hash, resume=resume,
                                               same_config=hashes[stage.name])
            run.resume_from = artifacts.last_complete_checkpoint(run.stage_dir) if can_resume else None
            if dropped:
                log(f"{tag}: removed {dropped}" + (", which --resume would have continued" if could_resume else ""))
            why = "" if stale[stage.name] == "it is not complete" else f" ({stale[stage.name]})"
            log(f"{tag}: training into {run.stage_dir}{why}" + (f", resuming from {run.resume_from.name}" if run.resume_from else ""))
            start = time.time()
            if launcher == "accelerate":
                result = _launch_with_accelerate(cfg, stage, run, overrides or [], accelerate_config, num_processes)
            else:
                result = RECIPES[stage.kind].run(run)
            record = _record(cfg, stage, run, result, hashes, time.time() - start)
            records[stage.name] = artifacts.complete_stage(run.stage_dir, record)
            log(f"{tag}: complete in {record['wall_seconds']:.0f}s; " + _summary(record["metrics"]))
    return records


@contextlib.contextmanager
def _stage_lock(run_dir: Path, stage: str):
    """An exclusive flock on RUN_DIR/.STAGE.lock-HOST, released at exit (also when the process is killed)."""
    import fcntl
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f".{stage}.lock-{socket.gethostname()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"stage {stage} in {run_dir} is being trained by another alignkit run on this machine "
                            f"(pid {holder}); wait for it, or give this run another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def _staleness(cfg: RecipeConfig, stage: StageConfig, config_hashes: tuple[str, ...], stale: dict[str, str]) -> str | None:
    """Why a stage must be trained, or None when its stage.json is complete and still describes it
    (under the current hash, or the legacy one a stage completed before the hash changed carries)."""
    record = artifacts.read_stage(cfg.run_dir / stage.name)
    if not record or not record.get("complete"):
        return "it is not complete"
    if record.get("config_hash") not in config_hashes:
        return "its config, data or a parent's config changed"
    for role, ref in stage.references().items():
        if ref in stale:
            return f"its {role} stage {ref} is trained again"
        # Same config, new weights (the parent was interrupted and retrained): the child started from other weights.
        recorded = record.get("parents", {}).get(role, {}).get("run_id")
        if recorded != (artifacts.read_stage(cfg.run_dir / ref) or {}).get("run_id"):
            return f"its {role} stage {ref} was retrained since"
    return None


def _summary(metrics: dict) -> str:
    keys = [k for k in ("train_loss", "eval_loss", "rewards/accuracies", "eval_accuracy", "rewards/margins", "mean_reward", "kl") if k in metrics]
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics[k], (int, float))) or "done"


def _launch_with_accelerate(cfg, stage, run: StageRun, overrides, accelerate_config, num_processes) -> dict:
    """Run one stage under `accelerate launch`; the runner (hashing, stage.json) stays in this process."""
    plan = {"config": str(cfg.path.resolve()), "overrides": overrides, "stage": stage.name,
            "config_hash": run.config_hash, "resume_from": str(run.resume_from) if run.resume_from else None}
    plan_path = run.stage_dir / "plan.json"
    artifacts.write_json_atomic(plan_path, plan)
    result_path = run.stage_dir / "result.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    cmd += ["-m", "alignkit.cli", "_stage", str(plan_path)]
    # Its own process group: when this runner is stopped (Ctrl-C, or SIGTERM from a scheduler, which the CLI
    # turns into KeyboardInterrupt), the launcher and every worker stop too, instead of writing into a stage
    # the runner has abandoned.
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        proc.wait()
    except BaseException:
        _stop_group(proc)
        raise
    if proc.returncode != 0 or not result_path.exists():
        raise UserError(f"stage {stage.name} failed under accelerate launch (exit {proc.returncode}); see the output above")
    return json.loads(result_path.read_text())


def _stop_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGINT)  # workers stop like on Ctrl-C: the stage stays incomplete
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    finally:  # also when a second Ctrl-C cuts the grace period short
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_stage_from_plan(plan_path: str) -> int:
    """Entry point of one accelerate-launched process: train the stage; rank 0 writes result.json."""
    plan = json.loads(Path(plan_path).read_text())
    cfg = load_recipe(plan["config"], plan["overrides"], stage_kinds=RECIPES)
    stage = cfg.stage(plan["stage"])
    run = make_stage_run(cfg, stage, plan["config_hash"])  # hashed by the runner: every process re-hashing the data would be waste
    run.resume_from = Path(plan["resume_from"]) if plan["resume_from"] else None
    module = RECIPES[stage.kind]
    if hasattr(module, "load_data"):
        run.prepared = module.load_data(run)
    result = module.run(run)
    result.setdefault("data", {})["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) == 0:
        artifacts.write_json_atomic(run.stage_dir / "result.json", result)
    return 0


def run_recipe_from_cli(args) -> int:
    if args.launcher != "accelerate" and (args.accelerate_config or args.num_processes):
        raise UserError("--accelerate-config and --num-processes need --launcher accelerate")
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise UserError(f"--accelerate-config {args.accelerate_config}: no such file "
                        "(the shipped ones are in recipes/configs/accelerate/)")
    only = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
    if args.only and not only:  # `--only ""` from an empty shell variable must not mean every stage
        raise UserError("--only needs stage names (comma-separated)")
    run_recipe(args.config, args.overrides, resume=args.resume, only=only, dry_run=args.dry_run,
               launcher=args.launcher, accelerate_config=args.accelerate_config, num_processes=args.num_processes)
    return 0
