"""bench/scale.py end to end at tiny sizes: every stage runs at every size and the report is complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scale.py"
STAGES = ("layout", "cache", "split", "mixed_val", "train", "pseudo")


@pytest.mark.slow
def test_scale_bench_runs_every_stage_at_every_size(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "work"), "--fractions", "0.0005", "0.001", "0.0015",
         "--train-steps", "2", "--batch-size", "4", "--clip-s", "1", "2", "--soundscape-s", "5", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    sizes = result["sizes"]
    assert [s["fraction"] for s in sizes] == [0.0005, 0.001, 0.0015]
    for size in sizes:
        assert set(size["stages"]) == set(STAGES)
        for stage, r in size["stages"].items():
            assert r["seconds"] > 0 and r["self_mb"] > 0 and r["peak_mb"] >= r["self_mb"], (stage, r)
        assert size["stages"]["train"]["steps"] == 2
        assert size["stages"]["cache"]["skipped"] == 0
        assert size["stages"]["split"]["duplicates_joined"] >= size["duplicates"]  # exact copies are found
    cache_bytes = [s["cache_bytes"] for s in sizes]
    assert cache_bytes[0] > 0 and cache_bytes == sorted(cache_bytes) and cache_bytes[-1] > cache_bytes[0]
    assert result["ok"] == (proc.returncode == 0)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    for stage in STAGES:
        assert any(line.startswith(f"| {stage} |") for line in table), stage
    assert "B per audio second" in proc.stdout
