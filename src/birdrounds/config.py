"""Locating and composing the Hydra config tree shared by `rounds/run.py` and the `birdrounds` CLI."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue


AUGMENT_ON = ("workers", "device")  # `data.augment_on`: where data.augment and data.mixup run


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


def error_line(err: BaseException) -> str:
    """One line for a bad-config or bad-input error, with the reason (Hydra puts it on a later line).

    A failed `instantiate` reads "Error in call to target 'X':\nValueError('train.epochs must be >= 1')
    \nfull_key: train"; this gives "train: train.epochs must be >= 1".
    """
    lines = str(err).splitlines() or [type(err).__name__]
    if len(lines) > 1 and lines[0].startswith("Error in call to target"):
        key = next((line.removeprefix("full_key: ") for line in lines if line.startswith("full_key: ")), None)
        reason = str(err.__cause__).splitlines()[0] if err.__cause__ is not None and str(err.__cause__) else lines[1]
        return f"{key}: {reason}" if key else reason
    return lines[0]


def validate(cfg: DictConfig) -> None:
    """Check the values that would otherwise fail deep inside a long run."""
    require(cfg, "data.root", lambda v: bool(v), "set the data folder, e.g. data.root=/path/to/birdclef-2025")
    require(cfg, "data.sample_rate_hz", lambda v: isinstance(v, int) and v > 0, "must be a positive integer")
    require(cfg, "data.window_s", lambda v: isinstance(v, (int, float)) and v > 0, "must be a positive number of seconds")
    require(cfg, "data.n_folds", lambda v: isinstance(v, int) and v >= 2, "must be an integer >= 2")
    require(cfg, "data.fold", lambda v: isinstance(v, int) and 0 <= v < cfg.data.n_folds, f"must be in [0, data.n_folds={cfg.data.n_folds})")
    if OmegaConf.select(cfg, "data.split_seed") is not None:
        require(cfg, "data.split_seed", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                "must be an integer >= 0 or null (null: the run's seed)")
    for key in ("data.mixed_val.subtract_background", "data.mixed_val.distance_from_snr"):
        if OmegaConf.select(cfg, key) is not None:
            require(cfg, key, lambda v: isinstance(v, bool), "must be true or false")
    if OmegaConf.select(cfg, "data.augment_on") is not None:
        require(cfg, "data.augment_on", lambda v: v in AUGMENT_ON, f"must be one of {AUGMENT_ON}")
    require(cfg, "data.on_missing_file", lambda v: v in ("warn", "error"), "must be 'warn' or 'error'")
    for key in ("data.external.loss_weight", "data.external.sample_weight"):
        if OmegaConf.select(cfg, key) is not None:
            require(cfg, key, lambda v: isinstance(v, (int, float)) and v >= 0, "must be a number >= 0")
    if OmegaConf.select(cfg, "data.external.filter_min_prob") is not None:
        require(cfg, "data.external.filter_min_prob", lambda v: isinstance(v, (int, float)) and 0 <= v <= 1,
                "must be null or a probability in [0, 1]")
    require(cfg, "round", lambda v: isinstance(v, int) and v >= 0, "must be a non-negative integer")
    require(cfg, "recompute_from", lambda v: v is None or (isinstance(v, int) and v >= 0),
            "must be null or a round number")
    require(cfg, "control", lambda v: isinstance(v, bool), "must be true or false")
    for key in ("train.epochs", "train.batch_size"):
        if OmegaConf.select(cfg, key) is not None:
            require(cfg, key, lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1")
    backbone = OmegaConf.select(cfg, "model.backbone")
    if backbone is not None:
        import timm

        require(cfg, "model.backbone", timm.is_model, "unknown timm model (timm.list_models('*name*') lists them)")
        require(cfg, "model.pretrained_path", lambda v: v is None or Path(v).is_file(), "weights file not found")
    if cfg.round > 0:
        require(cfg, "pseudo.student_init", lambda v: v in ("teacher", "scratch"), "must be 'teacher' or 'scratch'")
        from birdrounds.infer import SCORED_CHUNK_S  # imported here: it loads numpy and onnxruntime

        require(cfg, "pseudo.window_s", lambda v: isinstance(v, (int, float)) and v >= SCORED_CHUNK_S,
                f"must be at least the {SCORED_CHUNK_S:g}-s scored chunk")


# ---------------------------------------------------------------- secrets kept out of records

REDACTED = "***REDACTED***"
# A config key holds a secret when the last word of its name (split at "_", "-" or ".") is one of these:
# api_key, key, token, access_token, password, db_password, secret, client_secret, credentials ...
SECRET_WORDS = frozenset({"key", "apikey", "token", "password", "passwd", "secret", "credential", "credentials"})


def is_secret_name(name: object) -> bool:
    """True for a config key that names a credential (see SECRET_WORDS)."""
    return re.split(r"[_.\-]", str(name).lower())[-1] in SECRET_WORDS


def redact_secrets(config: Any) -> Any:
    """A resolved plain copy of `config` with every set secret value replaced by REDACTED.

    Unset values (null or empty) are kept, so a record still shows that no secret was given. Use it
    wherever a config is persisted or handed to a tracker; the live config keeps the real value.
    """
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return {k: REDACTED if is_secret_name(k) and v not in (None, "") else redact_secrets(v)
                for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact_secrets(v) for v in config]
    return config


def redact_argv(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with the value of every secret override (`xc.api_key=...`) redacted."""
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        secret = sep and value and is_secret_name(name.lstrip("+~-"))
        out.append(f"{name}={REDACTED}" if secret else arg)
    return out


@contextmanager
def redacted_argv() -> Iterator[None]:
    """Redact secret overrides in `sys.argv` meanwhile (wandb records the command line at init)."""
    saved = sys.argv
    sys.argv = redact_argv(saved)
    try:
        yield
    finally:
        sys.argv = saved
