#!/usr/bin/env bash
# The main job: set up, then run the offline end-to-end demo (label -> SFT -> reward -> PPO / DPO -> compare).
# Extra arguments go to `alignkit demo`, e.g. `bash scripts/demo.sh --workdir runs/demo2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/alignkit demo "$@"
