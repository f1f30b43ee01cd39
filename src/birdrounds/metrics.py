"""BirdCLEF's macro ROC-AUC: sklearn's per-class ROC-AUC, averaged over the classes that can be scored.

Kaggle skips a class with no positive in the solution. A class whose every row is positive cannot be
scored either (ROC-AUC needs both a positive and a negative; sklearn raises), so it is skipped too.
`clip_auc` and `soundscape_auc` score validation predictions by it (training and `birdrounds predict`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

ROW_ID_COLUMN = "row_id"
# Held-out clips count a class as present from this target value on (secondary labels are 0.5).
POSITIVE_TARGET = 0.5


def clip_auc(probs: np.ndarray, targets: np.ndarray) -> float:
    """Macro ROC-AUC of clip predictions against targets >= POSITIVE_TARGET (NaN if nothing to score)."""
    return scored_auc(*clip_arrays(probs, targets))


def clip_arrays(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(truth [N, C] as 0/1, scores [N, C]): what `clip_auc` scores."""
    return (targets >= POSITIVE_TARGET).astype(np.int64), probs


def soundscape_auc(probs: np.ndarray, row_ids: np.ndarray, solution: pd.DataFrame, classes: Sequence[str]) -> float:
    """Macro ROC-AUC of chunk predictions matched to the solution's rows by row_id (NaN if nothing to score).

    A row id predicted twice keeps its first prediction; a solution row without one is a ValueError.
    Classes the solution lacks count as absent everywhere (and so are skipped).
    """
    return scored_auc(*soundscape_arrays(probs, row_ids, solution, classes))


def soundscape_arrays(probs: np.ndarray, row_ids: np.ndarray, solution: pd.DataFrame,
                      classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(truth [R, C], scores [R, C]) in the solution's row order: what `soundscape_auc` scores."""
    submission = pd.DataFrame(probs, columns=list(classes))
    submission.insert(0, ROW_ID_COLUMN, row_ids)
    submission = submission.drop_duplicates(ROW_ID_COLUMN).set_index(ROW_ID_COLUMN)
    missing = sorted(set(solution[ROW_ID_COLUMN]) - set(submission.index))
    if missing:
        raise ValueError(f"{len(missing)} solution rows have no prediction, e.g. {missing[:3]}")
    truth = solution.reindex(columns=list(classes), fill_value=0).to_numpy()
    return truth, submission.loc[solution[ROW_ID_COLUMN], list(classes)].to_numpy()


def bootstrap_auc_interval(truth: np.ndarray, scores: np.ndarray, n_resamples: int = 200, level: float = 0.95,
                           seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the macro ROC-AUC over rows resampled with replacement (NaN, NaN if unscorable).

    Each resample scores the classes with both a positive and a negative row in it, as `macro_roc_auc`
    does; ties count one half. Rank-based, all classes at once, so 200 resamples of a few thousand rows
    take well under a second.
    """
    from scipy.stats import rankdata

    truth = np.asarray(truth) >= POSITIVE_TARGET
    scores = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        rows = rng.integers(0, len(truth), len(truth))
        y, s = truth[rows], scores[rows]
        n_pos = y.sum(axis=0)
        n_neg = len(y) - n_pos
        keep = (n_pos > 0) & (n_neg > 0)
        if not keep.any():
            continue
        ranks = rankdata(s[:, keep], axis=0)  # average ranks: ties count one half
        pos_rank_sum = (ranks * y[:, keep]).sum(axis=0)
        auc = (pos_rank_sum - n_pos[keep] * (n_pos[keep] + 1) / 2) / (n_pos[keep] * n_neg[keep])
        values.append(float(auc.mean()))
    if not values:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def scored_auc(truth: np.ndarray, probs: np.ndarray) -> float:
    """macro_roc_auc, or NaN with a warning when no class has both a positive and a negative row."""
    truth = truth.astype(bool)
    if not (truth.any(axis=0) & ~truth.all(axis=0)).any():
        log.warning("validation set has no class with both positives and negatives; AUC is NaN")
        return float("nan")
    return macro_roc_auc(truth.astype(np.int64), probs)


def macro_roc_auc(solution: np.ndarray | pd.DataFrame, submission: np.ndarray | pd.DataFrame) -> float:
    """Mean ROC-AUC over classes with at least one positive and one negative; ValueError if there are none."""
    scores = per_class_roc_auc(solution, submission)
    scored = scores.dropna()
    if scored.empty:
        raise ValueError("no class has both a positive and a negative row in the solution; ROC-AUC is undefined")
    return float(scored.mean())


def per_class_roc_auc(solution: np.ndarray | pd.DataFrame, submission: np.ndarray | pd.DataFrame) -> pd.Series:
    """sklearn's ROC-AUC per class column (tied scores count one half); NaN for classes skipped by the rule above."""
    # Imported here: sklearn.metrics takes about a second to import, and only scoring needs it.
    from sklearn.metrics import roc_auc_score

    y, scores, columns = _as_arrays(solution, submission)
    n_pos = y.sum(axis=0)
    keep = (n_pos > 0) & (n_pos < y.shape[0])
    auc = np.full(y.shape[1], np.nan)
    if keep.any():
        auc[keep] = roc_auc_score(y[:, keep], scores[:, keep], average=None)
    return pd.Series(auc, index=columns, dtype=np.float64)


def _as_arrays(
    solution: np.ndarray | pd.DataFrame, submission: np.ndarray | pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """Validated (bool labels [N, C], float scores [N, C], column names); DataFrames align by column name."""
    if isinstance(solution, pd.DataFrame):
        solution = solution.drop(columns=[ROW_ID_COLUMN], errors="ignore")
        columns = solution.columns
        if isinstance(submission, pd.DataFrame):
            submission = submission.drop(columns=[ROW_ID_COLUMN], errors="ignore")
            missing = columns.difference(submission.columns)
            if len(missing):
                raise ValueError(f"submission lacks {len(missing)} solution columns, e.g. {list(missing[:5])}")
            submission = submission[columns]
    else:
        columns = None
    labels = np.asarray(solution, dtype=np.float64)
    scores = np.asarray(submission, dtype=np.float64)
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"solution {labels.shape} and submission {scores.shape} must be equal 2-D shapes")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("solution must hold 0/1 labels; binarise soft targets first (e.g. target > 0)")
    if not np.isfinite(scores).all():
        raise ValueError("submission holds NaN or infinite scores")
    if columns is None:
        columns = pd.RangeIndex(labels.shape[1])
    return labels.astype(bool), scores, columns
