#!/usr/bin/env bash
# Create .venv with alignkit and its test dependencies. Idempotent: a second run only re-checks.
# torch is installed first and pinned (TORCH_SPEC) so that pip never swaps in a multi-GB CUDA build
# on a CPU machine; on a GPU machine set TORCH_SPEC to the build you want before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VENV="${VENV:-.venv}"
stamp="$VENV/.alignkit-installed"
if [[ -f "$stamp" && "$stamp" -nt pyproject.toml ]]; then
  exit 0
fi
echo "== setting up $VENV (torch: $TORCH_SPEC)"
"$PYTHON" -m venv "$VENV"
pip_install() {
  # This machine's pip config names local indexes that may be absent; their warnings are noise.
  "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
pip_install "$TORCH_SPEC"
pip_install -e ".[dev]"
touch "$stamp"
