"""bench/loader_rate.py: the training loader's samples/s, with augmentation in the workers or on the device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_loader_rate_measures_both_augmentation_placements(smoke_data, tmp_path):
    records = tmp_path / "records"
    env = {**os.environ, "BIRDROUNDS_HOME": str(smoke_data),  # the shared smoke data and cache, only read
           "BIRDROUNDS_RESULTS_DIR": str(records)}
    results = {}
    for where, record in (("workers", []), ("device", ["--record"])):
        out = tmp_path / f"{where}.json"
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "loader_rate.py"), "--workers", "0", "1",
                               "--batches", "3", "--batch-size", "4", "--json", str(out), *record,
                               "data=synthetic_smoke", f"data.augment_on={where}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[where] = json.loads(out.read_text())
    # --record: one record (of the run that asked), whose results are what --json wrote, with its overrides.
    [path] = records.glob("loader-rate-*.json")
    assert f"record: {path}" in proc.stderr
    record = json.loads(path.read_text())
    assert record["benchmark"] == "loader_rate" and record["results"] == results["device"]
    assert record["overrides"] == ["data=synthetic_smoke", "data.augment_on=device"]
    for where, result in results.items():
        assert result["augment_on"] == where
        assert [r["workers"] for r in result["rows"]] == [0, 1]
        assert all(r["samples"] == 12 and r["samples_per_s"] > 0 for r in result["rows"])
    assert "transform" not in results["workers"]  # nothing runs per batch outside the workers
    transform = results["device"]["transform"]
    assert transform["batches"] >= 1 and transform["s_per_batch"] > 0
