"""One value per default: where a settings class or builder keeps a Python default for a config key, it is the
value the composed config gives that key (the YAML tree is what users and the measured results ran with)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pandas as pd
import pytest
from omegaconf import OmegaConf

from birdrounds.config import compose
from birdrounds.data.augment import AugmentSettings
from birdrounds.data.clips import AUTO_EPOCH_BOUNDS, MixUp
from birdrounds.data.mixed_val import build_mixed_validation
from birdrounds.data.synthetic import SynthSpec
from birdrounds.infer import InferenceSettings
from birdrounds.train import LoggerSettings, TrainSettings
from birdrounds.xeno_canto import XCSettings


def python_defaults(target: Any) -> dict[str, Any]:
    """Field (dataclass) or keyword (function) defaults of `target`, as plain values."""
    if dataclasses.is_dataclass(target):
        out = {}
        for f in dataclasses.fields(target):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out
    return {name: p.default for name, p in inspect.signature(target).parameters.items()
            if p.default is not inspect.Parameter.empty}


def plain(value: Any) -> Any:
    """Tuples as lists, ints as floats where the other side is a float: the forms YAML and Python write."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# (what, overrides that select the config node, node path, renames {config key: python name}, keys not compared)
CASES = [
    (XCSettings, [], "xc", {}, {"data_root", "out_dir", "train_csv", "taxonomy_csv"}),
    (TrainSettings, ["train=default"], "train", {}, {"optimizer", "scheduler", "seed"}),
    (LoggerSettings, ["logger=wandb"], "logger", {}, set()),
    (SynthSpec, ["data=synthetic"], "data.synth", {}, set()),
    (AugmentSettings, ["data=birdclef2025", "data.root=x"], "data.augment", {}, set()),
    (MixUp, ["data=birdclef2025", "data.root=x"], "data.mixup", {}, {"seed"}),
    (build_mixed_validation, ["data=birdclef2025", "data.root=x"], "data.mixed_val", {}, set()),
    # The standalone infer.py's own defaults hold for a model exported without recorded settings (before
    # export recorded them): no smoothing there, as then; exports record the predict config's kernel.
    (InferenceSettings, [], "predict", {"threads": "intra_op_threads"}, {"smoothing"}),
]


@pytest.mark.parametrize("target, overrides, node, renames, skip", CASES,
                         ids=[getattr(c[0], "__name__", str(c[0])) for c in CASES])
def test_python_defaults_equal_the_composed_config(target, overrides, node, renames, skip):
    section = OmegaConf.to_container(OmegaConf.select(compose(overrides), node), resolve=True)
    defaults = python_defaults(target)
    compared, differ = 0, []
    for key, value in section.items():
        name = renames.get(key, key)
        if key.startswith("_") or key in skip or name not in defaults:
            continue
        compared += 1
        if plain(defaults[name]) != plain(value):
            differ.append(f"{node}.{key}: config {value!r}, Python {defaults[name]!r}")
    assert compared, f"nothing compared for {node}"
    assert not differ, "defaults written twice disagree: " + "; ".join(differ)


def test_auto_epoch_bounds_default_is_the_configs():
    assert list(AUTO_EPOCH_BOUNDS) == list(compose(["data=birdclef2025", "data.root=x"]).data.sampler.auto_bounds)


def test_an_older_runs_mixed_validation_config_builds_the_set_it_was_scored_on(monkeypatch):
    """A `data.mixed_val` written before distance/subtract_background existed gets their old values from the
    explicit legacy map, not today's defaults."""
    from birdrounds.data import mixed_val

    seen = {}
    monkeypatch.setattr(mixed_val, "build_mixed_validation", lambda *args, **kwargs: seen.update(kwargs))
    old = OmegaConf.create({"enabled": True, "n_rows": 50, "seed": 3, "snr_db": [-6, 10]})
    mixed_val.mixed_validation_from_config(old, pd.DataFrame({"x": [1]}), ["s.ogg"], None, ["a"])
    assert seen == {"n_rows": 50, "seed": 3, "snr_db": [-6.0, 10.0], "distance": [0.0, 0.0],
                    "subtract_background": False, "distance_from_snr": False}
    today = compose(["data=birdclef2025", "data.root=x"]).data.mixed_val
    mixed_val.mixed_validation_from_config(today, pd.DataFrame({"x": [1]}), ["s.ogg"], None, ["a"])
    assert seen["distance"] == [0.0, 1.0] and seen["subtract_background"] is True
