"""The equal-compute control arm, the oracle's truth labels and the students' fine-tuning schedule."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from birdrounds.config import ConfigError, compose
from birdrounds.pseudo import read_truth
from birdrounds.report import run_summary, round_rows, write_report
from birdrounds.rounds import config_hash, round_train_config, student_data_config

CLASSES = ["a", "b", "c"]
ROW_IDS = ["s1_5", "s1_10", "s2_5"]


def truth_csv(path, rows=ROW_IDS, columns=("row_id", "c", "a", "b"), values=None):
    values = np.arange(len(rows) * 3).reshape(len(rows), 3) % 2 if values is None else values
    table = pd.DataFrame(values, columns=list(columns[1:]))
    table.insert(0, columns[0], rows)
    table.to_csv(path, index=False)
    return path


def test_read_truth_orders_rows_and_classes_like_the_chunks(tmp_path):
    path = truth_csv(tmp_path / "truth.csv", rows=["s2_5", "s1_5", "s1_10"],
                     values=np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]]))  # columns c, a, b
    probs = read_truth(path, ROW_IDS, CLASSES)
    # s1_5 has a, s1_10 has b, s2_5 has c
    np.testing.assert_array_equal(probs, np.eye(3, dtype=np.float32))
    assert probs.dtype == np.float32


@pytest.mark.parametrize("case, message", [
    ("missing_class", "classes do not match"),
    ("unknown_class", "classes do not match"),
    ("missing_row", "1 train-soundscape chunks have no row"),
    ("unknown_row", "1 rows name no train-soundscape chunk"),
    ("bad_value", "values must be numbers in [0, 1]"),
    ("no_row_id", "no row_id column"),
])
def test_read_truth_refuses_a_csv_that_does_not_match(tmp_path, case, message):
    path = tmp_path / "truth.csv"
    if case == "missing_class":
        truth_csv(path, columns=("row_id", "a", "b", "b2"))
    elif case == "unknown_class":
        truth_csv(path, columns=("row_id", "a", "b", "zzz"))
    elif case == "missing_row":
        truth_csv(path, rows=ROW_IDS[:2], values=np.zeros((2, 3)))
    elif case == "unknown_row":
        truth_csv(path, rows=[*ROW_IDS, "s9_5"], values=np.zeros((4, 3)))
    elif case == "bad_value":
        truth_csv(path, values=np.array([[0, 2, 0], [0, 0, 0], [1, 0, 0]]))
    else:
        truth_csv(path, columns=("id", "a", "b", "c"))
    with pytest.raises(ConfigError, match=r"^pseudo\.truth: ") as err:
        read_truth(path, ROW_IDS, CLASSES)
    assert message in str(err.value)


def test_read_truth_accepts_rows_of_soundscapes_skipped_as_unreadable(tmp_path):
    path = truth_csv(tmp_path / "truth.csv", rows=[*ROW_IDS, "broken_5"], values=np.zeros((4, 3)))
    assert read_truth(path, ROW_IDS, CLASSES, skipped_stems={"broken"}).shape == (3, 3)


def test_student_train_applies_to_students_and_controls_only():
    cfg = compose(["pseudo.student_train.epochs=4", "pseudo.student_train.lr=2e-4",
                   "pseudo.student_train.warmup_epochs=0.5"])
    teacher, student = round_train_config(cfg, 0), round_train_config(cfg, 1)
    assert (teacher.epochs, teacher.optimizer.lr, teacher.scheduler.warmup_epochs) == (cfg.train.epochs, 1e-3, 1.0)
    assert (student.epochs, student.optimizer.lr, student.scheduler.warmup_epochs) == (4, 2e-4, 0.5)
    assert student.batch_size == cfg.train.batch_size  # the rest is train's
    assert config_hash(cfg, 0) == config_hash(compose([]), 0)  # the teacher does not read it


def test_student_background_p_leaves_the_teachers_data_config_alone():
    cfg = compose(["pseudo.background_p=0.0"])
    assert student_data_config(cfg).augment.background_p == 0.0
    assert cfg.data.augment.background_p == 0.5  # teacher and controls keep data.augment's
    assert student_data_config(compose([])) is not None and compose([]).pseudo.background_p is None
    assert student_data_config(compose([])).augment.background_p == 0.5


def test_control_flag_changes_no_round_hash():
    base = compose(["experiment=smoke"])
    with_control = compose(["experiment=smoke", "control=true"])
    assert all(config_hash(base, k) == config_hash(with_control, k) for k in (0, 1, 2))
    oracle = compose(["experiment=smoke", "pseudo.truth=/some/truth.csv"])
    assert config_hash(base, 0) == config_hash(oracle, 0) and config_hash(base, 1) != config_hash(oracle, 1)


def _write_arm(folder, soundscape_auc, clip_auc, seconds):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"val_soundscape_auc": soundscape_auc, "val_clip_auc": clip_auc}))
    (folder / "manifest.json").write_text(json.dumps({"seconds": seconds}))
    (folder / "DONE").write_text("{}")


def test_report_shows_control_and_gain_for_every_round(tmp_path):
    _write_arm(tmp_path / "round_0", 0.60, 0.90, 100.0)
    _write_arm(tmp_path / "round_1", 0.70, 0.91, 80.0)
    _write_arm(tmp_path / "round_1" / "control", 0.64, 0.92, 70.0)
    _write_arm(tmp_path / "round_2", 0.75, 0.92, 81.0)
    (tmp_path / "round_2" / "control").mkdir()  # a control still training: no numbers yet

    rows = round_rows(tmp_path)
    assert rows[1]["control_val_soundscape_auc"] == 0.64
    assert abs(rows[1]["gain_vs_control_val_soundscape_auc"] - 0.06) < 1e-12
    assert abs(rows[1]["gain_vs_control_val_clip_auc"] + 0.01) < 1e-12
    assert rows[2]["gain_vs_control_val_soundscape_auc"] is None

    report = write_report(tmp_path).read_text()
    assert "| control | gain vs control |" in report
    table = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| -")]
    assert table[2].split(" | ")[:10] == ["| 1", "–", "0.700", "+0.100", "0.640", "+0.060", "0.910", "+0.010", "0.920",
                                          "-0.010"]
    assert table[2].endswith("| 80 + 70 |")
    assert table[3].split(" | ")[4:6] == ["–", "–"]

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary == run_summary(rows)
    first, second = summary["rounds"][1], summary["rounds"][2]
    assert first["control"] == {"val_soundscape_auc": 0.64, "val_clip_auc": 0.92, "seconds": 70.0}
    assert abs(first["gain_vs_control"]["val_soundscape_auc"] - 0.06) < 1e-12
    assert second["control"] is None and summary["rounds"][0]["arm"] == "teacher"


# ----------------------------------------------------------------------------- end to end (smoke runs)

from birdrounds.model import load_checkpoint, weights_hash  # noqa: E402
from birdrounds.pseudo import read_pseudo_labels, split_table  # noqa: E402
from birdrounds.train import COMPLETE_MARKER  # noqa: E402
from conftest import DEMO_ROUNDS, copy_rounds  # noqa: E402
from test_run_e2e import _weights, kill_when, run_rounds, start_rounds  # noqa: E402

CONTROL_OVERRIDES = ("logger=none", "round=1", "control=true")


@pytest.mark.slow
def test_control_starts_from_the_students_weights_sees_no_pseudo_data_and_resumes(smoke_run, tmp_path):
    """round=1 control=true: the control is killed after its first epoch and resumed; it ends bitwise
    where an uninterrupted control ends (the shared smoke run's), started from the student's initial
    weights (the teacher's), trained on the labeled clips alone, and the report shows it beside the
    student. Round 2's control then continues round 1's control."""
    home, reference = smoke_run.home, smoke_run.run_dir
    # The shared run's teacher and round-1 student (not its control), copied: only the control trains here.
    run_dir = copy_rounds(reference, tmp_path / "run", "round_0", "round_1/")
    overrides = (*CONTROL_OVERRIDES, f"run_dir={run_dir}")
    marker = run_dir / "round_1" / "control" / "checkpoints" / "epoch_000" / COMPLETE_MARKER
    kill_when(start_rounds(home, {"BIRDROUNDS_TEST_COLLATE_DELAY_S": "0.5"}, *overrides, cwd=tmp_path), marker.exists)
    assert (run_dir / "round_1" / "DONE").is_file() and not (run_dir / "round_1" / "control" / "DONE").exists()
    done = run_rounds(home, *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log_text = done.stdout + done.stderr
    assert "round 1 already complete" in log_text and "resumed from" in log_text

    control_dir = run_dir / "round_1" / "control"
    for name in ("model.pt", "metrics.json", "manifest.json", "config.yaml", "DONE"):
        assert (control_dir / name).is_file(), name
    theirs = _weights(reference / "round_1" / "control" / "model.pt")
    ours = _weights(control_dir / "model.pt")
    assert all(torch.equal(value, ours[name]) for name, value in theirs.items())

    student = json.loads((run_dir / "round_1" / "metrics.json").read_text())
    control = json.loads((control_dir / "metrics.json").read_text())
    teacher = load_checkpoint(run_dir / "round_0" / "model.pt")[0]
    assert control["init_weights_hash"] == student["init_weights_hash"] == weights_hash(teacher)
    assert control["arm"] == "control" and student["arm"] == "student" and "pseudo" not in control
    assert json.loads((control_dir / "manifest.json").read_text())["arm"] == "control"
    # Same schedule: as many optimizer updates as the student.
    assert control["step"] == student["step"]

    summary = json.loads((run_dir / "metrics.json").read_text())["rounds"][1]
    assert summary["control"]["val_soundscape_auc"] == control["val_soundscape_auc"]
    assert summary["gain_vs_control"]["val_soundscape_auc"] == pytest.approx(
        student["val_soundscape_auc"] - control["val_soundscape_auc"])
    row = next(line for line in (run_dir / "report.md").read_text().splitlines() if line.startswith("| 1 |"))
    assert f"{control['val_soundscape_auc']:.3f}" in row

    # Round 2 (the shared run, brought to round 2 by `make demo`, then run again): a finished control is
    # reused like a round; round 2's control continues round 1's control (the run on labeled data alone),
    # while the student continues the round-1 student.
    again = smoke_run.again
    assert "round 1 control already complete" in again.stdout + again.stderr
    student2 = json.loads((reference / "round_2" / "metrics.json").read_text())
    control2 = json.loads((reference / "round_2" / "control" / "metrics.json").read_text())
    assert student2["init_weights_hash"] == weights_hash(load_checkpoint(reference / "round_1" / "model.pt")[0])
    assert control2["init_weights_hash"] == weights_hash(load_checkpoint(reference / "round_1" / "control" / "model.pt")[0])
    assert control2["init_weights_hash"] != student2["init_weights_hash"]
    assert len(json.loads((reference / "metrics.json").read_text())["rounds"]) == DEMO_ROUNDS + 1 == 3


def test_control_trains_on_the_labeled_clips_only(home, monkeypatch):
    """The control's training set is the teacher's labeled set; the student's mixes in pseudo chunks."""
    from accelerate import Accelerator

    from birdrounds import cli, rounds
    from birdrounds.data.clips import ClipDataset
    from birdrounds.data.prepare import prepare_data
    from birdrounds.mixing import MixupMaxDataset
    from birdrounds.model import save_checkpoint

    assert cli.main(["synth", "experiment=smoke"]) == 0
    cfg = compose(["experiment=smoke", "logger=none", "round=1"])
    prepared = prepare_data(cfg.data, progress=False)
    teacher = home / "round_0" / "model.pt"
    save_checkpoint(teacher, rounds.build_model(cfg, len(prepared.data.classes), 0), prepared.data.classes)
    seen = {}
    monkeypatch.setattr(rounds, "fit", lambda acc, model, train_set, *a, **k: seen.update(set=train_set) or {})
    round_dir = home / "round_1"
    rounds.train_round(cfg, prepared, Accelerator(cpu=True), round_dir, 1, [teacher], control=True)
    assert type(seen["set"]) is ClipDataset and not (round_dir / "pseudo_labels.parquet").exists()
    n_labeled = len(seen["set"])
    rounds.train_round(cfg, prepared, Accelerator(cpu=True), round_dir, 1, [teacher])
    assert isinstance(seen["set"], MixupMaxDataset) and len(seen["set"]) == n_labeled


@pytest.mark.slow
def test_oracle_trains_on_the_truth_csv_and_refuses_one_that_does_not_match(smoke_data, tmp_path):
    # The shared smoke data (unbroken: the truth table has a row for every chunk), a run folder of its own.
    home = smoke_data
    truth = home / "data" / "synthetic_smoke" / "truth" / "train_soundscape_labels.csv"
    run_dir = tmp_path / "run"
    # Through a file-level transform too: the round hands it each chunk's file (it would refuse otherwise),
    # and on 0/1 labels it changes nothing (a class present in a file has file max 1, an absent one is 0).
    file_scale = "pseudo.transform.transforms=[{_target_:birdrounds.pseudo.FileScale,alpha:1.0}]"
    proc = run_rounds(home, "logger=none", "round=1", f"pseudo.truth={truth}", file_scale, f"run_dir={run_dir}",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table, provenance = read_pseudo_labels(run_dir / "round_1" / "pseudo_labels.parquet")
    expected = pd.read_csv(truth).set_index("row_id")
    rows, probs = split_table(table, provenance["classes"])
    np.testing.assert_array_equal(probs, expected.loc[rows["row_id"], provenance["classes"]].to_numpy(np.float32))
    assert len(table) == len(expected) and provenance["truth"] == str(truth) and "teacher" not in provenance
    assert provenance["transform"] == "file_scale(alpha=1)"

    # Another run folder holding the same teacher, with a truth table that lacks a class: one line, exit 2.
    bad = tmp_path / "bad_truth.csv"
    expected.drop(columns=expected.columns[0]).reset_index().to_csv(bad, index=False)
    other = copy_rounds(run_dir, tmp_path / "other", "round_0")
    refused = run_rounds(home, "logger=none", "round=1", f"pseudo.truth={bad}", f"run_dir={other}", cwd=tmp_path)
    assert refused.returncode == 2
    output = refused.stdout + refused.stderr
    assert "pseudo.truth:" in output and "classes do not match" in output
    assert "Traceback" not in output and not (other / "round_1" / "DONE").exists()


def test_oracle_ignores_the_truth_rows_of_a_soundscape_found_unreadable_when_preparing(smoke_data, tmp_path):
    """A train soundscape dropped as unreadable before chunking: its rows in the truth table are not an error."""
    from birdrounds.data.audio import AudioCache
    from birdrounds.data.soundscapes import SoundscapeChunks
    from birdrounds.rounds import write_truth_labels

    root = smoke_data / "data" / "synthetic_smoke"
    truth = root / "truth" / "train_soundscape_labels.csv"
    cfg = compose(["experiment=smoke", f"pseudo.truth={truth}", "round=1"])
    classes = list(pd.read_csv(root / "taxonomy.csv")["primary_label"].astype(str))
    scapes = sorted((root / "train_soundscapes").glob("*.ogg"))
    readable = SoundscapeChunks(scapes[1:], AudioCache(tmp_path / "cache", 32000), window_s=5.0, stride_s=5.0)
    with pytest.raises(ConfigError, match="rows name no train-soundscape chunk"):
        write_truth_labels(cfg, readable, classes, 1, tmp_path / "refused.parquet")
    write_truth_labels(cfg, readable, classes, 1, tmp_path / "pseudo.parquet", unreadable=[str(scapes[0])])
    table, _ = read_pseudo_labels(tmp_path / "pseudo.parquet")
    assert len(table) == len(readable) and scapes[0].stem not in set(table["file"].map(lambda f: Path(f).stem))


def test_oracle_labels_win_over_an_external_teachers_chunk_table(smoke_data, tmp_path):
    """After an external teacher, round 1's teacher is round 0's chunk table; `pseudo.truth` still gives the
    true labels (the table is not read: an empty file stands for it)."""
    from accelerate import Accelerator

    from birdrounds.data.prepare import prepare_data
    from birdrounds.rounds import pseudo_label

    truth = smoke_data / "data" / "synthetic_smoke" / "truth" / "train_soundscape_labels.csv"
    cfg = compose(["experiment=smoke", "teacher=zero_shot", f"pseudo.truth={truth}", "round=1"])
    prepared = prepare_data(cfg.data, progress=False)
    table = tmp_path / "round_0" / "teacher_chunks.parquet"
    table.parent.mkdir()
    table.touch()
    path = pseudo_label(cfg, prepared, [table], 1, tmp_path / "round_1", Accelerator(cpu=True))
    labels, provenance = read_pseudo_labels(path)
    assert provenance["truth"] == str(truth) and len(labels) == len(pd.read_csv(truth))
