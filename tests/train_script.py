"""A tiny but real training run for the loop's tests: synthetic clips, real datasets, model, loss and fit.

Run directly (one process) or under `accelerate launch` (several); tests/test_train.py also imports
`make_data` and `train` to run the same setup in-process.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from accelerate import Accelerator
from accelerate.utils import set_seed

from birdrounds.config import shipped
from birdrounds.data.audio import DirectAudio
from birdrounds.data.clips import ClipDataset, MixUpCollate, make_sampler
from birdrounds.data.soundscapes import SoundscapeChunks
from birdrounds.losses import BCELoss
from birdrounds.model import BirdModel
from birdrounds.train import LoggerSettings, TrainSettings, fit

SAMPLE_RATE_HZ = 8000
WINDOW_S = 1.0
CLASSES = ["a", "b", "c"]
# Drawn with replacement by the class-balanced sampler; max_steps_per_epoch caps it further.
SAMPLES_PER_EPOCH = 64
# Each class is a tone at its own frequency, so the model has something to learn.
TONE_HZ = {"a": 600.0, "b": 1400.0, "c": 2600.0}
# timm's LayerNorm test EfficientNet (0.1M parameters): fast, and per-sample (no batch statistics).
TINY_MODEL = dict(
    backbone="test_efficientnet_ln.r160_in1k", head="sed", sample_rate_hz=SAMPLE_RATE_HZ, n_fft=256,
    hop_length=64, n_mels=32, f_min_hz=50.0, f_max_hz=4000.0, top_db=80.0, norm="standard", spec_augment=None,
    pool="avg", gem_p=3.0, drop_rate=0.1, drop_path_rate=0.0, pretrained_path=None, pretrained=False,
)


def _tone(label: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ
    return 0.3 * np.sin(2 * np.pi * TONE_HZ[label] * t) + 0.05 * rng.standard_normal(t.size)


def make_data(root: Path, files_per_class: int = 6, seed: int = 0) -> None:
    """Write train/val clips (1.5 s), two 3-s labeled soundscapes and their solution under `root`."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in CLASSES:
        for i in range(files_per_class):
            path = root / "clips" / label / f"{label}{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, _tone(label, 1.5, rng).astype(np.float32), SAMPLE_RATE_HZ)
            rows.append({"primary_label": label, "secondary_labels": [], "rating": 4.0, "path": str(path),
                         "split": "val" if i < 2 else "train"})
    pd.DataFrame(rows).to_pickle(root / "clips.pkl")
    solution = []
    for k, labels in enumerate([["a", "b", "c"], ["c", "a", "b"]]):
        wave = np.concatenate([_tone(label, WINDOW_S, rng) for label in labels]).astype(np.float32)
        sf.write(root / f"scape{k}.wav", wave, SAMPLE_RATE_HZ)
        for second, label in enumerate(labels, start=1):
            solution.append({"row_id": f"scape{k}_{second}", **{c: int(c == label) for c in CLASSES}})
    pd.DataFrame(solution).to_csv(root / "solution.csv", index=False)


def settings(epochs: int = 2, batch_size: int = 8, steps: int | None = 3, seed: int = 0,
             num_workers: int = 0, ema_decay: float | None = 0.9) -> TrainSettings:
    """The shipped recipe (train=default) shrunk: a few steps, one cosine with warmup over the first half epoch."""
    return shipped(
        "train", "train=default",
        scheduler={"warmup_epochs": 0.5, "restart_epochs": None, "min_lr": 1e-5},
        epochs=epochs, batch_size=batch_size, num_workers=num_workers, max_steps_per_epoch=steps,
        seed=seed, log_every_steps=1, ema_decay=ema_decay,
    )


def train(
    data: Path, out: Path, accelerator: Accelerator, train_settings: TrainSettings,
    logger: LoggerSettings | None = None, delay_s: float = 0.0, mixup_prob: float = 0.5, drop_rate: float = 0.1,
) -> dict:
    """Build the tiny setup from `data` and run fit into `out`."""
    table = pd.read_pickle(data / "clips.pkl")
    audio = DirectAudio(SAMPLE_RATE_HZ)
    train_rows = table[table["split"] == "train"].reset_index(drop=True)
    train_set = ClipDataset(train_rows, CLASSES, audio, window_s=WINDOW_S, seed=train_settings.seed)
    val_clips = ClipDataset(table[table["split"] == "val"].reset_index(drop=True), CLASSES, audio,
                            window_s=WINDOW_S, window_mode="center")
    scapes = SoundscapeChunks(sorted(data.glob("scape*.wav")), audio, window_s=WINDOW_S, stride_s=WINDOW_S)
    collate = MixUpCollate(shipped("data.mixup", prob=mixup_prob, seed=train_settings.seed))
    set_seed(train_settings.seed)  # the model's initial weights
    model = BirdModel(len(CLASSES), **{**TINY_MODEL, "drop_rate": drop_rate})
    return fit(
        accelerator, model, train_set, BCELoss(class_weight_temperature=0.0, framewise_weight=0.0), CLASSES, out,
        train_settings,
        sampler=make_sampler(train_rows, temperature=0.5, num_samples=SAMPLES_PER_EPOCH),
        collate_fn=_Slow(collate, delay_s) if delay_s else collate,
        val_clips=val_clips, val_soundscapes=scapes, val_solution=pd.read_csv(data / "solution.csv"),
        config={"train": {"mixup_prob": mixup_prob, "drop_rate": drop_rate}}, logger=logger, window_s=WINDOW_S,
    )


class _Slow:
    """Collate that waits `delay_s` per batch, so a test has time to kill a run between checkpoints."""

    def __init__(self, collate, delay_s: float) -> None:
        self.collate, self.delay_s = collate, delay_s

    def set_epoch(self, epoch: int) -> None:
        self.collate.set_epoch(epoch)

    def __call__(self, samples):
        time.sleep(self.delay_s)
        return self.collate(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--steps", type=int, default=3, help="max optimizer steps per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--delay-s", type=float, default=0.0, help="sleep per batch")
    parser.add_argument("--mixup-prob", type=float, default=0.5)
    parser.add_argument("--drop-rate", type=float, default=0.1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    train_settings = settings(args.epochs, args.batch_size, args.steps, args.seed, args.num_workers)
    accelerator = Accelerator()
    train(args.data, args.out, accelerator, train_settings, delay_s=args.delay_s,
          mixup_prob=args.mixup_prob, drop_rate=args.drop_rate)
    accelerator.end_training()  # destroys the process group, so the processes exit cleanly


if __name__ == "__main__":
    main()
