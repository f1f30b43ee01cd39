"""Labeled clip dataset: fixed windows, multi-hot targets, batch MixUp and class-balanced sampling."""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, WeightedRandomSampler, default_collate, get_worker_info

from birdrounds.data.audio import AudioDecodeError
from birdrounds.contract import SCORED_CHUNK_S

log = logging.getLogger(__name__)

WINDOW_MODES = ("random", "center")
TARGET_MODES = ("hard", "soft")


def rating_weights(ratings: Iterable[float]) -> np.ndarray:
    """Per-sample weight from a 0-5 rating: clip(rating, 1, 5) / 5; 0 or missing (unrated) gives 1.0."""
    r = pd.to_numeric(pd.Series(list(ratings), dtype=object), errors="coerce").to_numpy(dtype=np.float64)
    # BirdCLEF uses rating 0 for "no rating"; an unrated clip should not be down-weighted as if it were bad.
    unknown = ~np.isfinite(r) | (r <= 0)
    return np.where(unknown, 1.0, np.clip(r, 1.0, 5.0) / 5.0).astype(np.float32)


def fit_window(
    wave: np.ndarray, n_samples: int, mode: str, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Crop (longer) or zero-pad (shorter) `wave` to `n_samples` float32, at a random or the central offset."""
    n = len(wave)
    slack = abs(n - n_samples)
    offset = int(rng.integers(0, slack + 1)) if mode == "random" else slack // 2
    if n >= n_samples:
        return np.asarray(wave[offset : offset + n_samples], dtype=np.float32).copy()
    out = np.zeros(n_samples, dtype=np.float32)
    out[offset : offset + n] = wave
    return out


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's and NumPy's global RNGs for the block, then restore their previous state.

    audiomentations draws its parameters from the global `random` / `np.random`; seeding them per item
    makes augmentation reproducible and independent of DataLoader worker count, and restoring the state
    keeps that seeding from leaking into other code.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class ClipDataset(Dataset):
    """Fixed-length windows of labeled recordings with multi-hot targets and a scalar sample weight.

    Targets: the primary label is 1. Secondary labels (those in `classes`; others are ignored) are
    `secondary_weight` ("soft") or 1 when `secondary_weight > 0` ("hard"). Label smoothing then maps
    t -> t * (1 - eps) + eps / num_classes (torch's CrossEntropyLoss convention).

    Windows: clips longer than the window are cropped at a random ("random") or the central ("center")
    offset; shorter clips are zero-padded with the clip at a random or the central offset.

    Weight: 1.0, or `rating_weights(rating)` when `rating_weight` is set, times `row_weights` (one
    factor per row, e.g. a loss weight for external rows) when given; 0.0 for an unreadable file,
    which yields a zero waveform, a warning naming the file (once per file) and an entry in
    `failed_paths`. `num_failures` and `failed_paths` are per process: DataLoader workers keep their own.

    Randomness comes from a per-item generator seeded by (seed, epoch, index), so results do not depend
    on DataLoader worker count. Call `set_epoch` before each epoch; persistent workers hold a copy of the
    dataset and do not see it, so use non-persistent workers (the default) when windows should change.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        classes: Sequence[str],
        audio: Any,
        window_s: float = SCORED_CHUNK_S,
        window_mode: str = "random",
        target_mode: str = "soft",
        secondary_weight: float = 0.5,
        label_smoothing: float = 0.0,
        augment: Callable[[np.ndarray, int], np.ndarray] | None = None,
        rating_weight: bool = False,
        seed: int = 0,
        row_weights: Sequence[float] | None = None,
    ) -> None:
        if window_mode not in WINDOW_MODES:
            raise ValueError(f"window_mode must be one of {WINDOW_MODES}, got {window_mode!r}")
        if target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode must be one of {TARGET_MODES}, got {target_mode!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.classes = list(classes)
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(table["primary_label"]) - set(self.class_index))
        if unknown:
            raise ValueError(f"{len(unknown)} primary labels are not in the class list, e.g. {unknown[:5]}")
        self.paths = [str(p) for p in table["path"]]
        self.audio = audio
        self.window_mode = window_mode
        self.n_samples = int(round(window_s * audio.sample_rate_hz))
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        secondary_value = (1.0 if secondary_weight > 0 else 0.0) if target_mode == "hard" else secondary_weight
        self.targets = self._build_targets(table, secondary_value, label_smoothing)
        ratings = table["rating"] if rating_weight else [0.0] * len(table)
        self.weights = rating_weights(ratings) * _row_factors(row_weights, len(table))
        self.num_failures = 0
        self.failed_paths: list[str] = []

    def _build_targets(self, table: pd.DataFrame, secondary_value: float, eps: float) -> np.ndarray:
        """Multi-hot target matrix [rows, classes] (float32), smoothed."""
        targets = np.zeros((len(table), len(self.classes)), dtype=np.float32)
        secondaries = table["secondary_labels"] if "secondary_labels" in table else [[]] * len(table)
        for row, (primary, extra) in enumerate(zip(table["primary_label"], secondaries)):
            for label in _as_label_list(extra):
                if label in self.class_index:
                    targets[row, self.class_index[label]] = secondary_value
            targets[row, self.class_index[primary]] = 1.0
        return targets * (1.0 - eps) + eps / len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds random windows and augmentation."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        weight = float(self.weights[index])
        wave = self._load(self.paths[index])
        if wave is None:
            audio, weight = np.zeros(self.n_samples, dtype=np.float32), 0.0
        else:
            audio = fit_window(wave, self.n_samples, self.window_mode, rng)
            if self.augment is not None:
                audio = self._augment(audio, int(rng.integers(2**63)))
        return {
            "audio": torch.from_numpy(audio),
            "target": torch.from_numpy(self.targets[index].copy()),
            "weight": torch.tensor(weight, dtype=torch.float32),
        }

    def _load(self, path: str) -> np.ndarray | None:
        """Decoded waveform, or None (warned once per file and counted) when it cannot be decoded."""
        try:
            return self.audio.load(path)
        except AudioDecodeError as err:
            self.num_failures += 1
            if path not in self.failed_paths:
                self.failed_paths.append(path)
                log.warning("cannot decode %s (%s); using silence with weight 0", path, err)
            return None

    def _augment(self, audio: np.ndarray, seed: int) -> np.ndarray:
        """Run the augmentation under per-item seeded global RNGs; keep the window length and dtype."""
        with seeded_global_rngs(seed):
            out = self.augment(audio, self.audio.sample_rate_hz)
        return fit_window(np.asarray(out, dtype=np.float32), self.n_samples, "center")


def _as_label_list(value: Any) -> list[str]:
    """Secondary labels as a list; None/NaN means none. A raw string means the table was not parsed."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        raise TypeError(f"secondary_labels must be parsed into a list, got the string {value!r}")
    return [str(v) for v in value]


class MixUp:
    """Batch-level waveform MixUp: each sample is mixed, with probability `prob`, with another sample.

    Partners come from a random cyclic order, so no sample is mixed with itself. The mixing weight
    `lam` (share of the sample itself) is fixed (`weight`) or drawn per sample from Beta(alpha, alpha).
    audio = lam * x_i + (1 - lam) * x_j. Targets: "max" = elementwise max(t_i, t_j) with sample weight
    max(w_i, w_j) (both calls are present at full label strength); "sum" = lam * t_i + (1 - lam) * t_j
    with weight lam * w_i + (1 - lam) * w_j. Samples with weight 0 (undecodable files) are neither mixed
    nor used as partners. Other batch keys pass through unchanged.

    Randomness: a generator seeded by `seed`; inside a DataLoader worker it is re-seeded from
    (seed, worker seed) so workers and epochs draw different mixes, reproducibly under torch.manual_seed.

    `data.mixup` (configs/data/birdclef2025.yaml) holds every argument but `seed`, which no YAML sets.
    """

    def __init__(
        self,
        *,
        prob: float,
        alpha: float | None,
        weight: float | None,
        target_mode: str,
        seed: int = 0,
    ) -> None:
        if (alpha is None) == (weight is None):
            raise ValueError("give exactly one of alpha (Beta-distributed lam) or weight (fixed lam)")
        if target_mode not in ("max", "sum"):
            raise ValueError(f"target_mode must be 'max' or 'sum', got {target_mode!r}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.prob, self.alpha, self.weight = prob, alpha, weight
        self.target_mode = target_mode
        self.seed = int(seed)
        self.epoch = 0
        self._generator: torch.Generator | None = None
        self._generator_worker_seed: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Generators do not pickle; each process seeds its own on first use.
        return {**self.__dict__, "_generator": None, "_generator_worker_seed": None}

    def set_epoch(self, epoch: int) -> None:
        """Restart the draws from (seed, epoch), so a resumed run mixes exactly as an uninterrupted one."""
        self.epoch = int(epoch)
        self._generator = None

    def _rng(self) -> torch.Generator:
        info = get_worker_info()
        worker_seed = None if info is None else int(info.seed)
        if self._generator is None or worker_seed != self._generator_worker_seed:
            entropy = [self.seed, self.epoch] if worker_seed is None else [self.seed, self.epoch, worker_seed]
            state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
            self._generator = torch.Generator().manual_seed(int(state) % 2**63)
            self._generator_worker_seed = worker_seed
        return self._generator

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        size = batch["audio"].shape[0]
        if size < 2 or self.prob == 0.0:
            return batch
        gen = self._rng()
        # A random cyclic order gives every sample a partner other than itself.
        order = torch.randperm(size, generator=gen)
        partner = torch.empty(size, dtype=torch.long)
        partner[order] = torch.roll(order, -1)
        weight = batch["weight"].cpu() if "weight" in batch else torch.ones(size)
        mixed = (torch.rand(size, generator=gen) < self.prob) & (weight > 0) & (weight[partner] > 0)
        lam = torch.where(mixed, self._lam(size, gen), torch.ones(size))

        out = dict(batch)
        out["audio"] = _mix(batch["audio"], lam, partner)
        if self.target_mode == "sum":
            out["target"] = _mix(batch["target"], lam, partner)
            new_weight = _mix(weight, lam, partner)
        else:
            out["target"] = _max(batch["target"], mixed, partner)
            new_weight = _max(weight, mixed, partner)
        if "weight" in batch:
            out["weight"] = new_weight.to(batch["weight"].device)
        return out

    def _lam(self, size: int, gen: torch.Generator) -> torch.Tensor:
        """Share of each sample itself in its mix: fixed or Beta(alpha, alpha)."""
        if self.alpha is None:
            return torch.full((size,), float(self.weight))
        # torch.distributions cannot take a generator; draw Beta from two Gammas via numpy seeded by gen.
        np_rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        return torch.from_numpy(np_rng.beta(self.alpha, self.alpha, size).astype(np.float32))


def _col(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample vector [B] on `like`'s device, shaped to broadcast against `like` [B, ...]."""
    return values.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))


def _mix(x: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """lam * x + (1 - lam) * x[partner], with a per-sample lam."""
    lam = _col(lam, x).to(x.dtype)
    return lam * x + (1.0 - lam) * x[partner.to(x.device)]


def _max(x: torch.Tensor, mixed: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """Elementwise max(x, x[partner]) where `mixed`, x elsewhere."""
    return torch.where(_col(mixed, x), torch.maximum(x, x[partner.to(x.device)]), x)


class MixUpCollate:
    """DataLoader collate_fn: torch's default_collate, then MixUp (picklable for worker processes)."""

    def __init__(self, mixup: MixUp | None) -> None:
        self.mixup = mixup

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to MixUp (called by the training loop at each epoch start)."""
        if self.mixup is not None:
            self.mixup.set_epoch(epoch)

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = default_collate(samples)
        return batch if self.mixup is None else self.mixup(batch)


def class_sample_weights(labels: Sequence[str], temperature: float) -> np.ndarray:
    """Per-sample sampling probabilities count(label)^-t (sum 1): t=0 natural frequency, t=1 equal per class.

    A class is then drawn with probability proportional to count^(1 - t).
    """
    if not 0.0 <= temperature <= 1.0:
        raise ValueError(f"temperature must be in [0, 1], got {temperature}")
    counts = pd.Series(list(labels)).value_counts()
    per_sample = counts.loc[list(labels)].to_numpy(dtype=np.float64) ** (-temperature)
    return per_sample / per_sample.sum()


def _row_factors(row_weights: Sequence[float] | None, n_rows: int) -> np.ndarray:
    """Per-row multipliers (all 1 when None), checked for length and sign."""
    if row_weights is None:
        return np.ones(n_rows, dtype=np.float64)
    factors = np.asarray(row_weights, dtype=np.float64)
    if factors.shape != (n_rows,) or (factors < 0).any():
        raise ValueError(f"row_weights must be {n_rows} non-negative numbers, got shape {factors.shape}")
    return factors


def labeled_sample_weights(table: pd.DataFrame, temperature: float, rating_weight: bool = False,
                           row_weights: Sequence[float] | None = None) -> np.ndarray:
    """Sampling probabilities over `table` rows: class-flattened by `temperature`, optionally x rating weight,
    x `row_weights` (e.g. a sampling weight for external rows); they sum to 1."""
    weights = class_sample_weights(table["primary_label"].tolist(), temperature)
    if rating_weight:
        weights = weights * rating_weights(table["rating"])
    weights = weights * _row_factors(row_weights, len(table))
    if not weights.sum() > 0:
        raise ValueError("every training row has sampling weight 0")
    return weights / weights.sum()


def make_sampler(
    table: pd.DataFrame,
    temperature: float,  # data.sampler.temperature
    num_samples: int | None = None,
    rating_weight: bool = False,
    seed: int = 0,
    row_weights: Sequence[float] | None = None,
) -> WeightedRandomSampler:
    """Sampler with replacement over `table` rows, weighted by `labeled_sample_weights`."""
    weights = labeled_sample_weights(table, temperature, rating_weight, row_weights)
    generator = torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double),
        num_samples=len(table) if num_samples is None else int(num_samples),
        replacement=True,
        generator=generator,
    )


def epoch_clips(samples_per_epoch: int | str | None, n_rows: int, labeled_s: float, window_s: float,
                bounds: Sequence[int]) -> int:
    """Clips drawn per epoch: an explicit count, one per row (None), or for `auto` one per `window_s` of
    labeled audio, clamped to `bounds` (`data.sampler.auto_bounds`)."""
    if samples_per_epoch is None:
        return n_rows
    if samples_per_epoch == "auto":
        low, high = (int(b) for b in bounds)
        return int(min(high, max(low, math.ceil(labeled_s / window_s))))
    return int(samples_per_epoch)


def labeled_seconds(paths: Iterable[str], audio: Any) -> float:
    """Total duration of the decoded training files (each file once) from the audio cache's memmaps."""
    samples = 0
    for path in set(paths):
        try:
            samples += len(audio.load(path))
        except AudioDecodeError:
            continue  # skipped by the dataset with a warning when drawn
    return samples / audio.sample_rate_hz
