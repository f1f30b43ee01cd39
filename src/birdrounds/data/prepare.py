"""From the `data` config to validated tables, a filled audio cache and CV folds, ready for training."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig

from birdrounds.config import ConfigError
from birdrounds.data.audio import AudioCache, CacheBuildSummary
from birdrounds.data.layout import BirdCLEFData, load_birdclef, load_external
from birdrounds.data.split import ALWAYS_TRAIN, assign_folds

log = logging.getLogger(__name__)

# The train table's marker of rows appended from data.external (Xeno-canto): True there, False for the
# competition's own rows. Not a fold id: fold -1 (split.ALWAYS_TRAIN) also holds single-recording classes.
EXTERNAL_COLUMN = "is_external"


@dataclass
class PreparedData:
    """Everything the rounds need from the data folder, with what had to be skipped."""

    data: BirdCLEFData
    audio: AudioCache
    folds: np.ndarray  # one fold id per train row; -1 = always in training (external rows, single-group classes)
    cache_summary: CacheBuildSummary
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    n_external: int = 0  # rows appended from data.external folders (EXTERNAL_COLUMN)

    @property
    def external(self) -> np.ndarray:
        """Per train row: appended from data.external (never held out, weighted by data.external.*)."""
        column = self.data.train.get(EXTERNAL_COLUMN)
        return np.zeros(len(self.data.train), dtype=bool) if column is None else column.to_numpy(dtype=bool)

    def summary(self) -> dict:
        """Counts for a run's summary: rows, files, and what was skipped and why."""
        return {
            "classes": len(self.data.classes),
            "train_clips": len(self.data.train),
            "external_clips": self.n_external,
            "train_soundscapes": len(self.data.soundscapes),
            "val_soundscapes": len(self.data.val_soundscapes),
            "missing_listed_files": len(self.data.missing_files),
            "unreadable_audio_files": len(self.skipped),
            "unreadable_audio": [p for p, _ in self.skipped],
        }


def synthesize(spec_cfg: DictConfig, root: str | Path, num_workers: int = 2) -> Path:
    """Generate the synthetic dataset at `root` unless an identical one is already there."""
    from birdrounds.data.synthetic import TargetTaken, generate

    try:
        return generate(Path(root), instantiate(spec_cfg), num_workers=num_workers)
    except TargetTaken as err:  # e.g. data made by an older default: the user decides what to delete
        remedy = "remove that folder to generate it anew, or " if err.ours else ""
        raise ConfigError(f"data.root: {err.reason}; {remedy}set data.root (or BIRDROUNDS_HOME) "
                          "to another folder") from None


def split_seed(data_cfg: DictConfig, seed: int) -> int:
    """The seed of the fold assignment: `data.split_seed`, or the run's seed where it is null or absent."""
    value = data_cfg.get("split_seed")
    return int(seed) if value is None else int(value)


def prepare_data(data_cfg: DictConfig, seed: int = 0, progress: bool = True) -> PreparedData:
    """Synthesize if configured, load and validate the folder, fill the cache, drop unreadable files.

    The folds are assigned with `data_cfg.split_seed`, or with `seed` (the run's) where that is null.
    """
    if data_cfg.get("synth") is not None:
        synthesize(data_cfg.synth, data_cfg.root, num_workers=data_cfg.num_workers)
    data = load_birdclef(
        data_cfg.root, train_csv=data_cfg.train_csv, taxonomy_csv=data_cfg.taxonomy_csv,
        sample_submission=data_cfg.sample_submission, train_audio_dir=data_cfg.train_audio_dir,
        soundscapes_dir=data_cfg.soundscapes_dir, val_soundscapes_dir=data_cfg.val_soundscapes_dir,
        val_solution=data_cfg.val_solution, on_missing_file=data_cfg.on_missing_file,
    )
    external = load_external(list(data_cfg.external.dirs), data.classes, data_cfg.external.max_per_class) \
        if data_cfg.external.enabled else None
    audio = AudioCache(data_cfg.cache_dir, data_cfg.sample_rate_hz, dtype=data_cfg.cache_dtype)
    external_paths = [] if external is None else list(external["path"])
    paths = [*data.train["path"], *external_paths, *map(str, data.soundscapes), *map(str, data.val_soundscapes)]
    summary = audio.build(paths, num_workers=data_cfg.num_workers, progress=progress)
    bad = {str(p) for p, _ in summary.skipped}
    if bad:
        # Unreadable files were named by the cache build; here they leave every list they were in.
        data.train = data.train[~data.train["path"].isin(bad)].reset_index(drop=True)
        data.soundscapes = [p for p in data.soundscapes if str(p) not in bad]
        data.val_soundscapes = [p for p in data.val_soundscapes if str(p) not in bad]
    if data.train.empty:
        raise ConfigError(f"data.train_csv: no usable rows in {data.paths['train_csv']} "
                          f"({len(data.missing_files)} listed files missing, {len(bad)} unreadable audio files)")
    folds = assign_folds(data.train, n_folds=data_cfg.n_folds, seed=split_seed(data_cfg, seed), audio=audio)
    n_external = 0
    if external is not None and len(external):
        external = external[~external["path"].isin(bad)]
        n_external = len(external)
        data.train = pd.concat([data.train.assign(**{EXTERNAL_COLUMN: False}),
                                external.assign(**{EXTERNAL_COLUMN: True})], ignore_index=True)
        # External rows are never held out: validation stays on the competition's own clips.
        folds = np.concatenate([folds, np.full(n_external, ALWAYS_TRAIN)])
    return PreparedData(data=data, audio=audio, folds=folds, cache_summary=summary,
                        skipped=list(summary.skipped), n_external=n_external)
