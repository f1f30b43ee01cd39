"""Locating and composing the Hydra config tree shared by `rounds/run.py` and the `birdrounds` CLI."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the offending key."""


def config_dir() -> Path:
    """The `configs/` folder: $BIRDROUNDS_CONFIG_DIR, else the one beside `src/` in this checkout."""
    env = os.environ.get("BIRDROUNDS_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"BIRDROUNDS_CONFIG_DIR: no config.yaml in {path} (install birdrounds editable from its checkout)")
    return path


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the config tree with command-line style overrides, outside of @hydra.main."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def require(cfg: DictConfig, key: str, check, message: str) -> None:
    """Raise ConfigError naming `key` when it is missing or `check(value)` is false."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{key}: required value is missing ({message})") from None
    if not check(value):
        raise ConfigError(f"{key}: {message}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Check the values that would otherwise fail deep inside a long run."""
    require(cfg, "data.root", lambda v: bool(v), "set the data folder, e.g. data.root=/path/to/birdclef-2025")
    require(cfg, "data.sample_rate_hz", lambda v: isinstance(v, int) and v > 0, "must be a positive integer")
    require(cfg, "data.window_s", lambda v: isinstance(v, (int, float)) and v > 0, "must be a positive number of seconds")
    require(cfg, "data.n_folds", lambda v: isinstance(v, int) and v >= 2, "must be an integer >= 2")
    require(cfg, "data.fold", lambda v: isinstance(v, int) and 0 <= v < cfg.data.n_folds, f"must be in [0, data.n_folds={cfg.data.n_folds})")
    require(cfg, "data.on_missing_file", lambda v: v in ("warn", "error"), "must be 'warn' or 'error'")
    require(cfg, "round", lambda v: isinstance(v, int) and v >= 0, "must be a non-negative integer")
    require(cfg, "recompute_from", lambda v: v is None or (isinstance(v, int) and v >= 0),
            "must be null or a round number")
    require(cfg, "control", lambda v: isinstance(v, bool), "must be true or false")
    if cfg.round > 0:
        require(cfg, "pseudo.student_init", lambda v: v in ("teacher", "scratch"), "must be 'teacher' or 'scratch'")
        require(cfg, "pseudo.window_s", lambda v: isinstance(v, (int, float)) and v >= 5.0,
                "must be at least the 5-s scored chunk")
