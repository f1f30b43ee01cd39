"""bench/rounds_gain.py --report-only: the table's arithmetic and the goal checks, on run folders written here.

Training the arms is covered by test_control.py and test_run_e2e.py; this checks what the benchmark
reads from finished folders and what it concludes (gain, headroom, share, convergence, exit status).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def write_arm(folder: Path, soundscape_auc: float, clip_auc: float, seconds: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"val_soundscape_auc": soundscape_auc, "val_clip_auc": clip_auc}))
    (folder / "manifest.json").write_text(json.dumps({"seconds": seconds}))


def make_seed(home: Path, seed: int, teacher: tuple, rounds: list[dict]) -> None:
    """rounds: per round, {"student": (soundscape, clip), "control": ..., "oracle": ...}."""
    main, oracle = home / "runs" / f"seed{seed}", home / "runs" / f"seed{seed}_oracle"
    write_arm(main / "round_0", *teacher, seconds=100)
    for k, arms in enumerate(rounds, start=1):
        write_arm(main / f"round_{k}", *arms["student"], seconds=10 * k)
        write_arm(main / f"round_{k}" / "control", *arms["control"], seconds=11 * k)
        write_arm(oracle / f"round_{k}", *arms["oracle"], seconds=12 * k)


def report(home: Path, *seeds: int, rounds: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "rounds_gain.py"), "--home", str(home),
                           "--report-only", "--rounds", str(rounds), "--seeds", *map(str, seeds)],
                          capture_output=True, text=True, timeout=120)


def goal_lines(stdout: str) -> dict[str, bool]:
    goals = stdout.split("### Goals")[1].strip().splitlines()
    return {line.split(": ", 1)[1].split(":")[0]: line.startswith("- MET") for line in goals}


def test_all_goals_met_exit_zero(tmp_path):
    # Seed 0: r1 control .70, student .73, oracle .76; r2 control .70, student .75, oracle .76.
    make_seed(tmp_path, 0, (0.65, 0.900), [
        {"student": (0.73, 0.9), "control": (0.70, 0.905), "oracle": (0.76, 0.9)},
        {"student": (0.75, 0.9), "control": (0.70, 0.905), "oracle": (0.76, 0.9)}])
    make_seed(tmp_path, 1, (0.66, 0.910), [
        {"student": (0.74, 0.9), "control": (0.70, 0.913), "oracle": (0.77, 0.9)},
        {"student": (0.74, 0.9), "control": (0.70, 0.913), "oracle": (0.77, 0.9)}])
    proc = report(tmp_path, 0, 1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # Convergence: clip AUC the control adds, +0.005 and +0.003, mean +0.004.
    assert "| 0 | 0.650 | 0.900 | 0.905 | +0.005 | 100 |" in out
    assert "| mean ± std | 0.655 ± 0.007 | 0.905 ± 0.007 | 0.909 ± 0.006 | +0.004 ± 0.001 | |" in out
    # Round 1 per seed: gain, headroom, share, student - teacher, times student / control / oracle.
    assert "| 0 | 0.700 | 0.730 | 0.760 | +0.030 | +0.060 | 0.50 | +0.080 | 10 / 11 / 12 |" in out
    assert "| 1 | 0.700 | 0.740 | 0.770 | +0.040 | +0.070 | 0.57 | +0.080 | 10 / 11 / 12 |" in out
    assert "| mean ± std | 0.700 ± 0.000 | 0.735 ± 0.007 | 0.765 ± 0.007 | +0.035 ± 0.007 | +0.065 ± 0.007 |" in out
    # Round 2 is reported as well, with its own times.
    assert "| 0 | 0.700 | 0.750 | 0.760 | +0.050 | +0.060 | 0.83 | +0.100 | 20 / 22 / 24 |" in out
    assert set(goal_lines(out).values()) == {True}


def test_one_weak_seed_and_no_headroom_fail(tmp_path):
    make_seed(tmp_path, 0, (0.65, 0.90), [{"student": (0.74, 0.9), "control": (0.70, 0.93), "oracle": (0.70, 0.9)}])
    # Seed 1's student beats its control but not its teacher (0.72).
    make_seed(tmp_path, 1, (0.72, 0.90), [{"student": (0.71, 0.9), "control": (0.70, 0.93), "oracle": (0.69, 0.9)}])
    proc = report(tmp_path, 0, 1, rounds=1)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    goals = goal_lines(proc.stdout)
    assert goals == {"teacher converged": False, "oracle - control, round 1": False,
                     "round 1 student - control": True,  # +0.025 on average
                     "round 1 student - control in every seed": False,  # seed 1: +0.010
                     "round 1 student - teacher in every seed": False,  # seed 1: -0.010
                     "round 1 share of the oracle's headroom": False}  # the oracle is worse than the control
    assert "– (no headroom)" in proc.stdout
    assert "+0.040, +0.010 (>= +0.03)" in proc.stdout


def test_missing_arm_names_the_folder(tmp_path):
    make_seed(tmp_path, 0, (0.65, 0.90), [{"student": (0.74, 0.9), "control": (0.70, 0.93), "oracle": (0.70, 0.9)}])
    (tmp_path / "runs" / "seed0" / "round_1" / "control" / "metrics.json").unlink()
    proc = report(tmp_path, 0, rounds=1)
    assert proc.returncode != 0
    assert "seed0/round_1/control/metrics.json is missing: that arm has not finished" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_controls_from_copies_finished_controls_and_needs_matching_teachers(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from rounds_gain import copy_controls

    make_seed(tmp_path, 0, (0.65, 0.90), [{"student": (0.74, 0.9), "control": (0.70, 0.93), "oracle": (0.7, 0.9)},
                                          {"student": (0.75, 0.9), "control": (0.71, 0.93), "oracle": (0.7, 0.9)}])
    source, target = tmp_path / "runs" / "seed0", tmp_path / "runs" / "seed0_lever"
    for k in (1, 2):
        (source / f"round_{k}" / "control" / "DONE").touch()
    (target / "round_1" / "control").mkdir(parents=True)
    (target / "round_1" / "control" / "partial.pt").touch()  # an unfinished control there is replaced
    copy_controls(source, target, rounds=2)
    for k, auc in ((1, 0.70), (2, 0.71)):
        copied = json.loads((target / f"round_{k}" / "control" / "metrics.json").read_text())
        assert copied["val_soundscape_auc"] == auc and (target / f"round_{k}" / "control" / "DONE").is_file()
    assert not (target / "round_1" / "control" / "partial.pt").exists()
    (source / "round_2" / "control" / "DONE").unlink()
    try:
        copy_controls(source, tmp_path / "runs" / "other", rounds=2)
    except SystemExit as err:
        assert "round_2/control has not finished" in str(err)
    else:
        raise AssertionError("an unfinished source control was copied")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "rounds_gain.py"), "--home", str(tmp_path),
                           "--tag", "lever", "--controls-from", "", "--seeds", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--controls-from TAG needs --teacher-from TAG" in proc.stderr


def test_a_preset_is_recorded_in_its_own_section_not_as_the_headline(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from render_results import load_records, render, section_of

    make_seed(tmp_path, 0, (0.65, 0.90), [{"student": (0.74, 0.9), "control": (0.70, 0.93), "oracle": (0.7, 0.9)}])
    results = tmp_path / "results"
    results.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "rounds_gain.py"), "--home", str(tmp_path),
                           "--report-only", "--rounds", "1", "--seeds", "0", "--record", "experiment=few_shot"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "BIRDROUNDS_RESULTS_DIR": str(results)})
    assert proc.returncode == 1, proc.stdout + proc.stderr  # no headroom: not every goal is met
    ((name, record),) = load_records(results)
    assert name.startswith("rounds-gain-few_shot-") and section_of(record) == "presets"
    assert record["results"]["rounds"][0]["over_teacher"]["per_seed"] == [pytest.approx(0.09)]
    page = render(load_records(results))
    assert "## Presets on their own data" in page and "Current:" not in page and "| +0.090 ± 0.000 |" in page
