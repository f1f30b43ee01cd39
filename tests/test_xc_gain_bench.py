"""bench/xc_archive_gain.py end to end at smoke scale: import, both teacher arms, students in/out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
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


def test_compare_records_the_figures_it_prints_and_saves(tmp_path, monkeypatch, capsys):
    # compare() on two arms already "trained": a validation set that knows each model's per-class AUC.
    sys.path.insert(0, str(REPO / "bench"))
    import xc_archive_gain

    home, root = tmp_path / "home", tmp_path / "data"
    (home / "external_data" / "xeno_canto").mkdir(parents=True)
    root.mkdir()
    pd.DataFrame({"primary_label": ["a", "a", "b", "c"]}).to_csv(root / "train.csv", index=False)
    imported = home / "external_data" / "xeno_canto" / "train.csv"
    pd.DataFrame({"primary_label": ["b", "b", "c"]}).to_csv(imported, index=False)
    aucs = {("without", 0): {"a": 0.80, "b": 0.60, "c": 0.50}, ("with", 0): {"a": 0.81, "b": 0.70, "c": 0.54},
            ("without", 1): {"a": 0.78, "b": 0.62, "c": 0.52}, ("with", 1): {"a": 0.78, "b": 0.64, "c": 0.60}}

    class Val:
        def per_class(self, model):
            return pd.Series(aucs[model])

    monkeypatch.setenv("BIRDROUNDS_RESULTS_DIR", str(tmp_path / "records"))
    monkeypatch.setattr(sys, "argv", [str(REPO / "bench" / "xc_archive_gain.py"), "--home", str(home), "--record",
                                      "x.y=1"])
    status = xc_archive_gain.compare(home, root, ["b", "c"], Val(), [0, 1], "lever",
                                     lambda seed: ((("without", seed), 10.0 + seed), (("with", seed), 20.0 + seed)),
                                     ("without", "with"), 0.02, lever="x.y=1", record=True, overrides=["x.y=1"])
    assert status == 0  # extended +0.070 mean, macro up
    printed = capsys.readouterr()
    [path] = (tmp_path / "records").glob("xc-archive-gain-*.json")
    assert f"record: {path}" in printed.err
    record = json.loads(path.read_text())
    assert (record["benchmark"], record["overrides"]) == ("xc_archive_gain", ["x.y=1"])
    result = record["results"]
    assert result == json.loads((home / "xc_gain_lever.json").read_text())  # the file it always writes
    assert [r["extended_change"] for r in result["per_seed"]] == pytest.approx([0.07, 0.05])
    assert [r["macro_b"] - r["macro_a"] for r in result["per_seed"]] == pytest.approx([0.05, 0.1 / 3])
    assert result["per_class"]["1"] == pytest.approx({"b": 0.02, "c": 0.08}) and result["goal_met"] is True
    for r in result["per_seed"]:
        assert (f"| {r['seed']} | {r['extended_change']:+.3f} | {r['macro_a']:.3f} | {r['macro_b']:.3f} | "
                f"{r['macro_b'] - r['macro_a']:+.3f} | {r['seconds_a']:.0f} | {r['seconds_b']:.0f} |") in printed.out
    # On the results page: the per-seed table.
    from render_results import load_records, render

    page = render(load_records(tmp_path / "records"))
    assert "| seed | extended_change | extended_scored | macro_a | macro_b | seconds_a | seconds_b |" in page
    assert "| 0 | 0.07 | 2 | 0.6333 | 0.6833 | 10 | 20 |" in page
