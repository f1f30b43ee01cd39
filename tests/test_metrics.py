"""macro_roc_auc against sklearn, and the BirdCLEF skip rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from birdrounds.metrics import macro_roc_auc, per_class_roc_auc


def random_case(seed: int, n_rows: int = 200, n_cols: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n_rows, n_cols)) < rng.uniform(0.02, 0.3, n_cols)).astype(int)
    # Scores rounded to one decimal: many ties, within and across classes.
    p = np.round(np.clip(0.3 * y + rng.random((n_rows, n_cols)), 0, 1), 1)
    y[:, 0] = 0  # a class with no positive
    return y, p


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_sklearn_on_scorable_columns(seed):
    y, p = random_case(seed)
    keep = (y.sum(0) > 0) & (y.sum(0) < len(y))
    assert 0 < keep.sum() < y.shape[1]
    expected = roc_auc_score(y[:, keep], p[:, keep], average="macro")
    assert macro_roc_auc(y, p) == pytest.approx(expected, abs=1e-12)
    per_class = per_class_roc_auc(y, p)
    assert per_class.isna().to_numpy().tolist() == (~keep).tolist()
    for c in np.flatnonzero(keep):
        assert per_class[c] == pytest.approx(roc_auc_score(y[:, c], p[:, c]), abs=1e-12)


def test_skip_rule():
    y, p = random_case(10)
    base = macro_roc_auc(y, p)
    rng = np.random.default_rng(0)
    no_positive = np.zeros((len(y), 1), dtype=int)
    all_positive = np.ones((len(y), 1), dtype=int)
    extra_scores = rng.random((len(y), 2))
    widened = macro_roc_auc(np.hstack([y, no_positive, all_positive]), np.hstack([p, extra_scores]))
    assert widened == pytest.approx(base, abs=1e-12)
    with pytest.raises(ValueError, match="no class"):
        macro_roc_auc(np.hstack([no_positive, all_positive]), extra_scores)


def test_known_values():
    y = np.array([[1], [1], [0], [0]])
    assert macro_roc_auc(y, np.array([[0.9], [0.8], [0.2], [0.1]])) == 1.0
    assert macro_roc_auc(y, np.array([[0.1], [0.2], [0.8], [0.9]])) == 0.0
    assert macro_roc_auc(y, np.full((4, 1), 0.5)) == 0.5
    # one tied (positive, negative) pair out of four counts one half
    assert macro_roc_auc(y, np.array([[0.9], [0.5], [0.5], [0.1]])) == pytest.approx(0.875)


def test_dataframes_align_columns_and_drop_row_id():
    y, p = random_case(3, n_cols=5)
    classes = [f"sp{i}" for i in range(5)]
    solution = pd.DataFrame(y, columns=classes)
    solution.insert(0, "row_id", [f"file_{i * 5}" for i in range(len(y))])
    submission = pd.DataFrame(p, columns=classes)[classes[::-1]]  # columns in another order
    submission.insert(0, "row_id", solution["row_id"])
    assert macro_roc_auc(solution, submission) == pytest.approx(macro_roc_auc(y, p), abs=1e-12)
    per_class = per_class_roc_auc(solution, submission)
    assert list(per_class.index) == classes and np.isnan(per_class["sp0"])
    with pytest.raises(ValueError, match="lacks"):
        macro_roc_auc(solution, submission.drop(columns=["sp2"]))


def test_rejects_bad_inputs():
    y, p = random_case(4)
    with pytest.raises(ValueError, match="0/1"):
        macro_roc_auc(y * 0.5, p)
    bad = p.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        macro_roc_auc(y, bad)
    with pytest.raises(ValueError, match="shape"):
        macro_roc_auc(y, p[:, :3])
