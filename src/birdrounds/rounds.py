"""The orchestrator: bring a run folder up to `round=N`, reusing rounds already complete.

Round 0 is the teacher, trained on the labeled clips. Round k >= 1: the round k-1 model pseudo-labels
`train_soundscapes/` (`configs/pseudo/`: window, de-noising transform, mixing strategy), then a student,
initialised from the teacher or from scratch, is trained on labeled + pseudo-labeled data.

With `control=true` every student round also gets its equal-compute control in `round_k/control/`: the
same rounds on labeled data only (round 1's control starts from the student's initial weights, round
k's from round k-1's control), with the same schedule, seed and data pipeline. The student's gain over
its control is what the pseudo-labels bought; the gain over the teacher also counts the extra training.
With `pseudo.truth=PATH` the student trains on true chunk labels instead of the teacher's (the oracle
arm of a benchmark: the headroom any pseudo-labeling could reach).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, WeightedRandomSampler

from birdrounds.artifacts import (
    CONTROL_DIR,
    DONE_FILE,
    ENSEMBLE_CNN_DIR,
    EXTERNAL_SCORES_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PSEUDO_FILE,
    ROUND_CONFIG_FILE,
    TEACHER_CHUNKS_FILE,
    atomic_open,
    write_json_atomic,
)
from birdrounds.checks import SELECTION_ORDER, lineage_steps, round_checks
from birdrounds.config import LEGACY, ConfigError, redact_secrets, select_plain, validate
from birdrounds.data.augment import AugmentSettings
from birdrounds.data.clips import (
    ClipDataset,
    MixUp,
    MixUpCollate,
    epoch_clips,
    labeled_seconds,
    make_sampler,
)
from birdrounds.data.device_augment import BackgroundWindows, BatchAugment
from birdrounds.data.layout import DEFAULT_PATHS
from birdrounds.data.mixed_val import MixedValidation, mixed_validation_from_config
from birdrounds.data.prepare import EXTERNAL_COLUMN, PreparedData, prepare_data
from birdrounds.data.soundscapes import SoundscapeChunks
from birdrounds.contract import SCORED_CHUNK_S
from birdrounds.mixing import ConcatPseudoDataset, PseudoChunkDataset
from birdrounds.model import checkpoint_hash, load_checkpoint, read_checkpoint_file, weights_hash
from birdrounds.pseudo import (
    chunk_rows,
    detection_scores,
    is_framewise,
    predict_windows,
    probs_for_rows,
    pseudo_stats,
    read_pseudo_labels,
    read_truth,
    shard_range,
    split_table,
    windows_to_chunks,
    write_pseudo_labels,
)
from birdrounds.report import write_report
from birdrounds.teachers import external_teacher_round, is_external
from birdrounds.train import epoch_seed, fit

log = logging.getLogger(__name__)

INIT_SEED_TAG = 7919  # keeps the weight-init seed apart from the per-epoch training seeds


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`git describe` of the checkout this code runs from, or 'unknown' outside git; read once per process
    (`run` reads it first), so a manifest names the code the run started with, not the checkout at its end."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class RoundParts:
    """What a round trains on and validates with: `build_datasets`' labeled parts, `student_parts`' mix.

    `train_table` is the labeled training rows and `class_counts` their primary labels per class (the
    loss's class weights); `pseudo_stats` describes a student's pseudo-labels (None for the others).
    Kaggle scores the validation soundscapes in SCORED_CHUNK_S rows, whatever the training window.
    `val_mixed` is the held-out clips' calls in quiet train-soundscape backgrounds (`data.mixed_val`).
    """

    train_set: Dataset
    sampler: WeightedRandomSampler
    collate_fn: MixUpCollate
    train_table: pd.DataFrame
    class_counts: list[int]
    val_clips: ClipDataset | None = None
    val_soundscapes: SoundscapeChunks | None = None
    val_solution: pd.DataFrame | None = None
    val_mixed: MixedValidation | None = None
    pseudo_stats: dict[str, Any] | None = None
    n_external: int = 0  # external (Xeno-canto) rows in train_table
    batch_transform: BatchAugment | None = None  # `data.augment_on: device`: augmentation + MixUp per batch
    clips_per_epoch: int = 0  # labeled clips drawn per epoch (`data.sampler.samples_per_epoch`)
    labeled_s: float = 0.0  # seconds of labeled training audio


def build_datasets(prepared: PreparedData, data_cfg: DictConfig, seed: int, round_idx: int = 0,
                   drop_external: Collection[str] = ()) -> RoundParts:
    """Training clips (held-out fold removed), validation clips, labeled validation soundscapes and the
    mixed validation (held-out clips only; external rows are never held out).

    External rows (`data.external`) get `loss_weight` on their loss and `sample_weight` on their draw
    probability; with `in_students: false` only the teacher (round 0) trains on them, and round k's
    student and control both leave them out, so the control still sees the student's labeled data.
    External rows whose path is in `drop_external` (`filter_external`'s verdict) are left out too.
    """
    data, audio = prepared.data, prepared.audio
    ext_cfg = data_cfg.external
    held_out = prepared.folds == data_cfg.fold
    external = prepared.external
    in_training = ~held_out
    if round_idx > 0 and not ext_cfg.in_students:
        in_training &= ~external
    if len(drop_external):
        in_training &= ~(external & data.train["path"].isin(set(drop_external)).to_numpy())
    train_table, val_table = data.train[in_training].reset_index(drop=True), data.train[held_out].reset_index(drop=True)
    if train_table.empty:
        raise ConfigError(f"data.fold: holding out fold {data_cfg.fold} leaves no training rows "
                          f"({len(data.train)} usable rows, all in that fold)")
    row_external = external[in_training]
    loss_weights = np.where(row_external, float(ext_cfg.loss_weight), 1.0)
    draw_weights = np.where(row_external, float(ext_cfg.sample_weight), 1.0)
    on_device = data_cfg.augment_on == "device"
    augment = None if on_device else instantiate(data_cfg.augment, background_paths=[str(p) for p in data.soundscapes],
                                                 background_audio=audio)
    clip_args = OmegaConf.to_container(data_cfg.clips, resolve=True)
    train_set = ClipDataset(train_table, data.classes, audio, window_s=data_cfg.window_s, augment=augment,
                            seed=seed, row_weights=loss_weights, **clip_args)
    clip_args.update(window_mode="center", rating_weight=False)
    val_set = ClipDataset(val_table, data.classes, audio, window_s=data_cfg.window_s, seed=seed, **clip_args)
    val_soundscapes = None
    if data.val_solution is not None and data.val_soundscapes:
        val_soundscapes = SoundscapeChunks(data.val_soundscapes, audio, window_s=SCORED_CHUNK_S, stride_s=SCORED_CHUNK_S)
    val_mixed = mixed_validation_from_config(data_cfg.get("mixed_val"), val_table, data.soundscapes, audio, data.classes)
    labeled_s = labeled_seconds(train_table["path"], audio)
    n_clips = epoch_clips(data_cfg.sampler.samples_per_epoch, len(train_table), labeled_s, data_cfg.window_s,
                          data_cfg.sampler.auto_bounds)
    log.info("data.sampler.samples_per_epoch=%s: %d clips per epoch (%d training rows, %.0f s of labeled audio)",
             data_cfg.sampler.samples_per_epoch, n_clips, len(train_table), labeled_s)
    sampler = make_sampler(train_table, temperature=data_cfg.sampler.temperature, num_samples=n_clips,
                           rating_weight=data_cfg.clips.rating_weight, seed=seed, row_weights=draw_weights)
    mixup = instantiate(data_cfg.mixup) if data_cfg.mixup else None
    return RoundParts(
        train_set=train_set, sampler=sampler,
        collate_fn=MixUpCollate(None if on_device else mixup),
        batch_transform=device_augment(data_cfg, mixup, seed) if on_device else None,
        train_table=train_table,
        class_counts=train_table["primary_label"].value_counts().reindex(data.classes, fill_value=0).tolist(),
        val_clips=val_set if len(val_set) else None, val_soundscapes=val_soundscapes,
        val_solution=data.val_solution if val_soundscapes is not None else None, val_mixed=val_mixed,
        n_external=int(row_external.sum()), clips_per_epoch=n_clips, labeled_s=labeled_s,
    )


def device_augment(data_cfg: DictConfig, mixup: MixUp | None, seed: int) -> BatchAugment:
    """`data.augment` and `data.mixup` as one per-batch transform on the training device."""
    settings = AugmentSettings.from_config(data_cfg.augment) if data_cfg.augment else AugmentSettings.off()
    return BatchAugment(data_cfg.sample_rate_hz, settings, mixup=mixup, seed=seed)


def with_background_windows(parts: RoundParts, prepared: PreparedData, seed: int) -> RoundParts:
    """On-device augmentation: the workers add each item's soundscape window (the outermost dataset,
    so pseudo-labeled items get one too); the mix itself happens on the device."""
    transform = parts.batch_transform
    if transform is None or transform.settings.background_p <= 0 or not prepared.data.soundscapes:
        return parts
    windows = BackgroundWindows(parts.train_set, [str(p) for p in prepared.data.soundscapes], prepared.audio,
                                p=transform.settings.background_p, seed=seed)
    return dataclasses.replace(parts, train_set=windows)


def filter_external(cfg: DictConfig, prepared: PreparedData, model_path: Path, out_dir: Path,
                    accelerator: Accelerator) -> list[str] | None:
    """`data.external.filter_min_prob`: the external recordings in which `model_path` (the round's starting
    model: the previous round's for a student, the previous control for a control) does not detect the
    labeled species anywhere (the highest window probability of its label is below the threshold).

    Returns their paths (None when the filter is off). The scores are computed once by the main process
    and kept in `out_dir/external_scores.json` under the model's hash, so a resumed round reads them.
    """
    threshold = cfg.data.external.get("filter_min_prob")
    external = prepared.external
    if threshold is None or not external.any() or not cfg.data.external.in_students:
        return None
    if not is_checkpoint(model_path):
        log.warning("data.external.filter_min_prob: not applied after an external teacher (no model to score "
                    "the external recordings with); every external recording is kept")
        return None
    table = prepared.data.train[external]
    paths, labels = table["path"].astype(str).tolist(), table["primary_label"].astype(str).tolist()
    record_path = out_dir / EXTERNAL_SCORES_FILE
    model_hash = checkpoint_hash(model_path)

    def current() -> dict[str, Any] | None:
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        ok = record is not None and record.get("model_hash") == model_hash and set(record["scores"]) == set(paths)
        return record if ok else None

    if accelerator.is_main_process and current() is None:
        log.info("scoring %d external recordings with %s (data.external.filter_min_prob=%g)",
                 len(paths), model_path, threshold)
        scores = detection_scores([load_checkpoint(model_path)[0]], paths, labels, prepared.data.classes,
                                  prepared.audio, window_s=cfg.data.window_s, batch_size=cfg.train.batch_size,
                                  device=accelerator.device, progress=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record_path, {
            "model": str(model_path), "model_hash": model_hash, "window_s": cfg.data.window_s,
            "scores": {p: None if np.isnan(v) else round(float(v), 6) for p, v in zip(paths, scores)}})
    accelerator.wait_for_everyone()
    record = current()
    if record is None:
        raise RuntimeError(f"{record_path}: the external recordings' scores are missing after scoring")
    dropped = [p for p in paths if record["scores"][p] is not None and record["scores"][p] < threshold]
    log.info("data.external.filter_min_prob=%g: %d of %d external recordings not detected by %s, left out",
             threshold, len(dropped), len(paths), model_path.parent.name)
    return dropped


def round_output(round_dir: Path) -> Path:
    """What a completed round hands on: its model.pt, or an external teacher's chunk table (round 0)."""
    chunks = round_dir / TEACHER_CHUNKS_FILE
    return chunks if chunks.is_file() and not (round_dir / MODEL_FILE).is_file() else round_dir / MODEL_FILE


def external_blend(cfg: DictConfig) -> float:
    """`teacher.blend`: the external teacher's weight in the pseudo-labels of rounds >= 2 (0 without one)."""
    return float(cfg.teacher.blend) if is_external(cfg) else 0.0


def is_checkpoint(path: Path | None) -> bool:
    """Whether a round's output is a model checkpoint (not an external teacher's chunk table)."""
    return path is not None and path.name != TEACHER_CHUNKS_FILE


def teacher_paths(cfg: DictConfig, run_dir: Path, round_idx: int) -> list[Path]:
    """The previous round's model plus `pseudo.extra_teachers` (an ensemble whose mean labels the chunks).

    After an external teacher (`teacher.kind` probe or zero_shot), round 1's teacher is round 0's chunk table;
    later rounds' are the previous round's model and, with `teacher.blend` > 0, that table again.
    """
    previous = run_dir / f"round_{round_idx - 1}"
    if is_external(cfg):
        if cfg.pseudo.get("extra_teachers"):
            raise ConfigError("pseudo.extra_teachers: not supported with an external teacher "
                              f"(teacher.kind={cfg.teacher.kind}); leave it empty")
        if round_idx == 1:
            return [previous / TEACHER_CHUNKS_FILE]
        # Later rounds: the previous round's model (the student's start), blended with the external teacher's labels.
        chunks = run_dir / "round_0" / TEACHER_CHUNKS_FILE
        return [previous / MODEL_FILE, *([chunks] if external_blend(cfg) > 0 else [])]
    paths = [previous / MODEL_FILE]
    for extra in cfg.pseudo.get("extra_teachers") or []:
        extra = Path(extra)
        if not extra.is_file():
            raise ConfigError(f"pseudo.extra_teachers: checkpoint not found: {extra}")
        paths.append(extra)
    return paths


def pseudo_label(cfg: DictConfig, prepared: PreparedData, teachers: list[Path], round_idx: int,
                 round_dir: Path, accelerator: Accelerator) -> Path:
    """The teachers' de-noised soft labels for every train soundscape chunk, written once.

    Every process labels its contiguous share of the windows (`shard_range`) and saves it under
    `pseudo_partial/` (finished batches too, so a killed job resumes where it stopped); the main
    process then joins the shares in rank order, averages overlapping frames into 5-s chunks,
    de-noises and writes the table. The shares travel through the run folder, which every process
    already shares.
    """
    path = round_dir / PSEUDO_FILE
    if path.is_file():
        check_pseudo_source(path, cfg, teachers, round_idx)
        return path
    chunks = SoundscapeChunks(prepared.data.soundscapes, prepared.audio, window_s=cfg.pseudo.window_s,
                              stride_s=cfg.pseudo.stride_s)
    if cfg.pseudo.get("truth"):  # the oracle: true labels, whatever the teacher
        if accelerator.is_main_process:
            write_truth_labels(cfg, chunks, prepared.data.classes, round_idx, path,
                               unreadable=[p for p, _ in prepared.skipped])
        accelerator.wait_for_everyone()
        return path
    tables = [t for t in teachers if not is_checkpoint(t)]
    if tables and (not is_checkpoint(teachers[0]) or external_blend(cfg) >= 1.0):
        # Round 1 after an external teacher, or a later round whose labels are the external teacher's alone.
        if accelerator.is_main_process:
            write_external_labels(cfg, prepared.data.classes, tables[0], round_idx, path, teachers)
        accelerator.wait_for_everyone()
        return path
    checkpoints = [t for t in teachers if is_checkpoint(t)]
    framewise = is_framewise(chunks, SCORED_CHUNK_S)
    rank, world = accelerator.process_index, accelerator.num_processes
    partial = round_dir / "pseudo_partial"
    share = partial / f"share_{rank}of{world}.npy"
    if not share.is_file():
        models = [load_checkpoint(p)[0] for p in checkpoints]
        indices = shard_range(len(chunks), rank, world)
        log.info("pseudo-labeling %d of %d windows (process %d of %d, %d teacher(s))",
                 len(indices), len(chunks), rank, world, len(models))
        outputs = predict_windows(models, chunks, framewise, indices, batch_size=cfg.train.batch_size,
                                  device=accelerator.device, partial_dir=partial / f"rank_{rank}of{world}",
                                  progress=accelerator.is_local_main_process)
        with atomic_open(share, "wb") as f:
            np.save(f, outputs)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shares = [np.load(partial / f"share_{r}of{world}.npy") for r in range(world)]
        outputs = np.concatenate([s for s in shares if s.size]) if any(s.size for s in shares) else shares[0]
        probs = windows_to_chunks(outputs, chunks, SCORED_CHUNK_S)
        rows = chunk_rows(chunks, SCORED_CHUNK_S)
        if tables:
            weight = external_blend(cfg)
            probs = (1.0 - weight) * probs + weight * external_chunk_probs(tables[0], rows, prepared.data.classes)
        transform = instantiate(cfg.pseudo.transform)
        probs, keep = transform(probs, round_idx=round_idx, files=rows["file"].to_numpy())
        provenance = {"round": round_idx, **({"external_blend": external_blend(cfg)} if tables else {}),
                      "teacher": str(teachers[0]), "teacher_hash": checkpoint_hash(teachers[0]),
                      "teachers": [{"path": str(p), "hash": checkpoint_hash(p)} for p in teachers],
                      "transform": transform.describe(round_idx), "window_s": cfg.pseudo.window_s,
                      "stride_s": cfg.pseudo.stride_s, "kept_chunks": int(keep.sum()), "processes": world}
        write_pseudo_labels(path, rows[keep].reset_index(drop=True), probs[keep], prepared.data.classes, provenance)
    accelerator.wait_for_everyone()
    return path


def check_pseudo_source(path: Path, cfg: DictConfig, teachers: list[Path], round_idx: int) -> None:
    """Refuse to reuse a pseudo-label table made by other teachers (or another truth file) than today's."""
    _, provenance = read_pseudo_labels(path)
    if cfg.pseudo.get("truth"):
        recorded, current, what = provenance.get("truth_hash"), checkpoint_hash(cfg.pseudo.truth), "pseudo.truth file"
    else:
        current, what = [checkpoint_hash(t) for t in teachers], "teacher checkpoint(s)"
        if "teachers" in provenance:
            recorded = [t.get("hash") for t in provenance["teachers"]]
        else:  # tables written before every teacher was recorded
            recorded, current = [provenance.get("teacher_hash")], current[:1]
    if recorded != current:
        raise ConfigError(f"run_dir: {path} was made from another {what} than the current one "
                          f"({recorded} vs {current}); {_recompute_hint(round_idx)}")


def write_truth_labels(cfg: DictConfig, chunks: SoundscapeChunks, classes: list[str], round_idx: int,
                       path: Path, unreadable: Collection[str] = ()) -> None:
    """The oracle's table: `pseudo.truth`'s labels for every train-soundscape chunk, de-noised like the teacher's.

    The truth's rows for soundscapes that could not be read are ignored: those the chunking skipped and
    `unreadable` (files dropped as unreadable when the data was prepared, before any chunking).
    """
    truth_path = Path(cfg.pseudo.truth)
    rows = chunk_rows(chunks, SCORED_CHUNK_S)
    skipped = {Path(p).stem for p in [*(p for p, _ in chunks.skipped), *unreadable]}
    probs = read_truth(truth_path, rows["row_id"].tolist(), classes, skipped_stems=skipped)
    transform = instantiate(cfg.pseudo.transform)
    probs, keep = transform(probs, round_idx=round_idx, files=rows["file"].to_numpy())
    provenance = {"round": round_idx, "truth": str(truth_path), "truth_hash": checkpoint_hash(truth_path),
                  "transform": transform.describe(round_idx), "window_s": SCORED_CHUNK_S,
                  "stride_s": SCORED_CHUNK_S, "kept_chunks": int(keep.sum()), "processes": 1}
    log.info("oracle: %d train-soundscape chunks labeled from %s", int(keep.sum()), truth_path)
    write_pseudo_labels(path, rows[keep].reset_index(drop=True), probs[keep], classes, provenance)


def read_teacher_table(teacher_table: Path, classes: list[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Round 0's external chunk table and its provenance, refused in one line when it holds other classes."""
    table, provenance = read_pseudo_labels(teacher_table)
    if provenance.get("classes") != list(classes):
        raise ConfigError(f"run_dir: {teacher_table} holds other classes than the data's; {_recompute_hint(0)}")
    return table, provenance


def external_chunk_probs(teacher_table: Path, rows: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """Round 0's external chunk probabilities for `rows` (by row_id; chunks it lacks get 0)."""
    table, _ = read_teacher_table(teacher_table, classes)
    return probs_for_rows(table["row_id"], table[list(classes)].to_numpy(dtype=np.float32), rows["row_id"])


def write_external_labels(cfg: DictConfig, classes: list[str], teacher_table: Path, round_idx: int, path: Path,
                          teachers: list[Path]) -> None:
    """Round 0's external chunk probabilities, de-noised like a teacher's: round 1's labels after an external
    teacher, and later rounds' with `teacher.blend: 1`."""
    table, teacher_provenance = read_teacher_table(teacher_table, classes)
    rows, probs = split_table(table, classes)
    transform = instantiate(cfg.pseudo.transform)
    probs, keep = transform(probs, round_idx=round_idx, files=rows["file"].to_numpy())
    provenance = {"round": round_idx, "teacher": str(teachers[0]), "teacher_hash": checkpoint_hash(teachers[0]),
                  "teachers": [{"path": str(p), "hash": checkpoint_hash(p)} for p in teachers],
                  "external_blend": 1.0,
                  "external_teacher": teacher_provenance.get("teacher"),
                  "transform": transform.describe(round_idx), "window_s": SCORED_CHUNK_S,
                  "stride_s": SCORED_CHUNK_S, "kept_chunks": int(keep.sum()), "processes": 1}
    log.info("pseudo-labels from the external teacher's %d chunks (%s)", len(rows), teacher_table)
    write_pseudo_labels(path, rows[keep].reset_index(drop=True), probs[keep], classes, provenance)


def student_parts(cfg: DictConfig, prepared: PreparedData, pseudo_path: Path, parts: RoundParts) -> RoundParts:
    """Swap the labeled training set for labeled + pseudo-labeled data, as `cfg.pseudo.mixing` says."""
    table, _ = read_pseudo_labels(pseudo_path)
    rows, probs = split_table(table, prepared.data.classes)
    pseudo = PseudoChunkDataset(rows, probs, prepared.audio, window_s=cfg.data.window_s)
    mixed = instantiate(cfg.pseudo.mixing)(labeled=parts.train_set, pseudo=pseudo, seed=cfg.seed)
    sampler = parts.sampler
    if isinstance(mixed, ConcatPseudoDataset):
        # Concatenation is longer than the labeled set: labeled items drawn as the labeled sampler draws
        # them (class-flattened, external rows weighted), pseudo chunks uniformly.
        weights = mixed.sample_weights(parts.sampler.weights.numpy())
        sampler = WeightedRandomSampler(
            torch.as_tensor(weights), num_samples=len(parts.sampler), replacement=True,
            generator=torch.Generator().manual_seed(cfg.seed))
    return dataclasses.replace(parts, train_set=mixed, sampler=sampler,
                               pseudo_stats=pseudo_stats(probs, prepared.data.classes))


def build_model(cfg: DictConfig, num_classes: int, round_idx: int) -> torch.nn.Module:
    """Round `round_idx`'s freshly initialised model; students get `pseudo.student_drop_path_rate` if set.

    Seeded from (seed, round), so the same config gives the same initial weights on every process
    and in every rerun.
    """
    set_seed(epoch_seed(cfg.seed, round_idx, INIT_SEED_TAG))
    student_drop_path = cfg.pseudo.get("student_drop_path_rate") if round_idx > 0 else None
    overrides = {"drop_path_rate": student_drop_path} if student_drop_path is not None else {}
    return instantiate(cfg.model, **overrides)(num_classes=num_classes)


def initial_model(cfg: DictConfig, num_classes: int, round_idx: int, start: Path | None) -> torch.nn.Module:
    """The weights round `round_idx` starts from: seeded init, or `start`'s for `student_init=teacher`.

    `start` is the round k-1 model for the student, the round k-1 control for the control. After an
    external teacher there is no model to start from: round 1's student and control both start from the
    seeded init (`model.pretrained` weights where set).
    """
    model = build_model(cfg, num_classes, round_idx)
    if round_idx > 0 and cfg.pseudo.student_init == "teacher" and is_checkpoint(start):
        model.load_state_dict(load_checkpoint(start)[0].state_dict())
    return model


def start_record(model_path: Path, fine_tuned: bool) -> dict[str, Any]:
    """What a round starts from, for its checks (birdrounds.checks): the model it continues or replaces,
    that model's validation scores, and the optimizer steps its weights already had (0 from scratch)."""
    metrics_path = model_path.parent / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return {"model": str(model_path), "scores": {k: metrics.get(k) for k in SELECTION_ORDER if k in metrics},
            "steps_since_init": lineage_steps(metrics) if fine_tuned else 0}


def control_start(run_dir: Path, round_idx: int) -> Path:
    """Where round k's control starts: the teacher for k = 1, round k-1's control after that.

    The controls form the run as it would have gone on labeled data alone: round 1's control starts
    from exactly the student's weights, and every control has had the same compute as its student.
    """
    previous = run_dir / f"round_{round_idx - 1}"
    return round_output(previous / CONTROL_DIR if round_idx > 1 else previous)


def student_data_config(cfg: DictConfig) -> DictConfig:
    """`data` for a student: `pseudo.background_p`, where set, replaces `data.augment.background_p`.

    The background augmentation mixes unlabeled soundscape audio into labeled clips under the clip's
    target alone, while the mixing step brings soundscape audio with its pseudo-labels; this lets a
    student drop the former. Measured on the demo (docs/results.md): dropping it lowered students and oracle.
    """
    background_p = cfg.pseudo.get("background_p")
    if background_p is None:
        return cfg.data
    data = cfg.data.copy()
    data.augment.background_p = background_p
    return data


def round_train_config(cfg: DictConfig, round_idx: int) -> DictConfig:
    """`train` for the teacher; for students and their controls, `train` with `pseudo.student_train`'s values
    (except round 1 after an external teacher, which starts from the seeded init)."""
    train = cfg.train.copy()
    # After an external teacher, round 1's student (and control) learn from the seeded init: `train`'s schedule.
    from_scratch = round_idx == 1 and is_external(cfg)
    student = cfg.pseudo.get("student_train") if round_idx > 0 and not from_scratch else None
    if student:
        for key, target in (("epochs", "epochs"), ("lr", "optimizer.lr"), ("warmup_epochs", "scheduler.warmup_epochs")):
            if student.get(key) is not None:
                OmegaConf.update(train, target, student[key], merge=False)
    return train


def train_round(cfg: DictConfig, prepared: PreparedData, accelerator: Accelerator, round_dir: Path,
                round_idx: int = 0, teachers: list[Path] | None = None, control: bool = False) -> dict[str, Any]:
    """Round 0: the teacher on the labeled clips (or an external model's, `teacher.kind`); round k: pseudo-label
    with the teacher, train the student.

    `control=True` trains round k's control instead, in `round_dir/control/`: started from
    `teachers[0]` (see `control_start`), with the student's schedule and seed, on the labeled data alone.
    """
    student = round_idx > 0 and not control
    out_dir = round_dir / CONTROL_DIR if control else round_dir
    dropped = filter_external(cfg, prepared, teachers[0], out_dir, accelerator) if round_idx > 0 and teachers else None
    parts = build_datasets(prepared, student_data_config(cfg) if student else cfg.data, cfg.seed, round_idx,
                           drop_external=dropped or ())
    if round_idx == 0 and is_external(cfg):
        val_table = prepared.data.train[prepared.folds == cfg.data.fold].reset_index(drop=True)
        info = {"round": 0, "arm": "teacher", "external_clips": parts.n_external,
                "labeled_audio_s": round(parts.labeled_s, 1)}
        cnn, cnn_metrics = None, None
        if cfg.teacher.kind == "ensemble":
            # Our own CNN first, trained as teacher=cnn's round 0 is, in its own folder (resumed like any round).
            cnn_dir = out_dir / ENSEMBLE_CNN_DIR
            if not (cnn_dir / MODEL_FILE).is_file():
                fit_round(cfg, prepared, accelerator, cnn_dir, 0, parts, teachers=None, control=False, dropped=None)
            cnn = load_checkpoint(cnn_dir / MODEL_FILE)[0]
            cnn_metrics = json.loads((cnn_dir / METRICS_FILE).read_text())
        return external_teacher_round(cfg, prepared, accelerator, out_dir, parts.train_table, val_table,
                                      parts.val_mixed, info, cnn=cnn, cnn_metrics=cnn_metrics)
    if student:
        parts = student_parts(cfg, prepared, pseudo_label(cfg, prepared, teachers, round_idx, round_dir,
                                                         accelerator), parts)
    return fit_round(cfg, prepared, accelerator, out_dir, round_idx, parts, teachers, control, dropped)


def fit_round(cfg: DictConfig, prepared: PreparedData, accelerator: Accelerator, out_dir: Path, round_idx: int,
              parts: RoundParts, teachers: list[Path] | None, control: bool, dropped: list[str] | None) -> dict[str, Any]:
    """Train one round's own CNN (teacher, student or control) on `parts` into `out_dir`."""
    parts = with_background_windows(parts, prepared, cfg.seed)
    model = initial_model(cfg, len(prepared.data.classes), round_idx, teachers[0] if teachers else None)
    arm = "control" if control else ("teacher" if round_idx == 0 else "student")
    round_info = {"round": round_idx, "arm": arm, "init_weights_hash": weights_hash(model),
                  "external_clips": parts.n_external, "clips_per_epoch": parts.clips_per_epoch,
                  "labeled_audio_s": round(parts.labeled_s, 1),
                  **({"start": start_record(teachers[0], fine_tuned=round_idx > 0 and is_checkpoint(teachers[0]) and (
                      control or cfg.pseudo.student_init == "teacher"))} if teachers else {}),
                  **({"external_filtered": len(dropped)} if dropped is not None else {}),
                  **({"pseudo": parts.pseudo_stats} if parts.pseudo_stats is not None else {})}
    loss_fn = instantiate(cfg.loss)(class_counts=parts.class_counts)
    # fit writes the round's metrics.json (its only writer): the metrics, then `round_info`.
    return fit(
        accelerator, model, parts.train_set, loss_fn, prepared.data.classes,
        out_dir, instantiate(round_train_config(cfg, round_idx)),
        sampler=parts.sampler, collate_fn=parts.collate_fn, batch_transform=parts.batch_transform,
        val_clips=parts.val_clips,
        val_soundscapes=parts.val_soundscapes, val_solution=parts.val_solution, val_mixed=parts.val_mixed,
        config=OmegaConf.to_container(cfg, resolve=True),
        logger=instantiate(cfg.logger) if cfg.logger.log_with else None, window_s=cfg.data.window_s,
        extra_metrics=round_info,
    )


# Keys (dotted paths) that do not change what a round computes: where things live, how it is tracked, how
# far to go. `control` only adds the control arm beside each round; `data.mixed_val` only adds an
# evaluation (val_mixed_auc); neither changes a round's own result. `train.channels_last` is the weights'
# memory layout: the same model up to float rounding (tests/test_train.py).
NON_RESULT_KEYS = ("round", "recompute_from", "control", "logger", "paths", "xc", "export", "predict", "run_dir",
                   "experiment_name", "data.mixed_val", "train.channels_last")
# And those the teacher (round 0) never reads: the pseudo-labeling settings, whether students keep external rows.
TEACHER_IGNORED_KEYS = ("pseudo", "data.external.in_students", "data.external.filter_min_prob")
# And those rounds 0 and 1 never read: how rounds >= 2 blend an external teacher's labels.
EARLY_IGNORED_KEYS = ("teacher.blend",)


def _drop_key(plain: dict[str, Any], dotted: str) -> None:
    """Remove `dotted` (e.g. "data.mixed_val") from a nested plain config, if it is there."""
    *parents, last = dotted.split(".")
    node: Any = plain
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def result_config(plain: dict[str, Any], round_idx: int) -> dict[str, Any]:
    """A copy of a resolved plain config with only what decides round `round_idx`'s result (see the keys above)."""
    plain = copy.deepcopy(plain)
    for key in (*NON_RESULT_KEYS, *(TEACHER_IGNORED_KEYS if round_idx == 0 else ()),
                *(EARLY_IGNORED_KEYS if round_idx <= 1 else ())):
        _drop_key(plain, key)
    # Keys added after rounds were recorded stay out of the hash while they hold the value that does what the
    # code did before them (absent counts as it), so finished rounds stay reusable after an upgrade.
    for key, neutral in LEGACY.items():
        if select_plain(plain, key, neutral) == neutral:
            _drop_key(plain, key)
    return plain


def config_hash(cfg: DictConfig, round_idx: int) -> str:
    """Hash of the resolved config minus the keys that do not change this round's result."""
    plain = result_config(OmegaConf.to_container(cfg, resolve=True), round_idx)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


ABSENT = object()  # the value `config_changes` gives a key that one side does not have
SHOWN_CHANGES = 5  # changed keys a refusal names before "and N more"


def _same(a: Any, b: Any) -> bool:
    """Equal values: 5 and 5.0 are (an override may give an int for a float), true and 1 are not."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def config_changes(before: Any, after: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, before, after) for every value that differs between two plain configs.

    Lists of the same length are compared item by item (`transforms[1].alpha`); others as one value.
    """
    if isinstance(before, dict) and isinstance(after, dict):
        keys = [*before, *(k for k in after if k not in before)]
        return [change for k in keys
                for change in config_changes(before.get(k, ABSENT), after.get(k, ABSENT), f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [change for i, (b, a) in enumerate(zip(before, after))
                for change in config_changes(b, a, f"{prefix}[{i}]")]
    return [] if _same(before, after) else [(prefix, before, after)]


def _shown(value: Any, width: int = 40) -> str:
    """A config value as JSON (null, true, "text"), cut to `width` characters."""
    text = "(absent)" if value is ABSENT else json.dumps(value, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """'key: old -> new' for the first SHOWN_CHANGES changes, then 'and N more', on one line."""
    shown = [f"{key}: {_shown(old)} -> {_shown(new)}" for key, old, new in changes[:SHOWN_CHANGES]]
    more = len(changes) - SHOWN_CHANGES
    return "; ".join(shown + ([f"and {more} more"] if more > 0 else []))


def recorded_config(round_dir: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved config (secrets redacted) a finished round recorded: the manifest's, else config.yaml."""
    if isinstance(manifest.get("config"), dict):
        return manifest["config"]
    path = round_dir / ROUND_CONFIG_FILE
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None


def check_unchanged(round_dir: Path, round_idx: int, cfg: DictConfig) -> None:
    """Refuse to reuse a completed round whose config differs from `cfg`, naming the keys that differ.

    The keys compared are those the hash covers. Values that are equal under another hash (an override
    giving 5 for 5.0, a new secret, both redacted) are no change.
    """
    manifest = json.loads((round_dir / MANIFEST_FILE).read_text())
    current_hash = config_hash(cfg, round_idx)
    if manifest.get("config_hash") == current_hash:
        return
    recorded = recorded_config(round_dir, manifest)
    if recorded is None:
        what = f"hash {manifest.get('config_hash')}, now {current_hash}"
    else:
        # Through JSON as the manifest went, so both sides hold the same types (lists, string keys).
        current = json.loads(json.dumps(redact_secrets(cfg), default=str))
        changes = config_changes(result_config(recorded, round_idx), result_config(current, round_idx))
        if not changes:
            log.info("round %d in %s: the same config values under another hash; reused", round_idx, round_dir)
            return
        what = describe_changes(changes)
    raise ConfigError(f"run_dir: round {round_idx} in {round_dir} was completed with another config "
                      f"({what}); {_recompute_hint(round_idx)}")


def _recompute_hint(round_idx: int) -> str:
    return (f"pass recompute_from={round_idx} to redo it and the rounds after it "
            f"(their folders are kept, renamed *.replaced-<time>)")


def _changed_inputs(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the inputs whose recorded hash differs from the current one (file counts beside lists)."""
    changed = []
    for name in sorted(set(recorded.get("tables", {})) | set(current.get("tables", {}))):
        if recorded.get("tables", {}).get(name) != current.get("tables", {}).get(name):
            changed.append(name)
    # Rows from data.external (e.g. after `birdrounds xc-download`) are named as such; train_audio holds them too.
    # Records from before external_audio was listed compare train_audio alone.
    labels = {"train_audio": "train_audio"}
    if "external_audio" in recorded:
        labels = {"external_audio": "external_audio (data.external)", "train_audio": "train_audio with external rows"}
    for name in (*labels, "train_soundscapes", "val_soundscapes"):
        before, now = recorded.get(name) or {}, current.get(name) or {}
        if before.get("hash") != now.get("hash"):
            changed.append(f"{labels.get(name, name)} ({before.get('files', '?')} -> {now.get('files', '?')} files)")
    return changed


def check_reusable(round_dir: Path, round_idx: int, inputs: dict[str, Any], teachers: list[Path] | None) -> None:
    """Refuse to reuse a completed round whose inputs (tables, audio lists, teachers) changed since it ran.

    `check_unchanged` compares the config; this compares what the round read, e.g. Xeno-canto rows
    downloaded after round 0 (the external train.csv's rows join `train_audio`) or a teacher retrained.
    Records written before inputs were recorded are not checked.
    """
    manifest = json.loads((round_dir / MANIFEST_FILE).read_text())
    changed = _changed_inputs(manifest["inputs"], inputs) if "inputs" in manifest else []
    recorded_teachers = [t.get("hash") for t in manifest.get("teachers", [])]
    if teachers is not None and recorded_teachers and recorded_teachers != [checkpoint_hash(t) for t in teachers]:
        for teacher in teachers:  # a damaged teacher is named with the round that rebuilds it, not this one
            if is_checkpoint(teacher):
                read_checkpoint_file(teacher)
        changed.append("teacher checkpoint(s) " + ", ".join(str(t) for t in teachers))
    if changed:
        raise ConfigError(f"run_dir: round {round_idx} in {round_dir} was computed from other inputs "
                          f"(changed since: {'; '.join(changed)}); {_recompute_hint(round_idx)}")


def set_aside(run_dir: Path, first_round: int) -> None:
    """Rename round folders from `first_round` on, so they are recomputed and nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = 0
    for folder in sorted(run_dir.glob("round_*")):
        suffix = folder.name.removeprefix("round_")
        if suffix.isdigit() and int(suffix) >= first_round:
            kept = folder.with_name(f"{folder.name}.replaced-{stamp}")
            folder.rename(kept)
            moved += 1
            log.warning("recompute_from=%d: set aside %s as %s", first_round, folder, kept)
    if not moved:
        log.info("recompute_from=%d: no round folder from round %d on in %s, nothing set aside",
                 first_round, first_round, run_dir)


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Before the rounds: warn about settings that do nothing in this run, set aside what `recompute_from` redoes."""
    if cfg.control and cfg.round == 0:
        log.warning("control=true does nothing with round=0: controls are trained beside student rounds (round >= 1)")
    if cfg.recompute_from is None:
        return
    if cfg.recompute_from > cfg.round:
        log.warning("recompute_from=%d does nothing: this run stops at round=%d, so nothing is set aside or redone",
                    cfg.recompute_from, cfg.round)
        return
    if cfg.recompute_from > 0:
        # Nothing is renamed when the first redone round could not read its teachers (a damaged round k-1);
        # one that is not there yet is trained first, so it is not checked.
        for teacher in teacher_paths(cfg, run_dir, cfg.recompute_from):
            if teacher.is_file():
                read_checkpoint_file(teacher) if is_checkpoint(teacher) else read_pseudo_labels(teacher)
    set_aside(run_dir, cfg.recompute_from)


def input_hashes(prepared: PreparedData) -> dict[str, Any]:
    """What the round read: sha256 of the tables, and of each audio list's (path, size) lines."""
    data = prepared.data
    # Labelled by their competition-layout names, wherever `data.*` put them.
    tables = {DEFAULT_PATHS[key]: checkpoint_hash(data.paths[key])
              for key in ("train_csv", "taxonomy_csv", "sample_submission", "val_solution") if data.paths[key].is_file()}

    def listing(paths: list[Any]) -> dict[str, Any]:
        lines = sorted(f"{p}:{Path(p).stat().st_size if Path(p).is_file() else -1}" for p in paths)
        return {"files": len(lines), "hash": hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]}

    train_audio = data.train["path"].tolist() if "path" in data.train else []
    external = data.train[EXTERNAL_COLUMN].to_numpy(dtype=bool) if EXTERNAL_COLUMN in data.train else []
    return {"tables": tables, "train_audio": listing(train_audio),
            "external_audio": listing([p for p, ext in zip(train_audio, external) if ext]),
            "train_soundscapes": listing(data.soundscapes), "val_soundscapes": listing(data.val_soundscapes)}


def write_round_record(round_dir: Path, cfg: DictConfig, round_idx: int, metrics: dict, started: float,
                       prepared: PreparedData, inputs: dict[str, Any], teachers: list[Path] | None) -> None:
    """Resolved config, manifest and the completion marker (written last) of a finished round (or control)."""
    record = redact_secrets(cfg)  # secrets (xc.api_key ...) never reach a record
    with atomic_open(round_dir / ROUND_CONFIG_FILE, "w") as f:
        f.write(OmegaConf.to_yaml(record))
    write_json_atomic(round_dir / MANIFEST_FILE, {
        "round": round_idx, "arm": metrics.get("arm"), "config_hash": config_hash(cfg, round_idx),
        "code_version": code_version(),
        "seconds": round(time.time() - started, 1),
        "teachers": [{"path": str(t), "hash": checkpoint_hash(t)} for t in teachers or []],
        "model_hash": checkpoint_hash(round_output(round_dir)),
        "inputs": inputs,
        "data": prepared.summary(), "final_metrics": {k: v for k, v in metrics.items() if k != "history"},
        "schedule": {"epochs": len(metrics.get("history", [])), "clips_per_epoch": metrics.get("clips_per_epoch"),
                     "steps_per_epoch": metrics.get("steps_per_epoch"), "total_steps": metrics.get("step"),
                     "steps_since_init": lineage_steps(metrics)},
        "checks": round_checks(metrics).as_record(),
        "config": record,
    })
    write_json_atomic(round_dir / DONE_FILE, {"round": round_idx, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def log_checks(name: str, metrics: dict[str, Any]) -> None:
    """Warn about a round whose model is not usable, or worse than the model it started from."""
    checks = round_checks(metrics)
    for problem in checks.problems:
        log.warning("%s is not usable: %s", name, problem)
    for note in checks.notes:
        log.warning("%s: %s", name, note)


def run(cfg: DictConfig) -> Path:
    """Bring `cfg.run_dir` up to round `cfg.round`; returns the run folder."""
    validate(cfg)
    code_version()  # the code this process loaded, before anyone edits the checkout during a long run
    # Accelerate logs every file of every epoch checkpoint at INFO; the loop reports checkpoints itself.
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mixed_precision = cfg.train.get("mixed_precision")
    accelerator = Accelerator(log_with=cfg.logger.log_with, **({"mixed_precision": mixed_precision} if mixed_precision else {}))
    run_dir = Path(cfg.run_dir)
    if accelerator.is_main_process:
        prepare_run_dir(cfg, run_dir)
    accelerator.wait_for_everyone()
    prepared, inputs = None, None
    for round_idx in range(cfg.round + 1):
        round_dir = run_dir / f"round_{round_idx}"
        # The student first (the next round needs it), then its control when asked for.
        for control in (False, True) if cfg.control and round_idx > 0 else (False,):
            out_dir = round_dir / CONTROL_DIR if control else round_dir
            name = f"round {round_idx}{' control' if control else ''}"
            done = (out_dir / DONE_FILE).is_file()
            if done:
                check_unchanged(out_dir, round_idx, cfg)
            else:
                started = time.time()
            if prepared is None:
                # The main process generates data and fills the cache; the others then find it ready.
                with accelerator.main_process_first():
                    prepared = prepare_data(cfg.data, seed=cfg.seed, progress=accelerator.is_local_main_process)
                log.info("data: %s", {k: v for k, v in prepared.summary().items() if k != "unreadable_audio"})
                inputs = input_hashes(prepared)  # what every round of this run reads: hashed once
            teachers = None
            if round_idx:
                teachers = [control_start(run_dir, round_idx)] if control else teacher_paths(cfg, run_dir, round_idx)
            if done:
                check_reusable(out_dir, round_idx, inputs, teachers)
                log.info("%s already complete in %s", name, out_dir)
                continue
            metrics = train_round(cfg, prepared, accelerator, round_dir, round_idx, teachers, control=control)
            if accelerator.is_main_process:
                write_round_record(out_dir, cfg, round_idx, metrics, started, prepared, inputs, teachers)
                log.info("%s done: %s", name, {k: metrics.get(k) for k in ("val_clip_auc", "val_soundscape_auc",
                                                                            "val_mixed_auc")})
                log_checks(name, metrics)
                write_report(run_dir)
            accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        report = write_report(run_dir)
        log.info("report: %s\n%s", report, "\n".join(line for line in report.read_text().splitlines() if line.startswith("|")))
    # Closes trackers and the process group once, after every round has used this Accelerator.
    accelerator.end_training()
    return run_dir
