"""Training throughput of the real loop on this machine, and how much of it is spent waiting for data.

Writes synthetic recordings, decodes them into the AudioCache, and trains a model config from
configs/model/ with `birdrounds.train.fit` over a ClipDataset (random windows) with MixUp, a
class-balanced sampler and DataLoader workers. Prints samples/s and the share of epoch time blocked
in `next(dataloader)`; the loop's data defaults are meant to keep that share below 10%.

    python bench/train_throughput.py                       # BirdCLEF default: EfficientNet-B0 SED, 128 mels
    python bench/train_throughput.py --model tiny --steps 20
    python bench/train_throughput.py --augment             # with the waveform augmentation of data.augment
    python bench/train_throughput.py --record              # also results/train-throughput-<date>.json
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: with the default (spinning) wait policy, torch's compute threads and the
# DataLoader workers (or any other busy process) fight over a few cores and a step can take 10-60x
# longer; passive waiting yields the core instead. Export OMP_WAIT_POLICY=ACTIVE to measure without it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import soundfile as sf  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from birdrounds.config import compose  # noqa: E402
from birdrounds.data.audio import AudioCache  # noqa: E402
from birdrounds.data.clips import ClipDataset, MixUpCollate, make_sampler  # noqa: E402
from birdrounds.train import fit  # noqa: E402
from records import add_record_option, record_result  # noqa: E402

WAIT_SHARE_LIMIT = 0.10


def write_recordings(folder: Path, n_files: int, n_classes: int, sample_rate_hz: int, seed: int = 0) -> pd.DataFrame:
    """Noisy tone recordings of 8-30 s, one class each, as a train table with a `path` column."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_files):
        label = f"sp{i % n_classes:02d}"
        seconds = rng.uniform(8.0, 30.0)
        t = np.arange(int(seconds * sample_rate_hz)) / sample_rate_hz
        wave = 0.2 * np.sin(2 * np.pi * (500 + 300 * (i % n_classes)) * t) + 0.05 * rng.standard_normal(t.size)
        path = folder / f"{label}_{i:04d}.ogg"
        sf.write(path, wave.astype(np.float32), sample_rate_hz)
        rows.append({"primary_label": label, "secondary_labels": [], "rating": 4.0, "path": str(path)})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sed_effnet_b0", help="a config in configs/model/ (e.g. demo, tiny)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="each epoch starts fresh workers; all are reported")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--files", type=int, default=96)
    parser.add_argument("--augment", action="store_true", help="apply data.augment (shift, stretch, pitch, noise, gain)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    add_record_option(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.prefetch_factor=2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(args, args.work_dir or Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    cfg = compose([f"model={args.model}", "logger=none", *args.overrides])
    sample_rate_hz, window_s = cfg.data.sample_rate_hz, cfg.data.window_s
    (work / "audio").mkdir(parents=True, exist_ok=True)
    table = write_recordings(work / "audio", args.files, n_classes=24, sample_rate_hz=sample_rate_hz)
    cache = AudioCache(work / "cache", sample_rate_hz)
    cache.build(table["path"].tolist(), num_workers=2, progress=False)

    classes = sorted(table["primary_label"].unique())
    augment = instantiate(cfg.data.augment) if args.augment else None
    train_set = ClipDataset(table, classes, cache, window_s=window_s, window_mode="random", augment=augment)
    settings = dataclasses.replace(
        instantiate(cfg.train), epochs=args.epochs, batch_size=args.batch_size, num_workers=args.num_workers,
        max_steps_per_epoch=args.steps, log_every_steps=10**9,
    )
    counts = table["primary_label"].value_counts().reindex(classes).to_numpy()
    result = fit(
        Accelerator(mixed_precision=settings.mixed_precision),
        instantiate(cfg.model)(num_classes=len(classes)),
        train_set,
        instantiate(cfg.loss)(class_counts=counts),
        classes,
        work / "run",
        settings,
        sampler=make_sampler(table, temperature=cfg.data.sampler.temperature, num_samples=args.steps * args.batch_size),
        collate_fn=MixUpCollate(instantiate(cfg.data.mixup)),
    )
    figures = report(args, cfg, result["history"])
    if args.record:
        record_result("train_throughput", figures, overrides=args.overrides)


def report(args: argparse.Namespace, cfg, history: list[dict]) -> dict:
    """One line per epoch and a verdict on the last one (the first also pays one-off warm-up); returns
    what it printed, as a record holds it."""
    print(f"model={args.model} ({cfg.model.backbone}, {cfg.model.n_mels} mels), window {cfg.data.window_s} s "
          f"@ {cfg.data.sample_rate_hz} Hz, batch {args.batch_size}, {args.num_workers} workers, "
          f"MixUp p={cfg.data.mixup.prob}, augment={'on' if args.augment else 'off'}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    for h in history:
        print(f"epoch {h['epoch']}: {h['samples_per_s']:.1f} samples/s, "
              f"waiting for data {100 * h['data_wait_share']:.1f}% of epoch time")
    last = history[-1]["data_wait_share"]
    verdict = "OK" if last < WAIT_SHARE_LIMIT else "DATA-BOUND"
    print(f"{verdict}: data wait {100 * last:.1f}% (limit {100 * WAIT_SHARE_LIMIT:.0f}%)")
    return {"model": args.model, "backbone": cfg.model.backbone, "n_mels": cfg.model.n_mels,
            "window_s": cfg.data.window_s, "sample_rate_hz": cfg.data.sample_rate_hz, "batch_size": args.batch_size,
            "num_workers": args.num_workers, "mixup_p": cfg.data.mixup.prob, "augment": args.augment,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "epochs": [{"epoch": h["epoch"], "samples_per_s": float(h["samples_per_s"]),
                        "data_wait_share": float(h["data_wait_share"])} for h in history],
            "data_wait_share_limit": WAIT_SHARE_LIMIT, "verdict": verdict}


if __name__ == "__main__":
    main()
