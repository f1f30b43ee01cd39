"""Pseudo-labels for soundscapes: teacher inference, de-noising transforms, the Parquet table, weights.

Transforms act on a probability matrix [n_chunks, n_classes] plus a boolean keep-mask [n_chunks]
(chunks a transform drops are marked False; the matrix keeps its shape so rows stay aligned with the
chunk table). Every transform is called as `t(probs, keep, round_idx) -> (probs, keep)`, where
`round_idx` is the student round the labels are made for (1 = first pseudo-labeling round); one with
`uses_files = True` also gets `files=` (each chunk's soundscape file, rows of a file contiguous).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from birdrounds.artifacts import atomic_open, rebuild_hint
from birdrounds.config import ConfigError
from birdrounds.data.soundscapes import SoundscapeChunks
from birdrounds.contract import SCORED_CHUNK_S
from birdrounds.postprocess import overlap_to_chunks, scale_by_file_max

log = logging.getLogger(__name__)

PROVENANCE_KEY = b"birdrounds.provenance"
ROW_KEYS = ["row_id", "file", "start_s", "end_s"]
# Teacher inference outside a run's config (rounds pass train.batch_size): windows per batch, and how many
# batches a resumable job computes between saved parts.
INFER_BATCH_SIZE = 16
SAVE_EVERY_BATCHES = 10


# ---------------------------------------------------------------- de-noising transforms


class Power:
    """p ** k with k = exponents[round_idx - 1] (the last one for later rounds); 1st place 2025."""

    def __init__(self, exponents: float | Sequence[float]) -> None:
        self.exponents = [float(exponents)] if isinstance(exponents, (int, float)) else [float(e) for e in exponents]
        if not self.exponents or min(self.exponents) <= 0:
            raise ValueError(f"exponents must be positive, got {exponents!r}")

    def exponent(self, round_idx: int) -> float:
        """The exponent used for student round `round_idx` (>= 1)."""
        return self.exponents[min(max(round_idx, 1), len(self.exponents)) - 1]

    def __call__(self, probs: np.ndarray, keep: np.ndarray, round_idx: int = 1) -> tuple[np.ndarray, np.ndarray]:
        return np.power(probs, self.exponent(round_idx)), keep

    def describe(self, round_idx: int = 1) -> str:
        return f"power(k={self.exponent(round_idx):g})"


class Threshold:
    """Probabilities below `threshold` set to 0; optionally drop chunks whose max < `keep_threshold` (2nd 2025)."""

    def __init__(self, threshold: float, keep_threshold: float | None) -> None:
        self.threshold = float(threshold)
        self.keep_threshold = None if keep_threshold is None else float(keep_threshold)

    def __call__(self, probs: np.ndarray, keep: np.ndarray, round_idx: int = 1) -> tuple[np.ndarray, np.ndarray]:
        if self.keep_threshold is not None and probs.shape[1]:
            # Decided on the probabilities before trimming, as the write-up describes.
            keep = keep & (probs.max(axis=1) >= self.keep_threshold)
        return np.where(probs < self.threshold, 0.0, probs).astype(probs.dtype), keep

    def describe(self, round_idx: int = 1) -> str:
        return f"threshold(t={self.threshold:g}, keep>={self.keep_threshold})"


class TopK:
    """Keep each chunk's `k` largest probabilities (ties: lower class index first); others set to 0."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)

    def __call__(self, probs: np.ndarray, keep: np.ndarray, round_idx: int = 1) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(-probs, axis=1, kind="stable")[:, : self.k]
        out = np.zeros_like(probs)
        np.put_along_axis(out, order, np.take_along_axis(probs, order, axis=1), axis=1)
        return out, keep

    def describe(self, round_idx: int = 1) -> str:
        return f"topk(k={self.k})"


class MinMax:
    """Per-class min-max rescale to [0, 1] over all chunks (4th 2025); a constant class column becomes 0."""

    def __call__(self, probs: np.ndarray, keep: np.ndarray, round_idx: int = 1) -> tuple[np.ndarray, np.ndarray]:
        if len(probs) == 0:
            return probs, keep
        low, high = probs.min(axis=0), probs.max(axis=0)
        span = high - low
        scaled = (probs - low) / np.where(span > 0, span, 1.0)
        return np.where(span > 0, scaled, 0.0).astype(probs.dtype), keep

    def describe(self, round_idx: int = 1) -> str:
        return "minmax"


class DropLowest:
    """Drop the `fraction` of chunks with the smallest label sum (4th 2025: 0.2)."""

    def __init__(self, fraction: float) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {fraction}")
        self.fraction = float(fraction)

    def __call__(self, probs: np.ndarray, keep: np.ndarray, round_idx: int = 1) -> tuple[np.ndarray, np.ndarray]:
        n_drop = int(np.floor(self.fraction * len(probs)))
        order = np.argsort(probs.sum(axis=1), kind="stable")
        keep = keep.copy()
        keep[order[:n_drop]] = False
        return probs, keep

    def describe(self, round_idx: int = 1) -> str:
        return f"drop_lowest({self.fraction:g})"


class FileScale:
    """p * (1 - alpha + alpha * m), m = the class's max over the chunks of the same soundscape file.

    The file-level scaling of `birdrounds predict` (`postprocess.scale_by_file_max`), applied to the teacher's
    labels: a class the teacher hears nowhere in a file is damped in all its chunks, one it hears clearly
    somewhere keeps its chunk probabilities. alpha = 1 multiplies by the file max.
    """

    uses_files = True

    def __init__(self, alpha: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)

    def __call__(self, probs: np.ndarray, keep: np.ndarray, round_idx: int = 1,
                 files: Sequence[str] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if files is None or len(files) != len(probs):
            raise ValueError("FileScale needs each chunk's file (files=, one per row)")
        return scale_by_file_max(probs, pd.factorize(np.asarray(files))[0], self.alpha), keep

    def describe(self, round_idx: int = 1) -> str:
        return f"file_scale(alpha={self.alpha:g})"


class Compose:
    """Apply transforms in order; returns (probs float32, keep mask).

    `files` (each row's soundscape file) goes to the transforms that use it (`FileScale`).
    """

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, probs: np.ndarray, round_idx: int = 1,
                 files: Sequence[str] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        probs = np.asarray(probs, dtype=np.float32)
        keep = np.ones(len(probs), dtype=bool)
        for transform in self.transforms:
            if getattr(transform, "uses_files", False):
                probs, keep = transform(probs, keep, round_idx, files=files)
            else:
                probs, keep = transform(probs, keep, round_idx)
        return probs.astype(np.float32), keep

    def describe(self, round_idx: int = 1) -> str:
        """Human-readable chain for the provenance record, e.g. 'power(k=1.54)'; 'identity' when empty."""
        return " -> ".join(t.describe(round_idx) for t in self.transforms) or "identity"


# ---------------------------------------------------------------- teacher inference


def chunk_rows(dataset: SoundscapeChunks, chunk_s: float = SCORED_CHUNK_S) -> pd.DataFrame:
    """The scored chunk table (row_id, file, start_s, end_s) for the files of `dataset`."""
    if not is_framewise(dataset, chunk_s):
        return dataset.rows[ROW_KEYS].reset_index(drop=True)
    files = list(dict.fromkeys(dataset.rows["file"]))
    min_last_s = dataset.min_last / dataset.audio.sample_rate_hz
    chunks = SoundscapeChunks(files, dataset.audio, window_s=chunk_s, stride_s=chunk_s, min_last_s=min_last_s)
    return chunks.rows[ROW_KEYS].reset_index(drop=True)


def model_probs(models: Sequence[nn.Module], audio: torch.Tensor, framewise: bool) -> np.ndarray:
    """Mean sigmoid over the ensemble: clip probs [B, C], or framewise probs [B, T', C]."""
    key = "framewise_logits" if framewise else "logits"
    total = None
    for model in models:
        outputs = model(audio)
        if key not in outputs:
            raise ValueError("windows longer than the scored chunk need a model with framewise_logits (SED head)")
        out = torch.sigmoid(outputs[key].float())
        total = out if total is None else total + out
    return (total / len(models)).cpu().numpy().astype(np.float32)


def _save_part(folder: Path, first: int, outputs: np.ndarray) -> None:
    """Atomically store the outputs of windows first..first+len-1 as one part file (temp + os.replace)."""
    with atomic_open(folder / f"part_{first:09d}.npy", "wb") as f:
        np.save(f, outputs)


def _load_parts(folder: Path, n_windows: int) -> list[np.ndarray]:
    """The contiguous run of saved parts from window 0 (a gap or overflow means a different job: refuse)."""
    parts, done = [], 0
    saved = sorted(folder.glob("part_*.npy"))
    for i, path in enumerate(saved):
        if int(path.stem.split("_")[1]) != done:
            raise ValueError(f"{folder} has a gap before {path.name}; delete the folder to recompute")
        try:
            parts.append(np.load(path))
        except (OSError, ValueError, EOFError) as err:  # damaged on disk: recompute from here, not crash
            log.warning("pseudo-label part %s cannot be read (%s); recomputing from window %d", path, err, done)
            for later in saved[i:]:
                later.unlink()
            break
        done += len(parts[-1])
    if done > n_windows:
        raise ValueError(f"{folder} holds {done} windows but this job has {n_windows}; delete the folder")
    return parts


def shard_range(n_windows: int, rank: int, world_size: int) -> range:
    """Contiguous slice of window indices for process `rank` of `world_size` (sizes differ by <= 1)."""
    bounds = np.linspace(0, n_windows, world_size + 1).round().astype(int)
    return range(int(bounds[rank]), int(bounds[rank + 1]))


def is_framewise(dataset: SoundscapeChunks, chunk_s: float = SCORED_CHUNK_S) -> bool:
    """Whether the windows differ from the scored chunks, so framewise outputs are needed."""
    return not (abs(dataset.window_s - chunk_s) < 1e-9 and dataset.stride == dataset.n_samples)


def predict_windows(
    models: Sequence[nn.Module],
    dataset: SoundscapeChunks,
    framewise: bool,
    indices: Sequence[int] | None = None,
    batch_size: int = INFER_BATCH_SIZE,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    partial_dir: str | os.PathLike | None = None,
    save_every: int = SAVE_EVERY_BATCHES,
    progress: bool = False,
) -> np.ndarray:
    """Ensemble-mean sigmoid per window of `indices` (default all): clip [n, C] or framewise [n, T', C].

    With `partial_dir`, outputs are saved every `save_every` batches as part files there, and a later
    call skips the windows already saved (use one folder per job / process rank; delete it when the
    models or inputs change). `progress` shows a progress bar over the windows.
    """
    indices = list(range(len(dataset))) if indices is None else list(indices)
    folder = Path(partial_dir) if partial_dir is not None else None
    parts: list[np.ndarray] = []
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        parts = _load_parts(folder, len(indices))
    done = sum(len(p) for p in parts)
    if done:
        log.info("resuming pseudo-labeling: %d of %d windows already done", done, len(indices))
    for model in models:
        model.eval().to(device)
    loader = DataLoader(Subset(dataset, indices[done:]), batch_size=batch_size, num_workers=num_workers)
    pending: list[np.ndarray] = []
    bar = tqdm(total=len(indices), initial=done, desc="pseudo-labeling", unit="window", disable=not progress)
    with torch.inference_mode(), bar:
        for batch_idx, batch in enumerate(loader, start=1):
            bar.update(len(batch["audio"]))
            pending.append(model_probs(models, batch["audio"].to(device), framewise))
            if folder is not None and (batch_idx % save_every == 0 or done + sum(map(len, pending)) == len(indices)):
                block = np.concatenate(pending)
                _save_part(folder, done, block)
                parts.append(block)
                done, pending = done + len(block), []
    parts += pending
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def windows_to_chunks(outputs: np.ndarray, dataset: SoundscapeChunks, chunk_s: float = SCORED_CHUNK_S) -> np.ndarray:
    """Chunk probabilities aligned with `chunk_rows(dataset, chunk_s)` from all windows' outputs."""
    if not is_framewise(dataset, chunk_s):
        return outputs
    return _overlap_average(outputs, dataset.rows, chunk_rows(dataset, chunk_s), dataset.window_s, chunk_s)


def _overlap_average(frames: np.ndarray, windows: pd.DataFrame, chunks: pd.DataFrame, window_s: float,
                     chunk_s: float) -> np.ndarray:
    """Chunk probs aligned with `chunks` from framewise window probs, file by file.

    `postprocess.overlap_to_chunks` does the averaging (the same code the exported model's inference uses):
    overlapping frames are averaged on a per-file grid of step window_s / T', and a chunk takes the
    max over the grid cells whose centre lies in it. Chunk rows lie on the grid [c * chunk_s, (c + 1) * chunk_s).
    """
    out = np.zeros((len(chunks), frames.shape[2]), dtype=np.float32)
    chunks_of = chunks.groupby("file", sort=False).indices
    chunk_index = np.rint(chunks["start_s"].to_numpy() / chunk_s).astype(np.int64)
    window_starts = windows["start_s"].to_numpy()
    for file, win_idx in windows.groupby("file", sort=False).indices.items():
        rows = chunks_of.get(file)
        if rows is None or not len(rows):
            continue
        per_chunk = overlap_to_chunks(frames[win_idx], window_starts[win_idx], window_s,
                                      int(chunk_index[rows].max()) + 1, chunk_s)
        out[rows] = per_chunk[chunk_index[rows]]
    return out


def predict_chunks(
    models: Sequence[nn.Module],
    dataset: SoundscapeChunks,
    batch_size: int = INFER_BATCH_SIZE,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    chunk_s: float = SCORED_CHUNK_S,
    partial_path: str | os.PathLike | None = None,
    save_every: int = SAVE_EVERY_BATCHES,
) -> np.ndarray:
    """Ensemble-mean sigmoid probabilities [len(chunk_rows(dataset, chunk_s)), C] of the teacher models.

    When the dataset's windows are the scored chunks (window_s == stride_s == chunk_s) the clip
    probabilities are used directly. Longer windows (e.g. 20 s, stride 5 s) use the SED head's
    framewise logits with overlap averaging (see `_overlap_average`). `partial_path` is a folder for
    resumable progress (see `predict_windows`). Multi-process: run `predict_windows` on
    `shard_range(len(dataset), rank, world)` per process, gather and concatenate in rank order, then
    `windows_to_chunks`.
    """
    framewise = is_framewise(dataset, chunk_s)
    outputs = predict_windows(models, dataset, framewise, None, batch_size, num_workers, device,
                              partial_path, save_every)
    if len(dataset) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return windows_to_chunks(outputs, dataset, chunk_s)


# ---------------------------------------------------------------- the pseudo-label table


def write_pseudo_labels(path: str | os.PathLike, rows: pd.DataFrame, probs: np.ndarray,
                        classes: Sequence[str], provenance: dict[str, Any]) -> None:
    """Atomically write rows + one float32 column per class to Parquet, provenance in schema metadata."""
    path = Path(path)
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape != (len(rows), len(classes)):
        raise ValueError(f"probs shape {probs.shape} does not match {len(rows)} rows x {len(classes)} classes")
    table = rows[ROW_KEYS].reset_index(drop=True).copy()
    table = pd.concat([table, pd.DataFrame(probs, columns=list(classes))], axis=1)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = dict(arrow.schema.metadata or {})
    meta[PROVENANCE_KEY] = json.dumps({**provenance, "classes": list(classes)}).encode()
    arrow = arrow.replace_schema_metadata(meta)
    with atomic_open(path, "wb") as f:
        pq.write_table(arrow, f)


def read_pseudo_labels(path: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The table written by `write_pseudo_labels` and its provenance (with the class list under 'classes')."""
    try:
        arrow = pq.read_table(path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as err:  # truncated or overwritten: name it and what rebuilds it
        raise ConfigError(f"{path}: cannot be read, truncated or corrupt ({type(err).__name__}); "
                          f"{rebuild_hint(path)}") from None
    provenance = json.loads((arrow.schema.metadata or {}).get(PROVENANCE_KEY, b"{}"))
    return arrow.to_pandas(), provenance


def probs_for_rows(row_ids: Sequence[str], probs: np.ndarray, wanted: Sequence[str]) -> np.ndarray:
    """`probs` (one row per id of `row_ids`) in the order of the ids `wanted`; an id it lacks gets zeros."""
    index = pd.Index(row_ids).get_indexer(wanted)
    return np.where((index >= 0)[:, None], probs[np.maximum(index, 0)], 0.0).astype(np.float32)


def split_table(table: pd.DataFrame, classes: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows, probs float32 [n, C]) from a pseudo-label table."""
    return table[ROW_KEYS].copy(), table[list(classes)].to_numpy(dtype=np.float32)


def read_truth(path: str | os.PathLike, row_ids: Sequence[str], classes: Sequence[str],
               skipped_stems: Collection[str] = ()) -> np.ndarray:
    """True labels [len(row_ids), C] from a Kaggle solution-format CSV (row_id + one column per class).

    The oracle arm's input. Refused (ConfigError naming `pseudo.truth`) when its classes differ from
    `classes`, a chunk has no row, it has rows for chunks that do not exist (rows of soundscapes that
    were skipped as unreadable excepted), or a value is not a number in [0, 1].
    """
    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"pseudo.truth: {path}: {reason}")

    if not Path(path).is_file():
        raise refuse("file not found")
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise refuse(f"cannot read it as CSV ({str(err).splitlines()[0]})") from None
    if "row_id" not in table.columns:
        raise refuse("no row_id column")
    columns = [c for c in table.columns if c != "row_id"]
    missing, extra = sorted(set(classes) - set(columns)), sorted(set(columns) - set(classes))
    if missing or extra:
        raise refuse(f"its classes do not match the class list (missing {missing[:5]}, unknown {extra[:5]})")
    table = table.drop_duplicates("row_id").set_index("row_id")
    absent = [r for r in row_ids if r not in table.index]
    if absent:
        raise refuse(f"{len(absent)} train-soundscape chunks have no row, e.g. {absent[:3]}")
    known = set(row_ids)
    unknown = [r for r in table.index if r not in known and str(r).rsplit("_", 1)[0] not in skipped_stems]
    if unknown:
        raise refuse(f"{len(unknown)} rows name no train-soundscape chunk, e.g. {unknown[:3]}")
    values = table.loc[list(row_ids), list(classes)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(values).all() or values.min(initial=0.0) < 0 or values.max(initial=0.0) > 1:
        raise refuse("values must be numbers in [0, 1]")
    return values.astype(np.float32)


def pseudo_stats(probs: np.ndarray, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """chunks, coverage_above_0.5 (share of chunks with max > 0.5), mean_max_prob, positives per class (> 0.5)."""
    probs = np.asarray(probs, dtype=np.float32)
    n = len(probs)
    top = probs.max(axis=1) if n and probs.shape[1] else np.zeros(n, dtype=np.float32)
    positives = (probs > 0.5).sum(axis=0).astype(int).tolist()
    names = list(classes) if classes is not None else [str(i) for i in range(probs.shape[1] if probs.ndim == 2 else 0)]
    return {
        "chunks": int(n),
        "coverage_above_0.5": float((top > 0.5).mean()) if n else 0.0,
        "mean_max_prob": float(top.mean()) if n else 0.0,
        "positives_per_class": dict(zip(names, positives)),
    }


def file_weights(rows: pd.DataFrame, probs: np.ndarray) -> np.ndarray:
    """Per-row sampling weight: sum over classes of the row's file's max probability (1st 2025)."""
    frame = pd.DataFrame(np.asarray(probs, dtype=np.float64))
    frame["file"] = rows["file"].to_numpy()
    per_file = frame.groupby("file", sort=False).max().sum(axis=1)
    return per_file.reindex(rows["file"].to_numpy()).to_numpy(dtype=np.float64)


def detection_scores(models: Sequence[nn.Module], paths: Sequence[str], labels: Sequence[str], classes: list[str],
                     audio: Any, window_s: float, batch_size: int = INFER_BATCH_SIZE, device: str | torch.device = "cpu",
                     progress: bool = False) -> np.ndarray:
    """For each recording, the highest probability the models give its label over `window_s` windows at
    half-window stride: "is the labeled species detected anywhere in it". NaN for a file that cannot be
    decoded (skipped with a warning by SoundscapeChunks)."""
    if len(paths) != len(labels):
        raise ValueError("detection_scores: paths and labels differ in length")
    unique = list(dict.fromkeys(paths))
    windows = SoundscapeChunks(unique, audio, window_s=window_s, stride_s=window_s / 2, min_last_s=0.0)
    probs = predict_windows(models, windows, framewise=False, batch_size=batch_size, device=device,
                            progress=progress) if len(windows) else np.zeros((0, len(classes)), np.float32)
    # One pass over the windows: each file's best window per class, then each recording's label looked up.
    best = pd.DataFrame(probs, columns=classes).assign(file=windows.rows["file"].to_numpy()).groupby("file").max()
    return np.array([float(best.at[path, label]) if path in best.index and label in best.columns else np.nan
                     for path, label in zip(paths, labels)])
