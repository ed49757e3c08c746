#!/usr/bin/env bash
# The GPU benchmark as one command for the device machine (no network there: the wheels travel in .whl/).
# Here first:  bash benchmarks/gpu_wheels.sh
# Then, with the device tool, two calls so that a failure in the first costs little of the 15-minute budget:
#   run(command="bash benchmarks/gpu_device.sh 1b", carry=[".whl"], timeout_s=420)   # ~3-4 min: checks the path, 1B rows
#   run(command="bash benchmarks/gpu_device.sh 8b", carry=[".whl"], timeout_s=600)   # ~6-8 min: the 8B target rows
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
# Fail in seconds, not after a model build, if a package is missing or too old.
"$PYTHON" - <<'PY' || exit 4
import importlib, importlib.metadata as md
for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "liger_kernel", "triton", "pyarrow"):
    try:
        importlib.import_module(name)
        print(name, md.version(name.replace("_", "-")))
    except Exception as err:  # a CPU check has no triton; the GPU image has
        print(name, "MISSING:", type(err).__name__, err)
import recipes.runner, benchmarks.gpu_qlora  # noqa: F401  (alignkit's own imports)
PY
cp benchmarks/RESULTS.md /tmp/RESULTS.before.md
"$PYTHON" -m benchmarks.gpu_qlora --shapes "$shapes" "$@" 2>&1 | tee "$out/log"
status=${PIPESTATUS[0]}
diff /tmp/RESULTS.before.md benchmarks/RESULTS.md | sed -n 's/^> //p' > "$out/RESULTS.md"
exit "$status"
