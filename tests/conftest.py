"""Shared test set-up: no network for wandb, configs composed from this checkout, models from them."""

import copy
import functools
import os
from typing import Any

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see rounds/run.py


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh BIRDROUNDS_HOME so data/ and runs/ land in tmp_path."""
    monkeypatch.setenv("BIRDROUNDS_HOME", str(tmp_path))
    return tmp_path


@functools.cache
def _model_section(option: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from birdrounds.config import compose

    return OmegaConf.to_container(compose([f"model={option}"]).model, resolve=True)


def model_config(option: str = "tiny") -> dict[str, Any]:
    """configs/model/<option>.yaml as the real tree composes it (interpolations resolved), as a plain dict."""
    return copy.deepcopy(_model_section(option))


def config_model(num_classes: int, option: str = "tiny", **overrides: Any):
    """The BirdModel of configs/model/<option>.yaml, built as training builds it (instantiate, then call
    with num_classes); `overrides` replace config arguments (keyword arguments of that call)."""
    from hydra.utils import instantiate

    return instantiate(model_config(option))(num_classes=num_classes, **overrides)
