"""Atomic artifact writes (a crash never leaves a half-written file under its final name) and the
names of a run folder's artifacts, defined here once for their writers and readers."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

# ---- a run folder: run_dir/round_k/ holds one round (round_k/control/ its equal-compute control)
MODEL_FILE = "model.pt"                   # the round's final weights (birdrounds.train.fit)
METRICS_FILE = "metrics.json"             # its final metrics and history, with its round and arm (fit)
MANIFEST_FILE = "manifest.json"           # config hash, inputs, teachers, timing (birdrounds.rounds)
ROUND_CONFIG_FILE = "config.yaml"         # the resolved config, secrets redacted (birdrounds.rounds)
DONE_FILE = "DONE"                        # the completion marker, written last (birdrounds.rounds)
PSEUDO_FILE = "pseudo_labels.parquet"     # a student's pseudo-labels (birdrounds.rounds)
# An external teacher's round 0 (birdrounds.teachers): its probabilities for every train-soundscape 5-s chunk,
# in place of a model.pt; round 1 de-noises them into its pseudo-labels.
TEACHER_CHUNKS_FILE = "teacher_chunks.parquet"
EXTERNAL_SCORES_FILE = "external_scores.json"  # data.external.filter_min_prob: each external clip's detection score
CONTROL_DIR = "control"                   # round_k/control/: the round's equal-compute control
ENSEMBLE_CNN_DIR = "cnn"                  # round_0/cnn/: teacher=ensemble's own CNN (birdrounds.rounds)
# run_dir/ itself (birdrounds.report, birdrounds.submit)
REPORT_FILE = "report.md"
REPORT_PLOT_FILE = "report.png"
SUMMARY_FILE = METRICS_FILE               # run_dir/metrics.json: every round's AUCs and gains
PREDICT_RECORD = "predict.json"           # the last `birdrounds predict` run
LOCK_FILE = ".lock"                       # the OS lock of the command writing into the folder (birdrounds.lock)
LOCK_HOLDER_FILE = ".lock.json"           # who holds it: pid, host, start time, command
# an export package (birdrounds.export)
EXPORT_REPORT_FILE = "export.json"


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """Write to a temporary file beside `path`, then rename it over `path`; on error remove it.

    `fsync=False` for artifacts whose damage is detected and rebuilt on read (cache entries).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """NaN/inf floats to None, recursively, so the file is strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write strict JSON (NaN becomes null) atomically."""
    with atomic_open(path, "w") as f:
        json.dump(json_safe(data), f, indent=2)


def rebuild_hint(path: str | os.PathLike) -> str:
    """What rebuilds a damaged file of a run folder: `recompute_from=<k>` of the round_<k> it lies in."""
    round_dir = next((p for p in Path(path).parents if re.fullmatch(r"round_\d+", p.name)), None)
    redo = f"rerun with recompute_from={round_dir.name.removeprefix('round_')} to rebuild it" if round_dir else "replace it"
    return f"{redo}, or delete it"
