"""Training-loader samples/s per CPU core, with the default augmentation: what GPU rate can it feed?

Builds the round's training data exactly as `rounds/run.py` does (`birdrounds.rounds.build_datasets`:
ClipDataset over the decoded-audio cache with `data.augment` -- gain, noise, soundscape background, shift,
pitch, stretch --, MixUp through `MixUpCollate`, the class-balanced sampler; 5-s windows at 32 kHz) and
iterates its DataLoader with no model, for each `--workers` count. Prints one table row per count:
samples/s after the workers' first batch (steady state), samples/s including worker start-up, and samples/s
per core (cores = workers, or 1 for workers=0, where the main process does the work).

    python bench/loader_rate.py                         # synthetic data under $BIRDROUNDS_HOME (generated if absent)
    python bench/loader_rate.py --workers 0 1 2 --batches 40
    python bench/loader_rate.py --json out.json data.augment.pitch_p=0    # Hydra overrides after the flags
    python bench/loader_rate.py --record                 # also results/loader-rate-<date>.json (the --json rows)
    python bench/loader_rate.py data.augment_on=device    # workers only read, crop and slice backgrounds;
                                                          # also times the per-batch transform on the CPU

Measure on an otherwise idle machine: the per-core figure assumes each worker has a core of its own.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from birdrounds.config import compose  # noqa: E402
from birdrounds.data.clips import make_sampler  # noqa: E402
from birdrounds.data.prepare import prepare_data  # noqa: E402
from birdrounds.rounds import build_datasets, with_background_windows  # noqa: E402
from records import add_record_option, record_result  # noqa: E402


def measure(parts, data_cfg, batch_size: int, batches: int, workers: int, prefetch_factor: int, seed: int) -> dict:
    """One pass of `batches` batches; steady-state rate counted from the end of the first batch."""
    sampler = make_sampler(parts.train_table, temperature=data_cfg.sampler.temperature,
                           num_samples=batch_size * batches, rating_weight=data_cfg.clips.rating_weight, seed=seed)
    kwargs = dict(num_workers=workers)
    if workers:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=False)
    loader = DataLoader(parts.train_set, batch_size=batch_size, sampler=sampler,
                        collate_fn=parts.collate_fn, drop_last=True, **kwargs)
    start = time.perf_counter()
    first, n, n_first = None, 0, 0
    for batch in loader:
        n += len(batch["audio"])
        if first is None:
            first = time.perf_counter()
            n_first = n
    end = time.perf_counter()
    steady = (n - n_first) / (end - first)
    cores = max(workers, 1)
    return {"workers": workers, "cores": cores, "samples": n, "wall_s": round(end - start, 2),
            "first_batch_s": round(first - start, 2), "samples_per_s": round(steady, 1),
            "samples_per_s_with_startup": round(n / (end - start), 1),
            "samples_per_s_per_core": round(steady / cores, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=30, help="batches per measurement")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: train.batch_size of configs/train/default.yaml (64)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes per worker count (the best and all are reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    add_record_option(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.augment.pitch_p=0")
    args = parser.parse_args()
    # Per core: the main process's own torch work (MixUp, workers=0) stays on one thread.
    torch.set_num_threads(1)
    cfg = compose(["logger=none", "train=default", *args.overrides])
    batch_size = args.batch_size or cfg.train.batch_size
    prepared = prepare_data(cfg.data, seed=cfg.seed, progress=False)
    # As train_round builds them: with data.augment_on=device the workers also read background windows.
    parts = with_background_windows(build_datasets(prepared, cfg.data, cfg.seed), prepared, cfg.seed)
    augment = {k: v for k, v in cfg.data.augment.items() if k.endswith("_p") or k == "pitch_method"}
    print(f"window {cfg.data.window_s} s @ {cfg.data.sample_rate_hz} Hz, batch {batch_size}, {args.batches} batches, "
          f"MixUp {dict(cfg.data.mixup) if cfg.data.mixup else None}, augment {augment}, "
          f"{os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.2f}")
    rows = []
    for workers in args.workers:
        runs = [measure(parts, cfg.data, batch_size, args.batches, workers, cfg.train.prefetch_factor, cfg.seed + r)
                for r in range(args.repeats)]
        best = max(runs, key=lambda r: r["samples_per_s"])
        best["all_samples_per_s"] = [r["samples_per_s"] for r in runs]
        rows.append(best)
    print("| workers | cores | samples/s (steady) | samples/s incl. start-up | samples/s per core | first batch s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['workers']} | {r['cores']} | {r['samples_per_s']} | {r['samples_per_s_with_startup']} "
              f"| {r['samples_per_s_per_core']} | {r['first_batch_s']} |")
    result = {"batch_size": batch_size, "augment_on": cfg.data.get("augment_on", "workers"), "rows": rows}
    if parts.batch_transform is not None:
        result["transform"] = time_transform(parts, batch_size, cfg.seed)
        t = result["transform"]
        print(f"per-batch transform ({parts.batch_transform!r}) on the CPU, 1 thread: {t['s_per_batch']} s per "
              f"batch of {batch_size} = {t['samples_per_s']} samples/s (best of {t['batches']}; on a GPU it is "
              f"a few batched kernels)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.record:
        record_result("loader_rate", result, overrides=args.overrides)


def time_transform(parts, batch_size: int, seed: int, batches: int = 5) -> dict:
    """Seconds per batch of `parts.batch_transform` (augment_on=device) run here on the CPU, best of `batches`."""
    loader = DataLoader(parts.train_set, batch_size=batch_size, shuffle=True, collate_fn=parts.collate_fn,
                        drop_last=True, generator=torch.Generator().manual_seed(seed))
    parts.batch_transform.set_epoch(0)
    times = []
    for i, batch in zip(range(batches), loader):
        start = time.perf_counter()
        parts.batch_transform(batch)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"batches": len(times), "s_per_batch": round(best, 3), "samples_per_s": round(batch_size / best, 1)}


if __name__ == "__main__":
    main()
