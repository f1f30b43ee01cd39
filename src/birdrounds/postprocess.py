"""Post-processing of chunk probabilities: framewise windows to chunks, smoothing along a file, file-level scaling.

Inference (`infer.py`) and pseudo-labeling (`birdrounds.pseudo`) share them.
The export copies this file beside infer.py, where it runs without birdrounds installed: it imports only
the standard library and numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def overlap_to_chunks(frames: np.ndarray, starts: np.ndarray, window: float, n_chunks: int, chunk: float) -> np.ndarray:
    """Chunk probs [n_chunks, C] of one file from framewise probs [n_windows, T', C] of windows at `starts`.

    Frames go on a per-file grid of step window / T' (window offsets snapped to the nearest step, so
    strides and TTA shifts should be multiples of it), overlapping frames are averaged, and chunk c
    (covering [c * chunk, (c + 1) * chunk)) takes the max over the grid cells whose centre lies inside
    it. `starts`, `window` and `chunk` share one unit (samples here, seconds in birdrounds.pseudo,
    which labels soundscapes with this same function).
    """
    n_frames, n_classes = frames.shape[1], frames.shape[2]
    step = window / n_frames
    offsets = np.rint(starts / step).astype(np.int64)
    origin = int(offsets.min())
    offsets -= origin
    size = int(offsets.max()) + n_frames
    total = np.zeros((size, n_classes), dtype=np.float64)
    count = np.zeros(size, dtype=np.int64)
    for offset, window_frames in zip(offsets.tolist(), frames):
        total[offset : offset + n_frames] += window_frames
        count[offset : offset + n_frames] += 1
    mean = total / np.maximum(count, 1)[:, None]
    cell_chunk = np.floor((np.arange(size) + origin + 0.5) * step / chunk).astype(np.int64)
    out = np.zeros((n_chunks, n_classes), dtype=np.float64)
    for c in range(n_chunks):
        inside = (cell_chunk == c) & (count > 0)
        if inside.any():
            out[c] = mean[inside].max(axis=0)
    return out


def validate_kernel(kernel: Sequence[float]) -> np.ndarray:
    """A smoothing kernel as float64: odd length, finite, non-negative, positive centre weight."""
    weights = np.asarray(kernel, dtype=np.float64)
    if weights.ndim != 1 or len(weights) % 2 != 1:
        raise ValueError(f"smoothing kernel must have an odd number of weights, got {list(kernel)}")
    if not np.isfinite(weights).all() or (weights < 0).any() or weights[len(weights) // 2] <= 0:
        raise ValueError(f"smoothing weights must be finite and >= 0 with a positive centre, got {list(kernel)}")
    return weights


def _file_runs(file_index: np.ndarray) -> np.ndarray:
    """Start row of each file's run of rows; rows of one file must be contiguous."""
    file_index = np.asarray(file_index)
    starts = np.flatnonzero(np.r_[True, file_index[1:] != file_index[:-1]]) if len(file_index) else np.zeros(0, int)
    if len(starts) != len(np.unique(file_index)):
        raise ValueError("rows of each file must be contiguous (in chunk order)")
    return starts


def smooth(probs: np.ndarray, file_index: np.ndarray, kernel: Sequence[float]) -> np.ndarray:
    """Weighted moving average along the chunks of each file.

    out[i] = sum_j k[j] * p[i + j - h] / sum_j k[j], both sums over the taps j whose chunk
    i + j - h lies in the same file as i (h = len(k) // 2). Renormalising over the taps inside the
    file keeps a constant sequence constant at the edges; a 1-chunk file is unchanged.
    """
    weights = validate_kernel(kernel)
    probs = np.asarray(probs)
    file_index = np.asarray(file_index)
    _file_runs(file_index)
    n, half = len(probs), len(weights) // 2
    total = np.zeros(probs.shape, dtype=np.float64)
    norm = np.zeros(n, dtype=np.float64)
    rows = np.arange(n)
    for j, weight in enumerate(weights):
        src = rows + j - half
        valid = (src >= 0) & (src < n)
        valid[valid] = file_index[src[valid]] == file_index[valid]
        total[valid] += weight * probs[src[valid]]
        norm[valid] += weight
    return (total / np.maximum(norm, 1e-300)[:, None]).astype(probs.dtype)


def scale_by_file_max(probs: np.ndarray, file_index: np.ndarray, alpha: float) -> np.ndarray:
    """p * ((1 - alpha) + alpha * m), m = the class's max probability over the chunks of the same file.

    A class heard somewhere in the file keeps its chunk probabilities (m near 1); one never heard is
    damped towards p * (1 - alpha). alpha = 0 leaves p unchanged.
    """
    probs = np.asarray(probs)
    if alpha == 0 or len(probs) == 0:
        return probs.copy()
    starts = _file_runs(file_index)
    file_max = np.maximum.reduceat(probs, starts, axis=0)
    lengths = np.diff(np.r_[starts, len(probs)])
    factor = (1.0 - alpha) + alpha * np.repeat(file_max, lengths, axis=0)
    return (probs * factor).astype(probs.dtype)


def postprocess(raw: np.ndarray, file_index: np.ndarray, smoothing: Sequence[float] = (),
                file_scale_alpha: float = 0.0) -> np.ndarray:
    """Smoothing (if a kernel is given), then file-level scaling (if alpha > 0)."""
    probs = smooth(raw, file_index, smoothing) if len(smoothing) else np.array(raw, copy=True)
    return scale_by_file_max(probs, file_index, file_scale_alpha) if file_scale_alpha else probs
