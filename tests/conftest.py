"""Shared test set-up: no network for wandb, configs composed from this checkout."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see rounds/run.py


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh BIRDROUNDS_HOME so data/ and runs/ land in tmp_path."""
    monkeypatch.setenv("BIRDROUNDS_HOME", str(tmp_path))
    return tmp_path
