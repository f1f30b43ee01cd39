"""Defaults that learn and say when they do not: the data-sized epoch, checkpoint selection, the usability
checks in the log, report.md and `birdrounds export`, and export's choice of the best round."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from accelerate import Accelerator

import train_script
from birdrounds.checks import MIN_STEPS, lineage_steps, round_checks
from birdrounds.cli import main as cli_main
from birdrounds.config import compose
from birdrounds.data.clips import epoch_clips
from birdrounds.data.prepare import prepare_data
from birdrounds.metrics import bootstrap_auc_interval, macro_roc_auc
from birdrounds.model import load_checkpoint
from birdrounds.report import write_report
from birdrounds.rounds import build_datasets
from birdrounds.submit import export_checkpoints
from birdrounds.train import BEST_FILE, selected_index
from test_layout import row, write_layout

# ----------------------------------------------------------------------------- the epoch sized by the data


def test_auto_epoch_is_one_clip_per_window_of_labeled_audio_within_bounds():
    bounds = list(compose(["data=birdclef2025", "data.root=x"]).data.sampler.auto_bounds)  # [1024, 32768]
    assert epoch_clips("auto", n_rows=52, labeled_s=2112.0, window_s=5.0, bounds=bounds) == bounds[0]  # 423 -> 1024
    assert epoch_clips("auto", n_rows=900, labeled_s=50_000.0, window_s=5.0, bounds=bounds) == 10_000
    assert epoch_clips("auto", n_rows=28_564, labeled_s=1e6, window_s=5.0, bounds=bounds) == bounds[1]
    assert epoch_clips("auto", n_rows=3, labeled_s=101.0, window_s=5.0, bounds=(1, 100)) == 21  # ceil
    assert epoch_clips(None, n_rows=52, labeled_s=2112.0, window_s=5.0, bounds=bounds) == 52
    assert epoch_clips(512, n_rows=52, labeled_s=2112.0, window_s=5.0, bounds=bounds) == 512


def test_a_few_long_recordings_get_hundreds_of_steps_by_default(tmp_path):
    """The default data config on a BirdCLEF folder with 8 recordings of 30 s: the epoch covers the audio,
    so the default schedule has enough optimizer steps to learn (one per row would give 0-1 per epoch)."""
    root = write_layout(tmp_path / "d", [row(c, f"XC{c}{i}") for c in ("aaa1", "bbb1") for i in range(4)])
    long = (0.1 * np.sin(np.arange(30 * 32000) / 5)).astype("float32")
    for path in (root / "train_audio").rglob("*.ogg"):
        sf.write(path, long, 32000, format="OGG", subtype="VORBIS")
    cfg = compose(["data=birdclef2025", f"data.root={root}", "data.n_folds=2", "data.external.enabled=false",
                   "data.mixed_val.enabled=false"])
    assert cfg.data.sampler.samples_per_epoch == "auto"
    prepared = prepare_data(cfg.data, progress=False)
    parts = build_datasets(prepared, cfg.data, seed=0)
    n_train = len(parts.train_table)
    assert parts.labeled_s == pytest.approx(30.0 * n_train, rel=1e-3)
    assert parts.clips_per_epoch == len(parts.sampler) == cfg.data.sampler.auto_bounds[0]
    steps = cfg.train.epochs * (parts.clips_per_epoch // cfg.train.batch_size)
    assert steps >= MIN_STEPS
    assert cfg.train.epochs * math.ceil(n_train / cfg.train.batch_size) < 30  # what one draw per row gave


# ----------------------------------------------------------------------------- bootstrap interval


def test_bootstrap_interval_brackets_the_score_and_tells_chance_from_learning():
    rng = np.random.default_rng(0)
    truth = (rng.random((400, 5)) < 0.2).astype(int)
    learned = truth + 0.8 * rng.random((400, 5))
    low, high = bootstrap_auc_interval(truth, learned)
    assert 0.5 < low <= macro_roc_auc(truth, learned) <= high <= 1.0
    noise = rng.random((400, 5))
    low, high = bootstrap_auc_interval(truth, noise)
    assert low < 0.5 < high
    # Ties count one half, as sklearn: constant scores are exactly chance in every resample.
    assert bootstrap_auc_interval(truth, np.zeros((400, 5))) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_auc_interval(np.zeros((10, 2)), noise[:10, :2]))


# ----------------------------------------------------------------------------- checks on records


def _metrics(score, interval, step=400, start=None, key="val_soundscape_auc"):
    return {key: score, "step": step, "selection": {"selected_by": key, "interval_95": interval},
            **({"start": start} if start else {})}


def test_round_checks_flag_chance_short_schedules_and_a_worse_model():
    good = round_checks(_metrics(0.80, [0.74, 0.86]))
    assert good.usable and not good.notes
    chance = round_checks(_metrics(0.56, [0.45, 0.66]))
    assert not chance.usable and "within noise of chance" in chance.problems[0]
    short = round_checks(_metrics(0.80, [0.74, 0.86], step=40))
    assert not short.usable and "40 optimizer steps" in short.problems[0]
    assert "data.sampler.samples_per_epoch" in short.problems[0] and "train.epochs" in short.problems[0]
    # A student counts its teacher's steps: 240 of its own after a 320-step teacher is enough.
    start = {"model": "run/round_0/model.pt", "scores": {"val_soundscape_auc": 0.83}, "steps_since_init": 320}
    student = round_checks(_metrics(0.80, [0.74, 0.86], step=240, start=start))
    assert lineage_steps(_metrics(0.8, None, step=240, start=start)) == 560
    assert student.usable and student.notes == ["val_soundscape_auc 0.800 is below its starting model's 0.830 "
                                                "(run/round_0/model.pt)"]
    nan = round_checks(_metrics(float("nan"), None))
    assert not nan.usable and "could not be computed" in nan.problems[0]
    assert round_checks({"val_clip_auc": 0.9}).usable  # a record from before the checks: nothing to say


def test_selected_index_prefers_the_best_epoch_and_falls_back_to_the_last():
    history = [{"val_soundscape_auc": v, "val_clip_auc": 0.5} for v in (0.6, 0.9, 0.9, 0.7)]
    assert selected_index(history, "auto") == 1  # the earliest of equals
    assert selected_index(history, "last") == 3
    assert selected_index(history, "val_clip_auc") == 0
    assert selected_index([{"val_soundscape_auc": float("nan")}] * 2, "auto") == 1
    assert selected_index([{"val_mixed_auc": 0.7}, {"val_mixed_auc": 0.6}], "auto") == 0


# ----------------------------------------------------------------------------- selection in a real fit


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    train_script.make_data(root)
    return root


def test_fit_keeps_the_epoch_its_validation_prefers(clips, tmp_path, monkeypatch):
    """Validation scores fixed per epoch (0.6, 0.9, 0.7): model.pt holds epoch 1's weights, metrics.json says so."""
    from birdrounds import train

    scores = iter([0.5, 0.6, 0.5, 0.9, 0.5, 0.7])  # (clip, soundscape) per epoch, in _validate's order
    monkeypatch.setattr(train, "scored_auc", lambda truth, probs: next(scores))
    settings = train_script.settings(epochs=3, steps=2, ema_decay=None)
    settings.keep_checkpoints = 3
    result = train_script.train(clips, tmp_path, Accelerator(), settings)
    assert result["selected_by"] == "val_soundscape_auc" and result["selected_epoch"] == result["epoch"] == 1
    assert result["val_soundscape_auc"] == 0.9 and result["selection"]["last_epoch_score"] == 0.7
    assert result["step"] == 6 and result["steps_per_epoch"] == 2
    low, high = result["selection"]["interval_95"]
    assert 0.0 <= low <= high <= 1.0
    saved = load_checkpoint(tmp_path / "model.pt")[1]["state_dict"]
    epoch_1 = torch.load(tmp_path / "checkpoints" / "epoch_001" / "pytorch_model.bin", weights_only=True)
    epoch_2 = torch.load(tmp_path / "checkpoints" / "epoch_002" / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(saved[k], epoch_1[k].contiguous()) for k in saved)
    assert not all(torch.equal(saved[k], epoch_2[k].contiguous()) for k in saved)
    assert load_checkpoint(tmp_path / "checkpoints" / BEST_FILE)[1]["extra"]["epoch"] == 1


def test_select_by_last_keeps_the_last_epoch(clips, tmp_path, monkeypatch):
    from birdrounds import train

    scores = iter([0.5, 0.6, 0.5, 0.9, 0.5, 0.7])
    monkeypatch.setattr(train, "scored_auc", lambda truth, probs: next(scores))
    settings = train_script.settings(epochs=3, steps=1, ema_decay=None)
    settings.select_by = "last"
    result = train_script.train(clips, tmp_path, Accelerator(), settings)
    assert result["selected_epoch"] == 2 and result["val_soundscape_auc"] == 0.7
    assert result["selection"]["mode"] == "last" and not (tmp_path / "checkpoints" / BEST_FILE).exists()


# ----------------------------------------------------------------------------- report and export


def _round(run_dir: Path, k: int, score: float, interval, step: int = 400, control: bool = False) -> Path:
    folder = run_dir / f"round_{k}" / ("control" if control else "")
    folder.mkdir(parents=True, exist_ok=True)
    start = {"model": f"round_{k - 1}/model.pt", "scores": {}, "steps_since_init": 0} if k else None
    (folder / "metrics.json").write_text(json.dumps(_metrics(score, interval, step, start)))
    (folder / "manifest.json").write_text(json.dumps({"round": k, "seconds": 1.0}))
    (folder / "model.pt").write_bytes(b"not read by the choice")
    (folder / "DONE").write_text("{}")
    return folder


def test_report_says_first_when_the_last_round_is_not_usable(tmp_path):
    _round(tmp_path, 0, 0.80, [0.75, 0.85])
    _round(tmp_path, 1, 0.55, [0.46, 0.63])
    lines = write_report(tmp_path).read_text().splitlines()
    assert lines[0].startswith("**Round 1 is not usable** (val_soundscape_auc 0.550 is within noise of chance")
    assert "export.force=true" in lines[0]
    assert lines[1].startswith("**Round 0 scores best**")
    assert "- round 1: not usable: val_soundscape_auc 0.550 is within noise of chance" in "\n".join(lines)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["checks"]["usable"] for r in summary["rounds"]] == [True, False]


def test_report_of_usable_rounds_starts_with_its_title(tmp_path):
    _round(tmp_path, 0, 0.80, [0.75, 0.85])
    _round(tmp_path, 1, 0.84, [0.79, 0.88])
    assert write_report(tmp_path).read_text().startswith("# Rounds report")


def _export_cfg(run_dir: Path, *overrides: str):
    return compose([f"run_dir={run_dir}", *overrides])


def test_export_takes_the_best_round_and_refuses_an_unusable_one(tmp_path):
    _round(tmp_path, 0, 0.80, [0.75, 0.85])
    _round(tmp_path, 1, 0.86, [0.81, 0.90])
    _round(tmp_path, 2, 0.83, [0.78, 0.88])
    _round(tmp_path, 2, 0.90, [0.86, 0.93], control=True)  # a control is never exported
    assert export_checkpoints(_export_cfg(tmp_path)) == [tmp_path / "round_1" / "model.pt"]
    assert export_checkpoints(_export_cfg(tmp_path, "export.round=2")) == [tmp_path / "round_2" / "model.pt"]
    _round(tmp_path, 3, 0.95, [0.40, 0.99], step=40)  # best score, but at chance and barely trained
    from birdrounds.config import ConfigError

    with pytest.raises(ConfigError, match=r"^export\.force: round 3 .* is not usable"):
        export_checkpoints(_export_cfg(tmp_path))
    assert export_checkpoints(_export_cfg(tmp_path, "export.force=true")) == [tmp_path / "round_3" / "model.pt"]


def test_export_command_refuses_an_unusable_model_in_one_line(tmp_path, capsys):
    _round(tmp_path, 0, 0.52, [0.44, 0.60])
    assert cli_main(["export", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("birdrounds export: error: export.force: round 0")
    assert "pass export.force=true" in err[0]
