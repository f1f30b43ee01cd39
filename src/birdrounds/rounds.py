"""The orchestrator: bring a run folder up to `round=N`, reusing rounds already complete.

Round 0 is the teacher, trained on the labeled clips. Rounds >= 1 (pseudo-labeling and students) are
not built yet: asking for them trains round 0 and stops with a warning.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from birdrounds.config import validate
from birdrounds.data.clips import ClipDataset, MixUpCollate, make_sampler
from birdrounds.data.prepare import PreparedData, prepare_data
from birdrounds.data.soundscapes import SoundscapeChunks
from birdrounds.artifacts import write_json_atomic
from birdrounds.train import fit

log = logging.getLogger(__name__)

DONE_FILE = "DONE"
# Kaggle scores soundscapes in 5-s rows, whatever window the model was trained on.
SCORED_CHUNK_S = 5.0


def code_version() -> str:
    """`git describe` of the checkout this code runs from, or 'unknown' outside git."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_datasets(prepared: PreparedData, data_cfg: DictConfig, seed: int) -> dict[str, Any]:
    """Training clips (held-out fold removed), validation clips and labeled validation soundscapes."""
    data, audio = prepared.data, prepared.audio
    held_out = prepared.folds == data_cfg.fold
    train_table, val_table = data.train[~held_out].reset_index(drop=True), data.train[held_out].reset_index(drop=True)
    augment = instantiate(data_cfg.augment, background_paths=[str(p) for p in data.soundscapes], background_audio=audio)
    clip_args = OmegaConf.to_container(data_cfg.clips, resolve=True)
    train_set = ClipDataset(train_table, data.classes, audio, window_s=data_cfg.window_s, augment=augment,
                            seed=seed, **clip_args)
    clip_args.update(window_mode="center", rating_weight=False)
    val_set = ClipDataset(val_table, data.classes, audio, window_s=data_cfg.window_s, seed=seed, **clip_args)
    val_soundscapes = None
    if data.val_solution is not None and data.val_soundscapes:
        val_soundscapes = SoundscapeChunks(data.val_soundscapes, audio, window_s=SCORED_CHUNK_S, stride_s=SCORED_CHUNK_S)
    sampler = make_sampler(train_table, temperature=data_cfg.sampler.temperature,
                           num_samples=data_cfg.sampler.samples_per_epoch,
                           rating_weight=data_cfg.clips.rating_weight, seed=seed)
    return {"train_set": train_set, "val_clips": val_set if len(val_set) else None, "sampler": sampler,
            "collate_fn": MixUpCollate(instantiate(data_cfg.mixup) if data_cfg.mixup else None),
            "val_soundscapes": val_soundscapes,
            "val_solution": data.val_solution if val_soundscapes is not None else None,
            "class_counts": train_table["primary_label"].value_counts().reindex(data.classes, fill_value=0).tolist()}


def train_round0(cfg: DictConfig, prepared: PreparedData, accelerator: Accelerator, round_dir: Path) -> dict[str, Any]:
    """Train the teacher on the labeled clips of the training folds."""
    parts = build_datasets(prepared, cfg.data, cfg.seed)
    model = instantiate(cfg.model)(num_classes=len(prepared.data.classes))
    loss_fn = instantiate(cfg.loss)(class_counts=parts.pop("class_counts"))
    return fit(
        accelerator, model, parts.pop("train_set"), loss_fn, prepared.data.classes, round_dir,
        instantiate(cfg.train), config=OmegaConf.to_container(cfg, resolve=True),
        logger=instantiate(cfg.logger) if cfg.logger.log_with else None, window_s=cfg.data.window_s, **parts,
    )


def write_round_record(round_dir: Path, cfg: DictConfig, round_idx: int, metrics: dict, started: float,
                       data_summary: dict) -> None:
    """Resolved config, manifest and the completion marker (written last) of a finished round."""
    (round_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_json_atomic(round_dir / "manifest.json", {
        "round": round_idx, "code_version": code_version(), "seconds": round(time.time() - started, 1),
        "data": data_summary, "final_metrics": {k: v for k, v in metrics.items() if k != "history"},
    })
    write_json_atomic(round_dir / DONE_FILE, {"round": round_idx, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def run(cfg: DictConfig) -> Path:
    """Bring `cfg.run_dir` up to round `cfg.round`; returns the run folder."""
    validate(cfg)
    # Accelerate logs every file of every epoch checkpoint at INFO; the loop reports checkpoints itself.
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mixed_precision = cfg.train.get("mixed_precision")
    accelerator = Accelerator(log_with=cfg.logger.log_with, **({"mixed_precision": mixed_precision} if mixed_precision else {}))
    run_dir = Path(cfg.run_dir)
    round_dir = run_dir / "round_0"
    if (round_dir / DONE_FILE).is_file():
        log.info("round 0 already complete in %s", round_dir)
    else:
        started = time.time()
        # The main process generates data and fills the cache; the others then find it ready.
        with accelerator.main_process_first():
            prepared = prepare_data(cfg.data, seed=cfg.seed, progress=accelerator.is_local_main_process)
        summary = prepared.summary()
        log.info("data: %s", {k: v for k, v in summary.items() if k != "unreadable_audio"})
        metrics = train_round0(cfg, prepared, accelerator, round_dir)
        if accelerator.is_main_process:
            write_round_record(round_dir, cfg, 0, metrics, started, summary)
            log.info("round 0 done: %s", {k: metrics.get(k) for k in ("val_clip_auc", "val_soundscape_auc")})
        accelerator.wait_for_everyone()
    if cfg.round > 0:
        log.warning("round=%d asked, but pseudo-labeling rounds are not built yet; stopped after round 0", cfg.round)
    # Closes trackers and the process group once, after every round has used this Accelerator.
    accelerator.end_training()
    return run_dir
