"""bench/snr_tiers.py: the SNR of the call behind each positive cell, the tertile masks, the per-tier AUC."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import snr_tiers  # noqa: E402
from snr_tiers import positive_snr, tier_auc, tier_masks  # noqa: E402

from birdrounds.data.synthetic import Event, chunk_labels
from birdrounds.contract import row_ids


def test_positive_snr_marks_exactly_the_generators_positive_cells_with_the_loudest_call():
    classes = ["a", "b"]
    events = [Event("a", 3.0, 7.0, -2.0),   # labels rows 5 and 10
              Event("a", 4.8, 5.2, 9.0),    # 0.4 s call: needs 0.2 s of overlap, gets 0.2 in each row
              Event("b", 9.8, 10.1, 4.0),   # 0.2 s in row 10, needs 0.15: labels row 10 only
              Event("b", 14.9, 17.0, 1.0),  # 0.1 s in row 15: not labeled there; row 20 yes
              Event("other", 0.0, 5.0, 20.0)]  # an unlisted species: never a positive
    rows = np.array(row_ids("S1", 4))
    table = pd.DataFrame([{"filename": "S1.ogg", "label": e.label, "start_s": e.start_s, "end_s": e.end_s,
                           "snr_db": e.snr_db} for e in events])
    snr = positive_snr(table, rows, classes)
    truth = chunk_labels(events, 20.0, classes).astype(bool)
    assert np.array_equal(~np.isnan(snr), truth)  # the same cells as the solution
    assert snr[0, 0] == 9.0 and snr[1, 0] == 9.0  # the louder of the two a-calls in both rows
    assert snr[1, 1] == 4.0 and snr[3, 1] == 1.0


def test_tiers_split_positives_into_thirds_and_auc_scores_each_tier_against_all_negatives():
    rng = np.random.default_rng(0)
    truth = np.zeros((90, 1), dtype=bool)
    truth[:30, 0] = True
    snr = np.full((90, 1), np.nan)
    snr[:30, 0] = np.arange(30, dtype=float)  # 0..29 dB
    masks, cuts = tier_masks(snr, truth)
    assert [int(m.sum()) for m in masks.values()] == [10, 10, 10]
    assert masks["faint"][:10, 0].all() and masks["loud"][20:30, 0].all() and not masks["mid"][30:].any()
    probs = rng.uniform(0.0, 0.5, size=(90, 1))  # negatives and faint calls: chance
    probs[10:30, 0] = 0.9  # mid and loud calls heard
    assert tier_auc(probs, truth, masks["loud"], 3) == (1.0, 1)
    faint, used = tier_auc(probs, truth, masks["faint"], 3)
    assert 0.2 < faint < 0.8 and used == 1
    mean, used = tier_auc(probs, truth, masks["faint"], 11)  # a class with fewer positives is left out
    assert np.isnan(mean) and used == 0


def test_runs_as_a_script_from_any_folder(tmp_path):
    # bench/ is on sys.path only because the script lives there: it imports records and wide_val by name.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "snr_tiers.py"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--record" in proc.stdout


def test_record_holds_the_printed_table(tmp_path, monkeypatch, capsys):
    # One 30-s validation soundscape, two classes, a call per 5-s row at SNRs 0, 3, ..., 15 dB: two per tier.
    classes, snrs = ["a", "b"], [0.0, 3.0, 6.0, 9.0, 12.0, 15.0]
    events = [Event(classes[k % 2], 5 * k + 1.0, 5 * k + 4.0, snr) for k, snr in enumerate(snrs)]
    root = tmp_path / "data"
    (root / "truth").mkdir(parents=True)
    pd.DataFrame([{"filename": "S1.ogg", "label": e.label, "start_s": e.start_s, "end_s": e.end_s, "snr_db": e.snr_db,
                   "split": "val"} for e in events]).to_csv(root / "truth" / "soundscape_events.csv", index=False)
    rows = np.array(row_ids("S1", 6))
    truth = chunk_labels(events, 30.0, classes)
    solution = pd.DataFrame(truth, columns=classes).assign(row_id=rows)
    run = tmp_path / "run"
    folders = [run / "round_0", run / "round_1", run / "round_1" / "control"]
    for folder, arm in zip(folders, ("teacher", "student", "control")):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps({"arm": arm}))
    (folders[0] / "config.yaml").write_text("data: {}\n")

    def predict(model_path: Path):  # the student hears every call; the others are noise. Classes in another order.
        noise = np.random.default_rng(len(str(model_path))).uniform(size=truth.shape)
        probs = truth + 0.1 * noise if model_path.parent == folders[1] else noise
        return probs[:, ::-1], classes[::-1]

    val = SimpleNamespace(root=root, n_files=1, row_ids=rows, solution=solution, predict=predict,
                          score_probs=lambda probs, model_classes: float(probs[:, 0].mean()))
    monkeypatch.setattr(snr_tiers, "ValidationSoundscapes", SimpleNamespace(build=lambda data_cfg, n: val))
    monkeypatch.setattr(snr_tiers, "model_folders", lambda runs: folders if runs == [run] else [])
    monkeypatch.setenv("BIRDROUNDS_RESULTS_DIR", str(tmp_path / "records"))
    table = tmp_path / "table.json"
    monkeypatch.setattr(sys, "argv", [str(REPO / "bench" / "snr_tiers.py"), "--runs", str(run), "--min-positives", "1",
                                      "--json", str(table), "--record"])
    snr_tiers.main()

    printed = capsys.readouterr()
    [path] = (tmp_path / "records").glob("snr-tiers-*.json")
    assert f"record: {path}" in printed.err
    record = json.loads(path.read_text())
    assert (record["benchmark"], record["name"]) == ("snr_tiers", "snr-tiers")
    assert record["command"] == f"python bench/snr_tiers.py --runs {run} --min-positives 1 --json {table} --record"
    assert record["results"] == json.loads(table.read_text())  # what --json writes
    assert np.allclose(record["results"]["cuts_db"], [5.0, 10.0])
    models = record["results"]["models"]
    assert [m["arm"] for m in models] == ["teacher", "student", "control"]
    assert all(models[1][tier] == 1.0 and models[1][f"{tier}_classes"] == 2 for tier in ("faint", "mid", "loud"))
    lines = [line for line in printed.out.splitlines() if line.startswith("| run/")]
    names = ("run/round_0", "run/round_1", "run/round_1/control")
    assert lines == [f"| {name} | {m['arm']} | " + " | ".join(f"{m[k]:.3f}" for k in ("all", *snr_tiers.TIERS)) + " |"
                     for name, m in zip(names, models)]
    # It renders on the results page as a table of the models.
    from render_results import load_records, render

    page = render(load_records(tmp_path / "records"))
    assert "| model | arm | all | faint | faint_classes | mid | mid_classes | loud | loud_classes |" in page
    assert f"| {run / 'round_1'} | student | {models[1]['all']:.4g} | 1 | 2 | 1 | 2 | 1 | 2 |" in page
