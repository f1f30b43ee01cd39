"""The Hydra tree: every option of every group composes, validates and builds; bad values fail in one line
naming the key; the CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from birdrounds import cli
from birdrounds.config import ConfigError, compose, config_dir, error_line, validate
from birdrounds.data.clips import ClipDataset
from birdrounds.data.synthetic import SynthSpec
from birdrounds.mixing import STRATEGIES, PseudoChunkDataset
from birdrounds.model import BirdModel
from birdrounds.rounds import build_model as build_round_model
from birdrounds.rounds import round_train_config
from birdrounds.train import LoggerSettings, TrainSettings

# configs/accelerate/ holds `accelerate launch --config_file` files, not a Hydra group.
NOT_HYDRA = {"accelerate"}
GROUPS = sorted(p.name for p in config_dir().iterdir() if p.is_dir() and p.name not in NOT_HYDRA)
# `_`-prefixed files (configs/pseudo/_base.yaml) are what a group's options share, not options.
GROUP_OPTIONS = {group: sorted(p.stem for p in (config_dir() / group).glob("*.yaml") if not p.stem.startswith("_"))
                 for group in GROUPS}
CASES = [(group, option) for group in GROUPS for option in GROUP_OPTIONS[group]]
CLASSES = ["a", "b", "c"]


def composed(overrides: list[str], data_root: Path) -> DictConfig:
    """compose(overrides), with `data.root=data_root` where the data config requires one (data=birdclef2025)."""
    cfg = compose(overrides)
    return compose([*overrides, f"data.root={data_root}"]) if OmegaConf.is_missing(cfg.data, "root") else cfg


class Silence:
    """An audio source where every file is 12 s of silence at 100 Hz (enough for 5-s and 20-s windows)."""

    sample_rate_hz = 100

    def load(self, path) -> np.ndarray:
        return np.zeros(1200, np.float32)


def build_data(cfg) -> None:
    assert instantiate(cfg.data.mixup).prob == cfg.data.mixup.prob
    assert callable(instantiate(cfg.data.augment))
    if cfg.data.synth is not None:
        spec = instantiate(cfg.data.synth)
        assert isinstance(spec, SynthSpec) and spec.sample_rate_hz == cfg.data.sample_rate_hz


def build_model(cfg) -> None:
    model = instantiate(cfg.model)(num_classes=3)
    assert isinstance(model, BirdModel)
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, cfg.data.sample_rate_hz))["logits"].shape == (2, 3)


def build_loss(cfg) -> None:
    loss = instantiate(cfg.loss)(class_counts=[5, 1, 2])
    terms = loss({"logits": torch.zeros(2, 3)}, torch.tensor([[1.0, 0, 0], [0, 1, 0]]), None)
    assert torch.isfinite(terms["loss"])


def build_train(cfg) -> None:
    for round_idx in (0, 1):  # the teacher's schedule, then the students' (pseudo.student_train over train)
        settings = instantiate(round_train_config(cfg, round_idx))
        assert isinstance(settings, TrainSettings) and settings.epochs >= 1 and settings.batch_size >= 1
        optimizer = settings.optimizer(torch.nn.Linear(2, 2).parameters())
        scheduler = settings.scheduler(optimizer, steps_per_epoch=4, epochs=settings.epochs)
        optimizer.step()
        scheduler.step()
        assert 0 < optimizer.param_groups[0]["lr"] <= optimizer.defaults["lr"]


def build_logger(cfg) -> None:
    logger = instantiate(cfg.logger)
    assert isinstance(logger, LoggerSettings) and logger.log_with in (None, "wandb")


def build_pseudo(cfg) -> None:
    transform = instantiate(cfg.pseudo.transform)
    probs = np.array([[0.2, 0.9, 0.0], [0.05, 0.01, 0.6], [0.7, 0.3, 0.1]], np.float32)
    for round_idx in range(1, 6):  # past the last round a preset lists (its last value is reused)
        out, keep = transform(probs, round_idx=round_idx, files=["f0.ogg", "f0.ogg", "f1.ogg"])
        assert out.shape == probs.shape and keep.shape == (3,) and keep.any()
        assert np.isfinite(out).all() and transform.describe(round_idx)
    # The student's training set, as rounds.student_parts builds it, from in-memory silent audio.
    audio = Silence()
    table = pd.DataFrame({"primary_label": CLASSES, "secondary_labels": [[], [], []], "path": ["l0", "l1", "l2"],
                          "rating": [5.0] * 3})
    labeled = ClipDataset(table, CLASSES, audio, window_s=cfg.data.window_s, window_mode="center")
    rows = pd.DataFrame({"file": ["s0", "s0", "s1"], "start_s": [0.0, 5.0, 0.0], "end_s": [5.0, 10.0, 5.0]})
    pseudo = PseudoChunkDataset(rows, probs, audio, window_s=cfg.data.window_s)
    assert cfg.pseudo.mixing.strategy in STRATEGIES
    mixed = instantiate(cfg.pseudo.mixing)(labeled=labeled, pseudo=pseudo, seed=cfg.seed)
    assert len(mixed) >= len(labeled)
    item = mixed[0]
    assert item["audio"].shape == labeled[0]["audio"].shape and item["target"].shape == (len(CLASSES),)
    student = build_round_model(cfg, num_classes=3, round_idx=1)  # with pseudo.student_drop_path_rate, if set
    want = cfg.pseudo.student_drop_path_rate
    assert student.init_kwargs["drop_path_rate"] == (cfg.model.drop_path_rate if want is None else want)


def build_xc(cfg) -> None:
    settings = instantiate(cfg.xc, _convert_="all")
    assert settings.data_root == cfg.data.root and settings.sample_rate_hz == cfg.data.sample_rate_hz


def build_export(cfg) -> None:
    from birdrounds.export import KINDS
    from birdrounds.submit import inference_settings

    assert cfg.export.kinds and set(cfg.export.kinds) <= set(KINDS)
    assert Path(cfg.export.out_dir).is_relative_to(cfg.run_dir)
    inference_settings(cfg)  # an export records the predict settings


def build_predict(cfg) -> None:
    from birdrounds.submit import inference_settings

    settings = inference_settings(cfg)
    assert settings.smoothing == tuple(cfg.predict.smoothing or ())
    assert settings.engine == cfg.predict.engine


def build_paths(cfg) -> None:
    root = Path(cfg.paths.root)
    assert all(Path(cfg.paths[key]).parent == root for key in ("data_dir", "runs_dir", "external_dir"))


def build_teacher(cfg) -> None:
    from birdrounds.external import BACKENDS
    from birdrounds.teachers import ProbeHead, is_external

    assert is_external(cfg) == (cfg.teacher.kind != "cnn")
    if is_external(cfg):
        assert cfg.teacher.external.backend in BACKENDS and cfg.teacher.max_chunks_per_recording >= 1
    if cfg.teacher.kind == "probe":
        import numpy as np

        p = cfg.teacher.probe
        head = ProbeHead(8, len(CLASSES), p.hidden, p.dropout, np.zeros(8), np.ones(8))
        assert head.probs(np.zeros((2, 8), np.float32)).shape == (2, len(CLASSES))


BUILDERS = {"data": build_data, "model": build_model, "loss": build_loss, "train": build_train,
            "logger": build_logger, "pseudo": build_pseudo, "xc": build_xc, "export": build_export,
            "predict": build_predict, "paths": build_paths, "teacher": build_teacher}


def test_every_config_folder_is_a_group_of_the_root_config():
    defaults = OmegaConf.load(config_dir() / "config.yaml").defaults
    listed = {key for entry in defaults if not isinstance(entry, str) for key in entry}
    assert listed == set(GROUPS) and set(BUILDERS) == listed - {"experiment"}


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_validates_and_builds(group, option, home):
    # round=1: the student's keys (pseudo.*) are validated too.
    cfg = composed([f"{group}={option}", "round=1"], home / "birdclef-2025")
    validate(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "experiment":  # a global override file, not a key of its own
        assert resolved["experiment_name"] == option
    else:
        assert resolved[group] is not None
    assert resolved["run_dir"].startswith(str(home))  # paths follow BIRDROUNDS_HOME
    # An experiment selects options of several groups: build everything it composes.
    for builder in BUILDERS.values() if group == "experiment" else [BUILDERS[group]]:
        builder(cfg)


def test_birdclef2025_experiment_is_the_real_competition_recipe(tmp_path):
    cfg = composed(["experiment=birdclef2025"], tmp_path)
    validate(cfg)
    assert cfg.data.root == str(tmp_path) and cfg.data.synth is None
    assert cfg.model.backbone == "efficientnet_b0" and cfg.model.n_mels == 128
    # configs/train/default.yaml: the 1st-place 2025 supervised schedule (docs/recipes.md).
    settings = instantiate(cfg.train)
    assert (settings.epochs, settings.batch_size) == (15, 64)
    assert (cfg.train.optimizer.lr, cfg.train.optimizer.weight_decay) == (5e-4, 1e-4)
    assert (cfg.train.scheduler.restart_epochs, cfg.train.scheduler.min_lr) == (5.0, 1e-6)
    assert cfg.run_dir.endswith("runs/birdclef2025")


def test_accelerate_configs_load_as_accelerate_reads_them():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    for path in sorted((config_dir() / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))  # unknown keys would raise
        assert isinstance(config, ClusterConfig) and config.num_processes >= 1, path.name


def test_smoke_experiment_shrinks_everything():
    cfg = compose(["experiment=smoke"])
    assert cfg.model.backbone == "test_efficientnet"
    assert cfg.train.max_steps_per_epoch is not None
    assert cfg.data.synth.n_species < compose([]).data.synth.n_species
    assert cfg.run_dir.endswith("runs/smoke")
    real = compose(["experiment=smoke", "data=birdclef2025", "data.root=/data/birdclef-2025"])
    assert real.data.get("synth") is None and real.data.root == "/data/birdclef-2025"
    assert real.model.backbone == cfg.model.backbone and real.train.max_steps_per_epoch is not None


@pytest.mark.parametrize("override, key", [
    ("data.fold=7", "data.fold"),
    ("data.split_seed=-1", "data.split_seed"),
    ("data.split_seed=one", "data.split_seed"),
    ("data.mixed_val.subtract_background=maybe", "data.mixed_val.subtract_background"),
    ("data.mixed_val.distance_from_snr=maybe", "data.mixed_val.distance_from_snr"),
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


@pytest.mark.parametrize("override", ["data=birdclef2025", "experiment=birdclef2025"])
def test_real_data_config_needs_a_root(override):
    with pytest.raises(ConfigError, match=r"^data\.root: required"):
        validate(compose([override]))


def test_synthetic_data_is_generated_by_a_run_only_inside_the_project_home(tmp_path, monkeypatch):
    """A missing data.root outside the home is a typo (one line), not a place to generate a data set; inside
    the home (the default) or through `birdrounds synth` it is generated."""
    monkeypatch.setenv("BIRDROUNDS_HOME", str(tmp_path / "home"))
    typo = tmp_path / "elsewhere" / "synthetic_smok"
    with pytest.raises(ConfigError) as info:
        validate(compose(["experiment=smoke", f"data.root={typo}"]))
    assert error_line(info.value).startswith(f"data.root: no data at {typo}, which is outside the project home")
    assert not typo.exists()
    validate(compose(["experiment=smoke", f"data.root={typo}"]), may_generate=True)  # birdrounds synth
    validate(compose(["experiment=smoke"]))  # the default, inside the home
    validate(compose(["experiment=smoke", f"data.root={tmp_path / 'home' / 'data' / 'mine'}"]))


def test_model_options_share_a_base_and_repeat_none_of_it():
    """configs/model/*.yaml compose from _base.yaml and hold only their differences (each value once)."""
    base = yaml.safe_load((config_dir() / "model" / "_base.yaml").read_text())
    for option in GROUP_OPTIONS["model"]:
        spec = yaml.safe_load((config_dir() / "model" / f"{option}.yaml").read_text())
        assert spec["defaults"][0] == "_base", option
        repeated = [key for key, value in spec.items() if key in base and base[key] == value]
        assert not repeated, f"model/{option}.yaml repeats _base.yaml's {repeated}"
        composed = compose(["data.root=/data", f"model={option}"]).model
        assert all(key in composed for key in base), option


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
    assert error_line(info.value) == "train: train.epochs: must be an integer >= 1, got -1"
    assert error_line(ConfigError("data.fold: bad\nmore")) == "data.fold: bad"


# ---------------------------------------------------------------- pseudo presets over configs/pseudo/_base.yaml

# The `pseudo` section of each preset as composed before the presets shared _base.yaml (recorded then).
PRESETS_BEFORE_BASE = {
    "first_2025": {
        "window_s": 20.0, "stride_s": 5.0,
        "transform": {"_target_": "birdrounds.pseudo.Compose", "transforms": [
            {"_target_": "birdrounds.pseudo.Power", "exponents": [1.0, 1.54, 1.82, 1.67]},
            {"_target_": "birdrounds.pseudo.FileScale", "alpha": 1.0}]},
        "mixing": {"_target_": "birdrounds.mixing.make_mixed_dataset", "_partial_": True, "strategy": "mixup_max",
                   "mix_weight": 0.5, "file_weighted": True},
        "extra_teachers": [], "student_drop_path_rate": None, "student_init": "teacher", "background_p": None,
        "student_train": {"epochs": 15, "lr": None, "warmup_epochs": 0.5}, "truth": None,
    },
    "second_2025": {
        "window_s": 5.0, "stride_s": 5.0,
        "transform": {"_target_": "birdrounds.pseudo.Compose", "transforms": [
            {"_target_": "birdrounds.pseudo.Threshold", "threshold": 0.1, "keep_threshold": 0.5}]},
        "mixing": {"_target_": "birdrounds.mixing.make_mixed_dataset", "_partial_": True, "strategy": "replace",
                   "replace_prob": 0.4, "class_threshold": 0.5, "file_weighted": False},
        "extra_teachers": [], "student_drop_path_rate": None, "student_init": "teacher", "background_p": None,
        "student_train": {"epochs": 5, "lr": None, "warmup_epochs": 0.5}, "truth": None,
    },
    "fourth_2025": {
        "window_s": 5.0, "stride_s": 5.0,
        "transform": {"_target_": "birdrounds.pseudo.Compose", "transforms": [
            {"_target_": "birdrounds.pseudo.MinMax"}, {"_target_": "birdrounds.pseudo.DropLowest", "fraction": 0.2}]},
        "mixing": {"_target_": "birdrounds.mixing.make_mixed_dataset", "_partial_": True, "strategy": "concat",
                   "ratio": 1.0, "file_weighted": False},
        "extra_teachers": [], "student_drop_path_rate": None, "student_init": "teacher", "background_p": None,
        "student_train": {"epochs": 5, "lr": None, "warmup_epochs": 0.5}, "truth": None,
    },
    "none": {
        "window_s": 5.0, "stride_s": 5.0,
        "transform": {"_target_": "birdrounds.pseudo.Compose", "transforms": []},
        "mixing": {"_target_": "birdrounds.mixing.make_mixed_dataset", "_partial_": True, "strategy": "concat",
                   "ratio": 1.0, "file_weighted": False},
        "extra_teachers": [], "student_drop_path_rate": None, "student_init": "teacher", "background_p": None,
        "student_train": {"epochs": 5, "lr": None, "warmup_epochs": 0.5}, "truth": None,
    },
}


@pytest.mark.parametrize("preset", sorted(PRESETS_BEFORE_BASE))
def test_pseudo_presets_compose_as_before_they_shared_a_base(preset):
    composed_pseudo = OmegaConf.to_container(compose([f"pseudo={preset}"]).pseudo, resolve=True)
    assert composed_pseudo == PRESETS_BEFORE_BASE[preset]
    assert (config_dir() / "pseudo" / "_base.yaml").is_file()  # the presets do share it


def test_the_shared_base_is_not_an_option():
    with pytest.raises(ConfigError, match=r"^pseudo=_base: no such option; choose from first_2025, fourth_2025, "
                                          r"none, second_2025$"):
        compose(["pseudo=_base"])


# ---------------------------------------------------------------- unknown keys, unknown options, added keys

@pytest.mark.parametrize("override, message", [
    ("foo=1", "foo=1: no such key"),
    ("pseudo.windows_s=10", "pseudo.windows_s=10: no such key; did you mean pseudo.window_s?"),
    ("pseudo=frist_2025", "pseudo=frist_2025: no such option; choose from first_2025, fourth_2025, none, second_2025"),
    ("+foo=1", "+foo=1: no such key, and no component would read an added one"),
    ("++foo=1", "++foo=1: no such key, and no component would read an added one"),
    ("+pseudo.student_train.foo=1", "+pseudo.student_train.foo=1: no such key, and no component would read"),
    ("+data.synth.nope=1", "+data.synth.nope=1: birdrounds.data.synthetic.SynthSpec takes no argument 'nope'"),
    ("+train.optimizer.nope=1", "+train.optimizer.nope=1: torch.optim.AdamW takes no argument 'nope'"),
    ("+accelerate=cpu_2proc", "+accelerate=cpu_2proc: adds config group 'accelerate', which no component reads"),
    ("data.root", "data.root: not an override"),
])
def test_a_bad_override_is_one_config_error_naming_it(override, message):
    with pytest.raises(ConfigError) as info:
        compose(["experiment=smoke", override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_keys_added_where_a_component_takes_them_are_kept():
    # The additions the tests, the README and bench/rounds_gain.py use: arguments of a `_target_` the YAML
    # leaves at their default, and entries of a dict argument.
    cfg = compose(["+data.augment.noise_snr_db=[1.0,2.0]", "+data.synth.soundscape_dialect=0.1",
                   "+xc.synonyms.Regulus=Corthylio", "+train.optimizer.betas=[0.9,0.99]", "++seed=3"])
    assert list(cfg.data.augment.noise_snr_db) == [1.0, 2.0] and cfg.data.synth.soundscape_dialect == 0.1
    assert cfg.xc.synonyms.Regulus == "Corthylio" and cfg.seed == 3
    assert instantiate(cfg.data.synth).soundscape_dialect == 0.1


def test_a_bad_override_error_redacts_a_secret():
    with pytest.raises(ConfigError) as info:
        compose(["xc.apikey=hunter2"])
    assert "hunter2" not in str(info.value) and str(info.value).endswith("did you mean xc.api_key?")


ENTRY_POINTS = {"rounds/run.py": ["rounds/run.py"], "birdrounds": ["-m", "birdrounds.cli", "synth"]}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("override, message", [
    ("foo=1", "foo=1: no such key"),
    ("pseudo=frist_2025", "pseudo=frist_2025: no such option; choose from first_2025, fourth_2025, none, second_2025"),
    ("+foo=1", "+foo=1: no such key, and no component would read an added one"),
])
def test_both_entry_points_answer_a_bad_key_in_one_line_with_exit_2(entry, override, message, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, *ENTRY_POINTS[entry], override], capture_output=True, text=True, cwd=repo,
                          env={**__import__("os").environ, "BIRDROUNDS_HOME": str(tmp_path)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []  # refused before any data or run folder


@pytest.mark.parametrize("override, message", [
    ("train.optimizer.lr=-1", "train.optimizer.lr: must be a number > 0, got -1"),
    ("train.optimizer.lr=abc", "train.optimizer.lr: must be a number > 0, got 'abc'"),
    ("train.optimizer.lr=null", "train.optimizer.lr: must be a number > 0, got None"),
    ("seed=abc", "seed: must be an integer >= 0, got 'abc'"),
    ("seed=1.5", "seed: must be an integer >= 0, got 1.5"),
    ("train.optimizer.weight_decay=-0.1", "train.optimizer.weight_decay: must be a number >= 0, got -0.1"),
    ("data.augment.gain_p=1.5", "data.augment.gain_p: must be a number in [0, 1] or null, got 1.5"),
    ("data.mixup.prob=true", "data.mixup.prob: must be a number in [0, 1], got True"),
    ("model.drop_rate=1.0", "model.drop_rate: must be a number in [0, 1) or null, got 1.0"),
    ("train.scheduler.min_lr=-1e-6", "train.scheduler.min_lr: must be a number >= 0, got -1e-06"),
    ("train.num_workers=-1", "train.num_workers: must be an integer >= 0 or null, got -1"),
    ("pseudo.student_train.lr=0", "pseudo.student_train.lr: must be a number > 0 or null, got 0"),
    ("data.mixed_val.seed=x", "data.mixed_val.seed: must be an integer >= 0 or null, got 'x'"),
])
def test_a_bad_number_is_one_line_before_any_work(override, message):
    with pytest.raises(ConfigError) as info:
        validate(compose(["experiment=smoke", "data.root=/data", override]))
    assert error_line(info.value) == message


def test_every_shipped_option_passes_the_value_rules():
    from birdrounds.config import check_values

    for group, option in CASES:
        check_values(compose(["data.root=/data", f"{group}={option}"]))


@pytest.mark.slow
def test_a_bad_value_on_an_existing_run_names_the_value_and_renames_nothing(smoke_run, tmp_path):
    """`recompute_from=0` with a bad learning rate on a finished run: one line naming the value, exit 2, every
    file of the run folder as it was (no round renamed to *.replaced-*)."""
    import shutil

    from conftest import tree_hashes

    run_dir = Path(shutil.copytree(smoke_run.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("wandb")))
    before = tree_hashes(run_dir)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "rounds" / "run.py"),
                           "experiment=smoke", f"run_dir={run_dir}", "recompute_from=0", "train.optimizer.lr=-1"],
                          capture_output=True, text=True, env={**__import__("os").environ,
                                                               "BIRDROUNDS_HOME": str(smoke_run.home)}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["rounds/run.py: error: train.optimizer.lr: must be a number > 0, got -1"]
    assert tree_hashes(run_dir) == before


# ---------------------------------------------------------------- the user's own config folder (--config-dir)

def test_a_users_config_dir_adds_options_beside_the_shipped_ones(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - smoke\n  - _self_\nexperiment_name: mine\nseed: 7\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "demo.yaml").write_text("epochs: 3\n")  # a shipped option's name: the shipped file wins
    cfg = compose(["experiment=mine"], user_dirs=[tmp_path])
    assert cfg.experiment_name == "mine" and cfg.seed == 7 and cfg.model.backbone == compose(["experiment=smoke"]).model.backbone
    assert compose([], user_dirs=[tmp_path]).train.epochs == compose([]).train.epochs
    with pytest.raises(ConfigError, match=r"^experiment=mine: no such option; choose from birdclef2025, demo, few_shot, smoke$"):
        compose(["experiment=mine"])  # without the folder, the option does not exist
    with pytest.raises(ConfigError, match=r"^--config-dir: no such folder: "):
        compose([], user_dirs=[tmp_path / "missing"])


def test_the_config_tree_ships_inside_the_package():
    import birdrounds

    assert config_dir() == Path(birdrounds.__file__).parent / "configs"
    assert (Path(__file__).resolve().parents[1] / "configs").resolve() == config_dir()  # the checkout's configs/ link


def test_the_demo_preset_is_the_default_recipe_with_shorter_student_rounds():
    demo, default = compose(["experiment=demo"]), compose([])
    assert demo.pseudo.student_train.epochs < default.pseudo.student_train.epochs
    for node in ("data", "model", "train", "loss"):  # the teacher's recipe is the default's
        assert OmegaConf.to_container(demo[node], resolve=True) == OmegaConf.to_container(default[node], resolve=True)
    assert (demo.experiment_name, demo.pseudo.student_train.epochs) == ("demo", 6)


def test_a_mixing_strategy_without_its_arguments_is_one_line_before_any_work(home):
    """pseudo.mixing.strategy=concat over a mixup_max preset: concat's ratio is named before the teacher
    trains (the strategies' arguments have no Python defaults), and adding it is enough."""
    with pytest.raises(ConfigError) as info:
        validate(compose(["experiment=smoke", "data.root=/data", "round=1", "pseudo.mixing.strategy=concat"]))
    assert error_line(info.value).startswith("pseudo.mixing.ratio: strategy concat needs it")
    validate(compose(["experiment=smoke", "round=1", "pseudo.mixing.strategy=concat", "+pseudo.mixing.ratio=1.0"]))
