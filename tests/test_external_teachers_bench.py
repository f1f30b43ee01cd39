"""bench/external_teachers.py --report-only: its arithmetic and its record, on run folders written here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fit(folder: Path, test: float, mixed: float, history: list[tuple[float, float]] | None = None,
        init: str | None = None) -> None:
    """A fit's metrics.json: test AUC (val_soundscape_auc) and val_mixed_auc, kept at the last of `history`,
    started from weights hashed `init`."""
    folder.mkdir(parents=True, exist_ok=True)
    history = history or [(test, mixed)]
    (folder / "metrics.json").write_text(json.dumps({
        "val_soundscape_auc": test, "val_mixed_auc": mixed, "selected_epoch": len(history) - 1, "init_weights_hash": init,
        "history": [{"epoch": i, "val_soundscape_auc": t, "val_mixed_auc": m} for i, (t, m) in enumerate(history)]}))


def run_folder(home: Path, arm: str, seed: int, teacher: float, students: list[float], controls: list[float] | None,
               init: str = ""):
    """A run folder; round 1's student and control start from weights hashed `init` + the seed."""
    run = home / "runs" / f"{arm}_s{seed}"
    fit(run / "round_0", teacher, teacher)
    for k, student in enumerate(students, start=1):
        start = f"{init}{seed}" if k == 1 else None
        # the epoch chosen (the last) is 0.02 below the fit's best by the test soundscapes
        fit(run / f"round_{k}", student, student, history=[(student + 0.02, student - 0.1), (student, student)],
            init=start)
        if controls is not None:
            fit(run / f"round_{k}" / "control", controls[k - 1], controls[k - 1], init=start)


def test_report_and_record(tmp_path):
    home, results = tmp_path / "home", tmp_path / "results"
    results.mkdir()
    for seed, shift in ((0, 0.0), (1, 0.02)):
        run_folder(home, "cnn", seed, 0.60 + shift, [0.65 + shift, 0.70 + shift], [0.62 + shift, 0.63 + shift], "cnn")
        # run without controls; its round-1 students start from other weights than any arm with controls
        run_folder(home, "zero_shot", seed, 0.95, [0.75 + shift, 0.72 + shift], None, "scratch")
        # students on the truth
        run_folder(home, "oracle_zero_shot", seed, 0.95, [0.80 + shift, 0.82 + shift], None, "scratch")
        if seed == 0:  # an arm measured on one seed only: reported with n=1
            run_folder(home, "probe", seed, 0.90, [0.70, 0.71], None, "cnn")
        run_folder(home, "oracle_cnn", seed, 0.60 + shift, [0.75 + shift, 0.80 + shift], None, "cnn")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "external_teachers.py"), "--home", str(home),
                           "--data-root", str(tmp_path), "--seeds", "0", "1", "--arms", "cnn", "zero_shot", "probe",
                           "--oracle-arms", "zero_shot", "cnn", "--oracle-truth", "truth.csv", "--report-only", "--record", "--data-name", "fabricated"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "BIRDROUNDS_RESULTS_DIR": str(results)})
    assert proc.returncode == 0, proc.stderr
    assert "cnn        teacher 0.610 +- 0.014" in proc.stdout
    assert "round 2: student 0.710 +- 0.014, control 0.640 +- 0.014, gain +0.070 +- 0.000" in proc.stdout
    assert "round 1: student 0.760 +- 0.014, control -, gain -, student - teacher -0.190 +- 0.014" in proc.stdout
    record = json.loads(next(results.glob("external-teachers-*.json")).read_text())
    summary = record["results"]["summary"]
    selection = summary["selection_signal"]
    # every student fit chose an epoch 0.02 below its best; export would take round 2 for cnn, round 1 for zero_shot
    assert selection["epoch_choice_regret"]["mean"] == pytest.approx(0.02)
    assert selection["round_choice_regret"]["mean"] == pytest.approx(0.0)
    # an oracle's teacher is its arm's (counted once); its 4 students count; probe: 1 teacher + 2 students
    assert selection["models"] == 27 and selection["cnn_models"] == 24
    assert "not run: probe_s1 (left out)" in proc.stdout and summary["arms"]["probe"]["round_2"]["student"]["n"] == 1
    # probe, run without controls, shares its round-1 start with cnn (seed 0): it is compared with cnn's controls
    assert summary["arms"]["probe"]["controls_from"] == {"0": "cnn"}
    assert summary["arms"]["probe"]["round_2"]["gain_vs_control"]["per_seed"] == [pytest.approx(0.71 - 0.63)]
    assert summary["arms"]["zero_shot"]["controls_from"] == {}  # no arm with controls started where it did
    probe_row = next(r for r in record["results"]["tables"][0]["rows"] if r[:2] == ["probe", "round 2 student"])
    assert probe_row[3] == "0.630 ± 0.000 (n=1) (cnn's)"
    # oracle_cnn's gain is over cnn's controls: round 2 0.80 - 0.63
    assert "round 2: student 0.810 +- 0.014, control 0.640 +- 0.014, gain +0.170 +- 0.000" in proc.stdout
    # its controls are its arm's (zero_shot has none here)
    assert "oracle_zero_shot teacher 0.950" in proc.stdout and "round 2: student 0.830 +- 0.014, control -" in proc.stdout
    assert record["benchmark"] == "external_teachers" and record["data"] == "fabricated"
    assert [t["caption"] for t in record["results"]["tables"]][0].startswith("Test soundscape AUC")
