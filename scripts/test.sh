#!/usr/bin/env bash
# The test command: set up (venv, system packages) and run the whole suite, slow tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-deps.sh
exec .venv/bin/python -m pytest "$@"
