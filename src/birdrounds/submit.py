"""`birdrounds export` and `birdrounds predict` from the config: the last step of a run.

export:  a round's checkpoint(s) -> `export.out_dir/` (model.onnx fast path, model_waveform.onnx,
         classes.json, the standalone infer.py, README.md, export.json), each graph checked against
         PyTorch on real soundscape chunks.
predict: exported model(s) over a folder of soundscapes -> submission.csv; on the labeled validation
         soundscapes it also scores the AUC with and without smoothing into `run_dir/predict.json`,
         which report.md shows.

The export records the `predict` config's post-processing (contract.RECORDED_SETTINGS) in each graph, as
the defaults of the package's infer.py: its README command then writes the CSV `birdrounds predict`
writes. `predict` itself stays driven by its config and warns when that differs from the recording.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from birdrounds import infer
from birdrounds.artifacts import EXPORT_REPORT_FILE, METRICS_FILE, MODEL_FILE, PREDICT_RECORD, write_json_atomic
from birdrounds.audio_io import AUDIO_EXTENSIONS, AudioReadError, list_audio_files, read_audio
from birdrounds.checks import round_checks
from birdrounds.config import ConfigError
from birdrounds.contract import ModelFormatError
from birdrounds.data.layout import data_path
from birdrounds.metrics import ROW_ID_COLUMN, soundscape_auc
from birdrounds.report import best_round, completed_rounds, round_rows, write_report

log = logging.getLogger(__name__)


def export_checkpoints(cfg: DictConfig) -> list[Path]:
    """`export.checkpoints`, else `export.round`'s model.pt, else the best completed round's (see `pick_round`).

    A round whose model is not usable (birdrounds.checks: at chance, or too few steps to learn) is refused
    unless `export.force=true`.
    """
    if cfg.export.checkpoints:
        paths = [Path(p) for p in cfg.export.checkpoints]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"export.checkpoints: not found: {', '.join(missing)}")
        return paths
    run_dir = Path(cfg.run_dir)
    done = dict(completed_rounds(run_dir))
    if not done:
        raise ConfigError(f"export.round: no completed round in {run_dir}; run `python rounds/run.py` first "
                          "or pass export.checkpoints=[...]")
    k = pick_round(run_dir) if cfg.export.round is None else cfg.export.round
    if k not in done:
        raise ConfigError(f"export.round: round {k} is not complete in {run_dir} (completed: {sorted(done)})")
    if not (done[k] / MODEL_FILE).is_file():
        raise ConfigError(f"export.round: round {k} in {run_dir} is an external teacher, which has no model to "
                          f"export; export a student round (export.round=1 or later)")
    checks = round_checks(json.loads((done[k] / METRICS_FILE).read_text()))
    if not checks.usable:
        if not cfg.export.get("force", False):
            raise ConfigError(f"export.force: round {k} in {run_dir} is not usable ({checks.problems[0]}); "
                              "pass export.force=true to export it anyway")
        log.warning("exporting round %d although it is not usable (export.force=true): %s", k, "; ".join(checks.problems))
    return [done[k] / MODEL_FILE]


def pick_round(run_dir: Path) -> int:
    """The round `export.round: null` takes: the best by the score every round's model was kept by, else the last."""
    # An external teacher's round 0 has no model to export: it is not a candidate.
    exportable = {idx for idx, folder in completed_rounds(run_dir) if (folder / MODEL_FILE).is_file()}
    rows = [r for r in round_rows(run_dir) if r["round"] in exportable] or round_rows(run_dir)
    best = best_round(rows)
    if best is None:
        log.info("exporting the last completed round %d (export.round=K picks another)", rows[-1]["round"])
        return rows[-1]["round"]
    log.info("exporting round %d: the best %s (%.4f) of rounds %s (export.round=K picks another)",
             best[0], best[1], best[2], ", ".join(str(r["round"]) for r in rows))
    return best[0]


def soundscape_windows(folders: list[Path], sample_rate_hz: int, window_s: float, n: int) -> np.ndarray | None:
    """Up to `n` real windows [n, window samples], spread over the soundscapes of `folders` (None if none)."""
    files = [f for folder in folders if folder.is_dir() for f in list_audio_files(folder)]
    length = round(window_s * sample_rate_hz)
    windows: list[np.ndarray] = []
    for path in files:
        try:
            wave = read_audio(path, sample_rate_hz)
        except AudioReadError as err:
            log.warning("skipping %s for export checks: %s", path, err)
            continue
        starts = range(0, max(len(wave) - length, 0) + 1, length)
        windows += [np.pad(wave[s:s + length], (0, max(0, length - len(wave[s:])))) for s in starts]
        if len(windows) >= 4 * n:
            break
    if not windows:
        return None
    pick = np.linspace(0, len(windows) - 1, min(n, len(windows))).round().astype(int)
    return np.stack([windows[i] for i in pick]).astype(np.float32)


def _data_path(cfg: DictConfig, key: str) -> Path:
    """The data table or folder `key` as `data.*` configures it (layout.DEFAULT_PATHS)."""
    return data_path(cfg.data.root, key, cfg.data.get(key))


def _soundscape_folders(cfg: DictConfig) -> list[Path]:
    """The unlabeled and the validation soundscape folders of `data`."""
    return [_data_path(cfg, "soundscapes_dir"), _data_path(cfg, "val_soundscapes_dir")]


def run_export(cfg: DictConfig) -> dict[str, Any]:
    """Export the checkpoints named by `cfg.export` as a package; returns export.json's content.

    The `predict` config's post-processing at this moment is recorded in every graph (see the module doc).
    """
    from birdrounds.export import KINDS, checkpoint_window_s, export_package
    from birdrounds.model import load_checkpoint

    # The exporter's graph passes log every rewrite at INFO.
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    kinds = list(cfg.export.kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ConfigError(f"export.kinds: must be a non-empty list of {KINDS}, got {kinds}")
    checkpoints = export_checkpoints(cfg)
    predict_settings = infer.recorded_settings(inference_settings(cfg))
    out_dir = Path(cfg.export.out_dir)
    try:
        infer.check_output(out_dir / EXPORT_REPORT_FILE)
    except infer.OutputError as err:
        raise ConfigError(f"export.out_dir: {err}") from None
    _, ckpt = load_checkpoint(checkpoints[0])
    window_s = checkpoint_window_s(ckpt)
    n_audio = max(cfg.export.verify_chunks, cfg.export.calibration_chunks if cfg.export.int8 else 0)
    audio = soundscape_windows(_soundscape_folders(cfg), ckpt["audio"]["sample_rate_hz"], window_s, n_audio)
    if audio is None:
        log.warning("no readable soundscapes under %s: checking the export on noise", cfg.data.root)
    verify = audio[np.linspace(0, len(audio) - 1, min(cfg.export.verify_chunks, len(audio))).round().astype(int)] \
        if audio is not None else None
    log.info("exporting %s as %s to %s (predict settings recorded: %s)", [str(p) for p in checkpoints], kinds,
             out_dir, predict_settings)
    report = export_package([str(p) for p in checkpoints], out_dir, kind=kinds[0], verify_audio=verify,
                            int8=cfg.export.int8, calibration=audio, predict_settings=predict_settings,
                            atol=cfg.export.atol, extra_kinds=kinds[1:])
    for key in ("onnx", *kinds[1:]):
        part = report[key]
        log.info("%s: %s graph, max |ONNX - PyTorch| = %.2e on %d %s", part["path"], part["kind"],
                 part["max_abs_diff"], part["n_verify"], part["verify_inputs"])
    return report


def inference_settings(cfg: DictConfig) -> infer.InferenceSettings:
    """`cfg.predict` as infer.InferenceSettings (a bad value is reported naming its predict.* key)."""
    p = cfg.predict
    values = {"intra_op_threads": p.threads, "model_workers": p.model_workers, "decode_workers": p.decode_workers,
              "batch_size": p.batch_size,
              "window_stride_s": p.window_stride_s, "tta_shift_s": p.tta_shift_s,
              "smoothing": tuple(p.smoothing or ()), "file_scale_alpha": p.file_scale_alpha,
              "expected_duration_s": p.expected_duration_s, "engine": p.engine}
    try:
        return infer.InferenceSettings(**values)
    except ValueError as err:
        raise ConfigError(f"predict: {err}") from None


def run_predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict `predict.input_dir` with `predict.models`, write the submission, score it when labeled.

    The models, settings, sample submission columns and output folder are checked before any file is
    predicted; a problem there is a ConfigError naming its predict.* key.
    """
    from birdrounds.data.layout import read_table

    models = [Path(m) for m in cfg.predict.models]
    missing = [str(m) for m in models if not m.is_file()]
    if not models or missing:
        raise ConfigError(f"predict.models: not found: {', '.join(missing) or '[]'} (run `birdrounds export` first)")
    solution_path = cfg.predict.solution
    if cfg.predict.input_dir is None:
        input_dir = _soundscape_folders(cfg)[1]
        solution_path = solution_path or _data_path(cfg, "val_solution")
    else:
        input_dir = Path(cfg.predict.input_dir)
    if not input_dir.is_dir():
        raise ConfigError(f"predict.input_dir: not a folder: {input_dir}")
    sample_cfg = cfg.predict.sample_submission
    sample = _data_path(cfg, "sample_submission") if sample_cfg == "data" else Path(sample_cfg) if sample_cfg else None
    if sample is not None and not sample.is_file():
        raise ConfigError(f"predict.sample_submission: not found: {sample}")
    files = list_audio_files(input_dir)
    if not files:  # (the exported infer.py, which Kaggle runs on an empty test folder, writes a header-only file)
        nested = next((p for p in input_dir.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS), None)
        where = f"; there is audio in its subfolder {nested.parent}: point predict.input_dir there" if nested else ""
        raise ConfigError(f"predict.input_dir: no audio files in {input_dir}{where} (nothing was written)")
    settings = inference_settings(cfg)
    loaded = _load_models(models, settings)
    _check_sample_submission(sample, loaded[0].info.classes)
    try:
        infer.check_output(cfg.predict.output)
    except infer.OutputError as err:
        raise ConfigError(f"predict.output: {err}") from None
    preds = infer.predict_files(loaded, files, settings)
    infer.write_submission(cfg.predict.output, preds.row_ids, preds.classes, preds.probs, sample_submission=sample)
    record: dict[str, Any] = {
        "models": [str(m) for m in models], "input_dir": str(input_dir), "output": str(cfg.predict.output),
        "files": len(preds.files), "chunks": len(preds.row_ids), "unreadable": [f.path for f in preds.unreadable],
        "truncated": [f.path for f in preds.truncated],
        "seconds": round(preds.seconds, 2), "chunks_per_s": round(len(preds.row_ids) / max(preds.seconds, 1e-9), 1),
        "settings": OmegaConf.to_container(cfg.predict, resolve=True),
    }
    log.info("wrote %s: %s", cfg.predict.output, preds.summary())
    if solution_path and Path(solution_path).is_file():
        solution = read_table(Path(solution_path), (ROW_ID_COLUMN,), "solution")
        scored = solution[solution[ROW_ID_COLUMN].isin(set(preds.row_ids))]
        if len(scored) < len(solution):
            log.warning("%d solution rows have no prediction; scoring the %d that do", len(solution) - len(scored), len(scored))
        ids = np.asarray(preds.row_ids)
        record["solution"] = str(solution_path)
        record["auc_raw"] = soundscape_auc(preds.raw_probs, ids, scored, preds.classes)
        record["auc_postprocessed"] = soundscape_auc(preds.probs, ids, scored, preds.classes)
        log.info("validation soundscape AUC: %.4f raw, %.4f with smoothing %s / file scaling %s",
                 record["auc_raw"], record["auc_postprocessed"], list(settings.smoothing), settings.file_scale_alpha)
    run_dir = Path(cfg.run_dir)
    if run_dir.is_dir():
        write_json_atomic(run_dir / PREDICT_RECORD, record)
        write_report(run_dir)
    return record


def _load_models(paths: list[Path], settings: infer.InferenceSettings) -> list[infer.OnnxModel]:
    """The models, checked to run together with `settings`; warns where an export recorded other settings."""
    try:
        models = infer.load_models(paths, settings.intra_op_threads, settings.inter_op_threads,
                                   settings.allow_spinning, settings.engine, settings.n_model_workers)
        infer.check_run(models, settings)
    except ModelFormatError as err:
        raise ConfigError(f"predict.models: {err}") from None
    except ValueError as err:  # settings these models cannot use (e.g. a window stride leaving gaps)
        raise ConfigError(f"predict: {err}") from None
    ours = infer.recorded_settings(settings)
    for model in models:
        theirs = infer.recorded_settings(replace(settings, **model.info.predict_settings))
        differing = {k: (ours[k], theirs[k]) for k in model.info.predict_settings if ours[k] != theirs[k]}
        if differing:
            log.warning("%s was exported with other predict settings ({key: (config, export)} %s); the package's "
                        "infer.py would write another CSV unless given these as flags (or re-run birdrounds export)",
                        model.path, differing)
    return models


def _check_sample_submission(sample: Path | None, classes: list[str]) -> None:
    """ConfigError unless the sample submission's columns are the model's classes (in any order)."""
    if sample is None:
        return
    try:
        infer.align_columns(classes, np.zeros((0, len(classes))), infer.read_submission_header(sample))
    except (ValueError, OSError) as err:
        where = "" if str(sample) in str(err) else f"{sample}: "
        raise ConfigError(f"predict.sample_submission: {where}{err}") from None


def read_predict_record(run_dir: Path) -> dict[str, Any] | None:
    """The last `birdrounds predict` record of a run folder, if any."""
    path = run_dir / PREDICT_RECORD
    return json.loads(path.read_text()) if path.is_file() else None

