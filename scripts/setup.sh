#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install optsel with its test extras.
# CPU machines get the CPU build of torch (pinned via requirements/constraints-cpu.txt); a CUDA
# machine keeps whatever torch it already has when OPTSEL_KEEP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OPTSEL_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade -c requirements/lock.txt pip setuptools wheel
CONSTRAINTS=()
if [ "${OPTSEL_KEEP_TORCH:-0}" != "1" ]; then
  "${PIP[@]}" install -c requirements/constraints-cpu.txt torch==2.13.0
  # requirements/lock.txt: the exact package set the container image ships (scripts/make_lock.py).
  CONSTRAINTS=(-c requirements/constraints-cpu.txt -c requirements/lock.txt)
fi
# deepspeed's setup.py imports torch: build it against the venv's torch, never an isolated one.
"${PIP[@]}" install "${CONSTRAINTS[@]}" --no-build-isolation "deepspeed==0.19.8"
"${PIP[@]}" install "${CONSTRAINTS[@]}" -e ".[test,trl,lint,bench]"
# streaming's declared pins conflict with transformers 5 / numpy 2 and pull torchvision: no deps.
"${PIP[@]}" install --no-deps mosaicml-streaming==0.13.0
"${PIP[@]}" install "${CONSTRAINTS[@]}" $(grep -vE '^(#|mosaicml-streaming|$)' requirements/streaming.txt)
"$VENV/bin/python" -c "import torch, deepspeed, transformers, optsel; print('optsel env ready: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
