"""Waveform augmentation and MixUp on whole batches, on the training device (`data.augment_on: device`).

With `augment_on: workers` (the default) every clip is augmented in a DataLoader worker on the CPU
(`data/augment.py`, audiomentations); at 15-90 clips/s per core that cannot feed a GPU that trains at
thousands of clips/s. Here the workers only read and crop (and, for the background mix, slice a
soundscape window: `BackgroundWindows`), and `BatchAugment` applies the same transforms, in the same
order and with the same `data.augment` knobs, to the whole batch on the device with torch ops, then
MixUp (`data.mixup`):

- shift: a per-clip circular shift (rollover);
- stretch: a phase vocoder with a per-clip rate, length kept (torchaudio's algorithm, batched over rates);
- pitch: `resample` = a per-clip tape-speed change by linear interpolation (no anti-alias filter, unlike
  soxr); `signalsmith` = the same resampling after a stretch by the inverse factor, so the tempo is kept;
- background: the worker's soundscape window mixed in at an SNR relative to the clip's RMS;
- noise: Gaussian noise at an SNR relative to the clip's RMS;
- gain: a per-clip level change in dB.

The draws come from a generator on the batch's device seeded by (seed, epoch, process index) at each
`set_epoch`, so a run is reproducible on the same device and a resumed epoch draws as the first one did;
the draws differ from the worker path's. One difference in what a student sees: in the workers, only
the labeled clip is augmented before the pseudo-labeled chunk is mixed in (`pseudo.mixing`); here the
mixed clip is augmented as a whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from torch.utils.data import Dataset

from birdrounds.data.augment import AugmentSettings, SoundscapeBackground
from birdrounds.data.clips import MixUp

BACKGROUND_KEY = "background"


class BackgroundWindows(Dataset):
    """Wrap a training dataset: each item gains `background`, a random soundscape window (zeros when not drawn).

    Drawn with probability `p` per item from a generator seeded by (seed, epoch, index), so it does not
    depend on the worker count; reading it costs one slice of the decoded-audio cache. Undecodable
    backgrounds are warned about once and dropped from the pool (`SoundscapeBackground`'s reader).
    Other attributes (`set_epoch` aside) are the wrapped dataset's.
    """

    def __init__(self, dataset: Dataset, paths: Sequence[str], audio: Any, p: float, seed: int = 0) -> None:
        self.dataset = dataset
        self.reader = SoundscapeBackground(paths, audio, p=1.0)
        self.p, self.seed, self.epoch = float(p), int(seed), 0

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[index])
        n = len(item["audio"])
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 1])
        window = None
        if rng.random() < self.p:
            path = self.reader.paths[int(rng.integers(len(self.reader.paths)))]
            window = self.reader.window(path, n, float(rng.random()))
        item[BACKGROUND_KEY] = torch.from_numpy(window) if window is not None else torch.zeros(n)
        return item


class BatchAugment:
    """`data.augment`'s transforms, then MixUp, applied to a batch dict on its device (see the module doc).

    `settings` are the workers' (`data.augment`), with the same meaning; the background windows come
    with the batch (`BackgroundWindows`, in the workers) and are mixed in here when present.
    """

    def __init__(
        self,
        sample_rate_hz: int,
        settings: AugmentSettings,
        mixup: MixUp | None = None,
        seed: int = 0,
        n_fft: int = 512,
        hop_length: int = 128,
    ) -> None:
        self.sample_rate_hz = int(sample_rate_hz)
        self.settings = settings
        self.mixup = mixup
        self.seed, self.epoch = int(seed), 0
        self.n_fft, self.hop_length = n_fft, hop_length
        self._generator: torch.Generator | None = None

    def __repr__(self) -> str:
        return f"BatchAugment({self.settings}, mixup={self.mixup is not None})"

    def set_epoch(self, epoch: int) -> None:
        """Restart the draws from (seed, epoch, process index); MixUp's too."""
        self.epoch = int(epoch)
        self._generator = None
        if self.mixup is not None:
            self.mixup.set_epoch(epoch)

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            entropy = [self.seed, self.epoch, PartialState().process_index]
            state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
            self._generator = torch.Generator(device=device).manual_seed(int(state) % 2**63)
        return self._generator

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch)
        x = batch["audio"].float()
        background = out.pop(BACKGROUND_KEY, None)
        gen, s = self._rng(x.device), self.settings
        size, n = x.shape

        def draw(p: float) -> torch.Tensor:
            return torch.rand(size, generator=gen, device=x.device) < p

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(size, generator=gen, device=x.device)

        if s.shift_p > 0:
            on, frac = draw(s.shift_p), uniform(-s.shift_max_fraction, s.shift_max_fraction)
            x = torch.where(on[:, None], roll_rows(x, (frac * n).round().long()), x)
        if s.stretch_p > 0:
            on, rate = draw(s.stretch_p), uniform(*s.stretch_rate)
            x = self._on_rows(x, on, lambda rows, idx: time_stretch(rows, rate[idx], self.n_fft, self.hop_length))
        if s.pitch_p > 0:
            on = draw(s.pitch_p)
            factor = 2.0 ** (uniform(*s.pitch_semitones) / 12.0)
            if s.pitch_method == "resample":
                x = self._on_rows(x, on, lambda rows, idx: resample_rows(rows, factor[idx]))
            else:
                x = self._on_rows(x, on, lambda rows, idx: resample_rows(
                    time_stretch(rows, 1.0 / factor[idx], self.n_fft, self.hop_length), factor[idx]))
        if s.background_p > 0 and background is not None:
            # The worker drew whether to mix (a zero window means no); only the SNR is drawn here.
            background = background.to(x.device, x.dtype)
            x = x + background * _scale_to_snr(x, background, uniform(*s.background_snr_db))[:, None]
        if s.noise_p > 0:
            on, snr = draw(s.noise_p), uniform(*s.noise_snr_db)
            noise = torch.randn(x.shape, generator=gen, device=x.device)
            std = _rms(x) / 10.0 ** (snr / 20.0)
            x = x + noise * (std * on)[:, None]
        if s.gain_p > 0:
            on, db = draw(s.gain_p), uniform(*s.gain_db)
            x = x * torch.where(on, 10.0 ** (db / 20.0), torch.ones_like(db))[:, None]
        out["audio"] = x.to(batch["audio"].dtype)
        return self.mixup(out) if self.mixup is not None else out

    @staticmethod
    def _on_rows(x: torch.Tensor, on: torch.Tensor, fn: Any) -> torch.Tensor:
        """`fn(rows, idx)` applied to the selected rows only (an STFT costs; most rows are not drawn)."""
        idx = on.nonzero().flatten()
        if len(idx) == 0:
            return x
        x = x.clone()
        x[idx] = fn(x[idx], idx)
        return x


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.square().mean(dim=-1).sqrt()


def _scale_to_snr(signal: torch.Tensor, noise: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
    """Per-row factor for `noise` so that signal RMS / scaled noise RMS is `snr_db`; 0 where either is silent."""
    signal_rms, noise_rms = _rms(signal), _rms(noise)
    ok = (signal_rms > 0) & (noise_rms > 0)
    return torch.where(ok, signal_rms / 10.0 ** (snr_db / 20.0) / noise_rms.clamp_min(1e-12), torch.zeros_like(snr_db))


def roll_rows(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each row rolled right by its own number of samples (negative: left), with rollover."""
    n = x.shape[-1]
    index = (torch.arange(n, device=x.device)[None, :] - shifts[:, None]) % n
    return x.gather(1, index)


def resample_rows(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Row i played `factor[i]` times faster: out[t] = x[t * factor] (linear interpolation), zero past the end.

    Pitch and tempo both scale by the factor (a tape-speed change); the length is kept.
    """
    n = x.shape[-1]
    pos = torch.arange(n, device=x.device, dtype=torch.float32)[None, :] * factor.float()[:, None]
    left = pos.floor().long().clamp(max=n - 2)
    frac = (pos - left).to(x.dtype)
    y = x.gather(1, left) * (1 - frac) + x.gather(1, left + 1) * frac
    return torch.where(pos <= n - 1, y, torch.zeros_like(y))


def time_stretch(x: torch.Tensor, rate: torch.Tensor, n_fft: int = 512, hop_length: int = 128) -> torch.Tensor:
    """Row i sped up by `rate[i]` (> 1 faster) with its pitch kept: a phase vocoder, length kept.

    Output frame t reads input position t * rate (magnitudes interpolated, phases advanced by the
    measured phase differences), as torchaudio.functional.phase_vocoder does for one rate; frames past
    the input's end are silent, and a slowed-down row is cut at the original length.
    """
    n = x.shape[-1]
    window = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop_length, window=window, return_complex=True)  # [B, F, T]
    size, n_freq, n_frames = spec.shape
    steps = torch.arange(n_frames, device=x.device, dtype=x.dtype)[None, :] * rate.to(x.dtype)[:, None]
    padded = torch.nn.functional.pad(spec, (0, 2))  # reading past the end gives silence
    left = steps.floor().long().clamp(max=n_frames)
    alpha = (steps - left.to(x.dtype)).clamp(0, 1)[:, None, :]
    index = left[:, None, :].expand(size, n_freq, n_frames)
    s0, s1 = padded.gather(2, index), padded.gather(2, index + 1)
    advance = torch.linspace(0, math.pi * hop_length, n_freq, device=x.device, dtype=x.dtype)[None, :, None]
    delta = s1.angle() - s0.angle() - advance
    delta = delta - 2 * math.pi * torch.round(delta / (2 * math.pi)) + advance
    phase = torch.cat([spec[..., :1].angle(), delta[..., :-1]], dim=-1).cumsum(dim=-1)
    magnitude = alpha * s1.abs() + (1 - alpha) * s0.abs()
    magnitude = torch.where((steps <= n_frames - 1)[:, None, :], magnitude, torch.zeros_like(magnitude))
    return torch.istft(torch.polar(magnitude, phase), n_fft, hop_length, window=window, length=n)
