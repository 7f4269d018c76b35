#!/usr/bin/env bash
# Set up the environment (idempotent) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_prometheus.sh   # promtool + a real Prometheus for the monitoring tests
bash scripts/install_container_tools.sh   # podman, runc, debootstrap for tests/e2e/test_container.py
# The checks a maintainer runs: lint and format (config in pyproject's [tool.ruff]).
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash scripts/typecheck.sh   # mypy on the package layout (pyproject's [tool.mypy])
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/optsel/torch_extensions}
exec .venv/bin/python -m pytest -q -ra --durations=25 "$@"   # the 25 slowest tests, to keep the suite in budget
