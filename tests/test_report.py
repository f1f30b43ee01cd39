"""report.md and report.png from hand-made round records."""

import json

import numpy as np
import pandas as pd

from birdrounds.pseudo import write_pseudo_labels
from birdrounds.report import completed_rounds, round_rows, write_report


def make_round(run_dir, k, soundscape_auc, clip_auc, seconds, probs=None, done=True, external_clips=None):
    folder = run_dir / f"round_{k}"
    folder.mkdir(parents=True)
    metrics = {"round": k, "val_soundscape_auc": soundscape_auc, "val_clip_auc": clip_auc}
    if external_clips is not None:
        metrics["external_clips"] = external_clips
    if probs is not None:
        top = probs.max(axis=1)
        metrics["pseudo"] = {"chunks": len(probs), "coverage_above_0.5": float((top > 0.5).mean()),
                             "mean_max_prob": float(top.mean())}
        rows = pd.DataFrame({"row_id": [f"s_{5 * (i + 1)}" for i in range(len(probs))], "file": "s.ogg",
                             "start_s": [5.0 * i for i in range(len(probs))], "end_s": [5.0 * (i + 1) for i in range(len(probs))]})
        write_pseudo_labels(folder / "pseudo_labels.parquet", rows, probs, ["a", "b"], {"round": k})
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "manifest.json").write_text(json.dumps({"round": k, "seconds": seconds}))
    if done:
        (folder / "DONE").write_text("{}")


def test_rows_changes_and_files(tmp_path):
    make_round(tmp_path, 0, 0.60, 0.90, 100.0)
    make_round(tmp_path, 1, 0.70, 0.85, 80.0, probs=np.array([[0.9, 0.1], [0.2, 0.3], [0.6, 0.7], [0.1, 0.05]], np.float32),
               external_clips=7)
    make_round(tmp_path, 2, 0.75, None, 81.0, probs=np.array([[0.8, 0.1], [0.4, 0.3]], np.float32))
    make_round(tmp_path, 3, 0.99, 0.99, 1.0, done=False)  # interrupted: not reported
    (tmp_path / "round_1.replaced-20260101-000000").mkdir()  # set aside: not reported

    assert [k for k, _ in completed_rounds(tmp_path)] == [0, 1, 2]
    rows = round_rows(tmp_path)
    assert rows[0]["val_soundscape_auc_change"] is None
    assert abs(rows[1]["val_soundscape_auc_change"] - 0.10) < 1e-12
    assert abs(rows[1]["val_clip_auc_change"] + 0.05) < 1e-12
    assert rows[2]["val_clip_auc_change"] is None and rows[1]["coverage_above_0.5"] == 0.5

    report = write_report(tmp_path).read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| -")]
    assert len(table) == 1 + 3  # header + rounds 0..2
    # round, external clips, soundscape AUC, change, control, gain, clip AUC, change, control, gain
    # (no control here: dashes; runs recorded before external counts: a dash)
    assert table[2].split(" | ")[:10] == ["| 1", "7", "0.700", "+0.100", "–", "–", "0.850", "-0.050", "–", "–"]
    assert table[1].split(" | ")[1] == "–"
    assert table[2].endswith("| 4 | 0.50 | 0.500 | 80 |")  # chunks, coverage, mean of [0.9, 0.3, 0.7, 0.1], time
    assert table[3].split(" | ")[6] == "–"  # a missing metric is a dash, not a crash
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not list(tmp_path.glob("*.tmp*"))


def test_report_of_an_empty_run_folder(tmp_path):
    report = write_report(tmp_path).read_text()
    assert report.count("\n| ") == 2  # only the header and separator rows
