"""The stages after labeling through the runner, in two lanes at once: reward -> PPO beside DPO."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

from alignkit import artifacts
from demo.settings import quiet_libraries


@dataclass
class Lane:
    """A lane's stages (in order) and the process training them."""

    tag: str
    stages: list[str]
    process: BaseProcess


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
        _run_lanes(recipe, lanes, log=log)
    if not todo:
        log("every stage is complete with this recipe and data: skipped")
    return run_recipe(recipe, log=lambda line: None if "complete, skipped" in line else log(line))


def _run_lanes(recipe: Path, lanes: list[list[str]], *, log=print) -> None:
    """One spawned process per lane, their stages' progress logged until all end; a failed lane raises."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    threads = int(os.environ.get("ALIGNKIT_DEMO_THREADS", "1"))
    running = []
    for tag, stages in zip("AB", lanes):
        log(f"lane {tag}: {' -> '.join(stages)}")
        proc = ctx.Process(target=_run_lane, args=(str(recipe), stages, f"[lane {tag}] ", threads), daemon=False)
        proc.start()
        running.append(Lane(tag, stages, proc))
    try:
        _log_progress(recipe.parent / "run", running, log=log)
    except KeyboardInterrupt:
        for lane in running:
            lane.process.terminate()
        raise
    for lane in running:
        lane.process.join()
        if lane.process.exitcode != 0:
            from alignkit.errors import TrainingDiverged, UserError

            what = (f"lane {lane.tag} ({', '.join(lane.stages)}) failed with exit status {lane.process.exitcode}; "
                    "see its output above")
            raise (TrainingDiverged if lane.process.exitcode == 3 else UserError)(what)


def _log_progress(run_dir: Path, lanes: list[Lane], *, log=print) -> None:
    seen: dict[str, str] = {}
    while any(lane.process.is_alive() for lane in lanes):
        time.sleep(3)
        for lane in lanes:
            for name in lane.stages:
                status = _stage_status(run_dir / name)
                if status and seen.get(name) != status:
                    seen[name] = status
                    log(f"  {name}: {status}")


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
    quiet_libraries()
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
