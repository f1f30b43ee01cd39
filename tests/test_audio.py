"""Decoding, failure policy and the decoded-audio cache, on real files written in tmp_path."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from birdrounds.data import audio
from birdrounds.data.audio import AudioCache, AudioDecodeError, DirectAudio, audio_info, load_audio

SR_HZ = 32_000
FORMATS = {  # suffix -> soundfile (format, subtype)
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}


def sine(freq_hz: float, duration_s: float, sample_rate_hz: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(duration_s * sample_rate_hz)) / sample_rate_hz
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def write(path: Path, data: np.ndarray, sample_rate_hz: int = SR_HZ) -> Path:
    fmt, subtype = FORMATS[path.suffix[1:]]
    sf.write(path, data, sample_rate_hz, format=fmt, subtype=subtype)
    return path


def peak_frequency_hz(x: np.ndarray, sample_rate_hz: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sample_rate_hz)[spectrum.argmax()])


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


class CountingDecoder:
    """Wraps load_audio to count how often the cache really decodes."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path, sample_rate_hz):
        self.calls += 1
        return load_audio(path, sample_rate_hz)


@pytest.fixture
def decoder(monkeypatch) -> CountingDecoder:
    counting = CountingDecoder()
    monkeypatch.setattr(audio, "load_audio", counting)
    return counting


# --- decoding --------------------------------------------------------------------------------


def test_soundfile_can_write_every_tested_format():
    assert set(sf.available_formats()) >= {fmt for fmt, _ in FORMATS.values()}


@pytest.mark.parametrize("suffix", sorted(FORMATS))
def test_load_audio_decodes_each_format(tmp_path, suffix):
    x = sine(1000.0, 1.0, SR_HZ)
    y = load_audio(write(tmp_path / f"tone.{suffix}", x), SR_HZ)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - len(x)) <= 0.01 * len(x)
    assert peak_frequency_hz(y, SR_HZ) == pytest.approx(1000.0, abs=2.0)
    assert np.abs(y).max() == pytest.approx(0.5, abs=0.05)


def test_lossless_decode_matches_samples(tmp_path):
    x = sine(440.0, 0.5, SR_HZ)
    y = load_audio(write(tmp_path / "tone.flac", x), SR_HZ)
    np.testing.assert_allclose(y, x, atol=1 / 2**15)


def test_stereo_is_downmixed_to_mean(tmp_path):
    tone = sine(440.0, 0.5, SR_HZ, amplitude=1.0)
    stereo = np.stack([0.6 * tone, 0.2 * tone], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, SR_HZ, subtype="FLOAT")
    y = load_audio(path, SR_HZ)
    assert y.shape == (len(tone),)
    np.testing.assert_allclose(y, 0.4 * tone, atol=1e-6)


def test_resamples_44k1_to_32k_keeping_length_and_pitch(tmp_path):
    x = sine(1000.0, 1.0, 44_100)
    path = tmp_path / "cd.wav"
    sf.write(path, x, 44_100, subtype="FLOAT")
    y = load_audio(path, 32_000)
    assert abs(len(y) - 32_000) <= 1
    assert peak_frequency_hz(y, 32_000) == pytest.approx(1000.0, abs=1.0)


def test_direct_audio_decodes_like_load_audio(tmp_path):
    path = write(tmp_path / "tone.flac", sine(440.0, 0.5, 44_100), 44_100)
    source = DirectAudio(sample_rate_hz=SR_HZ)
    assert source.sample_rate_hz == SR_HZ
    np.testing.assert_array_equal(source.load(path), load_audio(path, SR_HZ))


def test_audio_info_reads_header(tmp_path):
    path = tmp_path / "stereo.flac"
    sf.write(path, np.zeros((22_050, 2), np.float32), 44_100)
    assert audio_info(path) == (pytest.approx(0.5), 44_100, 2)


# --- failure policy --------------------------------------------------------------------------


def assert_decode_error_names(path: Path, *, info_too: bool = True) -> None:
    with pytest.raises(AudioDecodeError, match=path.name):
        load_audio(path, SR_HZ)
    if info_too:
        with pytest.raises(AudioDecodeError, match=path.name):
            audio_info(path)


@pytest.mark.parametrize("suffix", ["ogg", "wav", "mp3"])
def test_random_bytes_raise(tmp_path, suffix):
    path = tmp_path / f"noise.{suffix}"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_decode_error_names(path)


def test_zero_byte_file_raises(tmp_path):
    path = tmp_path / "empty.ogg"
    path.write_bytes(b"")
    assert_decode_error_names(path)


def test_valid_header_with_zero_frames_raises(tmp_path):
    path = write(tmp_path / "silent.wav", np.zeros(0, np.float32))
    assert sf.info(path).frames == 0  # the header itself is valid
    assert_decode_error_names(path)


def test_missing_file_raises(tmp_path):
    assert_decode_error_names(tmp_path / "nowhere.ogg")


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_ogg_raises(tmp_path, fraction):
    # libsndfile decodes a cut Ogg file up to the cut without any error; we must still refuse it.
    noise = np.random.default_rng(1).uniform(-0.3, 0.3, 5 * SR_HZ).astype(np.float32)
    path = truncate(write(tmp_path / "cut.ogg", noise), fraction)
    assert_decode_error_names(path, info_too=False)


@pytest.mark.parametrize("suffix", ["flac", "mp3"])
def test_truncated_flac_and_mp3_raise(tmp_path, suffix):
    noise = np.random.default_rng(2).uniform(-0.3, 0.3, 3 * SR_HZ).astype(np.float32)
    path = truncate(write(tmp_path / f"cut.{suffix}", noise))
    assert_decode_error_names(path, info_too=False)


def test_non_finite_samples_raise(tmp_path):
    x = sine(440.0, 0.1, SR_HZ)
    x[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, SR_HZ, subtype="FLOAT")
    assert_decode_error_names(path, info_too=False)


# --- cache -----------------------------------------------------------------------------------


def test_cache_miss_then_hit_serves_memmap(tmp_path, decoder):
    path = write(tmp_path / "tone.ogg", sine(440.0, 1.0, SR_HZ))
    cache = AudioCache(tmp_path / "cache", SR_HZ)
    first = cache.load(path)
    entry = cache.entry_path(path)
    assert decoder.calls == 1 and entry.is_file()
    assert entry.relative_to(tmp_path / "cache").parts[:2] == (str(SR_HZ), entry.stem[:2])
    mtime_ns = entry.stat().st_mtime_ns

    second = AudioCache(tmp_path / "cache", SR_HZ).load(path)  # a fresh instance, as in a worker
    assert decoder.calls == 1
    assert entry.stat().st_mtime_ns == mtime_ns
    assert isinstance(second, np.memmap) and not second.flags.writeable
    assert second.dtype == np.float16 and second.ndim == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(second.astype(np.float32), load_audio(path, SR_HZ), atol=1e-3)


def test_cache_float32_is_exact(tmp_path):
    path = write(tmp_path / "tone.flac", sine(440.0, 0.5, SR_HZ))
    cached = AudioCache(tmp_path / "cache", SR_HZ, dtype="float32").load(path)
    assert cached.dtype == np.float32
    np.testing.assert_array_equal(cached, load_audio(path, SR_HZ))


def test_cache_rejects_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        AudioCache(tmp_path, SR_HZ, dtype="int8")


def test_changed_source_file_invalidates_entry(tmp_path, decoder):
    path = write(tmp_path / "clip.wav", sine(440.0, 0.5, SR_HZ))
    cache = AudioCache(tmp_path / "cache", SR_HZ)
    old_entry = cache.entry_path(path)
    cache.load(path)
    write(path, sine(2000.0, 0.5, SR_HZ))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    reloaded = cache.load(path)
    assert decoder.calls == 2
    assert cache.entry_path(path) != old_entry
    assert peak_frequency_hz(reloaded.astype(np.float32), SR_HZ) == pytest.approx(2000.0, abs=4.0)


def test_sample_rate_has_its_own_entry(tmp_path):
    path = write(tmp_path / "clip.flac", sine(440.0, 1.0, SR_HZ))
    at_32k = AudioCache(tmp_path / "cache", 32_000)
    at_16k = AudioCache(tmp_path / "cache", 16_000)
    assert at_32k.entry_path(path) != at_16k.entry_path(path)
    assert len(at_32k.load(path)) == 32_000
    assert len(at_16k.load(path)) == 16_000
    assert len(at_32k) == 1 and len(at_16k) == 1


def test_unreadable_entry_is_rebuilt(tmp_path, decoder):
    path = write(tmp_path / "clip.flac", sine(440.0, 0.5, SR_HZ))
    cache = AudioCache(tmp_path / "cache", SR_HZ)
    cache.load(path)
    cache.entry_path(path).write_bytes(b"not an npy file")
    assert len(cache.load(path)) == len(sine(440.0, 0.5, SR_HZ))
    assert decoder.calls == 2


def test_cache_load_of_corrupt_file_raises_and_is_remembered(tmp_path, decoder):
    path = tmp_path / "bad.ogg"
    path.write_bytes(b"OggS" + bytes(500))
    cache = AudioCache(tmp_path / "cache", SR_HZ)
    for _ in range(3):
        with pytest.raises(AudioDecodeError, match="bad.ogg"):
            cache.load(path)
    assert decoder.calls == 1
    assert len(cache) == 0


def test_build_in_parallel_skips_corrupt_file(tmp_path, caplog):
    good = [write(tmp_path / f"clip{i}.ogg", sine(300.0 + 100 * i, 1.0, SR_HZ)) for i in range(4)]
    bad = tmp_path / "corrupt.ogg"
    bad.write_bytes(np.random.default_rng(3).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    cache = AudioCache(tmp_path / "cache", SR_HZ)

    summary = cache.build([*good[:2], bad, *good[2:]], num_workers=2, progress=False)
    assert (summary.n_files, summary.n_cached_before, summary.n_decoded) == (5, 0, 4)
    assert [p for p, _ in summary.skipped] == [str(bad)]
    assert summary.seconds_of_audio == pytest.approx(4.0, abs=0.05)
    assert "corrupt.ogg" in caplog.text
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    for path in good:
        cached = cache.load(path)
        assert isinstance(cached, np.memmap)
        np.testing.assert_allclose(cached.astype(np.float32), load_audio(path, SR_HZ), atol=1e-3)

    again = cache.build([*good, bad], num_workers=2, progress=False)
    assert (again.n_cached_before, again.n_decoded, len(again.skipped)) == (4, 0, 1)
    assert again.seconds_of_audio == pytest.approx(summary.seconds_of_audio)


def test_build_remembers_failures_for_load(tmp_path, decoder):
    bad = truncate(write(tmp_path / "cut.flac", sine(440.0, 2.0, SR_HZ)))
    missing = tmp_path / "missing.ogg"
    cache = AudioCache(tmp_path / "cache", SR_HZ)
    summary = cache.build([bad, missing], num_workers=0, progress=False)
    assert sorted(p for p, _ in summary.skipped) == sorted([str(bad), str(missing)])
    calls = decoder.calls
    with pytest.raises(AudioDecodeError, match="cut.flac"):
        cache.load(bad)
    assert decoder.calls == calls


def test_write_audio_in_blocks_round_trips(tmp_path):
    from birdrounds.data.audio import write_audio

    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(3.5 * 32000)) / 32000)).astype(np.float32)
    write_audio(tmp_path / "t.ogg", tone, 32000)
    back = load_audio(tmp_path / "t.ogg", 32000)
    assert len(back) == len(tone) and np.abs(back - tone).max() < 0.05


def test_cache_build_refuses_an_unwritable_cache_in_one_line(tmp_path):
    from birdrounds.config import ConfigError

    path = write(tmp_path / "tone.ogg", sine(440.0, 1.0, SR_HZ))
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")  # unwritable even for root
    with pytest.raises(ConfigError, match=r"^data\.cache_dir: cannot write to .*1 file\(s\) are not cached yet"):
        AudioCache(blocker / "cache", SR_HZ).build([path], num_workers=1, progress=False)
    cache = AudioCache(tmp_path / "cache", SR_HZ)
    assert cache.build([path], num_workers=1, progress=False).n_decoded == 1


def test_cache_build_stops_on_a_full_disk_keeping_what_it_wrote(tmp_path, monkeypatch):
    """A full disk is not bad audio: one line naming data.cache_dir, no file skipped, a rerun resumes."""
    import errno

    import birdrounds.data.audio as audio_mod
    from birdrounds.config import ConfigError

    paths = [write(tmp_path / f"tone{i}.ogg", sine(440.0 + 50 * i, 1.0, SR_HZ)) for i in range(3)]
    real_save, saved = audio_mod._save_npy_atomic, []

    def save_until_full(entry, array):
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(entry, array)
        saved.append(entry)

    monkeypatch.setattr(audio_mod, "_save_npy_atomic", save_until_full)
    cache = AudioCache(tmp_path / "cache", SR_HZ)
    with pytest.raises(ConfigError, match=r"^data\.cache_dir: no space left .* after 2 of 3 new entries"):
        cache.build(paths, num_workers=1, progress=False)
    monkeypatch.setattr(audio_mod, "_save_npy_atomic", real_save)
    summary = AudioCache(tmp_path / "cache", SR_HZ).build(paths, num_workers=1, progress=False)
    assert (summary.n_cached_before, summary.n_decoded, summary.skipped) == (2, 1, [])


# --- one decoder for training and serving -----------------------------------------------------


@functools.cache
def _standalone_infer():
    """src/birdrounds/audio_io.py loaded as the export package runs it (beside infer.py): a lone file, not the
    package's module."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("standalone_audio_io", Path(audio.__file__).parents[1] / "audio_io.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rate_hz", [44_100, 48_000])
@pytest.mark.parametrize("suffix", ["mp3", "ogg", "flac"])
def test_training_and_serving_decode_the_same_samples(tmp_path, rate_hz, suffix):
    """A stereo 44.1/48 kHz recording (as Xeno-canto serves them) reaches training (the cache's decoder) and the
    standalone infer.py as the same 32 kHz mono samples."""
    rng = np.random.default_rng(rate_hz)
    left = sine(1500.0, 2.0, rate_hz) + 0.05 * rng.standard_normal(2 * rate_hz).astype(np.float32)
    path = write(tmp_path / f"xc.{suffix}", np.stack([left, 0.3 * sine(3000.0, 2.0, rate_hz)], axis=1), rate_hz)
    served = _standalone_infer().read_audio(path, SR_HZ)
    trained = load_audio(path, SR_HZ)
    cached = AudioCache(tmp_path / "cache32", SR_HZ, dtype="float32").load(path)
    assert abs(len(served) - 2 * SR_HZ) <= SR_HZ // 100  # MP3 and Vorbis pad a few frames
    assert np.abs(trained - served).max() <= 1e-5 and np.abs(np.asarray(cached) - served).max() <= 1e-5
    # The default float16 cache rounds to its 11-bit mantissa, nothing more.
    half = AudioCache(tmp_path / "cache16", SR_HZ).load(path)
    assert np.abs(np.asarray(half, np.float32) - served).max() <= 1e-3


def test_training_refuses_a_cut_file_that_serving_pads(tmp_path):
    """One truncation rule: the cut FLAC that training skips is the one predict keeps up to the cut."""
    path = truncate(write(tmp_path / "cut.flac", sine(440.0, 3.0, SR_HZ)))
    decoded = _standalone_infer().decode_audio(path, SR_HZ)
    assert decoded.truncated is not None and 0 < len(decoded.wave) < 3 * SR_HZ
    with pytest.raises(AudioDecodeError, match="truncated file .*cut.flac"):
        load_audio(path, SR_HZ)
