"""`python rounds/run.py` as a user runs it: smoke experiment, round records, reuse, bad audio skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from birdrounds import cli
from birdrounds.model import checkpoint_hash, load_checkpoint
from birdrounds.pseudo import read_pseudo_labels

REPO = Path(__file__).resolve().parents[1]


def run_rounds(home: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BIRDROUNDS_HOME": str(home), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, str(REPO / "rounds" / "run.py"), "experiment=smoke", *overrides],
                          capture_output=True, text=True, env=env, cwd=home, timeout=600)


@pytest.mark.slow
def test_smoke_run_writes_round0_and_skips_bad_audio(home):
    # Generate the data first so one focal clip and one soundscape can be broken before the run.
    assert cli.main(["synth", "experiment=smoke"]) == 0
    root = home / "data" / "synthetic_smoke"
    train = pd.read_csv(root / "train.csv")
    broken_clip = root / "train_audio" / train.loc[0, "filename"]
    broken_clip.write_bytes(b"not audio at all")
    broken_soundscape = sorted((root / "train_soundscapes").glob("*.ogg"))[0]
    broken_soundscape.write_bytes(b"")

    proc = run_rounds(home, "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    round_dir = home / "runs" / "smoke" / "round_0"
    for name in ("model.pt", "metrics.json", "manifest.json", "config.yaml", "DONE"):
        assert (round_dir / name).is_file(), name
    manifest = json.loads((round_dir / "manifest.json").read_text())
    assert set(manifest["data"]["unreadable_audio"]) == {str(broken_clip.resolve()), str(broken_soundscape.resolve())}
    assert manifest["data"]["train_clips"] == len(train) - 1
    assert broken_clip.name in proc.stdout + proc.stderr  # named in a warning
    metrics = json.loads((round_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["val_soundscape_auc"] <= 1.0 and 0.0 <= metrics["val_clip_auc"] <= 1.0
    model, ckpt = load_checkpoint(round_dir / "model.pt")
    assert ckpt["classes"] == list(pd.read_csv(root / "sample_submission.csv").columns[1:])
    assert "data" in ckpt["config"] and (round_dir / "config.yaml").read_text().count("experiment_name: smoke") == 1

    # A second call finds round 0 complete, does not train it again, and adds two student rounds.
    stamp = (round_dir / "model.pt").stat().st_mtime_ns
    again = run_rounds(home, "logger=none", "round=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (round_dir / "model.pt").stat().st_mtime_ns == stamp
    assert "round 0 already complete" in again.stdout + again.stderr
    for k in (1, 2):
        student_dir = round_dir.parent / f"round_{k}"
        table, provenance = read_pseudo_labels(student_dir / "pseudo_labels.parquet")
        teacher = round_dir.parent / f"round_{k - 1}" / "model.pt"
        assert provenance["round"] == k and provenance["teacher_hash"] == checkpoint_hash(teacher)
        assert len(table) > 0 and set(ckpt["classes"]) <= set(table.columns)
        metrics = json.loads((student_dir / "metrics.json").read_text())
        assert metrics["round"] == k and metrics["pseudo"]["chunks"] == len(table)
        assert (student_dir / "DONE").is_file() and load_checkpoint(student_dir / "model.pt")[1]["classes"] == ckpt["classes"]

    # A changed student setting: round 0 is still reused, round 1 is refused in one line naming the way out.
    changed = run_rounds(home, "logger=none", "round=2", "pseudo.stride_s=10")
    assert changed.returncode == 2
    assert "recompute_from: round 1" in changed.stdout + changed.stderr and "Traceback" not in changed.stderr
    redo = run_rounds(home, "logger=none", "round=2", "pseudo.stride_s=10", "recompute_from=1")
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert (round_dir / "model.pt").stat().st_mtime_ns == stamp
    assert len(list(round_dir.parent.glob("round_1.replaced-*"))) == 1
    assert len(list(round_dir.parent.glob("round_2.replaced-*"))) == 1
    provenance = read_pseudo_labels(round_dir.parent / "round_1" / "pseudo_labels.parquet")[1]
    assert provenance["stride_s"] == 10


@pytest.mark.slow
def test_bad_config_stops_before_work_with_one_line(home):
    proc = run_rounds(home, "data.fold=5")
    assert proc.returncode == 2
    assert "data.fold: must be in [0, data.n_folds=3)" in proc.stdout + proc.stderr
    assert not (home / "data").exists()


@pytest.mark.slow
def test_two_process_launch_of_the_entry_point(home):
    """`accelerate launch` with the shipped CPU config runs rounds/run.py as 2 DDP processes over gloo."""
    env = {**os.environ, "BIRDROUNDS_HOME": str(home), "ACCELERATE_USE_CPU": "1", "WANDB_MODE": "offline"}
    launcher = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(launcher), "launch", "--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml"),
                           str(REPO / "rounds/run.py"), "experiment=smoke", "logger=none"],
                          capture_output=True, text=True, env=env, cwd=home, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    round_dir = home / "runs" / "smoke" / "round_0"
    metrics = json.loads((round_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and (round_dir / "DONE").is_file()
    model, ckpt = load_checkpoint(round_dir / "model.pt")
    assert ckpt["extra"]["num_processes"] == 2


def test_round0_data_picks_up_external_rows_in_training_folds_only(home):
    """Rows under external_data/xeno_canto (xc-download's layout) join training, never validation."""
    from birdrounds.config import compose
    from birdrounds.data.prepare import EXTERNAL_FOLD, prepare_data

    cfg = compose(["experiment=smoke"])
    assert cli.main(["synth", "experiment=smoke"]) == 0
    root = home / "data" / "synthetic_smoke"
    train = pd.read_csv(root / "train.csv")
    ext = home / "external_data" / "xeno_canto"
    rows = train.iloc[:3].copy()
    rows["filename"] = [f"{label}/XC99900{i}.ogg" for i, label in enumerate(rows["primary_label"])]
    for src, dst in zip(train.iloc[:3]["filename"], rows["filename"]):
        (ext / dst).parent.mkdir(parents=True, exist_ok=True)
        (ext / dst).write_bytes((root / "train_audio" / src).read_bytes())
    rows.to_csv(ext / "train.csv", index=False)

    prepared = prepare_data(cfg.data, progress=False)
    assert prepared.summary()["external_clips"] == 3 and len(prepared.data.train) == len(train) + 3
    is_external = prepared.data.train["path"].str.startswith(str(ext))
    assert is_external.sum() == 3 and (prepared.folds[is_external.to_numpy()] == EXTERNAL_FOLD).all()

    cfg.data.external.enabled = False
    assert prepare_data(cfg.data, progress=False).summary()["external_clips"] == 0
