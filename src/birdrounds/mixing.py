"""How labeled clips and pseudo-labeled soundscape chunks meet in a student's training set.

Every dataset here returns the labeled-clip contract `{"audio", "target", "weight"}` and draws its
randomness from a generator seeded by (seed, epoch, index), so items are reproducible and independent
of DataLoader worker count. Call `set_epoch` before each epoch (it is passed on to the wrapped datasets).

Strategies (`make_mixed_dataset(strategy=...)`):
- "mixup_max" (1st 2025): every labeled sample is mixed with a random pseudo chunk,
  audio = w * labeled + (1 - w) * pseudo with fixed w (`mix_weight`), target = elementwise max.
- "replace" (2nd 2025): with probability p a labeled sample is replaced by a pseudo chunk of the same
  class (the labeled target's argmax; a chunk belongs to class c when its prob for c > threshold).
- "concat": the labeled items followed by round(ratio * n_labeled) pseudo items.
"mixup_max" and "replace" keep the labeled dataset's length and index space, so the labeled sampler
still applies; "concat" extends it (use `sample_weights` for a weighted sampler over all items).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from birdrounds.data.audio import AudioDecodeError
from birdrounds.data.clips import fit_window
from birdrounds.contract import SCORED_CHUNK_S
from birdrounds.pseudo import file_weights
from birdrounds.rules import STRATEGIES, STRATEGY_ARGS

log = logging.getLogger(__name__)


class PseudoChunkDataset(Dataset):
    """Audio of each pseudo-labeled chunk (a `window_s` window centred on it) with its soft target row.

    `rows` needs file, start_s, end_s; `probs` is [len(rows), C]. A window longer than the chunk is
    centred on the chunk (start clamped at 0) and zero-padded at the file end. An undecodable file
    gives silence with weight 0, a warning (once per file) and an entry in `failed_paths`.
    """

    def __init__(self, rows: pd.DataFrame, probs: np.ndarray, audio: Any, window_s: float = SCORED_CHUNK_S,
                 weight: float = 1.0) -> None:
        if len(rows) != len(probs):
            raise ValueError(f"{len(rows)} rows but {len(probs)} probability rows")
        self.rows = rows.reset_index(drop=True)
        self.probs = np.asarray(probs, dtype=np.float32)
        self.audio = audio
        self.n_samples = int(round(window_s * audio.sample_rate_hz))
        self.weight = float(weight)
        self.failed_paths: list[str] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sr = self.audio.sample_rate_hz
        centre_s = (self.rows.at[index, "start_s"] + self.rows.at[index, "end_s"]) / 2
        start = max(0, int(round(centre_s * sr)) - self.n_samples // 2)
        audio = np.zeros(self.n_samples, dtype=np.float32)
        weight = self.weight
        path = str(self.rows.at[index, "file"])
        try:
            piece = self.audio.load(path)[start : start + self.n_samples]
            audio[: len(piece)] = piece
        except AudioDecodeError as err:
            weight = 0.0
            if path not in self.failed_paths:
                self.failed_paths.append(path)
                log.warning("cannot decode %s (%s); its pseudo chunks are silence with weight 0", path, err)
        return {"audio": torch.from_numpy(audio), "target": torch.from_numpy(self.probs[index].copy()),
                "weight": torch.tensor(weight, dtype=torch.float32)}


class _Mixed(Dataset):
    """Shared plumbing: epoch, per-item generator, weighted pseudo draws."""

    def __init__(self, labeled: Dataset, pseudo: PseudoChunkDataset, seed: int,
                 pseudo_weights: np.ndarray | None = None) -> None:
        if len(pseudo) == 0:
            raise ValueError("no pseudo-labeled chunks to mix with")
        self.labeled, self.pseudo = labeled, pseudo
        self.seed, self.epoch = int(seed), 0
        weights = np.ones(len(pseudo)) if pseudo_weights is None else np.asarray(pseudo_weights, dtype=np.float64)
        if len(weights) != len(pseudo) or weights.min() < 0:
            raise ValueError("pseudo_weights must be non-negative, one per pseudo chunk")
        self.pseudo_weights = weights if weights.sum() > 0 else np.ones(len(pseudo))
        self._all = np.arange(len(pseudo))
        self._all_cdf = np.cumsum(self.pseudo_weights)  # reused by every unrestricted draw

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds the draws; passed on to the wrapped datasets."""
        self.epoch = int(epoch)
        for part in (self.labeled, self.pseudo):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        # The trailing 1 keeps this stream apart from the labeled dataset's own (seed, epoch, index).
        return np.random.default_rng([self.seed, self.epoch, int(index), 1])

    def _draw(self, rng: np.random.Generator, candidates: np.ndarray | None = None) -> int:
        """A pseudo chunk index drawn by `pseudo_weights` among `candidates` (all by default)."""
        pool = self._all if candidates is None else candidates
        cdf = self._all_cdf if candidates is None else np.cumsum(self.pseudo_weights[pool])
        if cdf[-1] <= 0:
            return int(pool[rng.integers(len(pool))])
        return int(pool[min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(pool) - 1)])


class MixupMaxDataset(_Mixed):
    """Each labeled item mixed with a random pseudo chunk: w * x + (1 - w) * x', target max, labeled weight."""

    def __init__(self, labeled: Dataset, pseudo: PseudoChunkDataset, *, mix_weight: float, seed: int,
                 pseudo_weights: np.ndarray | None = None) -> None:
        super().__init__(labeled, pseudo, seed, pseudo_weights)
        if not 0.0 < mix_weight <= 1.0:
            raise ValueError(f"mix_weight must be in (0, 1], got {mix_weight}")
        self.mix_weight = float(mix_weight)

    def __len__(self) -> int:
        return len(self.labeled)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.labeled[index])
        other = self.pseudo[self._draw(self._rng(index))]
        if float(other["weight"]) == 0.0:  # an undecodable pseudo file would only add silence and a bogus target
            return item
        extra = fit_window(other["audio"].numpy(), len(item["audio"]), "center")
        item["audio"] = self.mix_weight * item["audio"] + (1 - self.mix_weight) * torch.from_numpy(extra)
        item["target"] = torch.maximum(item["target"], other["target"])
        return item


class ReplaceDataset(_Mixed):
    """With probability `replace_prob`, a labeled item becomes a pseudo chunk of its class (if any)."""

    def __init__(self, labeled: Dataset, pseudo: PseudoChunkDataset, *, replace_prob: float,
                 class_threshold: float, seed: int, pseudo_weights: np.ndarray | None = None,
                 labeled_classes: Sequence[int] | None = None) -> None:
        super().__init__(labeled, pseudo, seed, pseudo_weights)
        if labeled_classes is None:
            labeled_classes = np.asarray(labeled.targets).argmax(axis=1)  # ClipDataset: primary label is 1
        self.labeled_classes = np.asarray(labeled_classes, dtype=int)
        self.replace_prob = float(replace_prob)
        self.pools = {c: np.flatnonzero(pseudo.probs[:, c] > class_threshold) for c in np.unique(self.labeled_classes)}

    def __len__(self) -> int:
        return len(self.labeled)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        pool = self.pools[self.labeled_classes[index]]
        if rng.random() < self.replace_prob and len(pool):
            return self.pseudo[self._draw(rng, pool)]
        return self.labeled[index]


class ConcatPseudoDataset(_Mixed):
    """Labeled items 0..n-1, then round(ratio * n) pseudo items, each a (weighted) random chunk."""

    def __init__(self, labeled: Dataset, pseudo: PseudoChunkDataset, *, ratio: float, seed: int,
                 pseudo_weights: np.ndarray | None = None) -> None:
        super().__init__(labeled, pseudo, seed, pseudo_weights)
        if ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {ratio}")
        self.n_labeled = len(labeled)
        self.n_pseudo = int(round(ratio * self.n_labeled))

    def __len__(self) -> int:
        return self.n_labeled + self.n_pseudo

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < self.n_labeled:
            return self.labeled[index]
        return self.pseudo[self._draw(self._rng(index))]

    def sample_weights(self, labeled_weights: np.ndarray) -> np.ndarray:
        """Sampling probabilities over all items: labeled by `labeled_weights`, pseudo uniform, at the ratio."""
        lab = np.asarray(labeled_weights, dtype=np.float64)
        lab = lab / lab.sum() * self.n_labeled / len(self)
        return np.concatenate([lab, np.full(self.n_pseudo, 1.0 / len(self))])


def make_mixed_dataset(labeled: Dataset, pseudo: PseudoChunkDataset, *, strategy: str, seed: int,
                       file_weighted: bool, **strategy_args: Any) -> Dataset:
    """The student's training set for `strategy`, built with that strategy's own arguments (`pseudo.mixing`:
    mix_weight; replace_prob and class_threshold; ratio); `file_weighted` draws chunks by `file_weights`
    (1st 2025)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    missing = [key for key in STRATEGY_ARGS[strategy] if key not in strategy_args]
    if missing:  # e.g. pseudo.mixing.strategy=concat over a preset written for mixup_max
        raise ValueError(f"pseudo.mixing.{missing[0]}: strategy {strategy} needs it (add "
                         f"+pseudo.mixing.{missing[0]}=<value>; configs/pseudo/*.yaml use each strategy)")
    weights = file_weights(pseudo.rows, pseudo.probs) if file_weighted else None
    dataset = {"mixup_max": MixupMaxDataset, "replace": ReplaceDataset, "concat": ConcatPseudoDataset}[strategy]
    # Another strategy's arguments (left by the preset a strategy override replaced) are not this one's.
    own = {key: strategy_args[key] for key in STRATEGY_ARGS[strategy]}
    return dataset(labeled, pseudo, seed=seed, pseudo_weights=weights, **own)
