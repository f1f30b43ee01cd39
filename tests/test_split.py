"""Near-duplicate grouping and fold assignment."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from birdrounds.data.audio import DirectAudio
from birdrounds.data.split import assign_folds, audio_fingerprint, near_duplicate_groups, recording_key

SR = 1000


def bursty(seed, seconds=3.0, gain=1.0):
    """Noise with a random on/off envelope, so different seeds give different fingerprints."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    envelope = np.repeat(rng.uniform(0.01, 1.0, 30), n // 30 + 1)[:n]
    return (rng.standard_normal(n) * envelope * 0.3 * gain).astype(np.float32)


def write(path, wave):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, SR, subtype="FLOAT")
    return str(path)


def test_recording_key():
    assert recording_key("ashgre1/XC1217224.ogg") == "XC1217224"
    assert recording_key("1139490/CSA36385.ogg") == "CSA36385"
    assert recording_key("x/iNat0012.ogg") == "INAT12"
    assert recording_key("ext/foo.ogg", "https://xeno-canto.org/123") == "XC123"
    assert recording_key("ext/foo.ogg", float("nan")) is None
    assert recording_key("ext/foo_XC55.ogg") is None  # only a leading archive id counts


def test_fingerprint_is_gain_invariant_and_content_specific():
    dur, env = audio_fingerprint(bursty(1), SR)
    dur_quiet, env_quiet = audio_fingerprint(bursty(1, gain=0.25), SR)
    assert dur == dur_quiet == 3.0
    np.testing.assert_array_equal(env, env_quiet)
    assert np.abs(env.astype(int) - audio_fingerprint(bursty(2), SR)[1]).max() > 1


@pytest.fixture()
def dup_table(tmp_path):
    """Rows 0/1: same XC id under two labels; rows 2/3: same audio in two collections (no shared id)."""
    rows = [
        ("a", "a/XC100.ogg", bursty(0)),
        ("b", "b/XC100.ogg", bursty(0)),
        ("a", "a/iNat7.ogg", bursty(1)),
        ("a", "xc_extra/recording7.ogg", bursty(1, gain=0.5)),
        ("b", "b/XC200.ogg", bursty(2)),
        ("b", "b/XC201.ogg", bursty(3)),
        ("a", "a/XC300.ogg", bursty(4)),
        ("c", "c/CSA1.ogg", bursty(5)),
    ]
    # Two stationary-noise clips of equal length: flat envelopes must not count as duplicates.
    flat = np.random.default_rng(9).standard_normal((2, 3 * SR)).astype(np.float32) * 0.1
    rows += [("b", "b/XC400.ogg", flat[0]), ("a", "a/XC401.ogg", flat[1])]
    return pd.DataFrame({
        "primary_label": [r[0] for r in rows],
        "filename": [r[1] for r in rows],
        "url": [""] * len(rows),
        "author": ["someone"] * len(rows),
        "path": [write(tmp_path / r[1].replace(".ogg", ".wav"), r[2]) for r in rows],
    })


def test_groups_by_id_and_by_content(dup_table):
    by_id = near_duplicate_groups(dup_table)
    assert by_id[0] == by_id[1]
    assert by_id[2] != by_id[3]
    assert len(set(by_id)) == len(dup_table) - 1
    by_content = near_duplicate_groups(dup_table, DirectAudio(SR))
    assert by_content[0] == by_content[1] and by_content[2] == by_content[3]
    assert len(set(by_content)) == len(dup_table) - 2  # flat-noise rows 8/9 stay apart
    assert set(by_content) == set(range(by_content.max() + 1)) and by_content[0] == 0


def test_unreadable_file_only_matched_by_id(dup_table, caplog):
    broken = dup_table.copy()
    with open(broken.loc[2, "path"], "wb") as f:
        f.write(b"garbage")
    with caplog.at_level(logging.WARNING, logger="birdrounds.data.split"):
        groups = near_duplicate_groups(broken, DirectAudio(SR))
    assert groups[2] != groups[3] and groups[0] == groups[1]
    assert any(broken.loc[2, "path"] in r.getMessage() for r in caplog.records)


def check_folds(table, folds, groups, n_folds):
    assert set(folds) <= set(range(-1, n_folds))
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1, f"group {g} split across folds"
    classes = set(table["primary_label"])
    for k in range(n_folds):
        assert set(table["primary_label"][folds != k]) == classes, f"fold {k} training lacks a class"


def test_assign_folds_keeps_duplicates_and_classes(dup_table):
    audio = DirectAudio(SR)
    folds = assign_folds(dup_table, n_folds=2, seed=0, audio=audio)
    groups = near_duplicate_groups(dup_table, audio)
    check_folds(dup_table, folds, groups, 2)
    assert folds[7] == -1  # class c has a single recording: always trained on
    assert folds[0] == folds[1] and folds[2] == folds[3]
    np.testing.assert_array_equal(folds, assign_folds(dup_table, n_folds=2, seed=0, audio=audio))


def random_table(seed, n_classes=25):
    rng = np.random.default_rng(seed)
    labels, names = [], []
    for c in range(n_classes):
        for _ in range(int(rng.integers(1, 15))):
            labels.append(f"sp{c:02d}")
            # Some recordings repeat an XC id already used (cross-listed under another label).
            xc = int(rng.integers(0, 40)) if rng.random() < 0.15 else 1000 + len(names)
            names.append(f"sp{c:02d}/XC{xc}.ogg")
    return pd.DataFrame({"primary_label": labels, "filename": names, "url": None})


@pytest.mark.parametrize("seed", range(5))
def test_assign_folds_on_random_tables(seed):
    table = random_table(seed)
    folds = assign_folds(table, n_folds=5, seed=seed)
    check_folds(table, folds, near_duplicate_groups(table), 5)
    sizes = np.bincount(folds[folds >= 0], minlength=5)
    assert sizes.min() > 0.5 * sizes.max()  # roughly balanced
    np.testing.assert_array_equal(folds, assign_folds(table, n_folds=5, seed=seed))
    assert not np.array_equal(folds, assign_folds(table, n_folds=5, seed=seed + 100))
