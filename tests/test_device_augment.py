"""data.augment_on=device: the batched on-device transforms, the workers' background windows, the wiring."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from birdrounds import rounds
from birdrounds.config import compose, shipped_config
from birdrounds.data.augment import AugmentSettings, build_waveform_augment
from birdrounds.data.clips import MixUp
from birdrounds.data.device_augment import (
    BackgroundWindows,
    BatchAugment,
    resample_rows,
    roll_rows,
    time_stretch,
)

SR = 8000


def settings(**on) -> AugmentSettings:
    """Everything off but `on`."""
    return dataclasses.replace(AugmentSettings.off(), **on)


def shipped_settings(**changes) -> AugmentSettings:
    """The shipped `data.augment`'s settings, `changes` over them."""
    return AugmentSettings.from_config(shipped_config("data.augment"), **changes)


def tone(freq_hz: float, seconds: float = 2.0, until_s: float | None = None) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    wave = torch.sin(2 * math.pi * freq_hz * t)
    return wave * (t < until_s) if until_s is not None else wave


def peak_hz(wave: torch.Tensor) -> float:
    return float(torch.fft.rfft(wave).abs().argmax()) * SR / len(wave)


def last_loud_s(wave: torch.Tensor, frame: int = SR // 20) -> float:
    envelope = wave[: len(wave) // frame * frame].reshape(-1, frame).abs().amax(dim=1)
    return float((envelope > 0.5).nonzero().max() + 1) * frame / SR


def test_roll_rows_rolls_each_row_by_its_own_amount():
    x = torch.arange(20.0).reshape(2, 10)
    out = roll_rows(x, torch.tensor([3, -2]))
    assert torch.equal(out[0], torch.roll(x[0], 3)) and torch.equal(out[1], torch.roll(x[1], -2))


def test_resample_rows_scales_pitch_and_tempo_and_keeps_the_length():
    x = torch.stack([tone(500.0), tone(500.0, until_s=1.0)])
    out = resample_rows(x, torch.tensor([1.0, 1.25]))
    assert out.shape == x.shape
    assert torch.allclose(out[0], x[0])  # factor 1: unchanged
    assert peak_hz(out[1][: SR // 2]) == pytest.approx(625.0, abs=2.0)  # 500 Hz * 1.25
    assert last_loud_s(out[1]) == pytest.approx(0.8, abs=0.06)  # the 1-s tone lasts 1 / 1.25 s
    assert out[1][int(1.6 * SR):].abs().max() == 0  # past the end of the input: silence


def test_time_stretch_changes_tempo_keeps_pitch_and_length():
    x = torch.stack([tone(500.0), tone(500.0, until_s=1.0), tone(500.0, until_s=1.0)])
    out = time_stretch(x, torch.tensor([1.0, 2.0, 0.8]), n_fft=256, hop_length=64)
    assert out.shape == x.shape
    middle = slice(SR // 10, -SR // 10)
    assert (out[0] - x[0])[middle].abs().max() < 0.01  # rate 1: the signal back
    assert last_loud_s(out[1]) == pytest.approx(0.5, abs=0.06)  # twice as fast
    assert last_loud_s(out[2]) == pytest.approx(1.25, abs=0.06)  # slower
    for row in out[1:]:
        assert peak_hz(row[: SR // 2]) == pytest.approx(500.0, abs=2.0)  # pitch kept


def test_signalsmith_pitch_on_device_keeps_the_tempo():
    x = tone(500.0, until_s=1.0)[None].repeat(2, 1)
    aug = BatchAugment(SR, settings(pitch_p=1.0, pitch_semitones=(4.0, 4.0), pitch_method="signalsmith"),
                       n_fft=256, hop_length=64)
    aug.set_epoch(0)
    out = aug({"audio": x})["audio"]
    assert peak_hz(out[0][: SR // 2]) == pytest.approx(500.0 * 2 ** (4 / 12), abs=3.0)
    assert last_loud_s(out[0]) == pytest.approx(1.0, abs=0.08)


def batch(size: int = 8, n: int = 4000, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(size, n, generator=gen) * 0.1, "target": torch.eye(size),
            "weight": torch.ones(size)}


def test_batch_augment_is_reproducible_per_epoch_and_keeps_shape_and_dtype():
    def run(epoch: int) -> torch.Tensor:
        aug = BatchAugment(SR, shipped_settings(pitch_method="resample"), n_fft=256, hop_length=64, seed=3)
        aug.set_epoch(epoch)
        return aug(batch())["audio"]

    first, again, other = run(0), run(0), run(1)
    assert first.shape == (8, 4000) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, batch()["audio"])


def test_batch_augment_with_everything_off_is_the_identity_and_mixup_runs_after():
    aug = BatchAugment(SR, AugmentSettings.off())
    aug.set_epoch(0)
    b = batch()
    assert torch.equal(aug(b)["audio"], b["audio"])
    mixed = BatchAugment(SR, AugmentSettings.off(), mixup=MixUp(prob=1.0, alpha=None, weight=0.5, target_mode="max"))
    mixed.set_epoch(0)
    out = mixed(b)
    assert (out["target"].sum(dim=1) == 2).all()  # every clip mixed with another: two labels each
    assert not torch.equal(out["audio"], b["audio"])


def test_gain_and_background_follow_their_ranges():
    b = batch()
    gain = BatchAugment(SR, settings(gain_p=1.0, gain_db=(-6.0, -6.0)))
    gain.set_epoch(0)
    assert torch.allclose(gain(b)["audio"], b["audio"] * 10 ** (-6 / 20))

    background = torch.randn(8, 4000)
    background[::2] = 0.0  # not drawn by the worker: left alone
    aug = BatchAugment(SR, settings(background_p=1.0, background_snr_db=(10.0, 10.0)))
    aug.set_epoch(0)
    out = aug({**b, "background": background})
    assert "background" not in out
    added = out["audio"] - b["audio"]
    assert torch.equal(added[::2], torch.zeros_like(added[::2]))
    snr_db = 20 * torch.log10(b["audio"][1::2].square().mean(1).sqrt() / added[1::2].square().mean(1).sqrt())
    assert torch.allclose(snr_db, torch.full_like(snr_db, 10.0), atol=1e-3)


def test_augment_settings_refuse_bad_ranges_and_methods_in_both_placements():
    with pytest.raises(ValueError, match="pitch_method"):
        shipped_settings(pitch_method="rubberband")
    with pytest.raises(ValueError, match="gain_db"):
        shipped_settings(gain_db=(6.0, -6.0))
    with pytest.raises(ValueError, match="noise_p"):
        shipped_settings(noise_p=1.5)
    with pytest.raises(ValueError, match="stretch_rate"):
        shipped_settings(stretch_rate=(0.0, 1.0))
    knobs = dataclasses.asdict(shipped_settings())
    with pytest.raises(ValueError, match="gain_db"):  # the workers' builder reads the same settings
        build_waveform_augment(SR, **{**knobs, "gain_db": (6.0, -6.0)})
    with pytest.raises(TypeError, match="gain_dB"):
        build_waveform_augment(SR, **knobs, gain_dB=(0.0, 1.0))
    with pytest.raises(TypeError, match="pitch_method"):  # the config holds it: no default made up here
        build_waveform_augment(SR, **{k: v for k, v in knobs.items() if k != "pitch_method"})


def test_device_transform_reads_the_configs_augment_knobs():
    cfg = compose(["data.augment.gain_p=0.9", "+data.augment.noise_snr_db=[1.0,2.0]", "data.augment_on=device"])
    transform = rounds.device_augment(cfg.data, None, seed=0)
    assert transform.settings.gain_p == 0.9 and transform.settings.noise_snr_db == (1.0, 2.0)
    assert transform.settings.pitch_method == cfg.data.augment.pitch_method
    cfg.data.augment = None
    assert rounds.device_augment(cfg.data, None, seed=0).settings == AugmentSettings.off()


class Windows:
    """A decoded-audio source over in-memory waveforms."""

    sample_rate_hz = SR

    def __init__(self, waves: dict[str, np.ndarray]) -> None:
        self.waves = waves

    def load(self, path: str) -> np.ndarray:
        return self.waves[path]


class Items:
    num_failures = 2

    def __init__(self) -> None:
        self.epoch = None

    def __len__(self) -> int:
        return 6

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"audio": torch.zeros(400), "target": torch.zeros(3)}


def test_background_windows_add_seeded_soundscape_windows_to_each_item():
    source = np.arange(10 * 400, dtype=np.float32)
    items = Items()
    windows = BackgroundWindows(items, ["a.ogg"], Windows({"a.ogg": source}), p=0.5, seed=1)
    windows.set_epoch(2)
    assert items.epoch == 2 and windows.num_failures == 2 and len(windows) == 6
    drawn = [windows[i]["background"] for i in range(6)]
    assert all(w.shape == (400,) for w in drawn)
    on = [bool(w.any()) for w in drawn]
    assert any(on) and not all(on)
    for w in drawn:  # a contiguous slice of the source, or silence
        if w.any():
            assert torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 400, dtype=torch.float32))
    assert all(torch.equal(windows[i]["background"], drawn[i]) for i in range(6))  # same (seed, epoch, index)
    none = BackgroundWindows(items, ["a.ogg"], Windows({"a.ogg": source}), p=0.0)
    assert not none[0]["background"].any()


def test_augment_on_is_validated_and_off_the_hash_at_its_default():
    from omegaconf import OmegaConf

    from birdrounds import rounds
    from birdrounds.config import ConfigError, compose, validate

    cfg = compose(["experiment=smoke", "data.augment_on=gpu"])
    with pytest.raises(ConfigError, match="data.augment_on"):
        validate(cfg)
    default = compose(["experiment=smoke"])
    without = default.copy()
    OmegaConf.set_struct(without, False)
    without.data.pop("augment_on")
    assert rounds.config_hash(default, 0) == rounds.config_hash(without, 0)
    assert rounds.config_hash(compose(["experiment=smoke", "data.augment_on=device"]), 0) != rounds.config_hash(default, 0)


def test_students_get_background_windows_outermost_and_the_transform_on_the_device(home, monkeypatch):
    from accelerate import Accelerator

    from birdrounds import cli, rounds
    from birdrounds.config import compose
    from birdrounds.data.prepare import prepare_data
    from birdrounds.mixing import MixupMaxDataset
    from birdrounds.model import save_checkpoint

    assert cli.main(["synth", "experiment=smoke"]) == 0
    cfg = compose(["experiment=smoke", "logger=none", "round=1", "data.augment_on=device"])
    prepared = prepare_data(cfg.data, progress=False)
    teacher = home / "round_0" / "model.pt"
    save_checkpoint(teacher, rounds.build_model(cfg, len(prepared.data.classes), 0), prepared.data.classes)
    seen = {}
    monkeypatch.setattr(rounds, "fit", lambda acc, model, train_set, *a, **k: seen.update(set=train_set, **k) or {})
    rounds.train_round(cfg, prepared, Accelerator(cpu=True), home / "round_1", 1, [teacher])
    assert isinstance(seen["set"], BackgroundWindows) and isinstance(seen["set"].dataset, MixupMaxDataset)
    assert seen["collate_fn"].mixup is None  # MixUp moved to the device transform
    transform = seen["batch_transform"]
    assert isinstance(transform, BatchAugment) and isinstance(transform.mixup, MixUp)
    assert transform.settings.background_p == cfg.data.augment.background_p
    item = seen["set"][0]
    assert item["background"].shape == item["audio"].shape
    assert seen["set"].dataset.labeled.augment is None  # nothing augmented in the workers


# A teacher trained through rounds/run.py with data.augment_on=device: tests/test_gpu_check.py (the CPU path of
# bench/gpu_check.sh trains one, `w1_device`, and checks its losses are finite).


def test_an_added_range_from_the_command_line_is_checked_on_the_workers_path():
    # `+data.augment.gain_db=[6,-6]` reaches build_waveform_augment as an OmegaConf list, not a tuple.
    from hydra.utils import instantiate

    from birdrounds.config import compose

    cfg = compose(["data=birdclef2025", "data.root=x", "+data.augment.gain_db=[6.0,-6.0]"])
    with pytest.raises(Exception, match="gain_db: low 6.0 is above high -6.0"):  # Hydra wraps the ValueError
        instantiate(cfg.data.augment)
    fine = compose(["data=birdclef2025", "data.root=x", "+data.augment.gain_db=[-3.0,3.0]"])
    assert instantiate(fine.data.augment) is not None
