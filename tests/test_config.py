"""The Hydra tree: every group's objects build, bad values fail in one line naming the key, the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from birdrounds import cli
from birdrounds.config import ConfigError, compose, config_dir, validate
from birdrounds.data.synthetic import SynthSpec

GROUP_OPTIONS = {
    group: sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
    for group in ("data", "model", "loss", "train", "logger", "experiment")
}


@pytest.mark.parametrize("option", GROUP_OPTIONS["model"])
def test_every_model_config_builds(option):
    cfg = compose([f"model={option}"])
    model = instantiate(cfg.model)(num_classes=3)
    assert model(__import__("torch").zeros(2, cfg.data.sample_rate_hz))["logits"].shape == (2, 3)


@pytest.mark.parametrize("option", GROUP_OPTIONS["loss"])
def test_every_loss_config_builds(option):
    loss = instantiate(compose([f"loss={option}"]).loss)(class_counts=[5, 1, 2])
    import torch

    terms = loss({"logits": torch.zeros(2, 3)}, torch.tensor([[1.0, 0, 0], [0, 1, 0]]), None)
    assert torch.isfinite(terms["loss"])


@pytest.mark.parametrize("option", GROUP_OPTIONS["train"])
def test_every_train_config_builds(option):
    settings = instantiate(compose([f"train={option}"]).train)
    assert settings.epochs >= 1 and settings.batch_size >= 1


@pytest.mark.parametrize("option", GROUP_OPTIONS["logger"])
def test_every_logger_config_builds(option):
    logger = instantiate(compose([f"logger={option}"]).logger)
    assert logger.log_with in (None, "wandb")


@pytest.mark.parametrize("option", GROUP_OPTIONS["data"])
def test_every_data_config_builds(option, tmp_path):
    cfg = compose([f"data={option}", f"data.root={tmp_path}"])
    validate(cfg)
    assert instantiate(cfg.data.mixup).prob == cfg.data.mixup.prob
    assert callable(instantiate(cfg.data.augment))
    if cfg.data.synth is not None:
        spec = instantiate(cfg.data.synth)
        assert isinstance(spec, SynthSpec) and spec.sample_rate_hz == cfg.data.sample_rate_hz


def test_smoke_experiment_shrinks_everything():
    cfg = compose(["experiment=smoke"])
    assert cfg.model.backbone == "test_efficientnet"
    assert cfg.train.max_steps_per_epoch is not None
    assert cfg.data.synth.n_species < compose([]).data.synth.n_species
    assert cfg.run_dir.endswith("runs/smoke")


@pytest.mark.parametrize("override, key", [
    ("data.fold=7", "data.fold"),
    ("data.window_s=0", "data.window_s"),
    ("data.on_missing_file=ignore", "data.on_missing_file"),
    ("round=-1", "round"),
    ("round=1 pseudo.student_init=warm", "pseudo.student_init"),
    ("round=2 pseudo.window_s=2", "pseudo.window_s"),
    ("train.epochs=-1", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.backbone=nonexistent_net", "model.backbone"),
    ("model.pretrained_path=/no/such/weights.pth", "model.pretrained_path"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        validate(compose(override.split()))


def test_real_data_config_needs_a_root():
    with pytest.raises(ConfigError, match=r"^data\.root: required"):
        validate(compose(["data=birdclef2025"]))


def test_cli_synth_writes_dataset_and_is_idempotent(home):
    assert cli.main(["synth", "experiment=smoke"]) == 0
    root = home / "data" / "synthetic_smoke"
    assert (root / "DONE.json").is_file() and (root / "train.csv").is_file()
    stamp = (root / "DONE.json").stat().st_mtime_ns
    assert cli.main(["synth", "experiment=smoke"]) == 0
    assert (root / "DONE.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("args, needle", [
    (["synth", "data.fold=9"], "data.fold"),
    (["synth", "data.no_such_key=1"], "no_such_key"),
    (["synth", "data=birdclef2025", "data.root=/x"], "data.synth"),
    (["synth", "model.backbone=nonexistent_net"], "model.backbone: unknown timm model"),
    (["synth", "train.epochs=-1"], "train.epochs: must be an integer >= 1"),
])
def test_cli_bad_config_is_one_line_error(args, needle, home):
    proc = subprocess.run([sys.executable, "-m", "birdrounds.cli", *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "BIRDROUNDS_HOME": str(home)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "birdrounds"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "synth" in proc.stdout


def test_error_line_gives_the_reason_of_a_failed_instantiate():
    from hydra.errors import InstantiationException

    from birdrounds.config import error_line

    cfg = compose(["train.epochs=-1"])
    with pytest.raises(InstantiationException) as info:
        instantiate(cfg.train)
    assert error_line(info.value) == "train: train.epochs must be >= 1, got -1"
    assert error_line(ConfigError("data.fold: bad\nmore")) == "data.fold: bad"
