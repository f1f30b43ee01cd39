"""bench/scale.py end to end at tiny sizes: every stage runs at every size and the report is complete."""

from __future__ import annotations

import json
import os
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


def measured_size(fraction: float, k: int) -> dict:
    """One size of a saved --out file, as the stages report it: work k times that of the smallest size."""
    def stage(workers: int = 0, mb: float = 200.0, **values) -> dict:
        return {"workers": workers, "self_mb": mb, "children_mb": mb / 2 if workers else 0.0,
                "peak_mb": mb + workers * mb / 2 if workers else mb, **values}

    return {"fraction": fraction, "rows": 300 * k, "duplicates": 3 * k, "soundscapes": 10 * k, "clip_mean_s": 5.0,
            "audio_s": 500.0 * k, "generate_s": 1.0, "data_bytes": 10**7 * k, "cache_bytes": 32 * 10**6 * k,
            "stages": {"layout": stage(seconds=0.1 * k, rows=300 * k),
                       "cache": stage(2, seconds=1.0 * k, files=50 * k, decoded=50 * k, audio_s=500.0 * k, skipped=0,
                                      written_bytes=32 * 10**6 * k),
                       "split": stage(seconds=0.2 * k, rows=300 * k, duplicates_joined=3 * k),
                       "mixed_val": stage(seconds=0.5 * k, background_files=10 * k, full_background_files=200),
                       "train": stage(2, 300.0, seconds=2.0 + 0.3 * k, dataset_s=0.3 * k, steps=2, rows=300 * k,
                                      step_s=1.0, written_bytes=10**6),
                       "pseudo": stage(seconds=1.0 * k, windows=100 * k, full_windows=200_000, window_s=20.0,
                                       written_bytes=10**5 * k)}}


def test_record_holds_the_out_json_and_reanalysing_records_only_when_asked(tmp_path):
    saved = tmp_path / "scale.json"
    saved.write_text(json.dumps({"args": {"workdir": str(tmp_path / "work"), "fractions": [0.001, 0.002, 0.004],
                                          "train_steps": 2, "batch_size": 4},
                                 "sizes": [measured_size(f, k) for f, k in ((0.001, 1), (0.002, 2), (0.004, 4))]}))
    records = tmp_path / "records"
    env = {**os.environ, "BIRDROUNDS_RESULTS_DIR": str(records)}
    plain = subprocess.run([sys.executable, str(SCRIPT), "--reanalyse", str(saved)], capture_output=True, text=True,
                           timeout=300, env=env)
    assert plain.returncode in (0, 1), plain.stderr[-3000:]
    assert not records.exists()  # no --record, no record
    recorded = subprocess.run([sys.executable, str(SCRIPT), "--reanalyse", str(saved), "--record"], capture_output=True,
                              text=True, timeout=300, env=env)
    assert recorded.returncode == plain.returncode and recorded.stdout == plain.stdout  # the same report
    [path] = records.glob("scale-*.json")
    assert f"record: {path}" in recorded.stderr
    record = json.loads(path.read_text())
    assert record["benchmark"] == "scale" and record["command"].startswith("python bench/scale.py --reanalyse")
    result = json.loads(saved.read_text())  # the --out JSON, rewritten by the analysis
    assert record["results"] == result and "record" not in result["args"]
    assert result["ok"] == (recorded.returncode == 0)
    lines = result["lines"]
    printed = [line for line in recorded.stdout.splitlines()
               if line.startswith("| ") and line.split(" | ")[0][2:] in STAGES]
    assert len(printed) == len(lines) > 6
    for line, ln in zip(printed, lines):
        assert line.startswith(f"| {ln['stage']} | ")
        assert ln["exponent"] is None or f" | {ln['exponent']:.2f} | " in line
    layout = next(ln for ln in lines if (ln["stage"], ln["metric"]) == ("layout", "seconds"))
    assert layout["exponent"] == pytest.approx(1.0) and layout["values"] == pytest.approx([0.1, 0.2, 0.4])
    # On the results page: the per-(stage, metric) lines as a table.
    sys.path.insert(0, str(SCRIPT.parent))
    from render_results import load_records, render

    page = render(load_records(records))
    assert "| stage | metric | driver | x | values | exponent | full_driver | projected | flags |" in page
    assert "| layout | seconds | rows | 300, 600, 1,200 | 0.1, 0.2, 0.4 | 1 |" in page
