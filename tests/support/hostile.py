"""The ``optsel.launch.train`` overrides of the bad-input tests' short runs (tests/e2e/test_bad_*.py,
test_hostile_runs.py): a 3-step random-selection run of ``engine`` on ``data_dir`` into ``out``."""

from __future__ import annotations

from pathlib import Path


def train_args(data_dir: Path, out: Path, engine: str = "fsdp2", *extra: str) -> list[str]:
    return [
        f"data.local={data_dir}",
        f"output_dir={out}",
        "run_name=r",
        "training.progress_bar=false",
        "training.num_eval_samples=8",
        "monitoring.port=0",
        "training.eval_every=0",
        f"engine.name={engine}",
        "selection.method=random",
        "training.num_steps=3",
        "selection.pool_size=8",
        "selection.budget=4",
        "selection.num_target_samples=4",
        *extra,
    ]
