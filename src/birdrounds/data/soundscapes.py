"""Fixed-window chunks over long unlabeled recordings (soundscapes), with their BirdCLEF row ids."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from birdrounds.data.audio import AudioDecodeError
from birdrounds.contract import SCORED_CHUNK_S, row_id  # the scored chunk and the row_id rule, defined once

log = logging.getLogger(__name__)

ROW_COLUMNS = ["row_id", "file", "stem", "start_s", "end_s"]


def window_starts(n_samples: int, window: int, stride: int, min_last: int) -> list[int]:
    """Window start offsets (samples) on the stride grid covering a recording of `n_samples`.

    Every full window is kept. After the last full window, one zero-padded window on the grid is added
    when it covers at least `min_last` samples not yet covered. A recording shorter than one window
    still gives one (padded) window at 0.
    """
    if n_samples < window:
        return [0]
    starts = list(range(0, n_samples - window + 1, stride))
    next_start = starts[-1] + stride
    new_audio = n_samples - max(next_start, starts[-1] + window)
    if new_audio >= max(min_last, 1):
        starts.append(next_start)
    return starts


class SoundscapeChunks(Dataset):
    """Windows of `window_s` every `stride_s` over each recording; `rows` describes them in order.

    `rows` columns: row_id (stem + window end second), file (path), stem, start_s, end_s (nominal:
    start_s + window_s, also for a padded trailing window). A 60-s file with 5-s windows gives exactly
    12 rows ending 5..60; a trailing remainder becomes a zero-padded row only if it holds at least
    `min_last_s` of new audio (default 2.5 s: half a window), so a 62-s file still gives 12 rows.

    Each file is loaded once at init through the audio source to learn its exact (resampled) length;
    with the decoded-audio cache that is a memmap open, with direct decoding a full decode. Files that
    cannot be decoded (or are empty) are skipped with a warning and listed in `skipped` as
    (path, reason). `__getitem__` keeps the last loaded file, so iterating in order decodes each once.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        audio: Any,
        window_s: float = SCORED_CHUNK_S,
        stride_s: float = SCORED_CHUNK_S,
        min_last_s: float = 2.5,
    ) -> None:
        if window_s <= 0 or stride_s <= 0:
            raise ValueError("window_s and stride_s must be positive")
        self.audio = audio
        sr = audio.sample_rate_hz
        self.window_s = float(window_s)
        self.n_samples = int(round(window_s * sr))
        self.stride = int(round(stride_s * sr))
        self.min_last = int(round(min_last_s * sr))
        self.skipped: list[tuple[str, str]] = []
        self.failed_paths: list[str] = []
        self._last: tuple[str, np.ndarray] | None = None
        frames = [self._file_rows(str(p)) for p in paths]
        frames = [f for f in frames if f is not None]
        self.rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ROW_COLUMNS)

    def _file_rows(self, path: str) -> pd.DataFrame | None:
        """Rows for one file, or None (warned, recorded in `skipped`) when it cannot be decoded."""
        try:
            n = len(self.audio.load(path))
        except AudioDecodeError as err:
            return self._skip(path, str(err) or type(err).__name__)
        if n == 0:
            return self._skip(path, "empty")
        sr = self.audio.sample_rate_hz
        stem = Path(path).stem
        start_s = np.array(window_starts(n, self.n_samples, self.stride, self.min_last)) / sr
        end_s = start_s + self.window_s
        return pd.DataFrame({
            "row_id": [row_id(stem, e) for e in end_s],
            "file": path,
            "stem": stem,
            "start_s": start_s,
            "end_s": end_s,
        })

    def _skip(self, path: str, reason: str) -> None:
        log.warning("skipping soundscape %s: %s", path, reason)
        self.skipped.append((path, reason))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.rows.at[index, "file"]
        start = int(round(self.rows.at[index, "start_s"] * self.audio.sample_rate_hz))
        chunk = np.zeros(self.n_samples, dtype=np.float32)
        wave = self._load(path)
        if wave is not None:
            piece = wave[start : start + self.n_samples]
            chunk[: len(piece)] = piece
        return {"audio": torch.from_numpy(chunk), "index": torch.tensor(index, dtype=torch.long)}

    def _load(self, path: str) -> np.ndarray | None:
        """The file's waveform, reusing the last one; None (warned once) if it stopped being decodable."""
        if self._last is not None and self._last[0] == path:
            return self._last[1]
        try:
            wave = self.audio.load(path)
        except AudioDecodeError as err:
            if path not in self.failed_paths:
                self.failed_paths.append(path)
                log.warning("cannot decode %s (%s); its chunks are silence", path, err)
            return None
        self._last = (path, wave)
        return wave

    def __getstate__(self) -> dict[str, Any]:
        # Don't ship the last decoded file to DataLoader workers.
        return {**self.__dict__, "_last": None}
