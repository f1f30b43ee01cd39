"""data.external.filter_min_prob: external clips the round's starting model does not detect are left out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from birdrounds.data.audio import AudioDecodeError
from birdrounds.pseudo import detection_scores

SR = 1000


class ArrayAudio:
    """An audio source over in-memory waveforms; a path it lacks does not decode."""

    sample_rate_hz = SR

    def __init__(self, waves: dict[str, np.ndarray]) -> None:
        self.waves = waves

    def load(self, path: str) -> np.ndarray:
        if path not in self.waves:
            raise AudioDecodeError(f"{path}: not audio")
        return self.waves[path]


class LoudnessModel(nn.Module):
    """Class "a" is as likely as the window is loud; class "b" never."""

    def forward(self, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        peak = audio.abs().amax(dim=1)
        return {"logits": torch.stack([20 * peak - 10, torch.full_like(peak, -10.0)], dim=1)}


def test_detection_scores_take_the_best_window_of_each_recordings_label():
    quiet, late = np.zeros(12 * SR, np.float32), np.zeros(12 * SR, np.float32)
    late[11 * SR:] = 1.0  # a call only in the last second: found by the trailing window
    short = np.full(2 * SR, 0.5, np.float32)  # shorter than a window: one padded window
    audio = ArrayAudio({"quiet": quiet, "late": late, "short": short})
    scores = detection_scores([LoudnessModel()], ["quiet", "late", "late", "short", "broken"],
                              ["a", "a", "b", "a", "a"], ["a", "b"], audio, window_s=5.0, batch_size=2)
    expected = 1 / (1 + np.exp(-np.array([-10.0, 10.0, -10.0, 0.0])))
    assert np.allclose(scores[:4], expected, atol=1e-5)
    assert np.isnan(scores[4])  # not decodable: no verdict (kept by the filter)
    with pytest.raises(ValueError, match="differ in length"):
        detection_scores([LoudnessModel()], ["quiet"], [], ["a", "b"], audio, window_s=5.0)


def test_filter_external_leaves_out_undetected_clips_keeps_scores_and_follows_the_model(home, monkeypatch):
    """Threshold between the scores: exactly the lower-scored external clips leave the round's training set;
    the scores are kept under the model's hash (a resumed round does not rescore), another model rescores;
    off (null) or in_students=false: nothing is scored."""
    from accelerate import Accelerator
    from test_run_e2e import add_external_rows

    from birdrounds import cli, rounds
    from birdrounds.config import compose
    from birdrounds.data.prepare import prepare_data
    from birdrounds.model import save_checkpoint

    assert cli.main(["synth", "experiment=smoke"]) == 0
    ext = str(add_external_rows(home))
    cfg = compose(["experiment=smoke", "logger=none", "round=1"])
    prepared = prepare_data(cfg.data, progress=False)
    teacher = home / "round_0" / "model.pt"
    save_checkpoint(teacher, rounds.build_model(cfg, len(prepared.data.classes), 0), prepared.data.classes)
    accelerator, out_dir = Accelerator(cpu=True), home / "round_1"

    assert rounds.filter_external(cfg, prepared, teacher, out_dir, accelerator) is None  # default: off
    cfg.data.external.filter_min_prob = 0.0
    assert rounds.filter_external(cfg, prepared, teacher, out_dir, accelerator) == []
    scores = json.loads((out_dir / "external_scores.json").read_text())
    assert scores["model_hash"] and len(scores["scores"]) == 3 and all(p.startswith(ext) for p in scores["scores"])
    values = sorted(scores["scores"].values())
    assert values[0] < values[-1]

    cfg.data.external.filter_min_prob = float(np.mean(values[:2]))  # between the lowest and the middle score
    calls = []
    original = rounds.detection_scores
    monkeypatch.setattr(rounds, "detection_scores", lambda *a, **k: calls.append(1) or original(*a, **k))
    dropped = rounds.filter_external(cfg, prepared, teacher, out_dir, accelerator)
    assert calls == [] and dropped == [p for p, v in scores["scores"].items() if v == values[0]]
    parts = rounds.build_datasets(prepared, cfg.data, cfg.seed, 1, drop_external=dropped)
    assert parts.n_external == 2 and not parts.train_table["path"].isin(dropped).any()
    assert len(parts.train_table) == len(rounds.build_datasets(prepared, cfg.data, cfg.seed, 1).train_table) - 1

    other = home / "other" / "model.pt"  # another starting model (e.g. the control's): scored again
    save_checkpoint(other, rounds.build_model(cfg, len(prepared.data.classes), 1), prepared.data.classes)
    rounds.filter_external(cfg, prepared, other, out_dir, accelerator)
    assert calls == [1]
    assert json.loads((out_dir / "external_scores.json").read_text())["model"] == str(other)

    cfg.data.external.in_students = False
    assert rounds.filter_external(cfg, prepared, other, out_dir, accelerator) is None


def test_filter_key_is_checked_and_neutral_when_off():
    """A bad threshold is one line naming the key; null leaves every round's hash as before the key existed,
    a threshold changes the students' hash but not the teacher's."""
    from omegaconf import OmegaConf

    from birdrounds.config import ConfigError, compose, validate
    from birdrounds.rounds import config_hash

    cfg = compose(["experiment=smoke"])
    before = OmegaConf.create(OmegaConf.to_container(cfg))  # a config from before the key existed
    del before.data.external["filter_min_prob"]
    assert config_hash(cfg, 1) == config_hash(before, 1) and config_hash(cfg, 0) == config_hash(before, 0)
    on = compose(["experiment=smoke", "data.external.filter_min_prob=0.2"])
    assert config_hash(on, 1) != config_hash(cfg, 1) and config_hash(on, 0) == config_hash(cfg, 0)
    with pytest.raises(ConfigError, match="data.external.filter_min_prob"):
        validate(compose(["experiment=smoke", "data.external.filter_min_prob=1.5"]))
