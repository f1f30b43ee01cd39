"""Soundscape chunking: row ids, window grid, trailing windows, short and unreadable files."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from birdrounds import contract
from birdrounds.data.audio import DirectAudio
from birdrounds.data.soundscapes import SoundscapeChunks, row_id, window_starts

SR = 100  # samples per second; tiny so minute-long files stay small


def write_seconds(path, seconds, sample_rate_hz=SR):
    """A file whose sample values encode their time (sample index / SR)."""
    n = int(round(seconds * sample_rate_hz))
    sf.write(str(path), (np.arange(n, dtype=np.float32) + 1) / 10_000, sample_rate_hz, subtype="FLOAT")
    return path


def test_row_id():
    assert row_id("H02_20230420_074000", 5.0) == "H02_20230420_074000_5"
    assert row_id("x", 59.9999) == "x_60"


def test_chunks_and_submission_share_the_row_id_rule_and_chunk(tmp_path):
    """Training, pseudo-labels and the submission name a chunk alike: one rule and one chunk, in contract.py."""
    assert row_id is contract.row_id
    path = write_seconds(tmp_path / "S01_20240101_000000.wav", 37)
    ds = SoundscapeChunks([path], DirectAudio(SR))  # default window and stride: the scored chunk
    assert ds.window_s == contract.SCORED_CHUNK_S and ds.stride == round(contract.SCORED_CHUNK_S * SR)
    assert ds.rows["row_id"].tolist() == contract.row_ids(path.stem, len(ds))


def test_sixty_second_file_gives_twelve_rows(tmp_path):
    path = write_seconds(tmp_path / "H02_20230420_074000.wav", 60)
    ds = SoundscapeChunks([path], DirectAudio(SR))
    assert len(ds) == 12
    assert ds.rows["row_id"].tolist() == [f"H02_20230420_074000_{s}" for s in range(5, 65, 5)]
    assert ds.rows["start_s"].tolist() == list(range(0, 60, 5))
    assert (ds.rows["file"] == str(path)).all() and (ds.rows["stem"] == "H02_20230420_074000").all()
    item = ds[3]
    assert item["index"].item() == 3 and item["index"].dtype == torch.long
    assert item["audio"].shape == (500,)
    assert item["audio"][0].item() == pytest.approx((15 * SR + 1) / 10_000)


def test_trailing_partial_window(tmp_path):
    short_tail = SoundscapeChunks([write_seconds(tmp_path / "a.wav", 62)], DirectAudio(SR))
    assert len(short_tail) == 12  # 2 s < min_last_s = 2.5 s
    long_tail = SoundscapeChunks([write_seconds(tmp_path / "b.wav", 63)], DirectAudio(SR))
    assert long_tail.rows["row_id"].tolist()[-1] == "b_65"
    last = long_tail[12]["audio"].numpy()
    assert (last[:300] > 0).all() and not last[300:].any()  # 3 s of audio, then zero padding


def test_short_file_gives_one_padded_row(tmp_path):
    ds = SoundscapeChunks([write_seconds(tmp_path / "tiny.wav", 1.5)], DirectAudio(SR))
    assert ds.rows["row_id"].tolist() == ["tiny_5"]
    audio = ds[0]["audio"].numpy()
    assert (audio[:150] > 0).all() and not audio[150:].any()


def test_overlapping_stride():
    assert window_starts(1000, 500, 250, 250) == [0, 250, 500]  # nothing new after the end at 1000
    assert window_starts(1100, 500, 250, 100) == [0, 250, 500, 750]
    assert window_starts(1050, 500, 250, 100) == [0, 250, 500]


def test_unreadable_file_skipped(tmp_path, caplog):
    bad = tmp_path / "broken.ogg"
    bad.write_bytes(b"not audio at all" * 4)
    good = write_seconds(tmp_path / "good.wav", 10)
    with caplog.at_level(logging.WARNING, logger="birdrounds.data.soundscapes"):
        ds = SoundscapeChunks([bad, good], DirectAudio(SR))
    assert ds.rows["row_id"].tolist() == ["good_5", "good_10"]
    assert [p for p, _ in ds.skipped] == [str(bad)]
    assert any(str(bad) in r.getMessage() for r in caplog.records)


def test_file_broken_after_init_gives_silence(tmp_path, caplog):
    path = write_seconds(tmp_path / "later.wav", 10)
    ds = SoundscapeChunks([path], DirectAudio(SR))
    path.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="birdrounds.data.soundscapes"):
        item = ds[1]
    assert not item["audio"].any() and ds.failed_paths == [str(path)]


def test_dataloader_batches_follow_rows(tmp_path):
    paths = [write_seconds(tmp_path / f"f{i}.wav", 20) for i in range(2)]
    ds = pickle.loads(pickle.dumps(SoundscapeChunks(paths, DirectAudio(SR))))
    batches = list(DataLoader(ds, batch_size=3, num_workers=0))
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == list(range(8))
    audio = torch.cat([b["audio"] for b in batches])
    starts = (audio[:, 0] * 10_000 - 1) / SR
    assert starts.tolist() == pytest.approx(ds.rows["start_s"].tolist())


def test_real_ogg_minute_at_32khz(tmp_path):
    path = tmp_path / "S08_20240101_000000.ogg"
    wave = (np.random.default_rng(0).standard_normal(60 * 32_000) * 0.1).astype(np.float32)
    # One big Ogg write can crash libsndfile 1.2.2; write one second at a time.
    with sf.SoundFile(str(path), "w", 32_000, 1) as f:
        for start in range(0, len(wave), 32_000):
            f.write(wave[start : start + 32_000])
    ds = SoundscapeChunks([path], DirectAudio(32_000))
    assert ds.rows["row_id"].tolist() == [f"S08_20240101_000000_{s}" for s in range(5, 65, 5)]
    assert ds[11]["audio"].shape == (160_000,)
