"""`birdrounds export` + `birdrounds predict` as a user runs them, after a smoke run."""

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import soundfile as sf
import torch
from onnx import TensorProto, helper, numpy_helper

from birdrounds import cli, contract, infer
from birdrounds.config import compose, validate
from birdrounds.model import save_checkpoint
from birdrounds.submit import run_predict
from conftest import config_model

SR = 32000
CLASSES = ["amerob", "blujay", "cangoo"]
# `predict` settings other than the config's defaults, so that the package could not match by chance.
PREDICT_OVERRIDES = ["predict.smoothing=[0.2,0.6,0.2]", "predict.file_scale_alpha=0.3", "predict.tta_shift_s=1.0",
                     "predict.expected_duration_s=30"]


def tiny_onnx(path: Path, classes: list[str] = CLASSES) -> Path:
    """A birdrounds waveform graph in a few nodes: probs = sigmoid(mean of the window * weights)."""
    n = round(contract.SCORED_CHUNK_S * SR)
    nodes = [helper.make_node("ReduceMean", ["waveform", "axis"], ["level"], keepdims=1),
             helper.make_node("Mul", ["level", "weights"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], [contract.OUTPUT_PROBS])]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis"),
             numpy_helper.from_array(np.linspace(-1, 1, len(classes)).astype(np.float32), "weights")]
    inputs = [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", n])]
    outputs = [helper.make_tensor_value_info(contract.OUTPUT_PROBS, TensorProto.FLOAT, ["batch", len(classes)])]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, {
        contract.META_FORMAT_VERSION: contract.FORMAT_VERSION, contract.META_CLASSES: json.dumps(classes),
        contract.META_SAMPLE_RATE_HZ: str(SR), contract.META_WINDOW_S: str(contract.SCORED_CHUNK_S),
        contract.META_INPUT: "waveform", contract.META_MEMBERS: "[]"})
    onnx.save(model, str(path))
    return path


def soundscapes(folder: Path) -> Path:
    """Noise and tones of several lengths, an unreadable file and a 60-s Ogg cut short."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(60 * SR) / SR
    for name, seconds in [("long", 21.0), ("mid", 12.5), ("short", 3.0)]:
        n = round(seconds * SR)
        wave = 0.05 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * 3000 * t[:n]) * (np.sin(t[:n]) > 0)
        sf.write(folder / f"{name}.wav", wave.astype(np.float32), SR, subtype="FLOAT")
    with sf.SoundFile(folder / "cut.ogg", "w", samplerate=SR, channels=1, format="OGG", subtype="VORBIS") as f:
        for start in range(0, 60 * SR, SR):
            f.write((0.2 * np.sin(2 * np.pi * (500 + 40 * start / SR) * t[start:start + SR])).astype(np.float32))
    data = (folder / "cut.ogg").read_bytes()
    (folder / "cut.ogg").write_bytes(data[: int(0.3 * len(data))])
    (folder / "broken.ogg").write_bytes(b"OggS" + bytes(100))
    return folder


def one_line_error(capsys) -> str:
    """The single stderr line of a failed command (no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def birdrounds(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "BIRDROUNDS_HOME": str(home), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "birdrounds.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or home, timeout=600)


@pytest.mark.slow
def test_export_predict_and_the_standalone_package(smoke_run, tmp_path):
    # `birdrounds export` ran in the shared smoke run's `make demo`; predict runs on a copy of its run folder
    # (it writes predict.json and report.md there).
    home, root = smoke_run.home, smoke_run.root
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run.run_dir, run_dir, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    assert "birdrounds export" in smoke_run.demo.stdout
    package = run_dir / "export"
    assert {"model.onnx", "model_waveform.onnx", "classes.json", "infer.py", "README.md", "export.json"} <= \
        {p.name for p in package.iterdir()}
    report = json.loads((package / "export.json").read_text())
    assert report["onnx"]["verify_inputs"] == "audio" and report["onnx"]["max_abs_diff"] <= 1e-4
    assert report["waveform"]["max_abs_diff"] <= 1e-4

    # The validation soundscapes (the default input) plus one unreadable file, in a folder of their own.
    inputs = tmp_path / "inputs"
    shutil.copytree(root / "val_soundscapes", inputs)
    (inputs / "broken.ogg").write_bytes(b"\x00" * 100)
    shutil.copy(Path(__file__).parent / "fixtures" / "real_audio" / "birds_10s.wav", inputs)  # real birds, 10.13 s
    out = tmp_path / "submission.csv"
    predicted = birdrounds(home, "predict", "experiment=smoke", f"run_dir={run_dir}", f"predict.input_dir={inputs}",
                           f"predict.output={out}", f"predict.solution={root / 'val_solution.csv'}", cwd=tmp_path)
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
    assert record["unreadable"] == [str(inputs / "broken.ogg")] and record["truncated"] == []
    assert 0 <= record["auc_raw"] <= 1 and 0 <= record["auc_postprocessed"] <= 1
    assert "AUC, raw" in (run_dir / "report.md").read_text()

    # Raw ONNX predictions score what the PyTorch model scored during training (the exported round's).
    exported = exported_round(run_dir, package)
    metrics = json.loads((run_dir / exported / "metrics.json").read_text())
    assert record["auc_raw"] == pytest.approx(metrics["val_soundscape_auc"], abs=1e-4)

    # The package alone (numpy, soundfile, onnxruntime), from a plain folder: the same numbers.
    alone = tmp_path / "kaggle"
    shutil.copytree(package, alone)
    standalone_out = tmp_path / "standalone.csv"
    # No post-processing flags: the predict config's smoothing was recorded in model.onnx at export.
    proc = subprocess.run([sys.executable, "-I", "infer.py", "--model", "model.onnx", "--input-dir", str(inputs),
                           "--output", str(standalone_out), "--sample-submission", str(root / "sample_submission.csv")],
                          capture_output=True, text=True, cwd=alone, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    standalone = pd.read_csv(standalone_out)
    assert list(standalone["row_id"]) == list(submission["row_id"])
    np.testing.assert_allclose(standalone.iloc[:, 1:].to_numpy(), submission.iloc[:, 1:].to_numpy(), atol=1e-6)


def exported_round(run_dir: Path, package: Path) -> str:
    """The round folder (e.g. "round_2") whose model.pt the package's model.onnx was exported from."""
    from birdrounds.model import checkpoint_hash

    meta = {p.key: p.value for p in onnx.load(str(package / "model.onnx")).metadata_props}
    hashes = {member["hash"] for member in json.loads(meta["birdrounds.members"])}
    (name,) = [d.name for d in sorted(run_dir.glob("round_*"))
               if (d / "model.pt").is_file() and checkpoint_hash(d / "model.pt") in hashes]
    return name


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


def test_package_readme_command_writes_what_predict_writes(home, tmp_path, caplog):
    """`birdrounds export` records the predict config's post-processing in the model: the package's README
    command, with no flags, then writes the CSV `birdrounds predict` writes."""
    torch.manual_seed(0)
    model = config_model(len(CLASSES))  # model=tiny, the model of experiment=smoke
    save_checkpoint(tmp_path / "model.pt", model, CLASSES, extra={"window_s": contract.SCORED_CHUNK_S})
    package = tmp_path / "export"
    assert cli.main(["export", "experiment=smoke", f"export.checkpoints=[{tmp_path / 'model.pt'}]",
                     "export.kinds=[spectrogram]", f"export.out_dir={package}", *PREDICT_OVERRIDES]) == 0
    sounds = soundscapes(tmp_path / "soundscapes")

    predicted = tmp_path / "predict.csv"
    cfg = compose(["experiment=smoke", f"predict.models=[{package / 'model.onnx'}]", f"predict.input_dir={sounds}",
                   f"predict.output={predicted}", "predict.sample_submission=null", *PREDICT_OVERRIDES])
    validate(cfg)
    with caplog.at_level(logging.WARNING):
        record = run_predict(cfg)
    assert not [r for r in caplog.records if "other predict settings" in r.getMessage()]
    assert record["unreadable"] == [str(sounds / "broken.ogg")] and record["truncated"] == [str(sounds / "cut.ogg")]

    # The package alone, from a plain folder, with the README's command as written.
    kaggle = tmp_path / "kaggle"
    shutil.copytree(package, kaggle)
    (line,) = [l for l in (kaggle / "README.md").read_text().splitlines() if l.startswith("python infer.py")]
    command = [sys.executable, "-I", *shlex.split(line)[1:]]
    command[command.index("--input-dir") + 1] = str(sounds)
    proc = subprocess.run(command, cwd=kaggle, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 unreadable, 1 truncated" in proc.stderr
    ours, theirs = pd.read_csv(kaggle / "submission.csv"), pd.read_csv(predicted)
    assert list(ours.columns) == list(theirs.columns) == ["row_id", *CLASSES]
    assert list(ours["row_id"]) == list(theirs["row_id"])
    # expected_duration_s=30: the rows of the unreadable file, and of the cut Ogg (whose header declares no length)
    assert sum(ours["row_id"].str.startswith("cut_")) == 6 and sum(ours["row_id"].str.startswith("broken_")) == 6
    np.testing.assert_allclose(ours.iloc[:, 1:].to_numpy(), theirs.iloc[:, 1:].to_numpy(), rtol=0, atol=1e-6)

    # The recorded settings matter, and flags override them.
    proc = subprocess.run([*command, "--smooth", "off", "--file-scale-alpha", "0", "--tta-shift-s", "0"], cwd=kaggle,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = pd.read_csv(kaggle / "submission.csv")
    assert not np.allclose(raw.iloc[:, 1:].to_numpy(), theirs.iloc[:, 1:].to_numpy(), atol=1e-4)

    # predict run with settings other than the export's says so.
    cfg.predict.smoothing = [0.1, 0.8, 0.1]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_predict(cfg)
    assert any("other predict settings" in r.getMessage() and "smoothing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("problem", ["corrupt model", "unwritable output", "columns", "no audio"])
def test_predict_input_errors_are_one_line_before_the_run(home, tmp_path, capsys, monkeypatch, problem):
    model = tiny_onnx(tmp_path / "m.onnx")
    sounds = tmp_path / "soundscapes"
    sounds.mkdir()
    sf.write(sounds / "a.wav", np.zeros(10 * SR, np.float32), SR)
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("row_id," + ",".join(CLASSES) + "\n")
    output = tmp_path / "out" / "submission.csv"
    if problem == "corrupt model":
        model.write_bytes(b"\x08garbage" * 50)
        expected = f"predict.models: {model}: not a readable ONNX model"
    elif problem == "unwritable output":
        (tmp_path / "out").write_text("a file where the output folder should be")
        expected = f"predict.output: cannot write {output}"
    elif problem == "columns":
        sample.write_text("row_id,amerob,blujay,zzz\n")
        expected = f"predict.sample_submission: {sample}: sample submission columns do not match"
    else:  # the audio one level down: the folder named holds none
        (sounds / "site1").mkdir()
        (sounds / "a.wav").rename(sounds / "site1" / "a.wav")
        output.parent.mkdir()
        output.write_text("row_id,amerob\nprevious,1\n")  # the previous submission stays as it was
        expected = (f"predict.input_dir: no audio files in {sounds}; there is audio in its subfolder "
                    f"{sounds / 'site1'}: point predict.input_dir there (nothing was written)")

    def never(*args, **kwargs):
        raise AssertionError("predicted before checking its inputs")

    monkeypatch.setattr(infer, "predict_files", never)
    code = cli.main(["predict", "experiment=smoke", f"predict.models=[{model}]", f"predict.input_dir={sounds}",
                     f"predict.output={output}", f"predict.sample_submission={sample}"])
    line = one_line_error(capsys)
    assert code == 2 and line.startswith(f"birdrounds predict: error: {expected}"), line
    if problem == "no audio":
        assert output.read_text() == "row_id,amerob\nprevious,1\n"
