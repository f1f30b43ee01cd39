"""bench/xc_archive_gain.py end to end at smoke scale: import, both teacher arms, students in/out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_smoke_data

REPO = Path(__file__).resolve().parents[1]


# Both arms: the smoke experiment, without its mixed validation set (an evaluation the bench does not read:
# it scores the models on the validation soundscapes itself).
BOTH = ("experiment=smoke", "data.mixed_val.enabled=false")


def bench(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BIRDROUNDS_HOME": str(home)}
    return subprocess.run([sys.executable, str(REPO / "bench" / "xc_archive_gain.py"), "--home", str(home),
                           "--seeds", "0", "--both", *BOTH, *args],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_xc_gain_bench_teachers_then_students(smoke_data, tmp_path):
    copy_smoke_data(smoke_data, tmp_path)  # nothing to synthesize
    proc = bench(tmp_path)
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "xc_gain_default.json").read_text())
    imported = (tmp_path / "external_data" / "xeno_canto" / "train.csv").read_text()
    assert result["extended"] and all(label in imported for label in result["extended"])
    (row,) = result["per_seed"]
    assert 0 <= row["macro_a"] <= 1 and 0 <= row["macro_b"] <= 1 and row["extended_scored"] >= 1
    assert "| mean ± std |" in proc.stdout and ("goal" in proc.stdout)
    without_dir = tmp_path / "runs" / "xc_without_experiment-smoke_data-mixed_val-enabled-false_s0"  # named by --both
    without = json.loads((without_dir / "round_0" / "manifest.json").read_text())
    with_xc = json.loads((tmp_path / "runs" / "xc_with_default_s0" / "round_0" / "manifest.json").read_text())
    assert without["data"]["external_clips"] == 0 < with_xc["data"]["external_clips"]

    students = bench(tmp_path, "--students")
    assert students.returncode in (0, 1), students.stdout[-2000:] + students.stderr[-2000:]
    for arm, expected in (("out", 0), ("in", with_xc["data"]["external_clips"])):
        run = tmp_path / "runs" / f"xc_students_default_{arm}_s0"
        assert json.loads((run / "round_1" / "metrics.json").read_text())["external_clips"] == expected
        # The teacher was copied and reused, not retrained.
        assert (json.loads((run / "round_0" / "manifest.json").read_text())["model_hash"] == with_xc["model_hash"])
    assert json.loads((tmp_path / "xc_gain_students_default.json").read_text())["arms"] == ["in_students=false",
                                                                                          "in_students=true"]
