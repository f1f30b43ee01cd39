"""Pseudo-label transforms, teacher inference (ensemble, long windows, resume), table and weights."""

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from birdrounds.config import ConfigError, compose
from birdrounds.data.soundscapes import SoundscapeChunks
from birdrounds.pseudo import (
    Compose,
    DropLowest,
    FileScale,
    MinMax,
    Power,
    Threshold,
    TopK,
    chunk_rows,
    file_weights,
    predict_chunks,
    predict_windows,
    pseudo_stats,
    read_pseudo_labels,
    shard_range,
    split_table,
    windows_to_chunks,
    write_pseudo_labels,
)


class MemoryAudio:
    """In-memory audio source: path -> waveform."""

    def __init__(self, waves: dict[str, np.ndarray], sample_rate_hz: int = 10) -> None:
        self.waves, self.sample_rate_hz = waves, sample_rate_hz

    def load(self, path):
        return self.waves[str(path)]


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


class MeanModel(nn.Module):
    """Clip prob of every class = mean audio + class offset; framewise prob = frame mean + slope * frame."""

    def __init__(self, n_classes: int = 2, n_frames: int = 2, slope: float = 0.1, offset: float = 0.0,
                 fail_after: int | None = None) -> None:
        super().__init__()
        self.n_classes, self.n_frames, self.slope, self.offset = n_classes, n_frames, slope, offset
        self.fail_after, self.calls = fail_after, 0

    def forward(self, audio):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("killed")
        cls = torch.arange(self.n_classes, dtype=torch.float64) * 0.01
        clip = audio.double().mean(dim=1, keepdim=True) + self.offset + cls
        frames = audio.double().reshape(len(audio), self.n_frames, -1).mean(dim=2)
        frames = frames + self.slope * torch.arange(self.n_frames, dtype=torch.float64)
        framewise = frames[:, :, None] + cls
        return {"logits": _logit(clip).float(), "framewise_logits": _logit(framewise).float()}


def _steps(values, seconds=5, sr=10):
    return np.repeat(np.asarray(values, dtype=np.float32), seconds * sr)


# ---------------------------------------------------------------- transforms


def test_power_uses_round_exponent_and_last_for_later_rounds():
    p = np.array([[0.25, 1.0]], dtype=np.float32)
    power = Power([1.0, 2.0, 0.5])
    keep = np.ones(1, bool)
    np.testing.assert_allclose(power(p, keep, 1)[0], [[0.25, 1.0]])
    np.testing.assert_allclose(power(p, keep, 2)[0], [[0.0625, 1.0]])
    np.testing.assert_allclose(power(p, keep, 7)[0], [[0.5, 1.0]])
    with pytest.raises(ValueError):
        Power([0.0])


def test_threshold_trims_and_drops_weak_chunks():
    p = np.array([[0.05, 0.6], [0.2, 0.3], [0.09, 0.1]], dtype=np.float32)
    out, keep = Compose([Threshold(0.1, keep_threshold=0.5)])(p)
    np.testing.assert_allclose(out, [[0.0, 0.6], [0.2, 0.3], [0.0, 0.1]], rtol=0, atol=1e-7)
    assert keep.tolist() == [True, False, False]
    _, keep_all = Compose([Threshold(0.1, keep_threshold=None)])(p)
    assert keep_all.all()


def test_topk_keeps_largest_per_chunk_with_stable_ties():
    p = np.array([[0.1, 0.5, 0.3, 0.5], [0.9, 0.0, 0.2, 0.1]], dtype=np.float32)
    out, _ = Compose([TopK(2)])(p)
    np.testing.assert_allclose(out, [[0.0, 0.5, 0.0, 0.5], [0.9, 0.0, 0.2, 0.0]])


def test_minmax_per_class_and_constant_column():
    p = np.array([[0.2, 0.3], [0.4, 0.3], [0.6, 0.3]], dtype=np.float32)
    out, _ = Compose([MinMax()])(p)
    np.testing.assert_allclose(out, [[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]], atol=1e-6)


def test_drop_lowest_and_composition_order():
    p = np.array([[0.1, 0.1], [0.9, 0.5], [0.3, 0.0], [0.4, 0.4], [0.0, 0.05]], dtype=np.float32)
    chain = Compose([DropLowest(0.4), Power([2.0]), Threshold(0.1, keep_threshold=None)])
    out, keep = chain(p)
    assert keep.tolist() == [False, True, True, True, False]
    np.testing.assert_allclose(out, [[0, 0], [0.81, 0.25], [0, 0], [0.16, 0.16], [0, 0]], atol=1e-6)
    assert chain.describe() == "drop_lowest(0.4) -> power(k=2) -> threshold(t=0.1, keep>=None)"
    assert Compose([]).describe() == "identity"


def test_file_scale_multiplies_by_the_class_max_of_its_file():
    p = np.array([[0.2, 0.1], [0.8, 0.1], [0.5, 0.4]], dtype=np.float32)
    files = np.array(["a.ogg", "a.ogg", "b.ogg"])
    chain = Compose([Power([1.0]), FileScale(1.0)])
    out, keep = chain(p, files=files)
    # File a: class 0 max 0.8, class 1 max 0.1; file b alone: each value times itself.
    np.testing.assert_allclose(out, [[0.16, 0.01], [0.64, 0.01], [0.25, 0.16]], atol=1e-6)
    assert keep.all() and chain.describe() == "power(k=1) -> file_scale(alpha=1)"
    half, _ = Compose([FileScale(0.5)])(p, files=files)
    np.testing.assert_allclose(half[0], [0.2 * (0.5 + 0.5 * 0.8), 0.1 * (0.5 + 0.5 * 0.1)], atol=1e-6)
    with pytest.raises(ValueError, match="files="):
        Compose([FileScale(1.0)])(p)
    with pytest.raises(ValueError, match="contiguous"):
        Compose([FileScale(1.0)])(p, files=np.array(["a.ogg", "b.ogg", "a.ogg"]))
    with pytest.raises(ValueError, match="alpha"):
        FileScale(1.5)


@pytest.mark.parametrize("name", ["none", "first_2025", "second_2025", "fourth_2025"])
def test_presets_instantiate(name):
    cfg = compose([f"pseudo={name}"]).pseudo  # the preset over configs/pseudo/_base.yaml
    chain = instantiate(cfg.transform)
    probs = np.array([[0.2, 0.9], [0.05, 0.01]], dtype=np.float32)
    out, keep = chain(probs, round_idx=2, files=["a.ogg", "a.ogg"])
    assert out.shape == (2, 2) and keep.shape == (2,)
    assert cfg.mixing.strategy in ("mixup_max", "replace", "concat")
    if name == "first_2025":
        # Power 1.54 at round 2, then each class times its max over the file (row 0 holds both maxima).
        powered = np.power(probs.astype(np.float64), 1.54)
        np.testing.assert_allclose(out, powered * powered[0], rtol=1e-5)


# ---------------------------------------------------------------- teacher inference


def test_predict_5s_chunks_averages_ensemble():
    audio = MemoryAudio({"a.ogg": _steps([0.2, 0.4]), "b.ogg": _steps([0.6])})
    data = SoundscapeChunks(["a.ogg", "b.ogg"], audio)
    models = [MeanModel(offset=0.0), MeanModel(offset=0.1)]
    probs = predict_chunks(models, data, batch_size=2)
    np.testing.assert_allclose(probs, [[0.25, 0.26], [0.45, 0.46], [0.65, 0.66]], atol=1e-6)
    assert chunk_rows(data)["row_id"].tolist() == ["a_5", "a_10", "b_5"]


def test_predict_long_windows_framewise_overlap_average():
    # 15-s file, 10-s windows every 5 s: windows [0,10) and [5,15), 2 frames of 5 s each.
    audio = MemoryAudio({"s.ogg": _steps([0.2, 0.4, 0.6])})
    data = SoundscapeChunks(["s.ogg"], audio, window_s=10.0, stride_s=5.0)
    assert len(data) == 2
    probs = predict_chunks([MeanModel(n_frames=2, slope=0.1)], data, batch_size=1)
    # cell 0: 0.2 (frame 0 of w0); cell 1: mean(0.4 + 0.1, 0.4 + 0) ; cell 2: 0.6 + 0.1 (frame 1 of w1)
    np.testing.assert_allclose(probs[:, 0], [0.2, 0.45, 0.7], atol=1e-6)
    np.testing.assert_allclose(probs[:, 1], [0.21, 0.46, 0.71], atol=1e-6)
    assert chunk_rows(data)["row_id"].tolist() == ["s_5", "s_10", "s_15"]


def test_predict_long_windows_chunk_takes_max_over_its_frames():
    # 4 frames of 2.5 s per 10-s window; one window; chunk = max over its two frames.
    wave = np.concatenate([np.full(25, 0.1), np.full(25, 0.3), np.full(25, 0.2), np.full(25, 0.2)]).astype(np.float32)
    data = SoundscapeChunks(["s.ogg"], MemoryAudio({"s.ogg": wave}), window_s=10.0, stride_s=5.0)
    probs = predict_chunks([MeanModel(n_frames=4, slope=0.0)], data)
    np.testing.assert_allclose(probs[:, 0], [0.3, 0.2], atol=1e-6)


def test_predict_resumes_without_recomputing(tmp_path):
    waves = {f"f{i}.ogg": _steps([0.1 + 0.1 * i, 0.15 + 0.1 * i]) for i in range(3)}
    data = SoundscapeChunks(sorted(waves), MemoryAudio(waves))
    expected = predict_chunks([MeanModel()], data, batch_size=1)
    partial = tmp_path / "partial"
    with pytest.raises(RuntimeError, match="killed"):
        predict_chunks([MeanModel(fail_after=5)], data, batch_size=1, partial_path=partial, save_every=2)
    assert sum(len(np.load(p)) for p in partial.glob("part_*.npy")) == 4  # the 5th window was never saved
    model = MeanModel()
    resumed = predict_chunks([model], data, batch_size=1, partial_path=partial, save_every=2)
    assert model.calls == 2  # only the 2 windows not done before the kill
    np.testing.assert_array_equal(resumed, expected)
    again = MeanModel()
    np.testing.assert_array_equal(predict_chunks([again], data, partial_path=partial), expected)
    assert again.calls == 0
    # A part damaged on disk is recomputed with what follows it, not a crash.
    parts = sorted(partial.glob("part_*.npy"))
    parts[1].write_bytes(b"damaged")
    after = MeanModel()
    np.testing.assert_array_equal(predict_chunks([after], data, batch_size=1, partial_path=partial), expected)
    assert after.calls == 6 - len(np.load(parts[0]))


# ---------------------------------------------------------------- table, stats, weights


def test_table_roundtrip_with_provenance(tmp_path):
    rows = pd.DataFrame({"row_id": ["a_5", "a_10"], "file": ["/x/a.ogg"] * 2, "start_s": [0.0, 5.0],
                         "end_s": [5.0, 10.0]})
    probs = np.array([[0.1, 0.9], [0.5, 0.25]], dtype=np.float64)
    path = tmp_path / "pseudo.parquet"
    write_pseudo_labels(path, rows, probs, ["c1", "c2"], {"round": 1, "teachers": ["abc123"], "transform": "power(k=1)"})
    assert not [p for p in tmp_path.iterdir() if p.name != "pseudo.parquet"]
    table, prov = read_pseudo_labels(path)
    assert list(table.columns) == ["row_id", "file", "start_s", "end_s", "c1", "c2"]
    assert table["c1"].dtype == np.float32
    assert prov == {"round": 1, "teachers": ["abc123"], "transform": "power(k=1)", "classes": ["c1", "c2"]}
    back_rows, back = split_table(table, prov["classes"])
    np.testing.assert_array_equal(back, probs.astype(np.float32))
    assert back_rows["row_id"].tolist() == ["a_5", "a_10"]
    with pytest.raises(ValueError):
        write_pseudo_labels(path, rows, probs[:1], ["c1", "c2"], {})
    # A truncated table in a round folder is named with the recompute_from that rebuilds it.
    damaged = tmp_path / "run" / "round_1" / "pseudo_labels.parquet"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"pseudo_labels.parquet: cannot be read, truncated or corrupt \(\w+\); "
                                          r"rerun with recompute_from=1 to rebuild it, or delete it$"):
        read_pseudo_labels(damaged)


def test_pseudo_stats():
    probs = np.array([[0.9, 0.6], [0.2, 0.4], [0.1, 0.7], [0.0, 0.0]], dtype=np.float32)
    stats = pseudo_stats(probs, ["a", "b"])
    assert stats["chunks"] == 4
    assert stats["coverage_above_0.5"] == pytest.approx(0.5)
    assert stats["mean_max_prob"] == pytest.approx((0.9 + 0.4 + 0.7 + 0.0) / 4)
    assert stats["positives_per_class"] == {"a": 1, "b": 2}


def test_file_weights_sum_of_file_max():
    rows = pd.DataFrame({"file": ["a", "a", "b"]})
    probs = np.array([[0.1, 0.5], [0.3, 0.2], [0.4, 0.4]])
    np.testing.assert_allclose(file_weights(rows, probs), [0.8, 0.8, 0.8])
    rows2 = pd.DataFrame({"file": ["b", "a", "a"]})
    np.testing.assert_allclose(file_weights(rows2, np.array([[0.1, 0.0], [0.2, 0.3], [0.6, 0.1]])), [0.1, 0.9, 0.9])


def test_predict_with_real_sed_models_short_and_long_windows():
    from conftest import config_model

    sr = 16000  # model=tiny at 16 kHz with a finer hop, so 5-s chunks give enough SED frames
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(config_model(3, sample_rate_hz=sr, n_fft=512, hop_length=256).eval())
    wave = (0.1 * np.random.default_rng(0).standard_normal(15 * sr)).astype(np.float32)
    audio = MemoryAudio({"s.ogg": wave}, sample_rate_hz=sr)
    short = SoundscapeChunks(["s.ogg"], audio)
    probs = predict_chunks(models, short, batch_size=3)
    with torch.no_grad():
        batch = torch.stack([short[i]["audio"] for i in range(3)])
        manual = (torch.sigmoid(models[0](batch)["logits"]) + torch.sigmoid(models[1](batch)["logits"])) / 2
    np.testing.assert_allclose(probs, manual.numpy(), atol=1e-5)
    long = predict_chunks(models, SoundscapeChunks(["s.ogg"], audio, window_s=10.0, stride_s=5.0), batch_size=2)
    assert long.shape == (3, 3) and np.isfinite(long).all() and ((long > 0) & (long < 1)).all()


def test_shards_gathered_equal_single_process(tmp_path):
    waves = {f"f{i}.ogg": _steps([0.1 + 0.1 * i, 0.2, 0.3 + 0.05 * i]) for i in range(3)}
    data = SoundscapeChunks(sorted(waves), MemoryAudio(waves), window_s=10.0, stride_s=5.0)
    whole = predict_chunks([MeanModel()], data, batch_size=2)
    shards = [shard_range(len(data), rank, 2) for rank in range(2)]
    assert [len(s) for s in shards] == [3, 3] and shards[0].stop == shards[1].start
    outputs = [predict_windows([MeanModel()], data, True, s, batch_size=2, partial_dir=tmp_path / f"r{i}",
                               save_every=1) for i, s in enumerate(shards)]
    np.testing.assert_array_equal(windows_to_chunks(np.concatenate(outputs), data), whole)
    (tmp_path / "r0" / "part_000000000.npy").unlink()
    with pytest.raises(ValueError, match="gap"):
        predict_windows([MeanModel()], data, True, shards[0], partial_dir=tmp_path / "r0")


def test_long_windows_need_framewise_output():
    class ClipOnly(nn.Module):
        def forward(self, audio):
            return {"logits": torch.zeros(len(audio), 2)}

    data = SoundscapeChunks(["s.ogg"], MemoryAudio({"s.ogg": _steps([0.2, 0.4, 0.6])}), window_s=10.0)
    with pytest.raises(ValueError, match="framewise"):
        predict_chunks([ClipOnly()], data)
