#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (or has too old), saved to .whl/ (git-ignored) for the device tool to carry.
# Run here, where PyPI is reachable:   bash benchmarks/gpu_wheels.sh
# then on the device:                  bash benchmarks/gpu_device.sh 1b    (see that file)
# The image has torch, accelerate, tokenizers, pyarrow, pandas...; it lacks trl, bitsandbytes, liger-kernel and
# datasets, and its transformers is older than ours. PYVER=3.11 fetches for this machine instead (a local check).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.12}"
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# The versions the CPU suite passes with (pyproject's lower bounds), plus what datasets and transformers need beyond the image.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}" -d .whl \
  "trl==1.16.0" "transformers==5.24.0" "peft==0.21.2" "bitsandbytes==0.50.2" "datasets==5.2.0" "liger-kernel==0.8.5" \
  "dill==0.4.1" "multiprocess==0.70.19" "regex==2026.11.19" 2> >(grep -v "is ignored: it is neither" >&2)
# bitsandbytes ships a library per CUDA and ROCm version (43 MB of a 64 MiB carry); the image's torch is CUDA 13:
# keep the CUDA 13 and CPU libraries, drop the rest from the wheel and its RECORD.
python3 - <<'PY'
import glob, re, zipfile
from pathlib import Path
src = Path(glob.glob(".whl/bitsandbytes-*.whl")[0])
drop = re.compile(r"libbitsandbytes_(cuda1[0-2]\d|rocm\d+|xpu\d+)\.so$")
tmp = src.with_suffix(".slim")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if drop.search(item.filename):
            continue
        data = zin.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if not drop.search(l.split(b",")[0].decode()))
        zout.writestr(item, data)
tmp.replace(src)
PY
du -ch .whl/*.whl | tail -1
