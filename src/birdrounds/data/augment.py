"""Training-only waveform augmentations (audiomentations plus a cache-backed background-noise mixer)."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr
from audiomentations import AddGaussianSNR, Compose, Gain, PitchShift, Shift, TimeStretch
from audiomentations.core.transforms_interface import BaseWaveformTransform
from omegaconf import DictConfig, ListConfig, OmegaConf

from birdrounds.data.audio import AudioDecodeError

log = logging.getLogger(__name__)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


class SoundscapeBackground(BaseWaveformTransform):
    """Mix in a random window of a random background recording (e.g. a soundscape) at a random SNR.

    Unlike audiomentations' AddBackgroundNoise, which decodes (and resamples) a whole file from disk on
    every call, this reads through an audio source, so with the decoded-audio cache a call costs one
    memmap slice. Parameters are drawn from Python's global `random` like every audiomentations
    transform, so seeding it per item makes the mix reproducible. A background that cannot be decoded is
    warned about once and dropped from the pool; a silent background or a silent clip is left unchanged.
    """

    supports_multichannel = False

    def __init__(
        self,
        paths: Sequence[str],
        audio: Any,
        min_snr_db: float = 0.0,
        max_snr_db: float = 20.0,
        p: float = 0.5,
    ) -> None:
        super().__init__(p)
        if not paths:
            raise ValueError("SoundscapeBackground needs at least one background path")
        if min_snr_db > max_snr_db:
            raise ValueError("min_snr_db must not be greater than max_snr_db")
        self.paths = [str(p) for p in paths]
        self.audio = audio
        self.min_snr_db, self.max_snr_db = min_snr_db, max_snr_db
        self.bad_paths: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"SoundscapeBackground({len(self.paths)} paths, snr_db=({self.min_snr_db}, {self.max_snr_db}), "
            f"p={self.p})"
        )

    def randomize_parameters(self, samples: np.ndarray, sample_rate: int) -> None:
        super().randomize_parameters(samples, sample_rate)
        if self.parameters["should_apply"]:
            self.parameters["path"] = random.choice(self.paths)
            self.parameters["snr_db"] = random.uniform(self.min_snr_db, self.max_snr_db)
            self.parameters["start_fraction"] = random.random()

    def apply(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        if sample_rate != self.audio.sample_rate_hz:
            raise ValueError(f"clip is {sample_rate} Hz but the background source is {self.audio.sample_rate_hz} Hz")
        noise = self.window(self.parameters["path"], len(samples), self.parameters["start_fraction"])
        signal_rms, noise_rms = _rms(samples), _rms(noise) if noise is not None else 0.0
        if signal_rms == 0.0 or noise_rms == 0.0:
            return samples
        target_noise_rms = signal_rms / 10 ** (self.parameters["snr_db"] / 20)
        return (samples + noise * np.float32(target_noise_rms / noise_rms)).astype(np.float32)

    def window(self, path: str, n_samples: int, start_fraction: float) -> np.ndarray | None:
        """`n_samples` of background from `path` starting at a fraction of the free range (tiled if short).

        None for an empty or undecodable file (the latter warned about once and dropped from the pool).
        Also the reader of `device_augment.BackgroundWindows`.
        """
        if path in self.bad_paths:
            return None
        try:
            wave = self.audio.load(path)
        except AudioDecodeError as err:
            self.bad_paths.add(path)
            log.warning("cannot decode background %s (%s); dropping it from the pool", path, err)
            return None
        if len(wave) == 0:
            return None
        if len(wave) < n_samples:
            return np.resize(np.asarray(wave, dtype=np.float32), n_samples)
        start = int(start_fraction * (len(wave) - n_samples + 1))
        return np.asarray(wave[start : start + n_samples], dtype=np.float32)


class ResamplePitchShift(BaseWaveformTransform):
    """Cheap pitch shift by resampling: tempo changes by the same factor (a tape-speed change).

    About 1 ms per 5-s 32 kHz clip against ~25 ms for Signalsmith's tempo-preserving shift. The result
    is cropped or zero-padded at the end to the input length.
    """

    supports_multichannel = False

    def __init__(self, min_semitones: float = -2.0, max_semitones: float = 2.0, p: float = 0.5) -> None:
        super().__init__(p)
        if min_semitones > max_semitones:
            raise ValueError("min_semitones must not be greater than max_semitones")
        self.min_semitones, self.max_semitones = min_semitones, max_semitones

    def randomize_parameters(self, samples: np.ndarray, sample_rate: int) -> None:
        super().randomize_parameters(samples, sample_rate)
        if self.parameters["should_apply"]:
            self.parameters["num_semitones"] = random.uniform(self.min_semitones, self.max_semitones)

    def apply(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        factor = 2.0 ** (self.parameters["num_semitones"] / 12.0)
        # Treating the clip as recorded at sample_rate * factor and playing it at sample_rate scales
        # every frequency by `factor` and the duration by 1 / factor.
        shifted = soxr.resample(samples, sample_rate * factor, sample_rate, quality="HQ")
        out = np.zeros_like(samples)
        out[: min(len(out), len(shifted))] = shifted[: len(out)]
        return out


class WaveformAugment:
    """A Compose of waveform transforms that returns float32 of the input length (picklable)."""

    def __init__(self, transforms: list[BaseWaveformTransform]) -> None:
        self.compose = Compose(transforms)

    def __call__(self, samples: np.ndarray, sample_rate_hz: int) -> np.ndarray:
        n = len(samples)
        out = self.compose(np.ascontiguousarray(samples, dtype=np.float32), sample_rate_hz)
        out = np.asarray(out, dtype=np.float32)
        # Stretch/pitch implementations may be off by a few samples; the window length is fixed.
        if len(out) != n:
            out = np.pad(out[:n], (0, max(0, n - len(out))))
        return out

    def __repr__(self) -> str:
        return f"WaveformAugment({self.compose!r})"


PITCH_METHODS = ("signalsmith", "resample")


@dataclass(frozen=True, kw_only=True)
class AugmentSettings:
    """The `data.augment` knobs: each transform's probability and range, shared by both placements.

    `build_waveform_augment` (per clip in the DataLoader workers) and `device_augment.BatchAugment` (per
    batch on the training device) read the same settings, so a knob means the same in both. The config
    (configs/data/birdclef2025.yaml) holds the probabilities and `pitch_method` (`from_config` reads them);
    the ranges, which no YAML sets (an experiment may add one: +data.augment.gain_db=[-6,6]), default here.
    """

    gain_p: float
    gain_db: tuple[float, float] = (-12.0, 6.0)
    noise_p: float
    noise_snr_db: tuple[float, float] = (5.0, 40.0)
    background_p: float
    background_snr_db: tuple[float, float] = (0.0, 20.0)
    shift_p: float
    shift_max_fraction: float = 0.5
    pitch_p: float
    pitch_semitones: tuple[float, float] = (-2.0, 2.0)
    pitch_method: str
    stretch_p: float
    stretch_rate: tuple[float, float] = (0.9, 1.1)

    def __post_init__(self) -> None:
        if self.pitch_method not in PITCH_METHODS:
            raise ValueError(f"pitch_method must be one of {PITCH_METHODS}, got {self.pitch_method!r}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_p") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{field.name} must be in [0, 1], got {value}")
            if isinstance(value, (list, tuple, ListConfig)):  # ListConfig: an added key, `+data.augment.gain_db=[a,b]`
                low, high = value  # a config's lists become tuples, so the settings stay hashable
                object.__setattr__(self, field.name, (float(low), float(high)))
                if low > high:
                    raise ValueError(f"{field.name}: low {low} is above high {high}")
        if self.stretch_rate[0] <= 0:
            raise ValueError(f"stretch_rate must be positive, got {self.stretch_rate}")

    @classmethod
    def off(cls) -> AugmentSettings:
        """Every transform off (`data.augment: null`); the pitch method is moot then."""
        return cls(**{f.name: 0.0 for f in dataclasses.fields(cls) if f.name.endswith("_p")}, pitch_method="resample")

    @classmethod
    def from_config(cls, node: Mapping[str, Any], **changes: Any) -> AugmentSettings:
        """The settings of a `data.augment` node (the workers' builder's own arguments left out), `changes`
        over them; e.g. `from_config(shipped_config("data.augment", "data=birdclef2025"))` for the shipped."""
        knobs = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        for key in ("_target_", "sample_rate_hz"):  # the config node builds build_waveform_augment
            knobs.pop(key, None)
        return cls(**{**knobs, **changes})


def build_waveform_augment(
    sample_rate_hz: int,
    background_paths: Sequence[str] | None = None,
    background_audio: Any = None,
    **knobs: Any,
) -> WaveformAugment | None:
    """Training waveform augmentation, each transform with its own probability; None when all are off.

    `knobs` are `AugmentSettings` fields, the probabilities and `pitch_method` required (an unknown or
    missing name is a TypeError naming it). Order: time shift
    (with rollover), time stretch (length kept), pitch shift, background mix, Gaussian noise (both at an
    SNR relative to the call), then gain (the recording level, noise included). Stretch and pitch use
    Signalsmith (~25 ms per 5-s 32 kHz clip each); `pitch_method="resample"` gives up the kept tempo for
    ~1 ms (see `ResamplePitchShift`). Background mixing is skipped without paths or source. Parameters
    come from the global `random` / `np.random` (audiomentations' convention); `ClipDataset` seeds both
    per item.
    """
    s = AugmentSettings(**knobs)
    transforms: list[BaseWaveformTransform] = []
    if s.shift_p > 0:
        transforms.append(Shift(-s.shift_max_fraction, s.shift_max_fraction, rollover=True, p=s.shift_p))
    if s.stretch_p > 0:
        transforms.append(
            TimeStretch(*s.stretch_rate, leave_length_unchanged=True, method="signalsmith_stretch", p=s.stretch_p)
        )
    if s.pitch_p > 0:
        transforms.append(_pitch_shift(s.pitch_method, s.pitch_semitones, s.pitch_p))
    if s.background_p > 0 and background_paths and background_audio is not None:
        if background_audio.sample_rate_hz != sample_rate_hz:
            raise ValueError(
                f"background source is {background_audio.sample_rate_hz} Hz, clips are {sample_rate_hz} Hz"
            )
        background = SoundscapeBackground(background_paths, background_audio, *s.background_snr_db, p=s.background_p)
        transforms.append(background)
    if s.noise_p > 0:
        transforms.append(AddGaussianSNR(*s.noise_snr_db, p=s.noise_p))
    if s.gain_p > 0:
        transforms.append(Gain(*s.gain_db, p=s.gain_p))
    return WaveformAugment(transforms) if transforms else None


def _pitch_shift(method: str, semitones: tuple[float, float], p: float) -> BaseWaveformTransform:
    """Pitch-shift transform: "signalsmith" keeps the tempo, "resample" is ~20x cheaper but does not."""
    if method == "resample":
        return ResamplePitchShift(*semitones, p=p)
    return PitchShift(*semitones, method="signalsmith_stretch", p=p)
