#!/usr/bin/env bash
# `make lock`: regenerate requirements/lock-*.txt (hashed, for CPython 3.11 on x86-64 Linux) from
# pyproject.toml and requirements/{cpu,cuda}.in. Pins already in a lock are kept unless pyproject or an
# .in file no longer allows them (uv prefers the output file's versions); `make lock UPGRADE=1` upgrades.
#   lock-dev.txt   server + dev extras, torch's CPU build: what `make install` (CI) installs
#   lock-cpu.txt   server extra, torch's CPU build: the CPU image (Dockerfile FLAVOR=cpu)
#   lock-cuda.txt  server extra, PyPI's torch (the CUDA 13.0 build): the CUDA image (FLAVOR=cuda)
#   lock-cuda126.txt  with CU126=1 only (needs PyTorch's cu126 index): the fallback (FLAVOR=cuda126)
# The image locks are constrained by lock-dev.txt, so the images run the versions the tests ran.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-build/uv/bin/uv}
if [ ! -x "$UV" ]; then
  python3 -m venv build/uv
  build/uv/bin/pip install --quiet "uv>=0.9"
fi
common=(--generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28
        --custom-compile-command "make lock" --quiet)
[ -n "${UPGRADE:-}" ] && common+=(--upgrade)
# torch's CPU build is not on PyPI: a local wheel where the machine has one, else PyTorch's CPU index.
if ls /opt/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then
  cpu_source=(--find-links /opt/wheels)
else
  cpu_source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
"$UV" pip compile pyproject.toml requirements/cpu.in --extra server --extra dev \
  "${common[@]}" "${cpu_source[@]}" -o requirements/lock-dev.txt
# The CUDA lock takes every version from the dev lock except torch's build (and what only it needs).
tmp=build/lock; mkdir -p "$tmp"
awk '/^[^ #]/ { skip = /^torch==/ } !skip' requirements/lock-dev.txt > "$tmp/constraints.txt"
"$UV" pip compile pyproject.toml requirements/cpu.in --extra server \
  "${common[@]}" "${cpu_source[@]}" -c requirements/lock-dev.txt -o requirements/lock-cpu.txt
"$UV" pip compile pyproject.toml requirements/cuda.in --extra server \
  "${common[@]}" -c "$tmp/constraints.txt" -o requirements/lock-cuda.txt
if [ -n "${CU126:-}" ]; then
  "$UV" pip compile pyproject.toml requirements/cuda126.in --extra server "${common[@]}" \
    --extra-index-url https://download.pytorch.org/whl/cu126 --index-strategy unsafe-best-match \
    -c "$tmp/constraints.txt" -o requirements/lock-cuda126.txt
fi
