"""Fixtures of the end-to-end bad-input tests (test_bad_config.py, test_bad_data.py, test_hostile_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def data_dir(prepare_synthetic) -> Path:
    """A prepared synthetic dataset (512 train, 64 val samples) per test module that asks for one; a module
    defining its own ``data_dir`` uses its own."""
    return prepare_synthetic("hostile-shards", num_train=512, num_val=64)


@pytest.fixture
def single_rank_env(monkeypatch):
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
