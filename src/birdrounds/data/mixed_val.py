"""A soundscape-like validation set built from the held-out fold alone (`val_mixed_auc`).

BirdCLEF 2025 ships no labeled soundscapes, so on real data only `val_clip_auc` (held-out focal clips)
exists, and it does not track the soundscape score. This set places the held-out clips' calls into
real train-soundscape audio and scores 5-s rows in Kaggle format, like the hidden test.

Construction (`build_mixed_validation`), a pure function of its inputs and `seed`:

- Backgrounds: 5-s segments of (at most `max_background_files`, seeded choice of) train soundscapes,
  ranked by RMS in a bird band (1-10 kHz); the quietest `quiet_fraction` of them are the candidates,
  since a soundscape's own birds are unknown and would be scored as absent. Soundscapes serve only
  as backgrounds: nothing of their (unknown) labels is used.
- Calls: each row gets 0, 1 or 2 held-out clips (probabilities `calls_per_row`). From a clip a
  segment of `call_s` seconds (uniform) is cut where the clip is loud (a window with at least half
  the clip's best window energy), scaled so that its active level (RMS of its loudest quarter of
  50-ms frames) lies `snr_db` (uniform) over the background segment's RMS, like the synthetic
  soundscapes' calls (about -6..+11 dB over the background), and added at a random offset. With
  `distance` set, each call is first heard from afar (`far_away`: high frequencies absorbed, a
  reverberant tail), as calls in field recordings mostly are.
- Labels: the clip's primary label is positive; its secondary labels (those in the class list) are
  positive too, as `clip_auc` counts them (targets >= 0.5). Rows with no call are all-negative.
- Row ids: `mixed<k>_<end_s>`, 12 rows per pseudo-file k (`row_id`), so the solution has Kaggle's
  `row_id` + one 0/1 column per class.
- Background subtraction (`subtract_background`, on by default in the configs): the soundscape
  segments hold birds of their own, unknown, which the solution scores as absent, so a model that
  hears them is penalized for it. With it, every background segment used is also scored alone (extra
  items `background<j>`, outside the solution) and a row's score per class is the model's probability
  on the row minus that on its background alone: what the added calls changed. A bird already in the
  background raises both and cancels. `MixedValidation.score` computes the AUC either way.

Only the held-out clips are mixed in: the caller passes the held-out fold's table (`prepared.folds ==
data.fold`, never external rows). Background audio comes from train soundscapes, which
students also see (with pseudo-labels); no held-out clip reaches training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import signal
from torch.utils.data import Dataset

from birdrounds.config import legacy_under, shipped_config
from birdrounds.data.audio import AudioDecodeError
from birdrounds.data.clips import _as_label_list
from birdrounds.data.layout import read_table
from birdrounds.contract import SCORED_CHUNK_S, row_id
from birdrounds.metrics import soundscape_arrays, soundscape_auc

log = logging.getLogger(__name__)

ROWS_PER_FILE = 12  # 60-s pseudo-files, like the test soundscapes
BIRD_BAND_HZ = (1000.0, 10000.0)
FRAME_S = 0.05


@dataclass(frozen=True)
class _Call:
    path: str
    clip_start: int  # samples into the clip
    length: int  # samples
    offset: int  # where in the 5-s row it starts
    gain: float
    distance: float = 0.0  # 0 = as recorded; up to 1 = far away (see `far_away`)
    seed: int = 0  # of the reverb tail


def far_away(piece: np.ndarray, sr: int, distance: float, seed: int) -> np.ndarray:
    """A call heard from `distance` (0..1): high frequencies absorbed, a reverberant tail added.

    Air and foliage absorb high frequencies more (gain exp(-distance * f / 8 kHz): -8.7 dB at 8 kHz
    from the farthest), and a far call arrives with more reverberation (an exponentially decaying
    noise tail, RT60 0.1-0.8 s, mixed in with weight `distance`). The result, longer by the tail, keeps
    the dry call's active level, so the row's SNR stays what was drawn.
    """
    if distance <= 0.0 or len(piece) == 0:
        return piece
    rng = np.random.default_rng([seed, 0x666172])
    rt60 = 0.1 + 0.7 * distance
    t = np.arange(int(round(rt60 * sr))) / sr
    tail = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)
    tail /= np.sqrt(np.sum(tail**2)) + 1e-12
    wet = signal.fftconvolve(piece, tail)
    out = np.concatenate([piece, np.zeros(len(tail) - 1, dtype=piece.dtype)]) * (1 - 0.5 * distance)
    out = out + distance * wet * (np.sqrt(np.mean(piece.astype(np.float64) ** 2)) /
                                  (np.sqrt(np.mean(wet[: len(piece)] ** 2)) + 1e-12))
    spectrum = np.fft.rfft(out)
    spectrum *= np.exp(-distance * np.fft.rfftfreq(len(out), 1 / sr) / 8000.0)
    out = np.fft.irfft(spectrum, n=len(out))
    level, dry = _active_level(out, sr), _active_level(piece, sr)
    return (out * (dry / level if level > 1e-12 else 0.0)).astype(np.float32)


def _band_rms(wave: np.ndarray, sr: int, n: int) -> np.ndarray:
    """RMS in the bird band of each full `n`-sample segment of `wave` (a trailing remainder is dropped)."""
    high = min(BIRD_BAND_HZ[1], 0.45 * sr)
    sos = signal.butter(4, (BIRD_BAND_HZ[0], high), "bandpass", fs=sr, output="sos")
    filtered = signal.sosfilt(sos, np.asarray(wave, dtype=np.float64))
    k = len(filtered) // n
    return np.sqrt((filtered[: k * n].reshape(k, n) ** 2).mean(axis=1) + 1e-20)


def _active_level(piece: np.ndarray, sr: int) -> float:
    """RMS of the loudest quarter of 50-ms frames: a call's level, not diluted by its pauses."""
    frame = max(1, int(FRAME_S * sr))
    k = max(1, len(piece) // frame)
    padded = np.zeros(k * frame)
    padded[: min(len(piece), k * frame)] = piece[: k * frame]
    energies = np.sort((padded.reshape(k, frame) ** 2).mean(axis=1))[::-1]
    top = energies[: max(1, k // 4)]
    return float(np.sqrt(top.mean() + 1e-20))


def _loud_start(wave: np.ndarray, length: int, sr: int, rng: np.random.Generator) -> int:
    """A start (samples) of a `length` window in `wave` whose energy is >= half the best window's."""
    if len(wave) <= length:
        return 0
    hop = max(1, sr // 4)
    starts = np.arange(0, len(wave) - length + 1, hop)
    cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(wave, dtype=np.float64) ** 2)])
    energy = cumulative[starts + length] - cumulative[starts]
    good = starts[energy >= 0.5 * energy.max()]
    return int(rng.choice(good))


class MixedValidation(Dataset):
    """5-s rows rendered from a plan: background segment + scaled call segments; `rows` and `solution`.

    Items are {"audio": float32 [n], "index": row number}, like SoundscapeChunks. The first
    `len(solution)` rows are the scored ones; with background subtraction, rows after them are the
    background segments alone (`rows.background_row` points a scored row at its own). `score` turns
    the items' probabilities into the AUC.
    """

    def __init__(self, rows: pd.DataFrame, calls: list[list[_Call]], solution: pd.DataFrame, audio: Any,
                 n_samples: int) -> None:
        self.rows, self.calls, self.solution = rows, calls, solution
        self.audio, self.n_samples = audio, n_samples

    @property
    def subtracts_background(self) -> bool:
        return "background_row" in self.rows.columns

    def score(self, probs: np.ndarray, index: np.ndarray, classes: Sequence[str]) -> float:
        """Macro AUC of the scored rows from probabilities [N, C] of items `index` (any order, each item
        at least once), minus each row's background-alone probabilities when the set subtracts them."""
        return soundscape_auc(*self._row_scores(probs, index), self.solution, classes)

    def arrays(self, probs: np.ndarray, index: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(truth, scores) of the scored rows, as `score` compares them (for a bootstrap interval)."""
        return soundscape_arrays(*self._row_scores(probs, index), self.solution, classes)

    def _row_scores(self, probs: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each scored row's probabilities (background-subtracted where the set does so) and its row ids."""
        by_item = np.full((len(self.rows), probs.shape[1]), np.nan, dtype=np.float64)
        by_item[np.asarray(index)] = probs
        if np.isnan(by_item).any():
            raise ValueError("mixed validation: some items have no prediction")
        n = len(self.solution)
        scores = by_item[:n]
        if self.subtracts_background:
            scores = scores - by_item[self.rows["background_row"].to_numpy()[:n]]
        return scores, self.rows["row_id"].to_numpy()[:n]

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, path: str) -> np.ndarray | None:
        try:
            return self.audio.load(path)
        except AudioDecodeError as err:
            log.warning("mixed validation: cannot decode %s (%s); left out of the row", path, err)
            return None

    def render(self, index: int) -> np.ndarray:
        """The row's waveform (float32)."""
        out = np.zeros(self.n_samples, dtype=np.float32)
        background = self._load(self.rows.at[index, "background"])
        if background is not None:
            start = int(self.rows.at[index, "background_start"])
            piece = np.asarray(background[start : start + self.n_samples], dtype=np.float32)
            out[: len(piece)] = piece
        for call in self.calls[index]:
            wave = self._load(call.path)
            if wave is None:
                continue
            piece = np.asarray(wave[call.clip_start : call.clip_start + call.length], dtype=np.float32)
            piece = far_away(piece, self.audio.sample_rate_hz, call.distance, call.seed)
            piece = piece[: self.n_samples - call.offset]
            out[call.offset : call.offset + len(piece)] += call.gain * piece
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"audio": torch.from_numpy(self.render(index)), "index": torch.tensor(index, dtype=torch.long)}


def _empty_segments(path: str | Path) -> set[str]:
    """Row ids whose every class column is 0 in a Kaggle-solution-format CSV (`row_id` + class columns)."""
    table = read_table(Path(path), ("row_id",), "mixed validation background_labels")
    if len(table.columns) < 2:
        raise ValueError(f"mixed validation: background_labels {path} needs row_id and class columns")
    values = table.drop(columns="row_id").to_numpy(dtype=np.float64)
    return set(table.loc[values.max(axis=1) <= 0, "row_id"].astype(str))


def _quiet_backgrounds(soundscapes: Sequence[str | Path], audio: Any, n: int, quiet_fraction: float,
                       max_files: int, rng: np.random.Generator, allowed: set[str] | None = None) -> pd.DataFrame:
    """(file, start sample, rms) of the quietest `quiet_fraction` of full 5-s soundscape segments
    (only those whose row id is in `allowed`, when given)."""
    paths = sorted(str(p) for p in soundscapes)
    if len(paths) > max_files:
        paths = sorted(rng.choice(paths, size=max_files, replace=False).tolist())
    records = []
    for path in paths:
        try:
            wave = audio.load(path)
        except AudioDecodeError as err:
            log.warning("mixed validation: skipping background %s (%s)", path, err)
            continue
        if len(wave) < n:
            continue
        band = _band_rms(wave, audio.sample_rate_hz, n)
        for k, value in enumerate(band):
            if allowed is None or row_id(Path(path).stem, (k + 1) * n / audio.sample_rate_hz) in allowed:
                records.append((path, k * n, float(value)))
    if not records:
        raise ValueError("mixed validation: no train soundscape gives a full 5-s background segment"
                         + (" listed as empty in background_labels" if allowed is not None else ""))
    table = pd.DataFrame(records, columns=["file", "start", "band_rms"])
    table = table.sort_values(["band_rms", "file", "start"], kind="stable").reset_index(drop=True)
    keep = max(1, int(round(quiet_fraction * len(table))))
    return table.iloc[:keep].reset_index(drop=True)


def build_mixed_validation(
    val_table: pd.DataFrame,
    soundscapes: Sequence[str | Path],
    audio: Any,
    classes: Sequence[str],
    *,
    n_rows: int,
    seed: int,
    snr_db: Sequence[float],
    quiet_fraction: float,
    calls_per_row: Sequence[float],
    call_s: Sequence[float],
    max_background_files: int,
    background_labels: str | Path | None,
    distance: Sequence[float],
    subtract_background: bool,
    distance_from_snr: bool,
    chunk_s: float = SCORED_CHUNK_S,
) -> MixedValidation:
    """The mixed validation set (see the module doc); `val_table` must hold the held-out clips only.
    `data.mixed_val` holds every keyword but `chunk_s` (`mixed_validation_from_config` passes them).

    `background_labels`: a CSV in Kaggle solution format over train-soundscape 5-s rows (e.g. segments
    a person listened to, or the synthetic data's truth); only rows labeled all-zero serve as backgrounds.
    `distance`: (low, high) of a uniform draw per call in [0, 1], rendered by `far_away`; (0, 0) = as recorded.
    `subtract_background`: also score each background segment used alone, and score rows by the change
    (module doc); the scored rows themselves are the same either way.
    `distance_from_snr`: a call's distance follows its drawn SNR instead of its own uniform draw, the
    loudest (snr_db high) at distance low and the faintest at distance high, as a call fades with
    distance; the rows, calls and levels are otherwise the same."""
    if not 0.0 < quiet_fraction <= 1.0:
        raise ValueError(f"quiet_fraction must be in (0, 1], got {quiet_fraction}")
    if len(distance) != 2 or not 0.0 <= distance[0] <= distance[1] <= 1.0:
        raise ValueError(f"distance: (low, high) with 0 <= low <= high <= 1, got {list(distance)}")
    probs = np.asarray(calls_per_row, dtype=np.float64)
    if probs.ndim != 1 or len(probs) < 1 or (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(f"calls_per_row: probabilities of 0, 1, 2 ... calls per row, got {list(calls_per_row)}")
    probs = probs / probs.sum()
    if len(val_table) == 0:
        raise ValueError("mixed validation: no held-out clips to mix in")
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    sr = audio.sample_rate_hz
    n = int(round(chunk_s * sr))
    rng = np.random.default_rng([seed, 0x6D697864])
    allowed = _empty_segments(background_labels) if background_labels else None
    backgrounds = _quiet_backgrounds(soundscapes, audio, n, quiet_fraction, max_background_files, rng, allowed)

    clips = val_table.reset_index(drop=True)
    waves: dict[str, np.ndarray | None] = {}

    def clip_wave(path: str) -> np.ndarray | None:
        if path not in waves:
            try:
                waves[path] = np.asarray(audio.load(path), dtype=np.float32)
            except AudioDecodeError as err:
                log.warning("mixed validation: skipping clip %s (%s)", path, err)
                waves[path] = None
        return waves[path]

    labels = np.zeros((n_rows, len(classes)), dtype=np.int64)
    rows, calls = [], []
    for k in range(n_rows):
        bg = backgrounds.iloc[int(rng.integers(len(backgrounds)))]
        bg_wave = audio.load(bg["file"])
        bg_rms = float(np.sqrt(np.mean(np.asarray(bg_wave[bg["start"] : bg["start"] + n], np.float64) ** 2) + 1e-20))
        row_calls = []
        for _ in range(int(rng.choice(len(probs), p=probs))):
            clip = clips.iloc[int(rng.integers(len(clips)))]
            wave = clip_wave(str(clip["path"]))
            length = int(rng.uniform(*call_s) * sr)
            snr = float(rng.uniform(*snr_db))
            if wave is None or not len(wave):
                continue
            length = min(length, len(wave), n)
            start = _loud_start(wave, length, sr, rng)
            offset = int(rng.integers(0, n - length + 1))
            level = _active_level(wave[start : start + length], sr)
            if level < 1e-8:
                continue
            far = {}
            if distance[1] > 0:  # drawn only then, so sets without distance keep their rows
                far = {"distance": float(rng.uniform(*distance)), "seed": int(rng.integers(2**31))}
                if distance_from_snr:  # the same draws either way; only the distance follows the level
                    fade = (snr_db[1] - snr) / (snr_db[1] - snr_db[0]) if snr_db[1] > snr_db[0] else 0.5
                    far["distance"] = float(distance[0] + (distance[1] - distance[0]) * fade)
            row_calls.append(_Call(str(clip["path"]), start, length, offset, bg_rms * 10 ** (snr / 20) / level, **far))
            labels[k, index[clip["primary_label"]]] = 1
            for label in _as_label_list(clip.get("secondary_labels")):
                if label in index:
                    labels[k, index[label]] = 1
        file_k, position = divmod(k, ROWS_PER_FILE)
        rows.append({"row_id": row_id(f"mixed{file_k}", (position + 1) * chunk_s), "background": bg["file"],
                     "background_start": int(bg["start"]), "n_calls": len(row_calls)})
        calls.append(row_calls)
    rows_table = pd.DataFrame(rows)
    solution = pd.DataFrame(labels, columns=classes)
    solution.insert(0, "row_id", rows_table["row_id"])
    if subtract_background:  # one extra item per background segment used, after the scored rows
        segment = rows_table.groupby(["background", "background_start"], sort=False).ngroup().to_numpy()
        rows_table["background_row"] = n_rows + segment  # segments numbered in order of first use
        alone = rows_table.drop_duplicates("background_row")[["background", "background_start", "background_row"]]
        alone = alone.assign(row_id=[f"background{j}" for j in range(len(alone))], n_calls=0)
        rows_table = pd.concat([rows_table, alone[rows_table.columns]], ignore_index=True)
        calls += [[] for _ in range(len(alone))]
    log.info("mixed validation: %d rows from %d held-out clips over %d quiet background segments "
             "(%d rows without a call)%s", n_rows, len(clips), len(backgrounds),
             int((rows_table["n_calls"].iloc[:n_rows] == 0).sum()),
             f", each scored against its background alone ({len(rows_table) - n_rows} segments)" if subtract_background else "")
    return MixedValidation(rows_table, calls, solution, audio, n)


def mixed_validation_from_config(cfg: Any, val_table: pd.DataFrame, soundscapes: Sequence[str | Path], audio: Any,
                                 classes: Sequence[str]) -> MixedValidation | None:
    """`data.mixed_val` -> the set, or None when it is off (null, enabled=false) or has nothing to mix.

    A key the node lacks takes its value from `config.LEGACY` where it was added after runs were recorded (an
    older run's config builds the set that run was scored on), else (and a null) from the shipped `data.mixed_val`.
    """
    if cfg is None or not cfg.get("enabled", True):
        return None
    if len(val_table) == 0 or not soundscapes:
        log.warning("mixed validation: off (%s)", "no held-out clips" if len(val_table) == 0 else "no train soundscapes")
        return None
    keys = ("n_rows", "seed", "snr_db", "quiet_fraction", "calls_per_row", "call_s", "max_background_files",
            "background_labels", "distance", "subtract_background", "distance_from_snr")
    values = {**legacy_under("data.mixed_val"), **{key: cfg[key] for key in keys if key in cfg}}
    # A null counts as not given, as it always has (but background_labels: null means no labels file).
    unset = [key for key in keys if values.get(key) is None and key != "background_labels"]
    if unset:  # a hand-written node: composing the shipped tree costs ~0.1 s, which a run's complete node skips
        shipped = shipped_config("data.mixed_val", "data=birdclef2025")
        values.update({key: shipped[key] for key in unset})
    kwargs = {key: values.get(key) for key in keys}
    for key in ("snr_db", "calls_per_row", "call_s", "distance"):
        kwargs[key] = [float(v) for v in kwargs[key]]
    return build_mixed_validation(val_table, soundscapes, audio, classes, **kwargs)
