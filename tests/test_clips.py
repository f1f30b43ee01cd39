"""Clip dataset (windows, targets, weights, failures), MixUp, sampling weights and waveform augmentation."""

from __future__ import annotations

import logging
import pickle
import random

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from birdrounds.data.audio import AudioCache, DirectAudio
from birdrounds.data.augment import ResamplePitchShift, SoundscapeBackground, build_waveform_augment
from birdrounds.data.clips import (
    ClipDataset,
    MixUp,
    MixUpCollate,
    class_sample_weights,
    make_sampler,
    rating_weights,
)

SR = 1000  # tiny rate keeps files and windows small; DirectAudio does not resample at the file's rate
CLASSES = ["a", "b", "c", "d"]


def write_wave(path, wave, sample_rate_hz=SR):
    sf.write(str(path), np.asarray(wave, dtype=np.float32), sample_rate_hz, subtype="FLOAT")
    return str(path)


def ramp(n):
    """A waveform whose values identify their sample position (exact in float32 for small n)."""
    return np.arange(1, n + 1, dtype=np.float32) / 10_000


def clip_table(paths, primary=None, secondary=None, rating=None):
    n = len(paths)
    return pd.DataFrame({
        "primary_label": primary or ["a"] * n,
        "secondary_labels": secondary or [[] for _ in range(n)],
        "rating": rating or [0.0] * n,
        "filename": [f"{i}.wav" for i in range(n)],
        "path": paths,
    })


@pytest.fixture()
def long_clip(tmp_path):
    return write_wave(tmp_path / "long.wav", ramp(3000))


def test_soft_hard_targets_ignore_unknown_secondary(long_clip):
    table = clip_table([long_clip] * 2, primary=["a", "c"], secondary=[["b", "zzz"], ["c", "d"]])
    audio = DirectAudio(SR)
    soft = ClipDataset(table, CLASSES, audio, window_s=1.0, target_mode="soft", secondary_weight=0.3)
    assert soft[0]["target"].tolist() == pytest.approx([1.0, 0.3, 0.0, 0.0])
    # A secondary equal to the primary keeps the primary at 1.
    assert soft[1]["target"].tolist() == pytest.approx([0.0, 0.0, 1.0, 0.3])
    hard = ClipDataset(table, CLASSES, audio, window_s=1.0, target_mode="hard", secondary_weight=0.3)
    assert hard[0]["target"].tolist() == [1.0, 1.0, 0.0, 0.0]
    hard_off = ClipDataset(table, CLASSES, audio, window_s=1.0, target_mode="hard", secondary_weight=0.0)
    assert hard_off[0]["target"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_label_smoothing(long_clip):
    table = clip_table([long_clip], secondary=[["b"]])
    ds = ClipDataset(table, CLASSES, DirectAudio(SR), window_s=1.0, secondary_weight=0.5, label_smoothing=0.2)
    # t * (1 - 0.2) + 0.2 / 4
    assert ds[0]["target"].tolist() == pytest.approx([0.85, 0.45, 0.05, 0.05])


def test_unknown_primary_or_unparsed_secondary_rejected(long_clip):
    with pytest.raises(ValueError, match="not in the class list"):
        ClipDataset(clip_table([long_clip], primary=["zzz"]), CLASSES, DirectAudio(SR))
    with pytest.raises(TypeError, match="parsed"):
        ClipDataset(clip_table([long_clip], secondary=["['b']"]), CLASSES, DirectAudio(SR))


def test_center_window_is_deterministic(long_clip):
    table = clip_table([long_clip])
    a = ClipDataset(table, CLASSES, DirectAudio(SR), window_s=1.0, window_mode="center", seed=1)
    b = ClipDataset(table, CLASSES, DirectAudio(SR), window_s=1.0, window_mode="center", seed=2)
    b.set_epoch(5)
    expected = ramp(3000)[1000:2000]
    np.testing.assert_array_equal(a[0]["audio"].numpy(), expected)
    np.testing.assert_array_equal(b[0]["audio"].numpy(), expected)


def test_random_window_reproducible_and_varies_by_epoch(long_clip):
    table = clip_table([long_clip] * 4)
    make = lambda: ClipDataset(table, CLASSES, DirectAudio(SR), window_s=1.0, window_mode="random", seed=3)
    first, again = make(), make()
    starts = {}
    for epoch in range(3):
        first.set_epoch(epoch)
        again.set_epoch(epoch)
        for i in range(len(table)):
            x = first[i]["audio"].numpy()
            np.testing.assert_array_equal(x, again[i]["audio"].numpy())
            start = int(round(x[0] * 10_000)) - 1
            np.testing.assert_array_equal(x, ramp(3000)[start : start + 1000])  # a contiguous crop
            starts[epoch, i] = start
    assert len(set(starts.values())) > 4  # windows move across items and epochs
    assert [starts[0, i] for i in range(4)] != [starts[1, i] for i in range(4)]


def test_short_clip_is_zero_padded(tmp_path):
    path = write_wave(tmp_path / "short.wav", np.ones(400))
    table = clip_table([path])
    center = ClipDataset(table, CLASSES, DirectAudio(SR), window_s=1.0, window_mode="center")[0]["audio"].numpy()
    assert center.shape == (1000,)
    np.testing.assert_array_equal(center[300:700], 1.0)
    assert center[:300].sum() == 0 and center[700:].sum() == 0
    ds = ClipDataset(table, CLASSES, DirectAudio(SR), window_s=1.0, window_mode="random")
    offsets = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        x = ds[0]["audio"].numpy()
        nonzero = np.flatnonzero(x)
        assert len(nonzero) == 400 and nonzero[-1] - nonzero[0] == 399
        offsets.add(int(nonzero[0]))
    assert len(offsets) > 1


def test_corrupt_file_gives_zero_weight_and_warns_once(tmp_path, long_clip, caplog):
    bad = tmp_path / "bad.ogg"
    bad.write_bytes(b"OggS this is not audio" * 10)
    table = clip_table([long_clip, str(bad)], rating=[4.0, 4.0])
    ds = ClipDataset(table, CLASSES, DirectAudio(SR), window_s=1.0, rating_weight=True)
    with caplog.at_level(logging.WARNING, logger="birdrounds.data.clips"):
        item = ds[1]
        ds[1]
    assert item["audio"].shape == (1000,) and not item["audio"].any()
    assert item["weight"].item() == 0.0
    assert item["target"].tolist()[0] == 1.0
    assert ds.num_failures == 2 and ds.failed_paths == [str(bad)]
    assert sum(str(bad) in r.getMessage() for r in caplog.records) == 1
    assert ds[0]["weight"].item() == pytest.approx(0.8)


def test_rating_weights():
    np.testing.assert_allclose(rating_weights([0, 5, 2.5, 0.5, float("nan"), 7]), [1, 1, 0.5, 0.2, 1, 1])


def test_results_do_not_depend_on_worker_count(tmp_path, long_clip):
    table = clip_table([long_clip] * 6)
    augment = build_waveform_augment(SR, gain_p=1.0, noise_p=1.0, background_p=0, shift_p=1.0, pitch_p=0, stretch_p=0,
                                     pitch_method="resample")
    ds = ClipDataset(table, CLASSES, DirectAudio(SR), window_s=1.0, augment=augment, seed=7)
    serial = [b["audio"] for b in DataLoader(ds, batch_size=2, num_workers=0)]
    state = random.getstate()
    parallel = [b["audio"] for b in DataLoader(ds, batch_size=2, num_workers=2)]
    assert random.getstate() == state  # per-item seeding does not leak into the global RNG
    for s, p in zip(serial, parallel):
        torch.testing.assert_close(s, p, rtol=0, atol=0)
    assert not torch.equal(serial[0][0], serial[0][1])


# ---- MixUp ----


def two_sample_batch():
    return {
        "audio": torch.tensor([[1.0, 2.0], [3.0, 6.0]]),
        "target": torch.tensor([[1.0, 0.0, 0.2], [0.0, 1.0, 0.5]]),
        "weight": torch.tensor([1.0, 0.4]),
        "index": torch.tensor([7, 8]),
    }


def test_mixup_max_exact_values():
    out = MixUp(prob=1.0, alpha=None, weight=0.5, target_mode="max")(two_sample_batch())
    # With two samples each one's partner is the other.
    torch.testing.assert_close(out["audio"], torch.tensor([[2.0, 4.0], [2.0, 4.0]]))
    torch.testing.assert_close(out["target"], torch.tensor([[1.0, 1.0, 0.5], [1.0, 1.0, 0.5]]))
    torch.testing.assert_close(out["weight"], torch.tensor([1.0, 1.0]))
    assert out["index"].tolist() == [7, 8]


def test_mixup_sum_exact_values():
    out = MixUp(prob=1.0, alpha=None, weight=0.75, target_mode="sum")(two_sample_batch())
    torch.testing.assert_close(out["audio"], torch.tensor([[1.5, 3.0], [2.5, 5.0]]))
    torch.testing.assert_close(out["target"], torch.tensor([[0.75, 0.25, 0.275], [0.25, 0.75, 0.425]]))
    torch.testing.assert_close(out["weight"], torch.tensor([0.85, 0.55]))


def test_mixup_prob_zero_and_zero_weight_samples_unchanged():
    batch = two_sample_batch()
    out = MixUp(prob=0.0, alpha=None, weight=0.5, target_mode="max")(batch)
    for key in batch:
        assert torch.equal(out[key], batch[key])
    batch["weight"] = torch.tensor([1.0, 0.0])  # sample 1 failed to decode
    out = MixUp(prob=1.0, alpha=None, weight=0.5, target_mode="max")(batch)
    assert torch.equal(out["audio"], batch["audio"]) and torch.equal(out["weight"], batch["weight"])


def test_mixup_beta_is_seeded_and_partners_differ():
    batch = {"audio": torch.eye(8), "target": torch.eye(8), "weight": torch.ones(8)}
    a = MixUp(prob=1.0, alpha=0.4, weight=None, target_mode="sum", seed=3)(batch)
    b = MixUp(prob=1.0, alpha=0.4, weight=None, target_mode="sum", seed=3)(batch)
    torch.testing.assert_close(a["audio"], b["audio"])
    lam = a["audio"].diagonal()
    assert ((lam > 0) & (lam < 1)).all() and len(set(lam.tolist())) > 1
    assert (a["audio"].count_nonzero(dim=1) == 2).all()  # every row mixed with one other row


def test_mixup_needs_exactly_one_of_alpha_and_weight():
    with pytest.raises(ValueError):
        MixUp(prob=0.5, alpha=0.4, weight=0.5, target_mode="max")
    with pytest.raises(ValueError):
        MixUp(prob=0.5, alpha=None, weight=None, target_mode="max")


def test_mixup_collate_is_picklable_and_mixes():
    collate = pickle.loads(pickle.dumps(MixUpCollate(MixUp(prob=1.0, alpha=None, weight=0.5, target_mode="max"))))
    samples = [
        {"audio": torch.tensor([0.0, 2.0]), "target": torch.tensor([1.0, 0.0]), "weight": torch.tensor(1.0)},
        {"audio": torch.tensor([2.0, 0.0]), "target": torch.tensor([0.0, 1.0]), "weight": torch.tensor(1.0)},
    ]
    out = collate(samples)
    torch.testing.assert_close(out["audio"], torch.ones(2, 2))
    torch.testing.assert_close(out["target"], torch.ones(2, 2))
    assert MixUpCollate(None)(samples)["audio"].shape == (2, 2)


# ---- sampling weights ----


LABELS = ["a"] * 90 + ["b"] * 9 + ["c"]


def test_class_sample_weights_extremes():
    natural = class_sample_weights(LABELS, temperature=0.0)
    np.testing.assert_allclose(natural, np.full(100, 0.01))
    flat = class_sample_weights(LABELS, temperature=1.0)
    per_class = pd.Series(flat).groupby(LABELS).sum()
    np.testing.assert_allclose(per_class.to_numpy(), [1 / 3] * 3)
    half = pd.Series(class_sample_weights(LABELS, 0.5)).groupby(LABELS).sum()
    assert half["a"] > half["b"] > half["c"]  # in between: flattened, not equal
    with pytest.raises(ValueError):
        class_sample_weights(LABELS, temperature=1.5)


def test_sampler_flattens_classes_and_is_seeded():
    table = pd.DataFrame({"primary_label": LABELS, "rating": [0.0] * 100})
    draws = list(make_sampler(table, temperature=1.0, num_samples=6000, seed=1))
    assert draws == list(make_sampler(table, temperature=1.0, num_samples=6000, seed=1))
    freq = pd.Series([LABELS[i] for i in draws]).value_counts(normalize=True)
    np.testing.assert_allclose(freq.sort_index().to_numpy(), [1 / 3] * 3, atol=0.04)
    natural = pd.Series([LABELS[i] for i in make_sampler(table, temperature=0.0, num_samples=6000)])
    assert natural.value_counts(normalize=True)["a"] > 0.85
    assert len(make_sampler(table, temperature=0.5)) == 100


def test_sampler_rating_weight():
    table = pd.DataFrame({"primary_label": ["a", "a"], "rating": [5.0, 1.0]})
    draws = np.array(list(make_sampler(table, temperature=0.0, num_samples=6000, rating_weight=True)))
    assert (draws == 0).mean() == pytest.approx(5 / 6, abs=0.03)


# ---- waveform augmentation ----


AUG_SR = 8000


def noise(n, seed, scale=0.1):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def test_augment_none_when_all_off():
    off = dict(gain_p=0, noise_p=0, background_p=0, shift_p=0, pitch_p=0, stretch_p=0, pitch_method="resample")
    assert build_waveform_augment(AUG_SR, **off) is None


@pytest.mark.parametrize("which", ["gain", "noise", "background", "shift", "pitch", "stretch", "pitch_resample"])
def test_each_augment_changes_audio_and_keeps_length(tmp_path, which):
    background = write_wave(tmp_path / "bg.wav", noise(3 * AUG_SR, 1), AUG_SR)
    probs = dict(gain_p=0, noise_p=0, background_p=0, shift_p=0, pitch_p=0, stretch_p=0)
    probs[f"{which.split('_')[0]}_p"] = 1.0
    augment = build_waveform_augment(
        AUG_SR, **probs, gain_db=(3, 6), background_paths=[background], background_audio=DirectAudio(AUG_SR),
        pitch_method="resample" if which == "pitch_resample" else "signalsmith",
    )
    t = np.arange(AUG_SR, dtype=np.float32) / AUG_SR
    clip = np.sin(2 * np.pi * 440 * t) * t  # rising tone: shifts and stretches change it
    random.seed(0)
    np.random.seed(0)
    out = augment(clip.copy(), AUG_SR)
    assert out.shape == clip.shape and out.dtype == np.float32
    assert np.abs(out - clip).max() > 1e-3
    augment_again = pickle.loads(pickle.dumps(augment))
    random.seed(0)
    np.random.seed(0)
    np.testing.assert_array_equal(augment_again(clip.copy(), AUG_SR), out)


def test_resample_pitch_shift_moves_frequency():
    clip = np.sin(2 * np.pi * 1000 * np.arange(AUG_SR) / AUG_SR).astype(np.float32)
    shift = ResamplePitchShift(12.0, 12.0, p=1.0)  # one octave up
    out = shift(clip, AUG_SR)
    spectrum = np.abs(np.fft.rfft(out[: AUG_SR // 2]))
    assert np.fft.rfftfreq(AUG_SR // 2, 1 / AUG_SR)[spectrum.argmax()] == pytest.approx(2000, abs=4)


def test_background_snr_and_unreadable_background(tmp_path, caplog):
    good = write_wave(tmp_path / "bg.wav", noise(2 * AUG_SR, 2, scale=0.5), AUG_SR)
    clip = noise(AUG_SR, 3, scale=0.2)
    mixer = SoundscapeBackground([good], DirectAudio(AUG_SR), min_snr_db=10.0, max_snr_db=10.0, p=1.0)
    added = mixer(clip, AUG_SR) - clip
    snr_db = 20 * np.log10(np.sqrt(np.mean(clip**2)) / np.sqrt(np.mean(added**2)))
    assert snr_db == pytest.approx(10.0, abs=0.01)
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"\x00" * 50)
    broken = SoundscapeBackground([str(bad)], DirectAudio(AUG_SR), p=1.0)
    with caplog.at_level(logging.WARNING, logger="birdrounds.data.augment"):
        np.testing.assert_array_equal(broken(clip, AUG_SR), clip)
        np.testing.assert_array_equal(broken(clip, AUG_SR), clip)
    assert sum(str(bad) in r.getMessage() for r in caplog.records) == 1


def test_reads_float16_memmaps_from_audio_cache(tmp_path, long_clip):
    cache = AudioCache(tmp_path / "cache", SR, dtype="float16")
    ds = ClipDataset(clip_table([long_clip]), CLASSES, cache, window_s=1.0, window_mode="center")
    audio = ds[0]["audio"]
    assert audio.dtype == torch.float32
    np.testing.assert_allclose(audio.numpy(), ramp(3000)[1000:2000], rtol=1e-3)


def test_mixup_set_epoch_restarts_draws_reproducibly():
    batch = {"audio": torch.arange(8, dtype=torch.float32).repeat(16, 1) * torch.arange(16.0)[:, None],
             "target": torch.eye(16), "weight": torch.ones(16)}
    mix = MixUp(prob=0.5, alpha=None, weight=0.5, target_mode="max", seed=3)
    mix.set_epoch(2)
    first = mix(dict(batch))["audio"]
    mix(dict(batch))  # draws move on within an epoch
    mix.set_epoch(2)
    assert torch.equal(mix(dict(batch))["audio"], first)
    mix.set_epoch(3)
    assert not torch.equal(mix(dict(batch))["audio"], first)
