"""bench/decode_speed.py runs end to end: every container and rate measured, the goal line printed."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_decode_speed_bench_measures_every_container_and_rate(tmp_path):
    records = sorted((REPO / "results").glob("*.json"))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "decode_speed.py"), "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1 = goal not met on a busy machine; not a failure here
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| container")
            and not line.startswith("| ---")]
    assert {tuple(r.split(" | ")[:2]) for r in rows} == {(f"| {c}", str(hz)) for c in ("ogg", "flac", "mp3")
                                                         for hz in (32000, 44100, 48000)}
    assert all(float(r.split(" | ")[2]) > 0 for r in rows)
    goal = proc.stdout.strip().splitlines()[-1]
    assert goal.startswith("goal at 44.1/48 kHz") and goal.endswith(("met", "NOT MET"))
    assert (proc.returncode == 0) == goal.endswith(": met")
    assert sorted((REPO / "results").glob("*.json")) == records  # no record without --record
