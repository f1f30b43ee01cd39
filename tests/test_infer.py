"""Standalone inference (`birdrounds.infer`): numpy frontend parity, chunking, ensembles, post-processing, CSV, CLI.

Most tests use tiny hand-built ONNX graphs (milliseconds to build and run) whose outputs are easy
to compute in numpy; the `slow` ones read a real (tiny) `BirdModel` exported by `birdrounds.export`.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch
import torchaudio
from onnx import TensorProto, helper, numpy_helper

from birdrounds import audio_io, contract, infer, melspec, postprocess
from birdrounds.export import INFER_FILES
from birdrounds.model import MelFrontend
from conftest import REAL_AUDIO, model_config

INFER_PY = Path(infer.__file__)
SR = 8000  # tiny graphs: 5-s windows of 40,000 samples
CLASSES = ["aaa", "bbb", "ccc"]
# Frontend of the hand-built spectrogram graphs (sample rate SR).
SMALL_FRONTEND = dict(sample_rate_hz=SR, n_fft=512, hop_length=256, n_mels=16, f_min_hz=50.0, f_max_hz=4000.0,
                      top_db=80.0, norm="standard")


# ---------------------------------------------------------------- helpers: tiny ONNX graphs


def metadata(classes, sample_rate_hz, window_s, kind, frontend, members=("tiny",)) -> dict[str, str]:
    return {
        "birdrounds.format_version": "1",
        "birdrounds.classes": json.dumps(list(classes)),
        "birdrounds.sample_rate_hz": str(sample_rate_hz),
        "birdrounds.window_s": str(window_s),
        "birdrounds.input": kind,
        "birdrounds.frontend": json.dumps(frontend),
        "birdrounds.members": json.dumps(list(members)),
    }


def save_graph(path, nodes, inputs, outputs, inits, meta) -> Path:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def level_graph(path, window_s=5.0, n_frames=10, scale=(2.0, -1.0, 0.5), bias=(0.0, 0.5, -0.5),
                classes=CLASSES, framewise=True, meta_overrides=None) -> Path:
    """Waveform graph: frame level = mean of the frame's samples; framewise = sigmoid(level * scale + bias)."""
    n_samples = round(window_s * SR)
    nodes = [
        helper.make_node("Reshape", ["waveform", "frame_shape"], ["frames"]),
        helper.make_node("ReduceMean", ["frames", "axis2"], ["level"], keepdims=0),
        helper.make_node("Unsqueeze", ["level", "axis2"], ["level3"]),
        helper.make_node("Mul", ["level3", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["framewise_probs"]),
        helper.make_node("ReduceMean", ["framewise_probs", "axis1"], ["probs"], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(np.array([0, n_frames, -1], dtype=np.int64), "frame_shape"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array(bias, dtype=np.float32), "bias"),
    ]
    n_classes = len(scale)
    inputs = [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", n_samples])]
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_classes])]
    if framewise:
        outputs.append(helper.make_tensor_value_info("framewise_probs", TensorProto.FLOAT,
                                                     ["batch", n_frames, n_classes]))
    meta = {**metadata(classes, SR, window_s, "waveform", SMALL_FRONTEND), **(meta_overrides or {})}
    return save_graph(path, nodes, inputs, outputs, inits, meta)


def level_ref(windows, n_frames=10, scale=(2.0, -1.0, 0.5), bias=(0.0, 0.5, -0.5)):
    """numpy twin of `level_graph`: (clip probs [n, C], framewise probs [n, T', C])."""
    level = np.asarray(windows, dtype=np.float64).reshape(len(windows), n_frames, -1).mean(axis=2)
    framewise = 1.0 / (1.0 + np.exp(-(level[..., None] * np.asarray(scale) + np.asarray(bias))))
    return framewise.mean(axis=1), framewise


def spec_graph(path, weights, frontend=SMALL_FRONTEND, classes=CLASSES, window_s=5.0) -> Path:
    """Spectrogram graph: probs = sigmoid(mean over time of spec @ weights), weights [n_mels, C]."""
    n_frames = round(window_s * frontend["sample_rate_hz"]) // frontend["hop_length"] + 1
    nodes = [
        helper.make_node("ReduceMean", ["spec", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "weights"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probs"]),
    ]
    inits = [numpy_helper.from_array(np.array([1, 3], dtype=np.int64), "axes"),
             numpy_helper.from_array(np.asarray(weights, dtype=np.float32), "weights")]
    inputs = [helper.make_tensor_value_info("spec", TensorProto.FLOAT, ["batch", 1, frontend["n_mels"], n_frames])]
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", len(classes)])]
    meta = metadata(classes, frontend["sample_rate_hz"], window_s, "spectrogram", frontend)
    return save_graph(path, nodes, inputs, outputs, inits, meta)


def spec_ref(windows, weights, frontend=SMALL_FRONTEND) -> np.ndarray:
    spec = melspec.MelFrontendNumpy(melspec.FrontendConfig(**frontend))(windows)
    return 1.0 / (1.0 + np.exp(-(spec.mean(axis=(1, 3)).astype(np.float64) @ np.asarray(weights, np.float64))))


def write_wav(path, wave, sample_rate_hz=SR) -> Path:
    sf.write(str(path), np.asarray(wave, dtype=np.float32), sample_rate_hz, subtype="FLOAT")
    return Path(path)


def settings(**overrides) -> infer.InferenceSettings:
    return infer.InferenceSettings(**{"intra_op_threads": 1, "decode_workers": 2, "batch_size": 4, **overrides})


def predict(model_paths, files, **overrides) -> infer.Predictions:
    return infer.predict_folder([str(p) for p in model_paths], files, settings(**overrides))


def read_csv(path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]]).reshape(
        len(rows) - 1, len(rows[0]) - 1)


@pytest.fixture
def weights():
    return np.random.default_rng(0).standard_normal((SMALL_FRONTEND["n_mels"], len(CLASSES)))


# ---------------------------------------------------------------- the numpy frontend


@pytest.mark.parametrize("sample_rate_hz,n_fft,n_mels,f_min_hz,f_max_hz", [
    (32000, 2048, 64, 50.0, 8000.0), (32000, 2048, 128, 50.0, 14000.0), (32000, 1024, 128, 0.0, 16000.0),
    (16000, 512, 32, 50.0, 8000.0),
])
def test_mel_filterbank_matches_torchaudio(sample_rate_hz, n_fft, n_mels, f_min_hz, f_max_hz):
    want = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, f_min_hz, f_max_hz, n_mels, sample_rate_hz).numpy()
    got = melspec.mel_filterbank(n_fft // 2 + 1, f_min_hz, f_max_hz, n_mels, sample_rate_hz)
    assert got.dtype == np.float32 and got.shape == want.shape
    # torchaudio computes in float32; the emulation agrees to about one float32 ulp.
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6)


def frontends(params, norm="standard", top_db=80.0, sample_rate_hz=32000):
    """Torch and numpy frontends; `params` gives hop_length, n_mels, f_max_hz and optionally n_fft, f_min_hz."""
    kwargs = dict(sample_rate_hz=sample_rate_hz, n_fft=params.get("n_fft", 2048), hop_length=params["hop_length"],
                  n_mels=params["n_mels"], f_min_hz=params.get("f_min_hz", 50.0), f_max_hz=params["f_max_hz"],
                  top_db=top_db, norm=norm)
    return MelFrontend(**kwargs).eval(), melspec.MelFrontendNumpy(melspec.FrontendConfig(**kwargs))


@pytest.mark.parametrize("norm", melspec.NORM_MODES)
@pytest.mark.parametrize("option", ["demo", "sed_effnet_b0"])  # the demo's and the BirdCLEF model configs
def test_frontend_matches_torch_on_real_audio(option, norm):
    params = model_config(option)
    wave, sample_rate_hz = sf.read(REAL_AUDIO, dtype="float32")
    assert sample_rate_hz == params["sample_rate_hz"] == 32000
    chunks = np.stack([wave[:160000], wave[160000:320000]]) if len(wave) >= 320000 else np.stack(
        [wave[:160000], np.pad(wave[160000:], (0, 320000 - len(wave)))])
    torch_frontend, numpy_frontend = frontends(params, norm)
    with torch.no_grad():
        want = torch_frontend(torch.from_numpy(chunks)).numpy()
    got = numpy_frontend(chunks)
    assert got.shape == want.shape == (2, 1, params["n_mels"], 160000 // params["hop_length"] + 1)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("top_db", [80.0, None])
@pytest.mark.parametrize("norm", melspec.NORM_MODES)
def test_frontend_matches_torch_on_noise_tone_and_silence(norm, top_db):
    rng = np.random.default_rng(1)
    t = np.arange(16000) / 16000
    rows = [
        rng.standard_normal(16000),
        1e-3 * rng.standard_normal(16000),             # quiet (-60 dBFS) noise
        0.3 * np.sin(2 * np.pi * 3000 * t) + 0.01 * rng.standard_normal(16000),
        np.zeros(16000),                                # silence
    ]
    if top_db is not None:
        # A pure tone leaves bins > 100 dB below its peak holding only float32 FFT rounding noise,
        # which differs between FFT implementations; top_db floors them, without it they disagree.
        rows.insert(0, 0.5 * np.sin(2 * np.pi * 1234.5 * t))
    batch = np.stack(rows).astype(np.float32)
    torch_frontend, numpy_frontend = frontends(dict(n_mels=64, hop_length=256, f_max_hz=8000.0), norm, top_db, 16000)
    with torch.no_grad():
        want = torch_frontend(torch.from_numpy(batch)).numpy()
    got = numpy_frontend(batch)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # Silence: every bin is floored at 1e-10 (-100 dB), a constant that normalises to exactly 0.
    assert np.array_equal(got[-1], np.zeros_like(got[-1])) and np.array_equal(want[-1], got[-1])


def test_frontend_config_is_validated():
    with pytest.raises(ValueError, match="norm"):
        melspec.FrontendConfig(**{**SMALL_FRONTEND, "norm": "pcen"})
    with pytest.raises(ValueError, match="f_max_hz"):
        melspec.FrontendConfig(**{**SMALL_FRONTEND, "sample_rate_hz": 16000, "f_max_hz": 14000.0})
    with pytest.raises(ValueError, match="missing keys"):
        melspec.FrontendConfig.from_dict({"sample_rate_hz": 32000})


# ---------------------------------------------------------------- post-processing


def test_smoothing_interior_edges_files_and_single_chunk():
    kernel = [0.1, 0.8, 0.1]
    probs = np.array([[0.0], [1.0], [0.0], [0.0],   # file 0: 4 chunks
                      [0.5],                        # file 1: 1 chunk
                      [0.2], [0.6]], dtype=np.float32)  # file 2: 2 chunks
    file_index = np.array([0, 0, 0, 0, 1, 2, 2])
    got = postprocess.smooth(probs, file_index, kernel)
    want = np.array([
        [(0.8 * 0.0 + 0.1 * 1.0) / 0.9],            # left edge: renormalised over the 2 taps inside
        [0.1 * 0.0 + 0.8 * 1.0 + 0.1 * 0.0],
        [0.1 * 1.0 + 0.8 * 0.0 + 0.1 * 0.0],
        [(0.1 * 0.0 + 0.8 * 0.0) / 0.9],
        [0.5],                                      # a 1-chunk file is unchanged
        [(0.8 * 0.2 + 0.1 * 0.6) / 0.9],           # files do not leak into each other
        [(0.1 * 0.2 + 0.8 * 0.6) / 0.9],
    ])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32


def test_smoothing_keeps_constants_and_wide_kernel_edges():
    kernel = [0.1, 0.2, 0.4, 0.2, 0.1]
    constant = np.full((12, 3), 0.3, dtype=np.float32)
    np.testing.assert_allclose(postprocess.smooth(constant, np.zeros(12, int), kernel), constant, rtol=1e-6)
    ramp = np.arange(5, dtype=np.float64)[:, None]
    got = postprocess.smooth(ramp, np.zeros(5, int), kernel)
    assert got[0, 0] == pytest.approx((0.4 * 0 + 0.2 * 1 + 0.1 * 2) / 0.7)
    assert got[1, 0] == pytest.approx((0.2 * 0 + 0.4 * 1 + 0.2 * 2 + 0.1 * 3) / 0.9)
    assert got[2, 0] == pytest.approx(2.0)


@pytest.mark.parametrize("kernel", [[0.5, 0.5], [0.1, -0.2, 0.1], [0.5, 0.0, 0.5], [], [[1.0]]])
def test_smoothing_kernel_is_validated(kernel):
    with pytest.raises(ValueError):
        postprocess.smooth(np.ones((3, 1)), np.zeros(3, int), kernel)


def test_smoothing_needs_contiguous_files():
    with pytest.raises(ValueError, match="contiguous"):
        postprocess.smooth(np.ones((3, 1)), np.array([0, 1, 0]), [0.1, 0.8, 0.1])


def test_file_scaling_by_file_max():
    probs = np.array([[0.2, 0.9], [0.4, 0.1],   # file 0: class maxima 0.4, 0.9
                      [0.5, 0.0]], dtype=np.float32)  # file 1: maxima 0.5, 0.0
    file_index = np.array([0, 0, 1])
    got = postprocess.scale_by_file_max(probs, file_index, alpha=0.5)
    factor = np.array([[0.5 + 0.5 * 0.4, 0.5 + 0.5 * 0.9]] * 2 + [[0.5 + 0.5 * 0.5, 0.5]])
    np.testing.assert_allclose(got, probs * factor, rtol=1e-6)
    np.testing.assert_array_equal(postprocess.scale_by_file_max(probs, file_index, 0.0), probs)
    # postprocess: smoothing first, then scaling by the smoothed file maxima.
    smoothed = postprocess.smooth(probs, file_index, [0.25, 0.5, 0.25])
    np.testing.assert_allclose(postprocess.postprocess(probs, file_index, [0.25, 0.5, 0.25], 0.5),
                               postprocess.scale_by_file_max(smoothed, file_index, 0.5), rtol=1e-6)


# ---------------------------------------------------------------- files, rows, padding


def test_row_ids_padding_and_short_files(tmp_path):
    model = level_graph(tmp_path / "m.onnx")
    audio = tmp_path / "audio"
    audio.mkdir()
    write_wav(audio / "ten.wav", np.full(10 * SR, 0.5))
    write_wav(audio / "twelve.wav", np.full(12 * SR, 0.5))
    write_wav(audio / "three.wav", np.full(3 * SR, 0.5))
    result = predict([model], audio)
    assert result.row_ids == ["ten_5", "ten_10", "three_5", "twelve_5", "twelve_10", "twelve_15"]
    assert result.raw_probs.shape == (6, 3) and result.classes == CLASSES
    assert [f.n_chunks for f in result.files] == [2, 1, 3] and not result.unreadable
    np.testing.assert_array_equal(result.file_index, [0, 0, 1, 2, 2, 2])
    # Partial chunks are zero-padded: 3 s of 0.5 then 2 s of zeros has mean level 0.3.
    full, _ = level_ref(np.full((1, 5 * SR), 0.5))
    three = np.r_[np.full(3 * SR, 0.5), np.zeros(2 * SR)][None]
    np.testing.assert_allclose(result.raw_probs[0], full[0], atol=1e-6)
    np.testing.assert_allclose(result.raw_probs[2], level_ref(three)[0][0], atol=1e-6)
    two = np.r_[np.full(2 * SR, 0.5), np.zeros(3 * SR)][None]
    np.testing.assert_allclose(result.raw_probs[5], level_ref(two)[0][0], atol=1e-6)
    # min_duration_s pads short files with rows up to it.
    padded = predict([model], [audio / "three.wav"], min_duration_s=10.0)
    assert padded.row_ids == ["three_5", "three_10"]


def test_unreadable_and_empty_files_get_zero_rows_and_a_warning(tmp_path, caplog):
    model = level_graph(tmp_path / "m.onnx")
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "corrupt.ogg").write_bytes(np.random.default_rng(0).bytes(4096))
    (audio / "empty.ogg").write_bytes(b"")
    write_wav(audio / "no_frames.wav", np.zeros(0))
    write_wav(audio / "ok.wav", np.full(5 * SR, 0.1))
    with caplog.at_level(logging.WARNING, logger="birdrounds.infer"):
        result = predict([model], audio)
    assert [f.readable for f in result.files] == [False, False, False, True]
    assert len(result.row_ids) == 3 * 12 + 1
    assert result.row_ids[:12] == [f"corrupt_{5 * (i + 1)}" for i in range(12)]
    np.testing.assert_array_equal(result.raw_probs[:36], 0.0)
    assert (result.raw_probs[36] > 0).all()
    for name in ("corrupt.ogg", "empty.ogg", "no_frames.wav"):
        assert any(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), name
    short = predict([model], [audio / "corrupt.ogg"], expected_duration_s=20.0)
    assert short.row_ids == ["corrupt_5", "corrupt_10", "corrupt_15", "corrupt_20"]


def encode(path, wave, sample_rate_hz=SR) -> Path:
    """Write mono audio in the format of the path's suffix, 1 s per call (libsndfile, as the data layer does)."""
    formats = {".ogg": ("OGG", "VORBIS"), ".flac": ("FLAC", "PCM_16"), ".wav": ("WAV", "FLOAT"),
               ".mp3": ("MP3", "MPEG_LAYER_III")}
    fmt, subtype = formats[Path(path).suffix]
    with sf.SoundFile(str(path), "w", samplerate=sample_rate_hz, channels=1, format=fmt, subtype=subtype) as f:
        for start in range(0, len(wave), sample_rate_hz):
            f.write(np.asarray(wave[start:start + sample_rate_hz], dtype=np.float32))
    return Path(path)


@pytest.mark.parametrize("suffix", [".ogg", ".flac", ".wav", ".mp3"])
def test_a_truncated_file_keeps_its_rows_with_silence_past_the_cut(tmp_path, caplog, suffix):
    """A 60-s soundscape cut to 30% of its bytes: 12 rows, the decoded part predicted, the rest silence.

    Each format fails its own way: Ogg decodes to the cut without error (no end-of-stream page, no
    declared length), FLAC stops with a decode error, MP3 and WAV decode less than their headers declare.
    """
    model = level_graph(tmp_path / "m.onnx")
    wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(60 * SR) / SR) + np.repeat(np.linspace(-0.2, 0.2, 60), SR)
    full = encode(tmp_path / f"full{suffix}", wave)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(0.3 * len(data))])
    with caplog.at_level(logging.WARNING, logger="birdrounds.infer"):
        result = predict([model], [full, cut])
    assert result.row_ids == [f"full_{5 * k}" for k in range(1, 13)] + [f"cut_{5 * k}" for k in range(1, 13)]
    whole, truncated = result.files
    assert whole.truncated is None and truncated.readable and truncated.truncated
    assert result.truncated == [truncated] and not result.unreadable
    assert "1 truncated" in result.summary()
    assert any(str(cut) in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    assert truncated.duration_s < 20
    # Before the cut: the same predictions as the complete file; after it: the model's output on silence.
    np.testing.assert_allclose(result.raw_probs[12:14], result.raw_probs[:2], rtol=0, atol=1e-6)
    silence = level_ref(np.zeros((1, 5 * SR)))[0][0]
    np.testing.assert_allclose(result.raw_probs[12 + 5:], np.tile(silence, (7, 1)), rtol=0, atol=1e-6)
    if suffix == ".ogg":  # no declared length: rows up to expected_duration_s
        assert predict([model], [cut], expected_duration_s=30.0).row_ids == [f"cut_{5 * k}" for k in range(1, 7)]
    else:  # the header's length wins over expected_duration_s
        assert len(predict([model], [cut], expected_duration_s=30.0).row_ids) == 12


def test_files_sharing_a_stem_are_named_in_the_warning(tmp_path, caplog):
    model = level_graph(tmp_path / "m.onnx")
    a_wav = write_wav(tmp_path / "a.wav", np.full(5 * SR, 0.1))
    a_flac = encode(tmp_path / "a.flac", np.full(5 * SR, 0.2))
    with caplog.at_level(logging.WARNING, logger="birdrounds.infer"):
        result = predict([model], tmp_path)
    assert result.row_ids == ["a_5", "a_5"]
    (warning,) = [r.getMessage() for r in caplog.records if "duplicate row ids" in r.getMessage()]
    assert str(a_wav) in warning and str(a_flac) in warning


def test_stereo_is_averaged_and_other_rates_are_resampled(tmp_path, monkeypatch, caplog):
    model = level_graph(tmp_path / "m.onnx")
    stereo = tmp_path / "stereo.wav"
    sf.write(str(stereo), np.stack([np.full(5 * SR, 0.2), np.full(5 * SR, 0.6)], axis=1).astype(np.float32), SR,
             subtype="FLOAT")
    np.testing.assert_allclose(predict([model], [stereo]).raw_probs[0], level_ref(np.full((1, 5 * SR), 0.4))[0][0],
                               atol=1e-6)
    other_rate = write_wav(tmp_path / "sr16k.wav", np.full(10 * 2 * SR, 0.3), sample_rate_hz=2 * SR)
    wave = audio_io.read_audio(other_rate, SR)
    assert len(wave) == 10 * SR
    assert predict([model], [other_rate]).row_ids == ["sr16k_5", "sr16k_10"]
    # Without scipy there is no resampler: the file is unreadable (zeros, warning), not a crash.
    monkeypatch.setitem(sys.modules, "scipy.signal", None)
    with caplog.at_level(logging.WARNING, logger="birdrounds.infer"):
        result = predict([model], [other_rate])
    assert not result.files[0].readable and "scipy" in result.files[0].error
    assert len(result.row_ids) == 12 and "sr16k.wav" in caplog.text


def test_empty_folder_writes_a_header_only_submission(tmp_path):
    model = level_graph(tmp_path / "m.onnx")
    (tmp_path / "audio").mkdir()
    out = tmp_path / "sub" / "submission.csv"
    assert infer.main(["--model", str(model), "--input-dir", str(tmp_path / "audio"), "--output", str(out)]) == 0
    assert out.read_text() == "row_id,aaa,bbb,ccc\n"


# ---------------------------------------------------------------- models and ensembles


def test_spectrogram_graph_uses_the_numpy_frontend(tmp_path, weights):
    model = spec_graph(tmp_path / "spec.onnx", weights)
    wave = np.random.default_rng(3).standard_normal(12 * SR).astype(np.float32) * 0.1
    path = write_wav(tmp_path / "noise.wav", wave)
    result = predict([model], [path])
    windows = np.zeros((3, 5 * SR), np.float32)
    windows.reshape(-1)[: len(wave)] = wave
    np.testing.assert_allclose(result.raw_probs, spec_ref(windows, weights), atol=1e-5)


def test_ensemble_shares_the_frontend_and_reorders_classes(tmp_path, weights, monkeypatch):
    a = spec_graph(tmp_path / "a.onnx", weights)
    b = spec_graph(tmp_path / "b.onnx", 2 * weights)
    # The same function as `a`, with its classes (and columns) in reverse order.
    a_reversed = spec_graph(tmp_path / "a_rev.onnx", weights[:, ::-1], classes=CLASSES[::-1])
    other_frontend = {**SMALL_FRONTEND, "n_mels": 8}
    c = spec_graph(tmp_path / "c.onnx", weights[:8], frontend=other_frontend)
    files = [write_wav(tmp_path / f"f{i}.wav", np.random.default_rng(i).standard_normal(10 * SR) * 0.1)
             for i in range(3)]
    calls: list[int] = []
    original = melspec.MelFrontendNumpy.__call__
    monkeypatch.setattr(melspec.MelFrontendNumpy, "__call__", lambda self, w: calls.append(len(w)) or original(self, w))
    single = {name: predict([m], files).raw_probs for name, m in [("a", a), ("b", b), ("c", c)]}
    calls.clear()
    both = predict([a, b], files)
    assert sum(calls) == 6  # 3 files x 2 chunks, once for both models
    np.testing.assert_allclose(both.raw_probs, (single["a"] + single["b"]) / 2, atol=1e-6)
    # The ensemble takes the first model's class order and maps the others' columns onto it.
    alone = predict([a_reversed], files)
    assert alone.classes == CLASSES[::-1]
    np.testing.assert_allclose(alone.raw_probs, single["a"][:, ::-1], atol=1e-6)
    np.testing.assert_allclose(predict([a, a_reversed], files).raw_probs, single["a"], atol=1e-6)
    calls.clear()
    mixed = predict([a, c], files)
    assert sum(calls) == 12  # two distinct frontends
    np.testing.assert_allclose(mixed.raw_probs, (single["a"] + single["c"]) / 2, atol=1e-6)


def test_concurrent_model_workers_give_the_single_worker_results(tmp_path, weights, monkeypatch):
    """Batches run side by side in several threads; the per-file bookkeeping must not mix them up."""
    clip_a = spec_graph(tmp_path / "a.onnx", weights)
    clip_b = spec_graph(tmp_path / "b.onnx", 2 * weights)
    long = level_graph(tmp_path / "long.onnx", window_s=10.0, n_frames=10)  # a second, framewise stream
    rng = np.random.default_rng(11)
    files = [write_wav(tmp_path / f"f{i}.wav", rng.standard_normal(int(seconds * SR)) * 0.1)
             for i, seconds in enumerate([3, 17, 30, 12.5, 5, 41])]
    files.append(tmp_path / "broken.wav")
    files[-1].write_bytes(b"RIFF not audio")
    models = [clip_a, clip_b, long]
    one = predict(models, files, model_workers=1, batch_size=1)
    seen: set[str] = set()
    original = infer.OnnxModel.run

    def run(self, *args, **kwargs):
        seen.add(threading.current_thread().name)
        time.sleep(0.02)  # hold the batch a moment, so an idle worker takes the next one even on a loaded host
        return original(self, *args, **kwargs)

    monkeypatch.setattr(infer.OnnxModel, "run", run)
    for workers, batch in [(3, 1), (2, 3)]:
        seen.clear()
        many = predict(models, files, model_workers=workers, batch_size=batch)
        assert len(seen) == workers and all(name.startswith("infer-model") for name in seen)
        assert many.row_ids == one.row_ids and [f.error is None for f in many.files] == [f.error is None for f in one.files]
        np.testing.assert_allclose(many.raw_probs, one.raw_probs, rtol=0, atol=1e-6)


def test_an_error_in_a_model_worker_stops_the_run(tmp_path, weights, monkeypatch):
    model = spec_graph(tmp_path / "a.onnx", weights)
    files = [write_wav(tmp_path / f"f{i}.wav", np.full(12 * SR, 0.1)) for i in range(4)]

    def fail(self, *args, **kwargs):
        raise RuntimeError("model call failed")

    monkeypatch.setattr(infer.OnnxModel, "run", fail)
    with pytest.raises(RuntimeError, match="model call failed"):
        predict([model], files, model_workers=2, batch_size=1)


def test_models_must_agree_on_classes_and_rate(tmp_path, weights):
    a = spec_graph(tmp_path / "a.onnx", weights)
    other = spec_graph(tmp_path / "other.onnx", weights, classes=["aaa", "bbb", "zzz"])
    with pytest.raises(contract.ModelFormatError, match="other classes"):
        predict([a, other], [])
    no_framewise = level_graph(tmp_path / "long.onnx", window_s=10.0, framewise=False)
    with pytest.raises(contract.ModelFormatError, match="framewise_probs"):
        predict([no_framewise], [])


@pytest.mark.parametrize("overrides,match", [
    ({"birdrounds.format_version": "2"}, "format_version"),
    ({"birdrounds.input": "mfcc"}, "input"),
    ({"birdrounds.classes": "not json"}, "metadata"),
    ({"birdrounds.classes": '["a", "a", "b"]'}, "distinct"),
])
def test_bad_metadata_is_refused_clearly(tmp_path, overrides, match):
    path = level_graph(tmp_path / "m.onnx", meta_overrides=overrides)
    with pytest.raises(contract.ModelFormatError, match=match):
        infer.load_models([path])


def test_missing_metadata_and_wrong_input_name(tmp_path, weights):
    path = level_graph(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    with pytest.raises(contract.ModelFormatError, match="missing"):
        infer.load_models([path])
    spec_as_waveform = level_graph(tmp_path / "w.onnx", meta_overrides={"birdrounds.input": "spectrogram"})
    with pytest.raises(contract.ModelFormatError, match="'spec'"):
        infer.load_models([spec_as_waveform])


def test_longer_windows_average_framewise_outputs_into_chunks(tmp_path):
    model = level_graph(tmp_path / "long.onnx", window_s=10.0, n_frames=10)  # 1-s frames
    levels = np.array([0.1, 0.7, -0.4, 0.3])
    wave = np.r_[np.repeat(levels, 5 * SR), np.full(2 * SR, 0.5)]  # 22 s: 4 chunks + a 2-s tail
    result = predict([model], [write_wav(tmp_path / "steps.wav", wave)], batch_size=2)
    assert result.row_ids == [f"steps_{5 * i}" for i in range(1, 6)]
    _, frame_probs = level_ref(levels[:, None] * np.ones((1, 10)), n_frames=10)
    # Every frame inside chunk c sees the level of chunk c, whichever windows overlap it.
    np.testing.assert_allclose(result.raw_probs[:4], frame_probs[:, 0], atol=1e-5)  # float32 means in ORT
    # The tail chunk: 2 s at 0.5 then padding zeros; the chunk takes the max over its frames.
    tail = level_ref(np.array([[0.5] * 2 + [0.0] * 8]), n_frames=10)[1][0]
    np.testing.assert_allclose(result.raw_probs[4], tail.max(axis=0), atol=1e-5)
    # Shifts that are whole frames put the shifted windows' frames on the same cells: same result.
    shifted = predict([model], [tmp_path / "steps.wav"], tta_shift_s=2.0)
    np.testing.assert_allclose(shifted.raw_probs, result.raw_probs, atol=1e-5)


def test_shift_tta_averages_shifted_windows(tmp_path):
    model = level_graph(tmp_path / "m.onnx")
    wave = np.random.default_rng(4).uniform(-1, 1, 15 * SR).astype(np.float32)
    path = write_wav(tmp_path / "noise.wav", wave)
    result = predict([model], [path], tta_shift_s=2.5)
    padded = np.r_[np.zeros(5 * SR), wave, np.zeros(5 * SR)].astype(np.float32)
    want = []
    for c in range(3):
        starts = [5 * SR + c * 5 * SR + s for s in (0, -SR * 5 // 2, SR * 5 // 2)]
        windows = np.stack([padded[s : s + 5 * SR] for s in starts])
        want.append(level_ref(windows)[0].mean(axis=0))
    np.testing.assert_allclose(result.raw_probs, np.array(want), atol=1e-6)


# ---------------------------------------------------------------- submission CSV


def test_submission_columns_follow_the_sample_submission(tmp_path):
    model = level_graph(tmp_path / "m.onnx")
    path = write_wav(tmp_path / "rec.wav", np.full(10 * SR, 0.2))
    result = predict([model], [path], smoothing=(0.1, 0.8, 0.1))
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("row_id,ccc,aaa,bbb\nx_5,0,0,0\n")
    out = tmp_path / "submission.csv"
    infer.write_submission(out, result.row_ids, result.classes, result.probs, sample)
    header, ids, values = read_csv(out)
    assert header == ["row_id", "ccc", "aaa", "bbb"] and ids == ["rec_5", "rec_10"]
    np.testing.assert_allclose(values, result.probs[:, [2, 0, 1]], atol=1e-6)
    assert not list(tmp_path.glob(".submission.csv.*"))  # no temporary file left behind
    sample.write_text("row_id,ccc,aaa,ddd\n")
    with pytest.raises(ValueError, match="do not match.*ddd"):
        infer.write_submission(out, result.row_ids, result.classes, result.probs, sample)
    # The CLI checks the columns before predicting and exits with a message.
    code = infer.main(["--model", str(model), "--input-dir", str(tmp_path), "--output", str(tmp_path / "x.csv"),
                       "--sample-submission", str(sample)])
    assert code == 2 and not (tmp_path / "x.csv").exists()


def test_cli_options_reach_the_settings(tmp_path, capsys):
    model = level_graph(tmp_path / "m.onnx")
    audio = tmp_path / "audio"
    audio.mkdir()
    write_wav(audio / "rec.wav", np.random.default_rng(5).uniform(-1, 1, 20 * SR))
    out = tmp_path / "submission.csv"
    argv = ["--model", str(model), "--model", str(model), "--input-dir", str(audio), "--output", str(out),
            "--smooth", "0.2,0.6,0.2", "--file-scale-alpha", "0.3", "--threads", "1", "--batch-size", "3"]
    assert infer.main(argv) == 0
    want = predict([model], audio, smoothing=(0.2, 0.6, 0.2), file_scale_alpha=0.3)
    _, ids, values = read_csv(out)
    assert ids == want.row_ids
    np.testing.assert_allclose(values, want.probs, atol=1e-6)
    assert not np.allclose(want.probs, want.raw_probs)
    with pytest.raises(SystemExit):
        infer.main(argv[:6] + ["--smooth", "0.5,0.5"])
    assert "odd number" in capsys.readouterr().err


def test_settings_recorded_at_export_are_the_cli_defaults_and_flags_override_them(tmp_path, caplog):
    recorded = {"smoothing": [0.2, 0.6, 0.2], "file_scale_alpha": 0.3, "window_stride_s": None, "tta_shift_s": 1.0,
                "expected_duration_s": 20.0}
    model = level_graph(tmp_path / "m.onnx", meta_overrides={contract.META_PREDICT_SETTINGS: json.dumps(recorded)})
    assert infer.load_models([model])[0].info.predict_settings == {**recorded, "smoothing": (0.2, 0.6, 0.2)}
    audio = tmp_path / "audio"
    audio.mkdir()
    write_wav(audio / "rec.wav", np.random.default_rng(5).uniform(-1, 1, 22 * SR))
    (audio / "broken.wav").write_bytes(b"RIFF not audio")
    out = tmp_path / "submission.csv"
    argv = ["--model", str(model), "--input-dir", str(audio), "--output", str(out), "--threads", "1"]
    assert infer.main(argv) == 0
    want = predict([model], audio, smoothing=(0.2, 0.6, 0.2), file_scale_alpha=0.3, tta_shift_s=1.0,
                   expected_duration_s=20.0)
    _, ids, values = read_csv(out)
    assert ids == want.row_ids and ids.count("broken_20") == 1 and "broken_25" not in ids
    np.testing.assert_allclose(values, want.probs, rtol=0, atol=1e-6)
    # Flags win: smoothing and file scaling off, no TTA.
    plain = predict([model], audio, expected_duration_s=20.0)
    for off in (["--smooth", "off"], ["--smooth", "1"]):
        assert infer.main([*argv, *off, "--file-scale-alpha", "0", "--tta-shift-s", "0"]) == 0
        np.testing.assert_allclose(read_csv(out)[2], plain.probs, rtol=0, atol=1e-6)
    assert not np.allclose(plain.probs, want.probs, atol=1e-3)
    # Models recording different settings: the first one's, with a warning naming the other.
    other = level_graph(tmp_path / "other.onnx")
    with caplog.at_level(logging.WARNING, logger="birdrounds.infer"):
        assert infer.main(["--model", str(model), "--model", str(other), *argv[2:]]) == 0
    assert any(str(other) in r.getMessage() and "predict settings" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("recorded", ['{"smoothing": [0.5, 0.5]}', '{"batch_size": 8}', '[1, 2]'])
def test_bad_recorded_settings_are_refused(tmp_path, recorded):
    model = level_graph(tmp_path / "m.onnx", meta_overrides={contract.META_PREDICT_SETTINGS: recorded})
    with pytest.raises(contract.ModelFormatError, match="bad birdrounds metadata"):
        infer.load_models([model])


def one_line_error(capsys) -> str:
    """The single stderr line of a failed `infer.main` (no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("problem", ["corrupt model", "output under a file", "output is a folder", "columns"])
def test_cli_input_errors_are_one_line_before_the_run(tmp_path, capsys, monkeypatch, problem):
    model = level_graph(tmp_path / "m.onnx")
    audio = tmp_path / "audio"
    audio.mkdir()
    write_wav(audio / "rec.wav", np.full(10 * SR, 0.1))
    out = tmp_path / "out" / "submission.csv"
    extra: list[str] = []
    if problem == "corrupt model":
        model.write_bytes(b"garbage, not a protobuf" * 10)
        expected = f"{model}: not a readable ONNX model"
    elif problem == "output under a file":
        (tmp_path / "blocker").write_text("a file where the output folder should be")
        out = tmp_path / "blocker" / "submission.csv"
        expected = f"cannot write {out}"
    elif problem == "output is a folder":
        out = audio
        expected = f"cannot write {out}: is a folder"
    else:
        (tmp_path / "sample.csv").write_text("row_id,aaa,bbb,zzz\n")
        extra = ["--sample-submission", str(tmp_path / "sample.csv")]
        expected = "sample submission columns do not match"

    def never(*args, **kwargs):
        raise AssertionError("predicted before checking its inputs")

    monkeypatch.setattr(infer, "predict_files", never)
    assert infer.main(["--model", str(model), "--input-dir", str(audio), "--output", str(out), *extra]) == 2
    line = one_line_error(capsys)
    assert line.startswith("infer: error: ") and expected in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- the standalone script


@pytest.mark.parametrize("name", INFER_FILES)
def test_infer_imports_only_stdlib_numpy_soundfile_onnxruntime_scipy(name):
    """infer.py and the modules the export copies beside it import nothing else (and each other only)."""
    # scipy (FFT, resampling), threadpoolctl (BLAS threads) and openvino (engine) are optional: imported
    # under try/except.
    optional = {"scipy", "threadpoolctl", "openvino"}
    siblings = {Path(f).stem for f in INFER_FILES}
    allowed = set(sys.stdlib_module_names) | {"numpy", "soundfile", "onnxruntime"} | optional | siblings
    tree = ast.parse((INFER_PY.parent / name).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            # Relative: siblings inside the package (`from . import contract`, `from .contract import ...`).
            if node.level and node.module is None:
                assert node.level == 1 and {alias.name for alias in node.names} <= siblings, ast.dump(node)
                continue
            assert node.level == 0 or (node.level == 1 and node.module in siblings), node.module
            roots.add(node.module.split(".")[0])
    assert roots <= allowed, roots - allowed
    # ... and the optional ones only inside try blocks (module level or in a function).
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if {n.split(".")[0] for n in names} & optional:
                assert id(node) in guarded, f"unguarded optional import at line {node.lineno}"


def test_standalone_script_matches_the_python_api(tmp_path, weights):
    real_frontend = dict(sample_rate_hz=32000, n_fft=2048, hop_length=1024, n_mels=16, f_min_hz=50.0,
                         f_max_hz=8000.0, top_db=80.0, norm="standard")
    model = spec_graph(tmp_path / "model.onnx", weights, frontend=real_frontend)
    audio = tmp_path / "test_soundscapes"
    audio.mkdir()
    shutil.copy(REAL_AUDIO, audio / "birds_10s.wav")
    (audio / "broken.ogg").write_bytes(b"OggS" + bytes(100))
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    for name in INFER_FILES:  # what the export copies
        shutil.copy(INFER_PY.parent / name, kaggle / name)
    script = kaggle / "infer.py"
    out = tmp_path / "submission.csv"
    # -I: isolated mode, so neither the checkout nor PYTHONPATH is on sys.path; only the copy runs.
    proc = subprocess.run(
        [sys.executable, "-I", str(script), "--model", str(model), "--input-dir", str(audio), "--output", str(out),
         "--smooth", "0.1,0.8,0.1", "--expected-duration-s", "10", "--progress-every", "1"],
        cwd=kaggle, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "broken.ogg" in proc.stderr and "2 files, 5 chunks, 1 unreadable" in proc.stderr
    assert "1/2 files" in proc.stderr and "2/2 files" in proc.stderr  # progress lines
    want = predict([model], audio, smoothing=(0.1, 0.8, 0.1), expected_duration_s=10.0)
    header, ids, values = read_csv(out)
    assert header == ["row_id", *CLASSES]
    assert ids == want.row_ids == ["birds_10s_5", "birds_10s_10", "birds_10s_15", "broken_5", "broken_10"]
    np.testing.assert_allclose(values, want.probs, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- a real exported BirdModel (birdrounds.export)


@pytest.fixture(scope="module")
def exported(exported_graphs):
    """A `model=tiny` BirdModel and its spectrogram and waveform graphs, exported once per session by
    `birdrounds.export.export_onnx` (conftest.exported_graphs, shared with tests/test_export.py)."""
    from birdrounds.model import load_checkpoint

    graphs = {kind: exported_graphs(kind, "sed") for kind in ("spectrogram", "waveform")}
    (checkpoint,) = {ckpt for ckpt, _, _ in graphs.values()}
    model, _ = load_checkpoint(checkpoint)
    return model.eval(), {kind: path for kind, (_, path, _) in graphs.items()}


@pytest.mark.slow
def test_exported_bird_model_matches_torch_on_real_audio(exported, tmp_path):
    model, paths = exported
    wave, _ = sf.read(REAL_AUDIO, dtype="float32")
    chunks = np.zeros((3, 160000), np.float32)  # 10.13 s -> 3 chunks, the last one zero-padded
    chunks.reshape(-1)[: len(wave)] = wave
    with torch.no_grad():
        want = torch.sigmoid(model(torch.from_numpy(chunks))["logits"]).numpy()
    for kind, path in paths.items():
        got = predict([path], [REAL_AUDIO])
        assert got.row_ids == ["birds_10s_5", "birds_10s_10", "birds_10s_15"]
        np.testing.assert_allclose(got.raw_probs, want, rtol=0, atol=1e-4, err_msg=kind)
    both = predict(list(paths.values()), [REAL_AUDIO])
    np.testing.assert_allclose(both.raw_probs, want, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_openvino_engine_matches_onnxruntime_and_refuses_waveform_graphs(exported):
    pytest.importorskip("openvino")
    _, paths = exported
    want = predict([paths["spectrogram"]], [REAL_AUDIO])
    f32 = predict([paths["spectrogram"]], [REAL_AUDIO], engine="openvino")
    assert f32.row_ids == want.row_ids
    np.testing.assert_allclose(f32.raw_probs, want.raw_probs, rtol=0, atol=1e-4)
    bf16 = predict([paths["spectrogram"]], [REAL_AUDIO], engine="openvino_bf16")
    np.testing.assert_allclose(bf16.raw_probs, want.raw_probs, rtol=0, atol=5e-2)  # bf16 keeps ~3 digits
    with pytest.raises(contract.ModelFormatError, match="spectrogram graphs only"):
        infer.load_models([paths["waveform"]], 1, engine="openvino")


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="engine must be one of"):
        infer.InferenceSettings(engine="tensorrt")
