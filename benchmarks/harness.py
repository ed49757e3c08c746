"""Shared by the benchmarks: run variants back to back in fresh processes, compare, append to RESULTS.md.

Each variant runs in its own Python process so peak memory (ru_maxrss on CPU,
torch.cuda.max_memory_allocated on GPU) belongs to that variant alone. Variants
alternate (baseline, ours, baseline, ours, ...) so drift on a shared machine
hits both sides; the median of the repeats is reported.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextmanager
def device_peak(interval: float = 0.01):
    """Peak GPU memory in use while the block runs, sampled every `interval` s; yields a dict with "mb".

    What nvidia-smi shows: the CUDA context, the allocator's cache, and memory outside torch's allocator
    (bitsandbytes' paged optimizer state is CUDA managed memory, which max_memory_allocated never sees).
    Device-wide, so it is only meaningful with one process on the GPU, as each benchmark variant is.
    """
    import torch

    peak = {"mb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while True:
            free, total = torch.cuda.mem_get_info()
            peak["mb"] = max(peak["mb"], (total - free) / 2**20)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def emit(result: dict) -> None:
    """A variant process's last stdout line: its measurements as JSON."""
    result["peak_memory_mb"] = round(peak_memory_mb(), 1)
    print("RESULT " + json.dumps(result), flush=True)


def run_variant(module: str, variant: str, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", module, "--variant", variant, *args]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{module} --variant {variant} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def compare(module: str, baseline: str, ours: str, args: list[str], repeats: int) -> tuple[dict, dict]:
    """Median measurements of both variants, run alternately `repeats` times each."""
    runs: dict[str, list[dict]] = {baseline: [], ours: []}
    for _ in range(repeats):
        for variant in (baseline, ours):
            runs[variant].append(run_variant(module, variant, args))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))} for v, rs in runs.items()}
    return med[baseline], med[ours]


def parse_args(doc: str, **extra):
    """The flags every benchmark takes; `extra` adds its own (name -> argparse kwargs)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repeat, nothing appended")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each variant; the median is reported")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # set when the harness runs one side in a fresh process
    p.add_argument("--work", help=argparse.SUPPRESS)
    for name, kwargs in extra.items():
        p.add_argument(name, **kwargs)
    return p.parse_args()


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        dev = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    from importlib.metadata import version

    libs = ", ".join(f"{n} {version(n)}" for n in ("torch", "transformers", "trl", "peft", "bitsandbytes"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return f"{dev}; Python {platform.python_version()}; {libs}" + (f"; alignkit at {commit}" if commit else "")


def record(title: str, command: str, header: list[str], rows: list[list], notes: str = "", quick: bool = False) -> str:
    """Print a markdown section and append it to RESULTS.md (quick runs are printed only)."""
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    section = "\n".join([
        f"### {title}",
        "",
        f"`{command}` — {time.strftime('%Y-%m-%d')}, {machine()}",
        "",
        *table,
        "",
        *( [notes, ""] if notes else [] ),
    ])
    print(section)
    if not quick:
        with open(RESULTS, "a") as f:
            f.write("\n" + section)
    return section


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"
