#!/usr/bin/env bash
# Type-check the installed package layout with mypy (config: pyproject's [tool.mypy]).
# The repository maps folders onto packages (pyproject's package-dir: pipeline/ is optsel.pipeline, ...), which
# mypy cannot follow; so the same layout is built from symlinks in a temporary folder and mypy checks
# `-p optsel` there. Error paths are printed relative to that layout (optsel/pipeline/... = pipeline/...).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TREE=$(mktemp -d)
trap 'rm -rf "$TREE"' EXIT
"${PYTHON:-.venv/bin/python}" - "$REPO" "$TREE" <<'PY'
import sys, tomllib
from pathlib import Path
repo, tree = Path(sys.argv[1]), Path(sys.argv[2])
package_dir = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
for dotted, folder in sorted(package_dir.items(), key=lambda kv: kv[0].count(".")):
    target = tree.joinpath(*dotted.split("."))
    if dotted == "optsel":
        target.mkdir(parents=True)
        for item in (repo / folder).iterdir():
            if item.name != "__pycache__":
                (target / item.name).symlink_to(item)
    else:
        target.symlink_to(repo / folder)
PY
cd "$TREE"
exec "$REPO/.venv/bin/mypy" --config-file "$REPO/pyproject.toml" --cache-dir "$REPO/.mypy_cache" -p optsel "$@"
