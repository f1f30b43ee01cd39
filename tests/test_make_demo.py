"""`make demo` as README's first command runs it, on the smoke data: the archive import comes before round 0."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_demo_imports_the_archive_before_round_0(home, tmp_path):
    # This interpreter's environment stands in for .venv; a fresh stamp keeps make from reinstalling it.
    stamp = tmp_path / "installed"
    stamp.touch()
    env = {**os.environ, "BIRDROUNDS_HOME": str(home), "WANDB_MODE": "offline"}
    proc = subprocess.run(["make", "-C", str(REPO), "demo", f"VENV={Path(sys.executable).parent.parent}",
                           f"STAMP={stamp}", "ROUNDS=1", "ARGS=experiment=smoke logger=none"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    imported = pd.read_csv(home / "external_data" / "xeno_canto" / "train.csv")
    archive = json.loads((home / "data" / "synthetic_smoke" / "xc_archive" / "recordings.json").read_text())
    assert 0 < len(imported) == len(archive)  # every archive recording is a minority-class one
    run = home / "runs" / "smoke"
    manifest = json.loads((run / "round_0" / "manifest.json").read_text())
    assert manifest["data"]["external_clips"] == len(imported)
    for folder in (run / "round_0", run / "round_1", run / "round_1" / "control"):  # in_students: true
        assert json.loads((folder / "metrics.json").read_text())["external_clips"] == len(imported)
    summary = json.loads((run / "metrics.json").read_text())
    assert [r["external_clips"] for r in summary["rounds"]] == [len(imported)] * 2
    assert "| round | external clips |" in (run / "report.md").read_text()
    assert len(pd.read_csv(run / "submission.csv")) > 0
