"""`run_demo`: every step of the demo in order, each reused when its inputs have not changed."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from alignkit import artifacts
from alignkit.tasks.pretrain import pretrained_tiny_model
from demo.data import write_data, write_recipe
from demo.evaluation import evaluate
from demo.labeling import label_pairs
from demo.lanes import run_stages
from demo.report import claim_lines, summarise, write_outputs
from demo.settings import DemoSettings, quiet_libraries


def demo_from_cli(args) -> int:
    settings = with_seed(DemoSettings.quick() if args.quick else DemoSettings(), args.seed)
    if getattr(args, "loop", False):
        from demo.loop import loop_demo_from_cli

        return loop_demo_from_cli(args, settings)
    result = run_demo(args.workdir, settings, quick=args.quick)
    print(f"\nalignkit demo: done in {result['wall_seconds']:.0f}s — {Path(args.workdir) / 'report.md'}")
    for line in claim_lines(result):
        print("  " + line)
    return 0


def with_seed(settings: DemoSettings, seed: int) -> DemoSettings:
    """The settings under another seed: the demo's own (data, labels, sampling, bootstrap) and the recipe's
    (training). The pretrained base stays the one model. Seed 0 is the template's, so the plain demo is unchanged."""
    if seed == 0:
        return settings
    return dataclasses.replace(settings, seed=seed, recipe_overrides=[*settings.recipe_overrides, f"seed={seed}"])


def run_demo(workdir: str | Path, settings: DemoSettings | None = None, *, quick: bool = False, log=print) -> dict:
    """Run (or reuse) every step of the demo in `workdir`; returns what demo.json holds."""
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    start, cpu_start = time.time(), _cpu_seconds()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    timings: dict[str, float] = {}

    def step(name: str):
        return _Step(name, timings, log)

    log(f"alignkit demo{' (quick)' if quick else ''}: workdir {workdir}")
    with step("pretrained model"):
        base = pretrained_tiny_model(None, settings.pretrain, log=log)
    with step("data"):
        write_data(workdir, settings)
        recipe = write_recipe(workdir, base, settings.recipe_overrides)

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
    result = summarise(workdir, records, labeling, evaluation, settings, timings, wall, quick)
    with step("report"):
        write_outputs(workdir, result, evaluation)
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
