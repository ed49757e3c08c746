"""Each benchmark runs in --quick mode and prints its ratio line. No timing is asserted, only that it measures."""

import os
import re
import subprocess
import sys

import pytest
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

QUICK = {
    "benchmarks.bench_stage_overhead": [r"\| SFT \|.*\| \d+\.\d{3} \|", r"\| DPO \|.*\| \d+\.\d{3} \|"],
    "benchmarks.bench_dpo_ref": [r"\| \d+\.\d{3} \| \d+\.\d{3} \| \d+\.\d{3} \|"],
    "benchmarks.bench_generation": [r"\| \d+\.\d \| \d+\.\d \| \d+\.\d{3} \|"],
    # Both sides train on the same real tokens (the back-reference), so the ratio compares equal work.
    "benchmarks.gpu_qlora": [rf"tiny {k}: tokens/s ratio \d+\.\d{{3}}, peak memory ratio \d+\.\d{{3}} \(real tokens: plain (\d+), ours \1\)"
                             for k in ("sft", "dpo")],
    # Bytes, not time: the same LoRA tensors get gradients on both sides, and ours holds less.
    "benchmarks.bench_kbit_memory": [r"parameters ratio 0\.\d{3}, saved activations ratio 0\.\d{3}, together 0\.\d{3} "
                                     r"\(LoRA tensors with gradients: peft (\d+), ours \1\)"],
    "benchmarks.bench_ppo_roles": [r"peak memory ratio \d+\.\d{3}, step time ratio \d+\.\d{3}"],
    # alignkit's side always runs; TRL 0.29.1's only where its venv (benchmarks/peer_setup.py) exists, else "n/a".
    "benchmarks.bench_ppo_peer": [r"\| alignkit kind: ppo \| \d+ \| \d+ \| \d+\.\d{3} \|",
                                  r"ppo peer: memory ratio (\d+\.\d{3}|n/a), step time ratio (\d+\.\d{3}|n/a)"],
    # The labeling load test's smallest cell: 5 annotators on SQLite, its latency columns and no lost votes.
    "benchmarks.bench_labeling": [r"\| sqlite \| 5 \| 0 \| 30 \| \d+ \| \d+ \| \d+ \| \d+ \| 0 \| 0 \| 0 \|"],
    # Labels, not time: both selections train the same ensemble on the same random start.
    "benchmarks.bench_active_labels": [r"\| 20 \| 0\.\d{3} \[", r"labels to reach random's full-budget accuracy: "],
    # Battles, not time: both allocations run to every adjacent pair separated on the same simulated models.
    "benchmarks.bench_active_battles": [r"\| active \| 1 \| \d+ \[nan, nan\] \| \d+ \| 0 \|",
                                        r"\| uniform \| 1 \| \d+ \[nan, nan\] \| \d+ \| 0 \|",
                                        r"active/uniform battles ratio \d+\.\d{3}"],
}
EXTRA_ARGS = {"benchmarks.bench_labeling": ["--annotators", "5", "--backends", "sqlite", "--think", "0"]}


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(QUICK))
def test_benchmark_quick_mode_prints_ratios(module, tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-m", module, "--quick", *EXTRA_ARGS.get(module, [])], capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    for pattern in QUICK[module]:
        assert re.search(pattern, out.stdout), f"{module}: no line matching {pattern!r} in:\n{out.stdout[-2000:]}"
