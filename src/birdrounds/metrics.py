"""BirdCLEF's macro ROC-AUC: per-class rank AUC, averaged over the classes that can be scored.

Kaggle skips a class with no positive in the solution. A class whose every row is positive cannot be
scored either (ROC-AUC needs both a positive and a negative; sklearn raises), so it is skipped too.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ROW_ID_COLUMN = "row_id"


def macro_roc_auc(solution: np.ndarray | pd.DataFrame, submission: np.ndarray | pd.DataFrame) -> float:
    """Mean ROC-AUC over classes with at least one positive and one negative; ValueError if there are none."""
    scores = per_class_roc_auc(solution, submission)
    scored = scores.dropna()
    if scored.empty:
        raise ValueError("no class has both a positive and a negative row in the solution; ROC-AUC is undefined")
    return float(scored.mean())


def per_class_roc_auc(solution: np.ndarray | pd.DataFrame, submission: np.ndarray | pd.DataFrame) -> pd.Series:
    """ROC-AUC per class column (ties count one half); NaN for classes skipped by the rule above."""
    y, scores, columns = _as_arrays(solution, submission)
    n_pos = y.sum(axis=0)
    n_neg = y.shape[0] - n_pos
    keep = (n_pos > 0) & (n_neg > 0)
    auc = np.full(y.shape[1], np.nan)
    if keep.any():
        ranks = _average_ranks(scores[:, keep])
        pos_rank_sum = np.where(y[:, keep], ranks, 0.0).sum(axis=0)
        p, n = n_pos[keep].astype(np.float64), n_neg[keep].astype(np.float64)
        # Mann-Whitney U of the positives, divided by the number of (positive, negative) pairs.
        auc[keep] = (pos_rank_sum - p * (p + 1) / 2) / (p * n)
    return pd.Series(auc, index=columns, dtype=np.float64)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks down each column of [N, C], tied values sharing their average rank."""
    n_rows, n_cols = x.shape
    order = np.argsort(x, axis=0, kind="stable")
    ordered = np.take_along_axis(x, order, axis=0).T.ravel()  # column after column
    local = np.tile(np.arange(n_rows), n_cols)
    # A tie group starts where the value changes or a new column begins.
    starts = np.flatnonzero((local == 0) | np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    group_rank = (local[starts] + 1 + local[ends - 1] + 1) / 2.0
    group_of = np.repeat(np.arange(starts.size), ends - starts)
    sorted_ranks = group_rank[group_of].reshape(n_cols, n_rows).T
    ranks = np.empty_like(sorted_ranks)
    np.put_along_axis(ranks, order, sorted_ranks, axis=0)
    return ranks


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
