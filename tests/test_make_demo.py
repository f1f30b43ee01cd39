"""`make demo` as README's first command runs it, on the smoke data: the archive import comes before round 0.

The shared smoke run (conftest.smoke_run) is this `make demo`, with ROUNDS=2, EXPERIMENT=smoke and ARGS=...
"""

import json

import pandas as pd
import pytest

from conftest import DEMO_ROUNDS


@pytest.mark.slow
def test_make_demo_imports_the_archive_before_round_0(smoke_run):
    home, proc = smoke_run.home, smoke_run.demo
    assert proc.args[:2] == ["make", "-C"] and "demo" in proc.args and f"ROUNDS={DEMO_ROUNDS}" in proc.args
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    imported = pd.read_csv(home / "external_data" / "xeno_canto" / "train.csv")
    archive = json.loads((smoke_run.root / "xc_archive" / "recordings.json").read_text())
    assert 0 < len(imported) == len(archive)  # every archive recording is a minority-class one
    run = smoke_run.run_dir
    manifest = json.loads((run / "round_0" / "manifest.json").read_text())
    assert manifest["data"]["external_clips"] == len(imported)
    folders = [run / "round_0", *(run / f"round_{k}" / arm for k in range(1, DEMO_ROUNDS + 1) for arm in ("", "control"))]
    for folder in folders:  # in_students: true
        assert json.loads((folder / "metrics.json").read_text())["external_clips"] == len(imported), folder
    summary = json.loads((run / "metrics.json").read_text())
    assert [r["external_clips"] for r in summary["rounds"]] == [len(imported)] * (DEMO_ROUNDS + 1)
    assert "| round | external clips |" in (run / "report.md").read_text()
    assert len(pd.read_csv(run / "submission.csv")) > 0
