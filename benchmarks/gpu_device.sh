#!/usr/bin/env bash
# The GPU benchmark as one command for the device machine (no network there: the wheels travel in .whl/).
# Here first:  bash benchmarks/gpu_wheels.sh
# Then, with the device tool (15 minutes of device time in all, the machine's start included):
#   run(command="bash benchmarks/gpu_device.sh 8b", carry=[".whl"], timeout_s=540)   # ~6-8 min: the 8B target rows
#   and only if 5 minutes or more are left, on the still-warm machine:
#   run(command="bash benchmarks/gpu_device.sh 1b", carry=[".whl"], timeout_s=240)   # ~2-3 min: the 1B rows
# The checks below fail within a minute, so a broken install costs little of the budget.
# Extra arguments go to the benchmark (e.g. --examples 32, --set stages.sft.train.use_liger_kernel=false).
# $OUT/log is the whole output; $OUT/RESULTS.md holds the appended section: copy it into benchmarks/RESULTS.md here.
set -uo pipefail
cd "$(dirname "$0")/.."
shapes="${1:-1b}"; shift || true
PYTHON="${PYTHON:-python3}"
out="${OUT:-/tmp/gpu-bench-out}"; mkdir -p "$out"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# Fail in seconds, not after a model build, if a package is missing or does not work on this GPU.
"$PYTHON" - <<'PY' || exit 4
import importlib, importlib.metadata as md, sys
import torch
gpu = torch.cuda.is_available()
missing = []
for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "liger_kernel", "triton", "pyarrow"):
    try:
        importlib.import_module(name)
        print(name, md.version(name.replace("_", "-")))
    except Exception as err:
        print(name, "MISSING:", type(err).__name__, err)
        if gpu or name not in ("liger_kernel", "triton"):  # a CPU smoke run has no Triton; the GPU run needs it
            missing.append(name)
if missing:
    sys.exit(f"cannot run the GPU benchmark without: {', '.join(missing)}")
import trl.trainer.sft_trainer, trl.trainer.dpo_trainer  # noqa: F401  (TRL imports its trainers lazily)
import recipes.runner, recipes.sft, recipes.dpo, benchmarks.gpu_qlora  # noqa: F401  (alignkit's own imports)
import datasets
datasets.Dataset.from_list([{"text": "x"}]).map(lambda r: r)  # pyarrow / fsspec of the image work with datasets
if gpu:
    import bitsandbytes.functional as F
    from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: F401
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    q, state = F.quantize_4bit(w, quant_type="nf4")
    err = (F.dequantize_4bit(q, state) - w).abs().mean().item()
    assert err < 0.2, f"bitsandbytes NF4 round trip error {err}"  # its CUDA library loads and computes
    from alignkit.training import fused_kernel_defaults
    assert fused_kernel_defaults() == {"use_liger_kernel": True}, "alignkit would not turn Liger on here"
    print("GPU checks passed:", torch.cuda.get_device_name(0))
PY
cp benchmarks/RESULTS.md /tmp/RESULTS.before.md
"$PYTHON" -m benchmarks.gpu_qlora --shapes "$shapes" "$@" 2>&1 | tee "$out/log"
status=${PIPESTATUS[0]}
diff /tmp/RESULTS.before.md benchmarks/RESULTS.md | sed -n 's/^> //p' > "$out/RESULTS.md"
exit "$status"
