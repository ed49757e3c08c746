#!/usr/bin/env bash
# Create .venv with alignkit and its test dependencies. Idempotent: a second run only re-checks.
# torch is installed first and pinned (TORCH_SPEC) so that pip never swaps in a multi-GB CUDA build
# on a CPU machine; on a GPU machine set TORCH_SPEC to the build you want before running this.
# Every other package is held to the version in constraints.txt, the set the test suite passed with;
# ALIGNKIT_UNLOCKED=1 installs the newest versions pyproject.toml allows instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VENV="${VENV:-.venv}"
if [[ "${ALIGNKIT_UNLOCKED:-0}" == "1" ]]; then
  mode="unlocked"
  constraints=()
else
  mode="locked"
  constraints=(-c constraints.txt)
fi
stamp="$VENV/.alignkit-installed"
# Up to date when installed after the last change to pyproject.toml and constraints.txt, in the same mode.
if [[ -f "$stamp" && "$stamp" -nt pyproject.toml && "$stamp" -nt constraints.txt \
      && "$(cat "$stamp")" == "$mode $TORCH_SPEC" ]]; then
  exit 0
fi
echo "== setting up $VENV (torch: $TORCH_SPEC, other packages: $mode)"
"$PYTHON" -m venv "$VENV"
pip_install() {
  # This machine's pip config names local indexes that may be absent; their warnings are noise.
  "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
pip_install "$TORCH_SPEC"
pip_install ${constraints[@]+"${constraints[@]}"} -e ".[dev,tracking]"  # tracking: the tracker tests run in CI
echo "$mode $TORCH_SPEC" > "$stamp"
