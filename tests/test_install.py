"""The package as a user installs it: a wheel (not editable), run from an empty folder, configs included.

The wheel is built from this checkout and installed with `--no-deps` into a folder put first on
PYTHONPATH, so the dependencies this environment already has (torch, ...) are reused and no second copy
is downloaded; the test checks that the installed copy, not the checkout, is the one that runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel of this checkout installed with --no-deps into a fresh folder (its `site`); returns the folder."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"  # a copy, so the build leaves nothing (build/, *.egg-info) in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = next((work / "dist").glob("birdrounds-*.whl"))
    site = work / "site"
    done = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return site


def run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`birdrounds <args>` through the installed copy's console script, in `cwd`, data and runs under `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(site), "BIRDROUNDS_HOME": str(cwd), "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    env.pop("BIRDROUNDS_CONFIG_DIR", None)
    return subprocess.run([sys.executable, str(site / "bin" / "birdrounds"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_the_wheel_holds_the_config_tree_and_its_copy_is_the_one_imported(installed, tmp_path):
    shipped = sorted(p.relative_to(REPO / "src" / "birdrounds" / "configs").as_posix()
                     for p in (REPO / "src" / "birdrounds" / "configs").rglob("*.yaml"))
    copied = sorted(p.relative_to(installed / "birdrounds" / "configs").as_posix()
                    for p in (installed / "birdrounds" / "configs").rglob("*.yaml"))
    assert copied == shipped and "config.yaml" in copied and "experiment/smoke.yaml" in copied
    probe = subprocess.run([sys.executable, "-c", "import birdrounds.config as c; print(c.__file__); print(c.config_dir())"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(installed)})
    module, configs = probe.stdout.split()
    assert Path(module).is_relative_to(installed) and Path(configs) == installed / "birdrounds" / "configs"


def test_installed_copy_runs_synth_rounds_export_predict_from_an_empty_folder_with_a_users_config_dir(installed, tmp_path):
    """What a Kaggle or Colab user does after `pip install`: nothing of the checkout is reachable. The run
    takes a preset from the user's own config folder (`--config-dir`), which builds on a shipped one."""
    work = tmp_path / "empty"
    work.mkdir()
    mine = tmp_path / "my_configs" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - smoke\n  - _self_\nexperiment_name: mine\n")
    user = ["--config-dir", str(tmp_path / "my_configs"), "experiment=mine"]

    bad = run(installed, work, "run", "foo=1")  # the rounds entry answers a bad key as every command does
    assert bad.returncode == 2 and bad.stderr.strip() == "birdrounds run: error: foo=1: no such key", bad.stderr
    synth = run(installed, work, "synth", *user)
    assert synth.returncode == 0, synth.stderr[-3000:]
    assert Path(synth.stdout.split()[-1]) == work / "data" / "synthetic_smoke"
    rounds = run(installed, work, "run", *user, "round=1", "logger=none")
    assert rounds.returncode == 0, rounds.stdout[-3000:] + rounds.stderr[-3000:]
    run_dir = work / "runs" / "mine"
    assert (run_dir / "round_1" / "model.pt").is_file() and (run_dir / "run.log").is_file()
    assert (run_dir / "round_1" / "config.yaml").read_text().count("experiment_name: mine") == 1
    export = run(installed, work, "export", *user)
    assert export.returncode == 0, export.stderr[-3000:]
    predict = run(installed, work, "predict", *user)
    assert predict.returncode == 0, predict.stderr[-3000:]
    submission = pd.read_csv(run_dir / "submission.csv")
    assert len(submission) > 0 and submission["row_id"].is_unique
    assert sorted(p.name for p in work.iterdir()) == ["data", "runs"]  # nothing written beside them
