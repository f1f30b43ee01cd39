"""bench/snr_tiers.py: the SNR of the call behind each positive cell, the tertile masks, the per-tier AUC."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from snr_tiers import positive_snr, tier_auc, tier_masks  # noqa: E402

from birdrounds.data.synthetic import Event, chunk_labels
from birdrounds.contract import row_ids


def test_positive_snr_marks_exactly_the_generators_positive_cells_with_the_loudest_call():
    classes = ["a", "b"]
    events = [Event("a", 3.0, 7.0, -2.0),   # labels rows 5 and 10
              Event("a", 4.8, 5.2, 9.0),    # 0.4 s call: needs 0.2 s of overlap, gets 0.2 in each row
              Event("b", 9.8, 10.1, 4.0),   # 0.2 s in row 10, needs 0.15: labels row 10 only
              Event("b", 14.9, 17.0, 1.0),  # 0.1 s in row 15: not labeled there; row 20 yes
              Event("other", 0.0, 5.0, 20.0)]  # an unlisted species: never a positive
    rows = np.array(row_ids("S1", 4))
    table = pd.DataFrame([{"filename": "S1.ogg", "label": e.label, "start_s": e.start_s, "end_s": e.end_s,
                           "snr_db": e.snr_db} for e in events])
    snr = positive_snr(table, rows, classes)
    truth = chunk_labels(events, 20.0, classes).astype(bool)
    assert np.array_equal(~np.isnan(snr), truth)  # the same cells as the solution
    assert snr[0, 0] == 9.0 and snr[1, 0] == 9.0  # the louder of the two a-calls in both rows
    assert snr[1, 1] == 4.0 and snr[3, 1] == 1.0


def test_tiers_split_positives_into_thirds_and_auc_scores_each_tier_against_all_negatives():
    rng = np.random.default_rng(0)
    truth = np.zeros((90, 1), dtype=bool)
    truth[:30, 0] = True
    snr = np.full((90, 1), np.nan)
    snr[:30, 0] = np.arange(30, dtype=float)  # 0..29 dB
    masks, cuts = tier_masks(snr, truth)
    assert [int(m.sum()) for m in masks.values()] == [10, 10, 10]
    assert masks["faint"][:10, 0].all() and masks["loud"][20:30, 0].all() and not masks["mid"][30:].any()
    probs = rng.uniform(0.0, 0.5, size=(90, 1))  # negatives and faint calls: chance
    probs[10:30, 0] = 0.9  # mid and loud calls heard
    assert tier_auc(probs, truth, masks["loud"], 3) == (1.0, 1)
    faint, used = tier_auc(probs, truth, masks["faint"], 3)
    assert 0.2 < faint < 0.8 and used == 1
    mean, used = tier_auc(probs, truth, masks["faint"], 11)  # a class with fewer positives is left out
    assert np.isnan(mean) and used == 0
