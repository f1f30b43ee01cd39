"""One source per default: a settings class or builder built from a config node has no Python default for a key
the composed node holds (the YAML tree is what users and the measured results ran with), and `shipped` builds
each from that tree. InferenceSettings alone keeps its own (infer.py also ships as a script without the YAML),
equal to the config's."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pandas as pd
import pytest
from omegaconf import OmegaConf

from birdrounds.config import LEGACY, compose, shipped
from birdrounds.data.augment import AugmentSettings
from birdrounds.data.clips import MixUp
from birdrounds.data.mixed_val import build_mixed_validation
from birdrounds.data.synthetic import SynthSpec
from birdrounds.infer import InferenceSettings
from birdrounds.model import SpecAugment
from birdrounds.train import LoggerSettings, TrainSettings
from birdrounds.xeno_canto import XCSettings


def python_defaults(target: Any) -> dict[str, Any]:
    """Field (dataclass) or keyword (function, class __init__) defaults of `target`, as plain values."""
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


def node_keys(overrides: list[str], node: str) -> set[str]:
    """The keys the composed node holds (Hydra's own `_target_`, `_convert_` ... left out)."""
    return {k for k in OmegaConf.select(compose(overrides), node) if not str(k).startswith("_")}


D = ["data=birdclef2025", "data.root=x"]
# (what, the overrides of every shipped option that builds it from the node, node path)
ONE_SOURCE = [
    (XCSettings, [[]], "xc"),
    (TrainSettings, [["train=default"], ["train=demo"], ["train=smoke"]], "train"),
    (LoggerSettings, [["logger=wandb"], ["logger=none"]], "logger"),
    (SynthSpec, [["data=synthetic"], ["data=synthetic_smoke"], ["data=synthetic_few_shot"]], "data.synth"),
    (AugmentSettings, [D, ["experiment=few_shot"]], "data.augment"),
    (MixUp, [D], "data.mixup"),
    (build_mixed_validation, [D], "data.mixed_val"),
    (SpecAugment, [["model=demo"], ["model=sed_effnet_b0"]], "model.spec_augment"),  # BirdModel builds it
]
IDS = [c[0].__name__ for c in ONE_SOURCE]


@pytest.mark.parametrize("target, option_overrides, node", ONE_SOURCE, ids=IDS)
def test_no_python_default_for_a_key_the_config_holds(target, option_overrides, node):
    keys = set().union(*(node_keys(o, node) for o in option_overrides))
    held = sorted(keys & set(python_defaults(target)))
    assert not held, f"{target.__name__}: a Python default repeats {node}'s " + ", ".join(held) + " (the YAML is the one source)"


def shipped_targets() -> dict[tuple[str, str], set[str]]:
    """Every birdrounds `_target_` of every option of every config group (and the default tree), with the keys
    its nodes hold: (target, node path) -> keys."""
    from birdrounds.config import config_dir

    groups = {p.name: sorted(q.stem for q in p.glob("*.yaml") if not q.stem.startswith("_"))
              for p in config_dir().iterdir() if p.is_dir() and p.name != "accelerate"}  # accelerate: launcher files

    def walk(node: Any, path: str):
        if isinstance(node, dict):
            if "_target_" in node:
                yield path, node
            for key, value in node.items():
                yield from walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{path}[{i}]")

    found: dict[tuple[str, str], set[str]] = {}
    for overrides in [[], *([f"{g}={o}"] for g, options in groups.items() for o in options)]:
        tree = OmegaConf.to_container(compose(["data.root=x", *overrides]), resolve=False)
        tree.pop("hydra", None)
        for path, node in walk(tree, ""):
            if node["_target_"].startswith("birdrounds."):
                found.setdefault((node["_target_"], path), set()).update(k for k in node if not k.startswith("_"))
    return found


def test_every_target_of_every_shipped_option_takes_its_values_from_the_yaml():
    """No class or function a config node builds (`_target_`) holds a Python default for a key of that node."""
    from hydra.utils import get_object

    found = shipped_targets()
    assert len({t for t, _ in found}) >= 15  # models, losses, transforms, mixing, settings classes ...
    held = [f"{target} ({path}): {sorted(keys & set(python_defaults(get_object(target))))}"
            for (target, path), keys in sorted(found.items()) if keys & set(python_defaults(get_object(target)))]
    assert not held, "Python defaults repeat the YAML's: " + "; ".join(held)


def test_the_check_catches_a_re_added_default(monkeypatch):
    """The test above would fail on a default written twice again (here: TrainSettings.epochs = 15)."""
    field = next(f for f in dataclasses.fields(TrainSettings) if f.name == "epochs")
    monkeypatch.setattr(field, "default", 15)
    with pytest.raises(AssertionError, match="repeats train's epochs"):
        test_no_python_default_for_a_key_the_config_holds(TrainSettings, [["train=default"]], "train")


@pytest.mark.parametrize("node, overrides, kind", [
    ("xc", [], XCSettings), ("train", ["train=smoke"], TrainSettings), ("logger", ["logger=none"], LoggerSettings),
    ("data.synth", ["data=synthetic"], SynthSpec), ("data.mixup", D, MixUp),
])
def test_shipped_builds_each_from_the_tree(node, overrides, kind):
    built = shipped(node, *overrides)
    assert isinstance(built, kind)
    values = OmegaConf.to_container(OmegaConf.select(compose(overrides), node), resolve=True)
    for key, value in values.items():
        if not key.startswith("_") and not (isinstance(value, dict) and "_target_" in value):  # partials built
            assert plain(getattr(built, key)) == plain(value), f"{node}.{key}"


def test_shipped_takes_changes_and_refuses_a_node_without_target():
    from birdrounds.config import ConfigError, shipped_config

    assert shipped("data.synth", "data=synthetic", n_species=3).n_species == 3
    augment = AugmentSettings.from_config(shipped_config("data.augment", *D), pitch_method="signalsmith")
    assert augment.pitch_method == "signalsmith" and augment.gain_p == compose(D).data.augment.gain_p
    with pytest.raises(ConfigError, match=r"^data\.mixed_val: has no _target_"):
        shipped("data.mixed_val", *D)


# The standalone infer.py keeps its own defaults (it also runs without the YAML); they must equal the config's.
# Its defaults hold for a model exported without recorded settings (before export recorded them): no smoothing
# there, as then; exports record the predict config's kernel.
def test_inference_defaults_equal_the_composed_config():
    section = OmegaConf.to_container(compose([]).predict, resolve=True)
    defaults, renames, skip = python_defaults(InferenceSettings), {"threads": "intra_op_threads"}, {"smoothing"}
    compared, differ = 0, []
    for key, value in section.items():
        name = renames.get(key, key)
        if key.startswith("_") or key in skip or name not in defaults:
            continue
        compared += 1
        if plain(defaults[name]) != plain(value):
            differ.append(f"predict.{key}: config {value!r}, Python {defaults[name]!r}")
    assert compared, "nothing compared for predict"
    assert not differ, "defaults written twice disagree: " + "; ".join(differ)


def test_an_older_runs_mixed_validation_config_builds_the_set_it_was_scored_on(monkeypatch):
    """A `data.mixed_val` written before distance/subtract_background existed gets their old values from the
    explicit legacy map (config.LEGACY), not today's defaults; what it lacks beyond those, the shipped node's."""
    from birdrounds.data import mixed_val

    seen = {}
    monkeypatch.setattr(mixed_val, "build_mixed_validation", lambda *args, **kwargs: seen.update(kwargs))
    old = OmegaConf.create({"enabled": True, "n_rows": 50, "seed": 3, "snr_db": [-6, 10]})
    mixed_val.mixed_validation_from_config(old, pd.DataFrame({"x": [1]}), ["s.ogg"], None, ["a"])
    legacy = {"distance": [0.0, 0.0], "subtract_background": False, "distance_from_snr": False, "background_labels": None}
    assert {k: LEGACY[f"data.mixed_val.{k}"] for k in legacy} == legacy
    today = compose(D).data.mixed_val
    assert seen == {"n_rows": 50, "seed": 3, "snr_db": [-6.0, 10.0], **legacy,
                    **{k: plain(today[k]) if k != "max_background_files" else today[k]
                       for k in ("quiet_fraction", "calls_per_row", "call_s", "max_background_files")}}
    mixed_val.mixed_validation_from_config(today, pd.DataFrame({"x": [1]}), ["s.ogg"], None, ["a"])
    assert seen["distance"] == [0.0, 1.0] and seen["subtract_background"] is True


def test_legacy_keys_stay_out_of_the_hash_at_their_legacy_value():
    """One legacy map for both readers: the round hash treats an absent legacy key as its legacy value."""
    from birdrounds.rounds import result_config

    plain_cfg = OmegaConf.to_container(compose(["experiment=smoke"]), resolve=True)
    for key in LEGACY:
        if key.startswith("data.synth."):
            assert key.rsplit(".", 1)[1] not in result_config(plain_cfg, 0)["data"]["synth"]
    assert "focal_min_s" in result_config(OmegaConf.to_container(compose(["data=synthetic_few_shot"]), resolve=True),
                                          0)["data"]["synth"]  # a real setting still counts


def test_the_walk_catches_a_re_added_default(monkeypatch):
    """A default written back into a built class (here FileScale's alpha = 1.0) fails the walk above."""
    from birdrounds.pseudo import FileScale

    monkeypatch.setattr(FileScale.__init__, "__defaults__", (1.0,))
    with pytest.raises(AssertionError, match=r"birdrounds\.pseudo\.FileScale \(pseudo\.transform\.transforms\[1\]\): \['alpha'\]"):
        test_every_target_of_every_shipped_option_takes_its_values_from_the_yaml()
