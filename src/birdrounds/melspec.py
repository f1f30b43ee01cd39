"""The mel frontend in numpy: `birdrounds.model.MelFrontend`'s log-mel spectrogram without torch.

Exported spectrogram graphs take its output (`birdrounds.frontend` metadata holds its arguments).
The export copies this file beside infer.py, where it runs without birdrounds installed: it imports only
the standard library, numpy (scipy's FFT when present).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

if __package__:  # birdrounds.melspec
    from .contract import FRONTEND_KEYS
else:  # a copy beside infer.py in an exported folder
    from contract import FRONTEND_KEYS  # type: ignore[no-redef]

try:  # scipy's FFT is faster than numpy's and can use several threads; optional
    import scipy.fft as _scipy_fft
except ImportError:  # pragma: no cover - exercised only where scipy is missing
    _scipy_fft = None

NORM_MODES = ("standard", "minmax", "standard_minmax")
# The constants of birdrounds.model.MelFrontend / torchaudio.AmplitudeToDB, repeated here because
# this file cannot import the package; tests/test_infer.py checks the parity.
_NORM_EPS = 1e-6
_POWER_FLOOR = 1e-10
# Size of the [windows, frames, n_fft] float32 frame buffer the frontend fills at a time: one 5-s
# window at n_fft 2048, hop 512 (2.6 MB). Blocks this small stay in cache and their temporaries are
# reused by malloc instead of being mapped and faulted in afresh: 1.16 ms per 5-s window, against
# 2.34 ms for blocks of 8 windows (24 MB). Memory stays bounded at any batch size and window length.
_FRONTEND_BLOCK_BYTES = 4 << 20
# Mel filters per block GEMM in the frontend (4..16 measured within 20% of each other; 8 fastest).
_FILTERS_PER_GEMM = 8


@dataclass(frozen=True)
class FrontendConfig:
    """Arguments of `birdrounds.model.MelFrontend` (the `birdrounds.frontend` metadata). No defaults: the
    values come from the exported model's metadata, written from the training config."""

    sample_rate_hz: int
    n_fft: int
    hop_length: int
    n_mels: int
    f_min_hz: float
    f_max_hz: float
    top_db: float | None
    norm: str

    def __post_init__(self) -> None:
        if self.norm not in NORM_MODES:
            raise ValueError(f"norm must be one of {NORM_MODES}, got {self.norm!r}")
        if not 0 <= self.f_min_hz < self.f_max_hz <= self.sample_rate_hz / 2:
            raise ValueError(f"need 0 <= f_min_hz < f_max_hz <= {self.sample_rate_hz / 2}, "
                             f"got {self.f_min_hz}, {self.f_max_hz}")
        if self.n_fft < 2 or self.hop_length < 1 or self.n_mels < 1:
            raise ValueError(f"bad frontend sizes: n_fft {self.n_fft}, hop {self.hop_length}, n_mels {self.n_mels}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FrontendConfig:
        """Build from the metadata dict; every key of the contract must be present, no others."""
        missing, unknown = set(FRONTEND_KEYS) - set(values), set(values) - set(FRONTEND_KEYS)
        if missing or unknown:
            raise ValueError(f"frontend metadata: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        top_db = values["top_db"]
        return cls(
            sample_rate_hz=int(values["sample_rate_hz"]), n_fft=int(values["n_fft"]),
            hop_length=int(values["hop_length"]), n_mels=int(values["n_mels"]),
            f_min_hz=float(values["f_min_hz"]), f_max_hz=float(values["f_max_hz"]),
            top_db=None if top_db is None else float(top_db), norm=str(values["norm"]),
        )


def _hz_to_mel(freq_hz: float) -> float:
    """HTK mel scale (torchaudio's default)."""
    return 2595.0 * math.log10(1.0 + freq_hz / 700.0)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace` in float32 on CPU: float32 step, first half from `start`, second half from `end`.

    Each value is one fused multiply-add (a single rounding), which float64 arithmetic then one
    rounding to float32 reproduces.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(max(steps - 1, 1))))
    idx = np.arange(steps, dtype=np.float64)
    values = np.where(idx < steps // 2, np.float64(start32) + step * idx, np.float64(end32) - step * (steps - 1 - idx))
    return values.astype(np.float32)


def mel_filterbank(n_freqs: int, f_min_hz: float, f_max_hz: float, n_mels: int, sample_rate_hz: int) -> np.ndarray:
    """Triangular HTK mel filters [n_freqs, n_mels] float32, no area norm: torchaudio's `melscale_fbanks`.

    Computed in float32 step by step as torchaudio does, so the weights match torch's to about one
    float32 ulp; exact (float64) weights differ from torch's by up to 1e-5, which would show as up to
    ~1e-4 in the normalised spectrogram.
    """
    f32 = np.float32
    # torchaudio spaces the bins up to sample_rate // 2 (integer division), not sample_rate / 2.
    all_freqs = _linspace_f32(0.0, sample_rate_hz // 2, n_freqs)
    mels = _linspace_f32(_hz_to_mel(f_min_hz), _hz_to_mel(f_max_hz), n_mels + 2)
    # torch's float32 pow is accurate to the last bit, as float64 pow rounded once is.
    f_pts = f32(700.0) * (np.power(10.0, (mels / f32(2595.0)).astype(np.float64)).astype(f32) - f32(1.0))
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(f32(0.0), np.minimum(down, up))


def _rfft(frames: np.ndarray, workers: int) -> np.ndarray:
    """Real FFT over the last axis (float32 in, complex64 out), scipy when available."""
    if _scipy_fft is not None:
        return _scipy_fft.rfft(frames, axis=-1, workers=workers, overwrite_x=True)
    # numpy < 2 computes in float64: back to complex64, which the frontend views as float32 pairs.
    return np.fft.rfft(frames, axis=-1).astype(np.complex64, copy=False)


class MelFrontendNumpy:
    """Waveforms [B, n_samples] -> normalised log-mel [B, 1, n_mels, frames], as `birdrounds.model.MelFrontend`.

    Same steps as torchaudio's MelSpectrogram + AmplitudeToDB with the frontend's settings: frames
    centred with reflect padding of n_fft // 2, periodic Hann window of n_fft samples, power
    spectrum, HTK mel filters; then 10 * log10(max(power, 1e-10)), floored per sample at its maximum
    minus top_db; then the per-sample normalisation of `MelFrontend._normalise` (std with ddof=1).
    A silent window normalises to all zeros, as in torch. Parity with torch is ~1e-5 on real audio;
    it is ill-defined only for bins more than ~100 dB below a window's peak (e.g. a pure digital
    tone with top_db=None), which hold float32 FFT rounding noise that differs between FFT libraries.
    """

    def __init__(self, config: FrontendConfig, fft_workers: int = 1) -> None:
        self.config = config
        self.fft_workers = max(1, int(fft_workers))
        n = np.arange(config.n_fft)
        self.window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / config.n_fft)).astype(np.float32)
        self.fbank = mel_filterbank(config.n_fft // 2 + 1, config.f_min_hz, config.f_max_hz, config.n_mels,
                                    config.sample_rate_hz)
        # FFT bins outside every filter (e.g. above f_max_hz) add exact zeros: skip them.
        used = np.flatnonzero(self.fbank.any(axis=1))
        self._bins = slice(int(used[0]), int(used[-1]) + 1) if len(used) else slice(0, 1)
        self._fbank_groups = self._filter_groups(self.fbank[self._bins])

    @staticmethod
    def _filter_groups(fbank: np.ndarray, per_group: int = _FILTERS_PER_GEMM) -> list[tuple[slice, slice, np.ndarray]]:
        """The filterbank cut into blocks of `per_group` neighbouring filters and the bins they cover.

        Each triangle spans a few bins, so the dense [bins, n_mels] product is mostly zeros; one small
        GEMM per block (columns, bin range, weights) skips them (measured on EfficientNet-B0's
        frontend: 1.28 -> 0.19 ms per 5-s chunk). Each filter row appears twice, for the real and the
        imaginary part, so the squared interleaved spectrum times it is |X|^2 @ fbank with no
        separate pass to form |X|^2. Bins are relative to `fbank`'s first row, in (re, im) units.
        """
        groups = []
        for first in range(0, fbank.shape[1], per_group):
            weights = fbank[:, first : first + per_group]
            rows = np.flatnonzero(weights.any(axis=1))
            lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 1)
            groups.append((slice(first, first + weights.shape[1]), slice(2 * lo, 2 * hi),
                           np.ascontiguousarray(np.repeat(weights[lo:hi], 2, axis=0))))
        return groups

    def n_frames(self, n_samples: int) -> int:
        """Spectrogram frames for a window of `n_samples` (centred framing)."""
        return n_samples // self.config.hop_length + 1

    def __call__(self, waveforms: np.ndarray) -> np.ndarray:
        """Normalised log-mel spectrograms [B, 1, n_mels, frames] float32."""
        waves = np.atleast_2d(np.asarray(waveforms, dtype=np.float32))
        if waves.shape[1] <= self.config.n_fft // 2:
            raise ValueError(f"windows of {waves.shape[1]} samples are too short for n_fft {self.config.n_fft}")
        n_frames = self.n_frames(waves.shape[1])
        out = np.empty((len(waves), 1, self.config.n_mels, n_frames), dtype=np.float32)
        block = max(1, _FRONTEND_BLOCK_BYTES // (4 * n_frames * self.config.n_fft))
        for start in range(0, len(waves), block):
            out[start : start + block, 0] = self._log_mel(waves[start : start + block])
        return self._normalise(out)

    def _log_mel(self, waves: np.ndarray) -> np.ndarray:
        """Floored dB mel power [b, n_mels, frames] float32."""
        cfg = self.config
        pad = cfg.n_fft // 2
        padded = np.pad(waves, ((0, 0), (pad, pad)), mode="reflect")
        # Frames are strided views of `padded`; the window multiply makes the one copy the FFT needs.
        frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft, axis=-1)[:, :: cfg.hop_length]
        spectrum = _rfft(frames * self.window, self.fft_workers)
        # complex64 [b, frames, bins] viewed as float32 (re, im) pairs, squared in place, then per
        # block of filters one GEMM over the whole batch block: [b * frames, 2 * bins] @ [2 * bins, filters].
        pairs = spectrum.view(np.float32)[..., 2 * self._bins.start : 2 * self._bins.stop]
        np.square(pairs, out=pairs)
        pairs = pairs.reshape(-1, pairs.shape[-1])
        mel = np.empty((len(pairs), cfg.n_mels), dtype=np.float32)
        for columns, bins, weights in self._fbank_groups:
            np.matmul(pairs[:, bins], weights, out=mel[:, columns])
        mel = mel.reshape(len(waves), -1, cfg.n_mels).transpose(0, 2, 1)
        db = 10.0 * np.log10(np.maximum(mel, np.float32(_POWER_FLOOR)))
        if cfg.top_db is not None:
            db = np.maximum(db, db.max(axis=(1, 2), keepdims=True) - np.float32(cfg.top_db))
        return db

    def _normalise(self, spec: np.ndarray) -> np.ndarray:
        """Per-sample normalisation over (channel, mel, frame); statistics in float64."""
        axes = (1, 2, 3)
        if self.config.norm in ("standard", "standard_minmax"):
            mean = spec.mean(axis=axes, keepdims=True, dtype=np.float64)
            std = spec.std(axis=axes, keepdims=True, ddof=1, dtype=np.float64)
            spec = ((spec - mean) / (std + _NORM_EPS)).astype(np.float32)
        if self.config.norm in ("minmax", "standard_minmax"):
            lo = spec.min(axis=axes, keepdims=True).astype(np.float64)
            hi = spec.max(axis=axes, keepdims=True).astype(np.float64)
            spec = ((spec - lo) / (hi - lo + _NORM_EPS)).astype(np.float32)
        return spec
