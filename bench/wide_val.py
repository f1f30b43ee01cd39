"""A wider labeled validation set for the benchmarks: the same synthetic data, more validation soundscapes.

The demo data has 10 labeled validation soundscapes (120 scored rows); on them 7 of 24 classes have no
positive row and several have 2-3, so two models 0.02 apart in macro AUC are within the score's own
noise (bench/mixed_val_corr.py prints that ceiling). The generator plans the validation soundscapes
after everything else from the same seeded stream, so asking it for N > 10 gives the same labeled
clips, train soundscapes, archive and first 10 validation soundscapes (checked here: tables byte-equal,
audio decoded sample-equal) plus N - 10 new ones. Models trained on the demo data are then scored on
the wider set after training, without retraining; nothing of it enters training or model selection.

    val = ValidationSoundscapes.build(data_cfg, n_soundscapes=40)  # data_cfg: a run's `data` config
    auc = val.score(run_dir / "round_1" / "model.pt")             # cached next to the model
    per_class = val.per_class(run_dir / "round_1" / "model.pt")

`n_soundscapes=None` (or the data's own count) scores on the data's own validation soundscapes.

From the shell, a finished run (e.g. `make demo`'s) scored on the wider set, student against control:

    python bench/wide_val.py runs/demo --val-soundscapes 40 [--record]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from omegaconf import DictConfig, OmegaConf

from birdrounds.artifacts import CONTROL_DIR, DONE_FILE, MODEL_FILE, ROUND_CONFIG_FILE
from birdrounds.data.audio import AudioCache
from birdrounds.data.prepare import synthesize
from birdrounds.data.soundscapes import SoundscapeChunks
from birdrounds.contract import SCORED_CHUNK_S
from birdrounds.metrics import ROW_ID_COLUMN, per_class_roc_auc, soundscape_auc
from birdrounds.model import checkpoint_hash, load_checkpoint
from birdrounds.pseudo import chunk_rows, predict_chunks
from birdrounds.report import completed_rounds
from records import add_record_option, record_result

# Files that must be identical between the run's data and the wider copy: everything a model trains on.
SAME_TABLES = ("train.csv", "taxonomy.csv", "truth/train_soundscape_labels.csv")


@dataclasses.dataclass
class ValidationSoundscapes:
    """Validation soundscapes (5-s chunks) with their Kaggle-format solution."""

    root: Path
    chunks: SoundscapeChunks
    solution: pd.DataFrame

    @property
    def n_files(self) -> int:
        return len(set(self.chunks.rows["file"]))

    @classmethod
    def build(cls, data_cfg: DictConfig, n_soundscapes: int | None = None, unseen: bool = False) -> "ValidationSoundscapes":
        """The data's validation soundscapes, or (generated once, next to it) its twin with `n_soundscapes`.

        `unseen=True` leaves out the data's own validation soundscapes, on which each round chose its kept
        epoch (`train.select_by`): a score used to choose is optimistic, the rest of the twin is not.
        """
        if data_cfg.get("synth") is None:
            raise SystemExit("the benchmark needs the synthetic data (data.synth): it has labeled validation "
                             "soundscapes and a generator")
        root = base = synthesize(data_cfg.synth, data_cfg.root, num_workers=data_cfg.num_workers)  # if not there yet
        if n_soundscapes and n_soundscapes != data_cfg.synth.n_val_soundscapes:
            root = base.with_name(f"{base.name}_val{n_soundscapes}")
            spec = OmegaConf.merge(data_cfg.synth, {"n_val_soundscapes": n_soundscapes})
            synthesize(spec, root, num_workers=data_cfg.num_workers)
            check_same_training_data(base, root)
        audio = AudioCache(data_cfg.cache_dir, data_cfg.sample_rate_hz, dtype=data_cfg.cache_dtype)
        files = sorted((root / "val_soundscapes").glob("*.ogg"))
        solution = pd.read_csv(root / "val_solution.csv")
        if unseen:
            seen = {p.stem for p in (base / "val_soundscapes").glob("*.ogg")}
            files = [f for f in files if f.stem not in seen]
            solution = solution[~solution[ROW_ID_COLUMN].str.rsplit("_", n=1).str[0].isin(seen)].reset_index(drop=True)
            if not files:
                raise SystemExit(f"{root}: no validation soundscape beyond the {len(seen)} used for selection; "
                                 "ask for more (--val-soundscapes)")
        chunks = SoundscapeChunks(files, audio, window_s=SCORED_CHUNK_S, stride_s=SCORED_CHUNK_S)
        return cls(root=root, chunks=chunks, solution=solution)

    def predict(self, model_path: Path) -> tuple[np.ndarray, list[str]]:
        """Chunk probabilities of a checkpoint and its class list."""
        model, ckpt = load_checkpoint(model_path)
        model.eval()
        return predict_chunks([model], self.chunks, batch_size=32), list(ckpt["classes"])

    @property
    def row_ids(self) -> np.ndarray:
        """The chunks' Kaggle row ids, in `predict`'s row order."""
        return chunk_rows(self.chunks)[ROW_ID_COLUMN].to_numpy()

    def score_probs(self, probs: np.ndarray, classes: list[str]) -> float:
        """Macro soundscape AUC of chunk probabilities in `predict`'s row order."""
        return soundscape_auc(probs, self.row_ids, self.solution, classes)

    def score(self, model_path: Path) -> float:
        """Macro soundscape AUC of a checkpoint, cached in `<model>.val<N>.json` under its weights' hash."""
        cache = model_path.with_name(f"{model_path.stem}.val{self.n_files}.json")
        digest = checkpoint_hash(model_path)
        if cache.is_file():
            record = json.loads(cache.read_text())
            if record.get("checkpoint_hash") == digest and record.get("root") == str(self.root):
                return float(record["val_soundscape_auc"])
        probs, classes = self.predict(model_path)
        auc = self.score_probs(probs, classes)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text(json.dumps({"val_soundscape_auc": auc, "checkpoint_hash": digest, "root": str(self.root),
                                   "files": self.n_files}))
        os.replace(tmp, cache)
        return auc

    def per_class(self, model_path: Path) -> pd.Series:
        """Per-class ROC-AUC of a checkpoint (NaN for a class without positive rows)."""
        probs, classes = self.predict(model_path)
        pred = pd.DataFrame(probs, columns=classes).assign(row_id=self.row_ids)
        truth = self.solution.set_index(ROW_ID_COLUMN).loc[pred[ROW_ID_COLUMN]].reset_index()
        return per_class_roc_auc(truth.reindex(columns=classes, fill_value=0), pred[classes])


def check_same_training_data(base: Path, wide: Path) -> None:
    """Exit unless `wide` holds exactly `base`'s training data and first validation soundscapes."""
    for name in SAME_TABLES:
        if (base / name).read_bytes() != (wide / name).read_bytes():
            raise SystemExit(f"{wide / name} differs from {base / name}: the wider set is not the same data")
    for folder in ("train_audio", "train_soundscapes", "val_soundscapes"):
        for path in sorted((base / folder).rglob("*.ogg")):
            # Ogg stream serial numbers differ between encodes: compare decoded samples.
            twin = wide / path.relative_to(base)
            if not twin.is_file() or not np.array_equal(sf.read(path)[0], sf.read(twin)[0]):
                raise SystemExit(f"{twin} differs from {path}: the wider set is not the same data")
    solution = pd.read_csv(base / "val_solution.csv").set_index(ROW_ID_COLUMN)
    wide_solution = pd.read_csv(wide / "val_solution.csv").set_index(ROW_ID_COLUMN)
    if not wide_solution.loc[solution.index].equals(solution):
        raise SystemExit(f"{wide / 'val_solution.csv'} disagrees with {base / 'val_solution.csv'} on shared rows")


def round_arms(run_dir: Path) -> list[tuple[int, Path, Path | None]]:
    """(round, model folder, its control folder or None) for every completed round of a run, in order."""
    return [(index, folder, folder / CONTROL_DIR if (folder / CONTROL_DIR / DONE_FILE).is_file() else None)
            for index, folder in completed_rounds(run_dir)]


def main() -> None:
    parser = argparse.ArgumentParser(description="Score a finished run's rounds and controls on the synthetic "
                                                 "data's validation soundscapes, its own and a wider twin.")
    parser.add_argument("run_dir", type=Path, help="a run folder (runs/<experiment_name>) on the synthetic data")
    parser.add_argument("--val-soundscapes", type=int, default=40, metavar="N",
                        help="validation soundscapes of the wider twin (default 40)")
    add_record_option(parser)
    args = parser.parse_args()
    arms = round_arms(args.run_dir)
    if not arms:
        raise SystemExit(f"{args.run_dir}: no completed round_*/ folder (DONE marker)")
    data_cfg = OmegaConf.load(arms[0][1] / ROUND_CONFIG_FILE).data
    own, wide = ValidationSoundscapes.build(data_cfg), ValidationSoundscapes.build(data_cfg, args.val_soundscapes)
    print(f"| round | student, {own.n_files} soundscapes | control | gain | "
          f"student, {wide.n_files} soundscapes | control | gain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for index, folder, control in arms:
        cells, row = [], {"round": index}
        for val, which in ((own, "own"), (wide, "wide")):
            student = val.score(folder / MODEL_FILE)
            if control is None:
                cells += [f"{student:.3f}", "–", "–"]
                row.update({f"student_{which}": student, f"control_{which}": None, f"gain_{which}": None})
            else:
                reference = val.score(control / MODEL_FILE)
                cells += [f"{student:.3f}", f"{reference:.3f}", f"{student - reference:+.3f}"]
                row.update({f"student_{which}": student, f"control_{which}": reference,
                            f"gain_{which}": student - reference})
        rows.append(row)
        print(f"| {index} | " + " | ".join(cells) + " |", flush=True)
    if args.record:  # "own": the data's validation soundscapes; "wide": its twin with --val-soundscapes
        record_result("wide_val", {"own_val_soundscapes": own.n_files, "wide_val_soundscapes": wide.n_files,
                                   "rounds": rows})


if __name__ == "__main__":
    main()
