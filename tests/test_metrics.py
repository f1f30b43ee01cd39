"""macro_roc_auc against sklearn and a brute-force pair count, the BirdCLEF skip rule, and the
validation scores built on it (clip_auc, soundscape_auc)."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from birdrounds.metrics import POSITIVE_TARGET, clip_auc, macro_roc_auc, per_class_roc_auc, soundscape_auc


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


# ----------------------------------------------------------------------------- a brute-force reference


def pair_count_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC-AUC by definition: the share of (positive, negative) pairs ranked right, ties counting one half,
    averaged over the classes that have both; NaN when none has."""
    scores = []
    for c in range(y.shape[1]):
        pos, neg = p[y[:, c] == 1, c], p[y[:, c] == 0, c]
        if len(pos) and len(neg):
            wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
            scores.append(wins / (len(pos) * len(neg)))
    return float(np.mean(scores)) if scores else float("nan")


@pytest.mark.parametrize("seed", range(8))
def test_equals_the_pair_count_on_data_with_ties(seed):
    rng = np.random.default_rng(100 + seed)
    n_rows, n_cols = int(rng.integers(3, 60)), int(rng.integers(1, 8))
    y = (rng.random((n_rows, n_cols)) < rng.uniform(0.0, 0.6, n_cols)).astype(int)
    y[:, rng.integers(n_cols)] = 1  # a class that is everywhere: skipped like one that is nowhere
    y[0, 0], y[1, 0] = 1, 0  # at least one class can be scored
    p = rng.integers(0, 4, (n_rows, n_cols)) / 4  # four score levels: ties everywhere
    assert macro_roc_auc(y, p) == pytest.approx(pair_count_auc(y, p), abs=1e-12)


def test_clip_auc_counts_targets_from_the_positive_threshold():
    rng = np.random.default_rng(7)
    targets = rng.choice([0.0, 0.25, POSITIVE_TARGET, 1.0], size=(80, 5))  # secondary labels at 0.5 count
    probs = np.round(rng.random((80, 5)), 1)
    expected = pair_count_auc((targets >= POSITIVE_TARGET).astype(int), probs)
    assert clip_auc(probs, targets) == pytest.approx(expected, abs=1e-12)


def test_nothing_to_score_is_nan_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="birdrounds.metrics"):
        assert np.isnan(clip_auc(np.random.default_rng(0).random((4, 2)), np.array([[1, 0]] * 4, dtype=float)))
    assert "no class with both positives and negatives" in caplog.text


def test_soundscape_auc_matches_rows_by_id():
    rng = np.random.default_rng(3)
    classes = ["a", "b", "c", "d"]
    ids = [f"s{f}_{5 * (k + 1)}" for f in range(3) for k in range(6)]
    truth = (rng.random((len(ids), 3)) < 0.4).astype(int)
    truth[0, :] = 1 - truth[1, :]  # every listed class has a positive and a negative
    solution = pd.DataFrame(truth, columns=classes[:3])  # "d" is in no solution column: absent, skipped
    solution.insert(0, "row_id", ids)
    probs = np.round(rng.random((len(ids), 4)), 1)
    expected = pair_count_auc(truth, probs[:, :3])
    # Predictions in another order, and a repeated row id whose first prediction counts.
    order = rng.permutation(len(ids))
    shuffled_ids = np.array(ids)[order]
    repeated = np.vstack([probs[order], 1 - probs[order][:1]])
    assert soundscape_auc(repeated, np.append(shuffled_ids, shuffled_ids[0]), solution, classes) == \
        pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="1 solution rows have no prediction"):
        soundscape_auc(probs[order][1:], shuffled_ids[1:], solution, classes)
