"""Test hygiene shared by every test module."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_environment():
    """Code under test may export launcher variables into this process (streaming reads RANK /
    WORLD_SIZE / LOCAL_WORLD_SIZE from the environment, and the data layer sets them for a single
    process). Restore the environment after every test so that they never leak into the launchers and
    subprocesses of later tests (a stale LOCAL_WORLD_SIZE=1 makes every rank a streaming leader)."""
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)
