"""Cross-validation folds that keep near-duplicate recordings together and every class in training."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from birdrounds.data.audio import AudioDecodeError

log = logging.getLogger(__name__)

_FILE_ID = re.compile(r"(XC|iNat|CSA)(\d+)", re.IGNORECASE)
_XC_URL = re.compile(r"xeno-canto\.org/(?:sounds/uploaded/\w+/)?(\d+)", re.IGNORECASE)
ENVELOPE_SEGMENTS = 32
ENVELOPE_STEP_DB = 3.0  # quantisation step of the energy envelope
ENVELOPE_FLOOR_DB = -60.0  # segments quieter than this (relative to the loudest) count as silence
DURATION_TOLERANCE_S = 0.1


def recording_key(filename: Any, url: Any = None) -> str | None:
    """Archive-prefixed recording id ('XC123', 'INAT45', 'CSA6') from the file name, else an XC url."""
    match = _FILE_ID.match(Path(str(filename)).name)
    if match:
        return f"{match.group(1).upper()}{int(match.group(2))}"
    match = _XC_URL.search(str(url)) if isinstance(url, str) else None
    return f"XC{int(match.group(1))}" if match else None


def audio_fingerprint(wave: np.ndarray, sample_rate_hz: int) -> tuple[float, np.ndarray]:
    """(duration in s rounded to 0.1, coarse energy envelope: 32 segment levels in 3-dB steps below the loudest)."""
    bounds = np.linspace(0, len(wave), ENVELOPE_SEGMENTS + 1).astype(int)
    power = np.array([
        np.mean(np.square(wave[a:b], dtype=np.float64)) if b > a else 0.0
        for a, b in zip(bounds[:-1], bounds[1:])
    ])
    level_db = 10 * np.log10(power + 1e-12)
    # Relative to the loudest segment, so a copy stored at another gain still matches.
    relative = np.clip(level_db - level_db.max(), ENVELOPE_FLOOR_DB, 0.0)
    return round(len(wave) / sample_rate_hz, 1), np.round(relative / ENVELOPE_STEP_DB).astype(np.int8)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def near_duplicate_groups(table: pd.DataFrame, audio: Any = None) -> np.ndarray:
    """Group id per row (0..G-1, in order of first row): rows of one recording or of identical audio.

    Rows are joined when they carry the same archive recording id (XC/iNat/CSA number from the file
    name, or the Xeno-canto url); the id alone decides, since the archive numbers are unique and author
    strings may be written differently by different sources. With an audio source, rows are also joined
    when their audio matches: durations within 0.1 s and energy envelopes within one 3-dB step in every
    segment. Flat envelopes (under 6 dB of range: stationary noise, silence) never content-match, since
    they say nothing about identity. Reading every file costs one pass over the audio (use the cache).
    """
    uf = _UnionFind(len(table))
    urls = table["url"] if "url" in table else [None] * len(table)
    first_row: dict[str, int] = {}
    for row, (name, url) in enumerate(zip(table["filename"], urls)):
        key = recording_key(name, url)
        if key is not None:
            uf.union(first_row.setdefault(key, row), row)
    if audio is not None:
        for i, j in _content_matches(table, audio):
            uf.union(i, j)
    roots = np.array([uf.find(i) for i in range(len(table))])
    return pd.factorize(roots)[0].astype(np.int64)


def _content_matches(table: pd.DataFrame, audio: Any) -> list[tuple[int, int]]:
    """Row pairs whose audio fingerprints match (unreadable files are warned about and left out)."""
    rows, durations, envelopes = [], [], []
    for row, path in enumerate(table["path"]):
        try:
            duration_s, envelope = audio_fingerprint(audio.load(path), audio.sample_rate_hz)
        except AudioDecodeError as err:
            log.warning("cannot decode %s for duplicate search (%s); matching it by id only", path, err)
            continue
        if envelope.max() - envelope.min() >= 2:
            rows.append(row)
            durations.append(duration_s)
            envelopes.append(envelope)
    if not rows:
        return []
    order = np.argsort(durations, kind="stable")
    rows, durations = np.array(rows)[order], np.array(durations)[order]
    envelopes = np.array(envelopes, dtype=np.int16)[order]
    # Candidates for each fingerprint: the later ones (in duration order) within the duration tolerance.
    stops = np.searchsorted(durations, durations + DURATION_TOLERANCE_S + 1e-9, side="right")
    pairs = []
    for a, stop in enumerate(stops):
        close = np.abs(envelopes[a + 1 : stop] - envelopes[a]).max(axis=1) <= 1 if stop > a + 1 else []
        pairs.extend((int(rows[a]), int(rows[b])) for b in np.flatnonzero(close) + a + 1)
    return pairs


ALWAYS_TRAIN = -1  # the fold id of rows never held out (their class has one recording group)


def assign_folds(table: pd.DataFrame, n_folds: int = 5, seed: int = 0, audio: Any = None) -> np.ndarray:
    """Fold id per row (0..n_folds-1, or -1 = always in training), deterministic for a seed.

    Near-duplicate groups (see `near_duplicate_groups`) stay in one fold. A class (primary label)
    found in only one group puts that group in fold -1, since it could not be both trained on and
    validated. Other groups are dealt class by class, rarest class first, largest group first, each to
    the fold holding the fewest rows of that class (then fewest rows overall, then at random), so every
    class has groups in at least two folds and thus appears in every fold's training part.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    groups = near_duplicate_groups(table, audio)
    pairs = pd.DataFrame({"group": groups, "label": table["primary_label"].astype(str).to_numpy()})
    class_rows = pairs.groupby(["label", "group"]).size()  # rows of each class in each group
    class_groups = {c: s.index.get_level_values("group").to_numpy() for c, s in class_rows.groupby(level="label")}
    group_fold = np.full(groups.max() + 1 if len(groups) else 0, -2)  # -2 = not yet assigned
    for members in class_groups.values():
        if len(members) == 1:
            group_fold[members[0]] = ALWAYS_TRAIN
    _deal_groups(group_fold, class_groups, class_rows, np.bincount(groups), n_folds, seed)
    _keep_classes_in_training(group_fold, class_groups, class_rows)
    return group_fold[groups]


def _deal_groups(
    group_fold: np.ndarray,
    class_groups: dict[str, np.ndarray],
    class_rows: pd.Series,
    group_size: np.ndarray,
    n_folds: int,
    seed: int,
) -> None:
    """Greedy stratified dealing of unassigned groups into folds (in place)."""
    rng = np.random.default_rng(seed)
    fold_rows = np.zeros(n_folds)
    for label in sorted(class_groups, key=lambda c: (len(class_groups[c]), c)):
        members = class_groups[label]
        rows_of_class = class_rows.loc[label]
        per_fold = np.zeros(n_folds)
        for g in members[group_fold[members] >= 0]:
            per_fold[group_fold[g]] += rows_of_class[g]
        todo = members[group_fold[members] == -2]
        for g in todo[np.lexsort((rng.random(len(todo)), -group_size[todo]))]:
            fold = np.lexsort((rng.random(n_folds), fold_rows, per_fold))[0]
            group_fold[g] = fold
            per_fold[fold] += rows_of_class[g]
            fold_rows[fold] += group_size[g]


def _keep_classes_in_training(
    group_fold: np.ndarray, class_groups: dict[str, np.ndarray], class_rows: pd.Series
) -> None:
    """If all of a class's groups ended up in one fold (via other classes' groups), train on the smallest."""
    for label, members in class_groups.items():
        folds = set(group_fold[members].tolist())
        if len(folds) == 1 and -1 not in folds:
            smallest = min(members, key=lambda g: (class_rows.loc[(label, g)], g))
            group_fold[smallest] = -1
