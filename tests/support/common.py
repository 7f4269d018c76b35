"""Paths and the environment every subprocess-running test uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
CHECKPOINT_KEY_VARS = ("OPTSEL_CHECKPOINT_KEY", "OPTSEL_CHECKPOINT_KEY_FILE")


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment for an ``optsel`` subprocess: one thread, warnings off, the shared torch
    extensions cache, and no launcher or checkpoint-key variable unless given in ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_VARS, *CHECKPOINT_KEY_VARS) or k in extra}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/optsel/torch_extensions"))
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def run_train(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``optsel.launch.train configs/demo.yaml *args`` in a subprocess from the repository root, with
    :func:`cli_env` (``env``: extra variables); output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "optsel.launch.train", "configs/demo.yaml", *args],
        cwd=REPO,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_split(split_dir: Path) -> list[dict]:
    """All rows of an MDS split, read with streaming's own MDS reader (no StreamingDataset)."""
    import optsel.pipeline.data.streaming_compat  # noqa: F401

    # isort: split
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    index = json.loads((split_dir / "index.json").read_text())
    rows = []
    for shard in index["shards"]:
        raw = split_dir / shard["raw_data"]["basename"]
        if not raw.exists():
            zipped = split_dir / shard["zip_data"]["basename"]
            raw.write_bytes(decompress(shard["compression"], zipped.read_bytes()))
        reader = reader_from_json(str(split_dir.parent), split_dir.name, shard)
        rows += [reader.get_item(i) for i in range(reader.samples)]
        raw.unlink()
    return rows
