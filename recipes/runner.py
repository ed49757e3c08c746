"""The pipeline runner: a recipe's stages in dependency order, each into its own stage directory.

    alignkit run recipes/configs/tiny_sft_dpo.yaml [--set stages.dpo.train.beta=0.2] [--resume]

From flag to checkpoint, top to bottom in this file:

    run_recipe   load_recipe (alignkit.config: YAML + --set, validated against each kind's KIND)
    plan         pure: each stage's hash (alignkit.hashing), why it is stale, which stages train under
                 --only, what checkpoints a run would drop and what --resume continues; --dry-run prints it
    preflight    everything checkable before a directory is touched: the model, the parents' weights and
                 kinds, each stage's TRL config (recipe.train_config, built once and kept on the
                 StageRun) and its data (recipe.load_data)
    execute      per stage: lock, begin the directory (alignkit.artifacts), recipe.run, stage.json last

A stage whose stage.json is complete under its hash is skipped; changing one stage's config changes its
hash and so its descendants' — they re-run, nothing else does. Only a stage's own directory is touched.
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
from dataclasses import dataclass
from pathlib import Path

from alignkit import artifacts
from alignkit.config import RecipeConfig, StageConfig, load_recipe, order_stages
from alignkit.errors import UserError
from alignkit.hashing import HASH_FORMULA, config_hashes, fingerprints, recorded_under_old_formula
from alignkit.modeling import TINY_SPEC, check_model
from alignkit.stage import StageRecipe, StageResult, StageRun, check_parents
from alignkit.tracking import Reporting

# kind -> the recipe file that trains it (alignkit.stage.StageRecipe: KIND, load_data, train_config, run).
STAGE_RECIPES = {
    "sft": "recipes.sft",
    "dpo": "recipes.dpo",
    "kto": "recipes.kto",
    "reward": "recipes.reward",
    "ppo": "recipes.ppo",
    "rloo": "recipes.rloo",
    "grpo": "recipes.grpo",
    "eval": "recipes.eval",
    "orpo": "recipes.orpo",
    "simpo": "recipes.simpo",
    "best_of_n": "recipes.best_of_n",
}


class _RecipeModules(dict):
    """kind -> imported recipe module, imported on first use (so `sft` never imports PPO code)."""

    def __contains__(self, kind) -> bool:
        return kind in STAGE_RECIPES

    def __iter__(self):
        return iter(STAGE_RECIPES)

    def __getitem__(self, kind) -> StageRecipe:
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
class StagePlan:
    """One stage as the plan sees it, before anything is touched."""

    stage: StageConfig
    run: StageRun
    tag: str  # "[2/3] dpo (dpo)", how the log names it
    stale: str | None  # why it must be trained; None when its stage.json still describes it
    selected: bool  # trains in this run (stale, and chosen by --only if given)
    upgrade: bool = False  # complete under an older hash formula: its stage.json is upgraded, not retrained
    resumes_from: Path | None = None  # the checkpoint --resume continues
    drops: str = ""  # the checkpoints training it removes, in words
    could_resume: bool = False  # what it drops, --resume would have continued


@dataclass
class Plan:
    cfg: RecipeConfig
    hashes: dict[str, str]  # stage -> config hash (alignkit.hashing)
    stages: list[StagePlan]  # dependency order

    def todo(self) -> list[StagePlan]:
        return [p for p in self.stages if p.selected]


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
    """Run (or skip) every stage; returns {stage name: stage.json record} (in a dry run, the skipped ones')."""
    cfg = load_recipe(config, overrides, stage_kinds=RECIPES)
    the_plan = plan(cfg, only=only or [], resume=resume)
    preflight(the_plan)
    if dry_run:
        for line in describe(the_plan):
            log(line)
        return {p.stage.name: artifacts.read_stage(p.run.stage_dir) for p in the_plan.stages if p.stale is None}
    launch = _launch(cfg, overrides or [], accelerate_config, num_processes) if launcher == "accelerate" else None
    return execute(the_plan, launch=launch, resume=resume, log=log)


def plan(cfg: RecipeConfig, *, only: list[str], resume: bool) -> Plan:
    """Which stages train and why, reading stage directories but writing nothing."""
    for name in only:
        cfg.stage(name)  # unknown names are errors
    ordered = order_stages(cfg.stages)
    fingerprint = fingerprints(ordered)
    hashes = config_hashes(cfg, ordered, fingerprint)
    records = {s.name: artifacts.read_stage(cfg.run_dir / s.name) for s in ordered}
    upgrades = recorded_under_old_formula(cfg, ordered, fingerprint, records)
    stale: dict[str, str] = {}
    plans = []
    for i, stage in enumerate(ordered, 1):
        reason = _staleness(cfg, stage, hashes[stage.name], records, stale, upgraded=stage.name in upgrades)
        if reason:
            stale[stage.name] = reason
        run = _stage_run(cfg, stage, hashes[stage.name])
        p = StagePlan(stage, run, f"[{i}/{len(ordered)}] {stage.name} ({stage.kind})", reason,
                      selected=reason is not None and (not only or stage.name in only),
                      upgrade=reason is None and stage.name in upgrades)
        if p.selected:
            _checkpoints(p, resume)
        plans.append(p)
    return Plan(cfg, hashes, plans)


def _staleness(cfg: RecipeConfig, stage: StageConfig, config_hash: str, records: dict[str, dict | None],
               stale: dict[str, str], *, upgraded: bool) -> str | None:
    """Why a stage must be trained, or None when its stage.json is complete and still describes it (under the
    current hash, or an older formula's that `upgraded` says it was completed under)."""
    record = records[stage.name]
    if not record or not record.get("complete"):
        return "it is not complete"
    if record.get("config_hash") != config_hash and not upgraded:
        return "its config, data or a parent's config changed"
    for role, ref in stage.references().items():
        if ref in stale:
            return f"its {role} stage {ref} is trained again"
        # Same config, new weights (the parent was interrupted and retrained): the child started from other weights.
        if record.get("parents", {}).get(role, {}).get("run_id") != (records[ref] or {}).get("run_id"):
            return f"its {role} stage {ref} was retrained since"
    return None


def _checkpoints(p: StagePlan, resume: bool) -> None:
    """What training this stage does to checkpoints an earlier run left: continue them (--resume, same
    config) or drop them, said before (in a dry run) and after, so hours of training are not lost silently."""
    last = artifacts.last_complete_checkpoint(p.run.stage_dir)
    if last is None:
        return
    started = artifacts.started_config_hash(p.run.stage_dir)  # None once a run completed
    same_config = started == p.run.config_hash
    if resume and same_config:
        p.resumes_from = last
    elif started is None:
        p.drops = f"the checkpoints of its earlier, completed run (up to {last.name})"
    else:
        p.could_resume = same_config
        p.drops = f"the checkpoints of its unfinished earlier run (up to {last.name})" + (
            "" if same_config else ", made under another config")


def describe(the_plan: Plan) -> list[str]:
    """The plan in words: what --dry-run prints, and what a real run logs for stages it does not train."""
    return [_plan_line(p) for p in the_plan.stages if _plan_line(p)]


def _plan_line(p: StagePlan) -> str:
    if p.stale is None:
        return f"{p.tag}: complete, skipped ({p.run.stage_dir})"
    if not p.selected:
        left = artifacts.is_complete(p.run.stage_dir)
        return f"{p.tag}: not selected by --only, left as it is although {p.stale}" if left else ""
    resuming = f", resuming from {p.resumes_from.name}" if p.resumes_from else ""
    dropping = (f", removing {p.drops}" + (", which --resume continues" if p.could_resume else "")) if p.drops else ""
    return f"{p.tag}: would train into {p.run.stage_dir}{resuming}{dropping}"


def _stage_run(cfg: RecipeConfig, stage: StageConfig, config_hash: str) -> StageRun:
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
        report=Reporting(report_to=stage.report_to, project=cfg.run_dir.name, recipe=str(cfg.path.resolve()),
                         lineage=tuple(_lineage(cfg, stage)), log_completions=stage.log_completions),
    )


def preflight(the_plan: Plan) -> None:
    """Everything checkable before a stage directory is touched, so bad input anywhere leaves them all as
    they were. Order: the model (cheapest, and a mistyped path must not cost a complete stage its
    stage.json), the parents' weights, then each stage's config and data, then its complete parents."""
    cfg, todo = the_plan.cfg, the_plan.todo()
    if todo and (cfg.model.base != TINY_SPEC or isinstance(cfg.peft.target_modules, list)):
        try:
            check_model(cfg.model, cfg.peft)
        except UserError as err:
            at = cfg.where("peft.target_modules" if str(err).startswith("peft.") else "model.base")
            raise UserError(f"{at}: {err}") from None
    retrained = {p.stage.name for p in the_plan.stages if p.stale}
    for p in todo:
        _check_parent_weights(p, retrained)
    for p in todo:
        _prepare(cfg, p.stage, p.run)
    selected = {p.stage.name for p in todo}
    for p in todo:
        for role, ref in p.stage.references().items():
            if ref in retrained and ref not in selected:
                raise UserError(f"stage {p.stage.name} needs {role} stage {ref} complete first (run without --only)")
        if not retrained & set(p.stage.references().values()):
            # Parents complete already (a re-run): their kinds and the reward gate, checked now.
            check_parents(p.run, RECIPES[p.stage.kind].KIND,
                          min_reward_accuracy=getattr(p.run.args, "min_reward_accuracy", 0.0))


def _check_parent_weights(p: StagePlan, retrained: set[str]) -> None:
    for role, ref in p.stage.references().items():
        parent_dir = p.run.parents[role]
        if ref in retrained:
            continue  # trained again in this run before its child
        problem = artifacts.weights_problem(parent_dir) if artifacts.is_complete(parent_dir) else None
        if problem:
            raise UserError(f"stage {p.stage.name}: its {role} stage {parent_dir} is marked complete but {problem}; "
                            f"remove {parent_dir / artifacts.STAGE_JSON} to train it again")


def _prepare(cfg: RecipeConfig, stage: StageConfig, run: StageRun) -> None:
    """The stage's TRL config, then its data (a mistyped setting is reported before any data is read), both
    kept on the StageRun; errors name the YAML line or --set that gave the value."""
    recipe = RECIPES[stage.kind]
    try:
        run.args = recipe.train_config(run)  # TRL validates its settings when the config is built
    except UserError as err:
        key = getattr(err, "key", None)
        at = cfg.where(f"stages.{stage.name}.train.{key}") if key else str(cfg.path)
        raise UserError(f"{at}: {err}") from None
    try:
        run.prepared = recipe.load_data(run)
    except UserError as err:
        # "stages.dpo.data.eval_fraction=0.99 leaves no training rows": name where it was set, too
        # (errors about a data file already start with FILE:LINE).
        key = str(err).split("=", 1)[0].split(":", 1)[0].split(" ", 1)[0]
        if key.startswith(f"stages.{stage.name}."):
            raise UserError(f"{cfg.where(key)}: {err}") from None
        raise


def execute(the_plan: Plan, *, launch=None, resume: bool, log=print) -> dict[str, dict]:
    """Train the plan's stages in order, each under its lock, stage.json written last."""
    cfg, records = the_plan.cfg, {}
    # One runner per stage on this machine: a second one would remove the first one's logs and checkpoints as
    # it begins the same stage. Runners of disjoint `--only` sets may share a run_dir (the demo's lanes do);
    # nodes of one multi-node run each hold their own lock. Held until this run ends.
    with contextlib.ExitStack() as locks:
        for p in the_plan.stages:
            if not p.selected:
                line = _plan_line(p)
                if line:
                    log(line)
                if p.stale is None:
                    records[p.stage.name] = _upgraded(p, the_plan.hashes) if p.upgrade else artifacts.read_stage(p.run.stage_dir)
                continue
            locks.enter_context(_stage_lock(cfg.run_dir, p.stage.name))
            records[p.stage.name] = _train(the_plan, p, launch=launch, resume=resume, log=log)
    return records


def _train(the_plan: Plan, p: StagePlan, *, launch, resume: bool, log) -> dict:
    run = p.run
    can_resume = artifacts.begin_stage(run.stage_dir, run.config_hash, resume=resume)
    run.resume_from = artifacts.last_complete_checkpoint(run.stage_dir) if can_resume else None
    if p.drops:
        log(f"{p.tag}: removed {p.drops}" + (", which --resume would have continued" if p.could_resume else ""))
    why = "" if p.stale == "it is not complete" else f" ({p.stale})"
    log(f"{p.tag}: training into {run.stage_dir}{why}" + (f", resuming from {run.resume_from.name}" if run.resume_from else ""))
    start = time.time()
    result = launch(p.stage, run) if launch else RECIPES[p.stage.kind].run(run)
    record = artifacts.complete_stage(run.stage_dir, _record(the_plan, p, result, time.time() - start))
    log(f"{p.tag}: complete in {record['wall_seconds']:.0f}s; " + _summary(record["metrics"]))
    return record


def _upgraded(p: StagePlan, hashes: dict[str, str]) -> dict:
    """A stage completed under an older hash formula, its stage.json rewritten once under the current one."""
    record = artifacts.read_stage(p.run.stage_dir)
    for role, ref in p.stage.references().items():
        record.get("parents", {}).get(role, {})["config_hash"] = hashes[ref]
    record.update(config_hash=p.run.config_hash, hash_formula=HASH_FORMULA)
    artifacts.write_json_atomic(p.run.stage_dir / artifacts.STAGE_JSON, record)
    return record


def _lineage(cfg: RecipeConfig, stage: StageConfig) -> list[str]:
    chain, current = [], stage
    while current.after:
        chain.append(current.after)
        current = cfg.stage(current.after)
    return chain


def _record(the_plan: Plan, p: StagePlan, result: StageResult, wall: float) -> dict:
    from alignkit.modeling import resolve_base

    cfg, stage = the_plan.cfg, p.stage
    return {
        "name": stage.name,
        "kind": stage.kind,
        "base": cfg.model.base,
        "base_resolved": resolve_base(cfg.model.base),
        "model": dataclasses.asdict(cfg.model),
        "peft": dataclasses.asdict(cfg.peft),
        "parents": {role: {"name": ref, "path": str(cfg.run_dir / ref), "config_hash": the_plan.hashes[ref],
                           "run_id": (artifacts.read_stage(cfg.run_dir / ref) or {}).get("run_id")}
                    for role, ref in stage.references().items()},
        "lineage": _lineage(cfg, stage),
        # A loop round's stage: its round and its policy parent's (None for a stage outside the rounds).
        **({"round": stage.round, "parent_round": cfg.stage(stage.after).round if stage.after else None}
           if stage.round is not None else {}),
        "recipe": str(cfg.path.resolve()),
        "config": {"kind": stage.kind, "after": stage.after, "reward": stage.reward, "data": stage.data,
                   "train": stage.train, "seed": cfg.seed},
        "config_hash": p.run.config_hash,
        "hash_formula": HASH_FORMULA,
        "data": result.data,
        "metrics": result.metrics,
        "memory": result.memory,
        "wall_seconds": round(wall, 2),
    }


@contextlib.contextmanager
def _stage_lock(run_dir: Path, stage: str):
    """An exclusive flock on RUN_DIR/.STAGE.lock-HOST, released at exit (also when the process is killed)."""
    import fcntl
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    # A loop round's stages are named round-N/STAGE: their locks stay files of run_dir itself.
    path = run_dir / f".{stage.replace('/', '--')}.lock-{socket.gethostname()}"
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


def _summary(metrics: dict) -> str:
    keys = [k for k in ("train_loss", "eval_loss", "rewards/accuracies", "eval_accuracy", "rewards/margins", "mean_reward", "kl") if k in metrics]
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics[k], (int, float))) or "done"


def _launch(cfg: RecipeConfig, overrides: list[str], accelerate_config: str | None, num_processes: int | None):
    """How execute runs a stage under `accelerate launch`; the runner (hashing, stage.json) stays in this process."""

    def launch(stage: StageConfig, run: StageRun) -> StageResult:
        plan_path = run.stage_dir / "plan.json"
        artifacts.write_json_atomic(plan_path, {
            "config": str(cfg.path.resolve()), "overrides": overrides, "stage": stage.name,
            "config_hash": run.config_hash, "resume_from": str(run.resume_from) if run.resume_from else None})
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
        return StageResult(**json.loads(result_path.read_text()))

    return launch


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
    launched = json.loads(Path(plan_path).read_text())
    cfg = load_recipe(launched["config"], launched["overrides"], stage_kinds=RECIPES)
    stage = cfg.stage(launched["stage"])
    # Hashed by the runner: every process re-hashing the data would be waste.
    run = _stage_run(cfg, stage, launched["config_hash"])
    run.resume_from = Path(launched["resume_from"]) if launched["resume_from"] else None
    _prepare(cfg, stage, run)
    result = RECIPES[stage.kind].run(run)
    result.data["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) == 0:
        artifacts.write_json_atomic(run.stage_dir / "result.json", dataclasses.asdict(result))
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
