"""`birdrounds export` + `birdrounds predict` as a user runs them, after a smoke run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from birdrounds import cli

REPO = Path(__file__).resolve().parents[1]


def birdrounds(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BIRDROUNDS_HOME": str(home), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "birdrounds.cli", *args], capture_output=True, text=True,
                          env=env, cwd=home, timeout=600)


@pytest.mark.slow
def test_export_predict_and_the_standalone_package(home):
    env = {**os.environ, "BIRDROUNDS_HOME": str(home), "WANDB_MODE": "offline"}
    run = subprocess.run([sys.executable, str(REPO / "rounds" / "run.py"), "experiment=smoke", "logger=none"],
                         capture_output=True, text=True, env=env, cwd=home, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir, root = home / "runs" / "smoke", home / "data" / "synthetic_smoke"

    exported = birdrounds(home, "export", "experiment=smoke")
    assert exported.returncode == 0, exported.stderr[-3000:]
    package = run_dir / "export"
    assert {"model.onnx", "model_waveform.onnx", "classes.json", "infer.py", "README.md", "export.json"} <= \
        {p.name for p in package.iterdir()}
    report = json.loads((package / "export.json").read_text())
    assert report["onnx"]["verify_inputs"] == "audio" and report["onnx"]["max_abs_diff"] <= 1e-4
    assert report["waveform"]["max_abs_diff"] <= 1e-4

    # The validation soundscapes (the default input) plus one unreadable file, in a folder of their own.
    inputs = home / "inputs"
    shutil.copytree(root / "val_soundscapes", inputs)
    (inputs / "broken.ogg").write_bytes(b"\x00" * 100)
    shutil.copy(Path(__file__).parent / "fixtures" / "real_audio" / "birds_10s.wav", inputs)  # real birds, 10.13 s
    out = home / "submission.csv"
    predicted = birdrounds(home, "predict", "experiment=smoke", f"predict.input_dir={inputs}", f"predict.output={out}",
                           f"predict.solution={root / 'val_solution.csv'}")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "broken.ogg" in predicted.stderr
    submission = pd.read_csv(out)
    assert list(submission.columns) == list(pd.read_csv(root / "sample_submission.csv").columns)
    broken = submission[submission["row_id"].str.startswith("broken_")]
    assert list(broken["row_id"]) == [f"broken_{5 * k}" for k in range(1, 13)]  # 60 s expected -> 12 rows of zeros
    assert (broken.iloc[:, 1:].to_numpy() == 0).all()
    real = submission[submission["row_id"].str.startswith("birds_10s_")]
    assert list(real["row_id"]) == ["birds_10s_5", "birds_10s_10", "birds_10s_15"]  # last chunk zero-padded
    assert (real.iloc[:, 1:].to_numpy() > 0).all()
    solution = pd.read_csv(root / "val_solution.csv")
    assert set(solution["row_id"]) <= set(submission["row_id"])
    record = json.loads((run_dir / "predict.json").read_text())
    assert record["unreadable"] == [str(inputs / "broken.ogg")]
    assert 0 <= record["auc_raw"] <= 1 and 0 <= record["auc_postprocessed"] <= 1
    assert "AUC, raw" in (run_dir / "report.md").read_text()

    # Raw ONNX predictions score what the PyTorch model scored during training.
    metrics = json.loads((run_dir / "round_0" / "metrics.json").read_text())
    assert record["auc_raw"] == pytest.approx(metrics["val_soundscape_auc"], abs=1e-4)

    # The package alone (numpy, soundfile, onnxruntime), from a plain folder: the same numbers.
    alone = home / "kaggle"
    shutil.copytree(package, alone)
    standalone_out = home / "standalone.csv"
    proc = subprocess.run([sys.executable, "-I", "infer.py", "--model", "model.onnx", "--input-dir", str(inputs),
                           "--output", str(standalone_out), "--smooth", "0.1,0.8,0.1",
                           "--sample-submission", str(root / "sample_submission.csv")],
                          capture_output=True, text=True, cwd=alone, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    standalone = pd.read_csv(standalone_out)
    assert list(standalone["row_id"]) == list(submission["row_id"])
    np.testing.assert_allclose(standalone.iloc[:, 1:].to_numpy(), submission.iloc[:, 1:].to_numpy(), atol=1e-6)


def test_predict_without_an_export_is_one_line(home, capsys):
    assert cli.main(["predict", "experiment=smoke", f"predict.models=[{home}/nope.onnx]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("birdrounds predict: error: predict.models: not found")


def test_export_without_a_round_is_one_line(home, capsys):
    assert cli.main(["export", "experiment=smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export.round: no completed round" in err[0]


def test_bad_smoothing_kernel_names_the_key(home, capsys, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    (home / "data" / "synthetic_smoke" / "val_soundscapes").mkdir(parents=True)
    assert cli.main(["predict", "experiment=smoke", f"predict.models=[{model}]", "predict.smoothing=[0.5,0.5]",
                     "predict.sample_submission=null"]) == 2
    assert "predict:" in capsys.readouterr().err



def test_export_and_predict_read_the_soundscape_folders_data_names(home, capsys, tmp_path):
    from birdrounds.config import compose
    from birdrounds.submit import _soundscape_folders

    cfg = compose(["experiment=smoke", f"data.soundscapes_dir={tmp_path}/unlabeled"])
    assert _soundscape_folders(cfg) == [tmp_path / "unlabeled", Path(cfg.data.root) / "val_soundscapes"]
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    assert cli.main(["predict", "experiment=smoke", f"predict.models=[{model}]",
                     f"data.val_soundscapes_dir={tmp_path}/moved_val"]) == 2
    assert f"predict.input_dir: not a folder: {tmp_path}/moved_val" in capsys.readouterr().err
    # predict.sample_submission=data (the default) follows data.sample_submission too.
    assert cli.main(["predict", "experiment=smoke", f"predict.models=[{model}]", f"predict.input_dir={tmp_path}",
                     f"data.sample_submission={tmp_path}/moved.csv"]) == 2
    assert f"predict.sample_submission: not found: {tmp_path}/moved.csv" in capsys.readouterr().err
