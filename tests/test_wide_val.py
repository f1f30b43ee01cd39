"""bench/wide_val.py: the same synthetic data with more labeled validation soundscapes, for benchmark scoring."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from birdrounds.config import compose
from birdrounds.model import save_checkpoint
from conftest import config_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from wide_val import ValidationSoundscapes, check_same_training_data, round_arms  # noqa: E402


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    """The smoke data config under one home for the module, its data generated (the folders are shared: each
    test may run first on its worker)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIRDROUNDS_HOME", str(tmp_path_factory.mktemp("home")))
        data = compose(["experiment=smoke"]).data
        OmegaConf.resolve(data)
    ValidationSoundscapes.build(data)  # generates the data itself
    return data


def test_twin_keeps_the_training_data_and_adds_validation_soundscapes(data_cfg):
    own = ValidationSoundscapes.build(data_cfg)
    assert own.root == Path(data_cfg.root) and own.n_files == data_cfg.synth.n_val_soundscapes == 2

    wide = ValidationSoundscapes.build(data_cfg, n_soundscapes=5)
    assert wide.root == Path(data_cfg.root).with_name(Path(data_cfg.root).name + "_val5") and wide.n_files == 5
    rows_per_file = int(data_cfg.synth.soundscape_s // 5)
    assert len(wide.solution) == len(wide.chunks) == 5 * rows_per_file
    # The data's own validation rows are among the twin's, with the same labels.
    own_solution = own.solution.set_index("row_id")
    assert wide.solution.set_index("row_id").loc[own_solution.index].equals(own_solution)

    # Without the soundscapes each round chose its epoch on: the twin's other files and their rows only.
    unseen = ValidationSoundscapes.build(data_cfg, n_soundscapes=5, unseen=True)
    own_files = {Path(f).name for f in own.chunks.rows["file"]}
    assert unseen.n_files == 3 and not own_files & {Path(f).name for f in unseen.chunks.rows["file"]}
    assert len(unseen.solution) == len(unseen.chunks) == 3 * rows_per_file
    assert not set(unseen.solution["row_id"]) & set(own.solution["row_id"])
    assert set(unseen.solution["row_id"]) | set(own.solution["row_id"]) == set(wide.solution["row_id"])

    # A twin whose training audio differs is refused, naming the file.
    victim = sorted((wide.root / "train_audio").rglob("*.ogg"))[0]
    audio, rate = sf.read(victim)
    sf.write(victim, audio * 0.5, rate, format="OGG", subtype="VORBIS")
    with pytest.raises(SystemExit, match=victim.name):
        check_same_training_data(Path(data_cfg.root), wide.root)


def test_score_matches_per_class_mean_and_is_cached_under_the_weights_hash(data_cfg, tmp_path):
    wide = ValidationSoundscapes.build(data_cfg, n_soundscapes=4)
    classes = list(pd.read_csv(Path(data_cfg.root) / "taxonomy.csv")["primary_label"].astype(str))
    model_path = tmp_path / "round_1" / "model.pt"
    save_checkpoint(model_path, config_model(len(classes)), classes)

    auc = wide.score(model_path)
    per_class = wide.per_class(model_path)
    assert 0.0 <= auc <= 1.0 and np.isclose(auc, per_class.mean())  # macro = mean over scored classes
    assert np.isclose(wide.score_probs(*wide.predict(model_path)), auc)  # what mixed_val_corr.py scores with
    cache = model_path.with_name("model.val4.json")
    record = json.loads(cache.read_text())
    assert record["val_soundscape_auc"] == auc and record["files"] == 4

    # The cache is read while the weights are the same, and ignored once they change.
    cache.write_text(json.dumps({**record, "val_soundscape_auc": 0.123}))
    assert wide.score(model_path) == 0.123
    save_checkpoint(model_path, config_model(len(classes)), classes)  # another random init
    assert wide.score(model_path) != 0.123 and json.loads(cache.read_text())["checkpoint_hash"] != record["checkpoint_hash"]


def test_cli_scores_each_round_and_its_control_on_both_sets(data_cfg, tmp_path):
    classes = list(pd.read_csv(Path(data_cfg.root) / "taxonomy.csv")["primary_label"].astype(str))
    run = tmp_path / "run"
    for folder, seed in (("round_0", 0), ("round_1", 1), ("round_1/control", 2), ("round_2", 3)):
        path = run / folder
        torch.manual_seed(seed)  # distinct random weights per arm
        save_checkpoint(path / "model.pt", config_model(len(classes)), classes)
        (path / "metrics.json").write_text("{}")
        (path / "DONE").touch()
        OmegaConf.save(OmegaConf.create({"data": data_cfg}), path / "config.yaml")
    (run / "round_3").mkdir()  # unfinished: left out
    assert [(k, f.name, c is not None) for k, f, c in round_arms(run)] == [
        (0, "round_0", False), (1, "round_1", True), (2, "round_2", False)]

    records = tmp_path / "records"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "wide_val.py"),
                           str(run), "--val-soundscapes", "4", "--record"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BIRDROUNDS_RESULTS_DIR": str(records)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 1", "| 2"]
    own = ValidationSoundscapes.build(data_cfg)
    wide = ValidationSoundscapes.build(data_cfg, n_soundscapes=4)
    student, control = run / "round_1" / "model.pt", run / "round_1" / "control" / "model.pt"
    expected = [own.score(student), own.score(control), own.score(student) - own.score(control),
                wide.score(student), wide.score(control), wide.score(student) - wide.score(control)]
    assert rows[1] == "| 1 | " + " | ".join(
        f"{v:+.3f}" if i % 3 == 2 else f"{v:.3f}" for i, v in enumerate(expected)) + " |"
    assert rows[0].endswith("| – | – |") and "2 soundscapes" in proc.stdout and "4 soundscapes" in proc.stdout

    # --record: the same figures, unrounded, in a record that renders on the results page.
    [path] = records.glob("wide-val-*.json")
    assert f"record: {path}" in proc.stderr
    record = json.loads(path.read_text())
    assert record["benchmark"] == "wide_val" and record["command"].startswith("python bench/wide_val.py")
    result = record["results"]
    assert (result["own_val_soundscapes"], result["wide_val_soundscapes"]) == (2, 4)
    assert [r["round"] for r in result["rounds"]] == [0, 1, 2]
    keys = ("student_own", "control_own", "gain_own", "student_wide", "control_wide", "gain_wide")
    assert [result["rounds"][1][k] for k in keys] == pytest.approx(expected)
    assert result["rounds"][0]["student_own"] == own.score(run / "round_0" / "model.pt")
    assert all(result["rounds"][k][f"{arm}_{val}"] is None for k in (0, 2) for arm in ("control", "gain")
               for val in ("own", "wide"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from render_results import load_records, render

    page = render(load_records(records))
    assert "| round | student_own | control_own | gain_own | student_wide | control_wide | gain_wide |" in page
    assert page.count("| – | – |") == 4  # rounds 0 and 2: no control, so no gain
