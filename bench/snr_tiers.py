"""Where does a model gain? Validation-soundscape AUC by how loud the calls are (synthetic data only).

The generator records every soundscape call with its signal-to-noise ratio (`truth/soundscape_events.csv`).
This script gives each positive (row, class) cell of the validation solution the SNR of the loudest
call of that class that labels the row (the generator's own overlap rule), splits the positive cells
into tertiles by it (faint, mid, loud), and scores every finished model per tier: for each class, ROC-AUC of its
positive rows of that tier against all its negative rows, averaged over the classes with at least
`--min-positives` such rows. "all" is the usual macro soundscape AUC.

    python bench/snr_tiers.py --val-soundscapes 120 --runs /tmp/exp90/runs/seed0_e15 /tmp/exp90/runs/seed0_e15_oracle

The validation soundscapes are those of the runs' data, or its N-soundscape twin (bench/wide_val.py).
Inference only, on CPU. `--json PATH` keeps the table; `--record` keeps the same as results/snr-tiers-<date>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from birdrounds.artifacts import METRICS_FILE, MODEL_FILE, ROUND_CONFIG_FILE
from birdrounds.data.synthetic import labeled_chunks
from birdrounds.contract import SCORED_CHUNK_S as CHUNK_S, row_id
from birdrounds.metrics import ROW_ID_COLUMN
from records import add_record_option, model_folders, record_result
from wide_val import ValidationSoundscapes

TIERS = ("faint", "mid", "loud")


def positive_snr(events: pd.DataFrame, row_ids: np.ndarray, classes: list[str]) -> np.ndarray:
    """[rows, classes] SNR (dB) of the loudest call of each class that labels each row; NaN where none does.

    `events`: the generator's `filename, label, start_s, end_s, snr_db` rows; a row id is `<stem>_<end s>`.
    A call labels the 5-s rows the generator's solution gives it (`synthetic.labeled_chunks`).
    """
    position = {rid: i for i, rid in enumerate(row_ids)}
    column = {c: j for j, c in enumerate(classes)}
    snr = np.full((len(row_ids), len(classes)), np.nan)
    for ev in events.itertuples(index=False):
        j = column.get(str(ev.label))
        if j is None:
            continue
        stem = Path(ev.filename).stem
        # every chunk that starts by the call's end; rows past the file's end are not in `row_ids`
        for k in labeled_chunks(ev.start_s, ev.end_s, int(ev.end_s // CHUNK_S) + 1):
            i = position.get(row_id(stem, (k + 1) * CHUNK_S))
            if i is not None:
                snr[i, j] = ev.snr_db if np.isnan(snr[i, j]) else max(snr[i, j], ev.snr_db)
    return snr


def tier_masks(snr: np.ndarray, truth: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Masks of the positive cells in each SNR tertile, and the two cut points (dB)."""
    known = truth & ~np.isnan(snr)
    if not known.any():
        raise SystemExit("no positive cell has a call SNR: are these the generator's events?")
    cuts = np.percentile(snr[known], [100 / 3, 200 / 3])
    filled = np.nan_to_num(snr, nan=-np.inf)
    return {"faint": known & (filled < cuts[0]), "mid": known & (filled >= cuts[0]) & (filled < cuts[1]),
            "loud": known & (filled >= cuts[1])}, cuts


def tier_auc(probs: np.ndarray, truth: np.ndarray, positives: np.ndarray, min_positives: int) -> tuple[float, int]:
    """Mean over classes of ROC-AUC(positives of the tier vs every negative row); (mean, classes used)."""
    aucs = []
    for c in range(truth.shape[1]):
        pos, neg = positives[:, c], ~truth[:, c]
        if pos.sum() >= min_positives and neg.any():
            y = np.r_[np.ones(pos.sum()), np.zeros(neg.sum())]
            aucs.append(roc_auc_score(y, np.r_[probs[pos, c], probs[neg, c]]))
    return (float(np.mean(aucs)) if aucs else float("nan")), len(aucs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--val-soundscapes", type=int, default=None, metavar="N",
                        help="score on the N-soundscape twin of the runs' synthetic data (bench/wide_val.py)")
    parser.add_argument("--min-positives", type=int, default=3, help="positive rows of a tier a class needs")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    add_record_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    folders = model_folders(args.runs)
    if not folders:
        raise SystemExit("no completed round folders under --runs")
    wide = ValidationSoundscapes.build(OmegaConf.load(folders[0] / ROUND_CONFIG_FILE).data, args.val_soundscapes)
    events = pd.read_csv(wide.root / "truth" / "soundscape_events.csv")
    events = events[events["split"] == "val"]
    solution = wide.solution.set_index(ROW_ID_COLUMN).loc[wide.row_ids]
    classes = list(solution.columns)
    truth = solution.to_numpy().astype(bool)
    masks, cuts = tier_masks(positive_snr(events, wide.row_ids, classes), truth)
    print(f"{wide.n_files} validation soundscapes ({wide.root}); {int(truth.sum())} positive cells; "
          f"tiers by call SNR: faint < {cuts[0]:.1f} dB <= mid < {cuts[1]:.1f} dB <= loud\n", flush=True)
    print("| model | arm | all | faint | mid | loud |")
    print("| --- | --- | --- | --- | --- | --- |")
    table = []
    for folder in folders:
        probs, model_classes = wide.predict(folder / MODEL_FILE)
        ordered = pd.DataFrame(probs, columns=model_classes)[classes].to_numpy()
        row = {"model": str(folder), "arm": json.loads((folder / METRICS_FILE).read_text()).get("arm"),
               "all": wide.score_probs(probs, model_classes)}
        for tier in TIERS:
            row[tier], row[f"{tier}_classes"] = tier_auc(ordered, truth, masks[tier], args.min_positives)
        table.append(row)
        name = "/".join(folder.parts[-3:] if folder.name == "control" else folder.parts[-2:])
        print(f"| {name} | {row['arm']} | " + " | ".join(f"{row[k]:.3f}" for k in ("all", *TIERS)) + " |", flush=True)
    result = {"cuts_db": cuts.tolist(), "models": table}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.record:
        record_result("snr_tiers", result)


if __name__ == "__main__":
    main()
