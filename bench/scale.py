"""Scaling with data size: data preparation, pseudo-labeling and training on BirdCLEF-2025-shaped folders.

For each `--fractions` f, writes a folder with the real competition's layout and shape at f of its size:
206 classes (146 Aves, lognormal counts with median 130; 34 Amphibia, 17 Insecta, 9 Mammalia with 2-6
recordings each; 28,564 train.csv rows at f=1, at least one per class), round(9,726 f) (>= 2) train
soundscapes (60 s as in the competition; copies of 8 renderings), short train clips of seeded mono
32-kHz OGG audio (tone bursts in noise) and ~1% exact duplicate clips under new XC ids. Then each stage
runs in its own fresh process, using the library as a run does:

  layout     load_birdclef (tables, file checks)                            driver: train rows
  cache      AudioCache.build of train audio + soundscapes, 2 workers        driver: seconds of audio
  split      assign_folds with the filled cache (duplicate search, folds)   driver: train rows
  mixed_val  build_datasets' mixed validation set (data.mixed_val)           driver: soundscapes read,
             min(soundscapes, data.mixed_val.max_background_files = 200)
  train      build_datasets (mixed_val off) + fit for --train-steps steps, 2 loader workers, no
             validation                                                      driver: train rows
  pseudo     rounds.pseudo_label of all train soundscapes, fresh tiny model, CPU  driver: 20-s windows

Per stage: time (the stage's work, not imports; layout and split: best of --repeats calls; train:
build_datasets and time per step), peak RAM = own ru_maxrss + workers x the largest worker's (a
conservative total), and bytes written. Growth exponent = least-squares slope of log(value) on
log(driver). Full scale: 28,564 rows; 9,726 x 60-s soundscapes (their windows); audio = those plus
28,564 clips x --train-audio-mean-s (an assumption). Projections start at the largest size: time and
disk never below linear, per-step time by the fitted law, RAM by the larger of the power law and the
least-squares MB per driver unit over all sizes (a conservative bound: noise at these sizes inflates it). The decode cache holds float16 at 32 kHz,
64,000 B per second of audio (+128 B per file): its measured rate and full-scale size are printed.
Exit status 0 when no exponent exceeds 1.15 and every projected peak RAM is under 16 GB, else 1.

    python bench/scale.py --workdir /tmp/scale [--fractions 0.005 0.01 0.02] [--train-steps 20] [--out scale.json]

`--record` also writes results/scale-<date>.json, whose results are the --out JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from records import add_record_option, record_result

# torch is imported only inside the stages (so cache-build workers, which import this file, stay light);
# its OpenMP threads must yield rather than spin on 2 cores (src/birdrounds/cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FULL_ROWS, FULL_SOUNDSCAPES, SOUNDSCAPE_S = 28_564, 9_726, 60.0
N_AVES, AVES_MEDIAN = 146, 130
OTHERS = {"Amphibia": 34, "Insecta": 17, "Mammalia": 9}
SR = 32_000
CACHE_BYTES_PER_S = 2 * SR  # float16 entries
RAM_LIMIT_MB = 16 * 1024
SUPERLINEAR = 1.15
STAGES = ("layout", "cache", "split", "mixed_val", "train", "pseudo")
DRIVERS = {"layout": "rows", "cache": "audio_s", "split": "rows", "mixed_val": "background_files", "train": "rows",
           "pseudo": "windows"}
GEN_VERSION = 3
SOUNDSCAPE_POOL = 8  # distinct soundscapes rendered; the others are copies of them
TIME_NAMES = {"seconds": "time s", "dataset_s": "datasets s", "step_s": "time per step s"}


def class_counts(seed: int) -> list[tuple[str, str, int]]:
    """(label, class_name, recordings at full scale) for the 206 classes, sorted by label."""
    rng = np.random.default_rng(seed)
    others = [(cls, int(n)) for cls, k in OTHERS.items() for n in rng.integers(2, 7, k)]
    aves_total = FULL_ROWS - sum(n for _, n in others)
    z = np.array([NormalDist().inv_cdf((i + 0.5) / N_AVES) for i in range(N_AVES)])
    lo, hi = 0.0, 3.0  # lognormal quantiles with median 130; sigma set so Aves fill the remaining rows
    for _ in range(60):
        sigma = (lo + hi) / 2
        lo, hi = (sigma, hi) if (AVES_MEDIAN * np.exp(sigma * z)).sum() < aves_total else (lo, sigma)
    aves = np.round(AVES_MEDIAN * np.exp(sigma * z)).astype(int)
    aves[-1] += aves_total - aves.sum()
    rows = [(f"aves{i:03d}", "Aves", int(n)) for i, n in enumerate(rng.permutation(aves))]
    rows += [(str(1_000_000 + 37 * i), cls, n) for i, (cls, n) in enumerate(others)]
    return sorted(rows)


def plan_rows(classes: list[tuple[str, str, int]], fraction: float, dup_fraction: float, seed: int) -> Any:
    """train.csv at `fraction` (>= 1 row per class) plus `dup_of` (row index a duplicate copies, or -1)."""
    import pandas as pd

    rng = np.random.default_rng(seed + 1)
    labels = [(lab, cls) for lab, cls, n in classes for _ in range(max(1, round(n * fraction)))]
    n = len(labels)
    aves = [lab for lab, cls, _ in classes if cls == "Aves"]
    coll = [rng.choice(["XC", "iNat"], p=[0.8, 0.2]) if cls == "Aves" else rng.choice(["XC", "iNat", "CSA"])
            for _, cls in labels]
    n_dup = max(2, round(dup_fraction * n))
    dup_src = rng.choice(n, n_dup, replace=False)
    labels += [labels[i] for i in dup_src]
    coll += ["XC"] * n_dup
    ids = 100_000 + np.cumsum(rng.integers(1, 50, len(labels)))
    second = [str([str(a) for a in rng.choice(aves, rng.integers(1, 3), replace=False)]) if rng.random() < 0.1 else "[]"
              for _ in labels]
    return pd.DataFrame({
        "primary_label": [lab for lab, _ in labels], "secondary_labels": second,
        "type": "['song']", "filename": [f"{lab}/{c}{i}.ogg" for (lab, _), c, i in zip(labels, coll, ids)],
        "collection": coll, "rating": np.round(rng.integers(0, 11, len(labels)) / 2, 1),
        "url": [f"https://xeno-canto.org/{i}" for i in ids], "latitude": rng.uniform(5, 8, len(labels)).round(4),
        "longitude": rng.uniform(-75, -73, len(labels)).round(4),
        "scientific_name": [f"Genus {lab}" for lab, _ in labels], "common_name": [f"Name {lab}" for lab, _ in labels],
        "author": [f"Author {k}" for k in rng.integers(0, 500, len(labels))], "license": "cc-by-nc-sa 4.0",
        "duration_s": 0.0, "dup_of": np.concatenate([np.full(n, -1), dup_src]),
    })


def render(duration_s: float, seed: int) -> np.ndarray:
    """Cheap audio: a noise floor of random level with random windowed tone bursts (a non-flat envelope)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.002, 0.02) * rng.standard_normal(int(duration_s * SR)).astype(np.float32)
    for _ in range(int(rng.integers(1, 2 + duration_s))):
        n = min(len(x), int(rng.uniform(0.1, 0.5) * SR))
        start, t = int(rng.integers(0, len(x) - n + 1)), np.arange(n) / SR
        x[start:start + n] += rng.uniform(0.05, 0.5) * np.hanning(n) * np.sin(2 * np.pi * rng.uniform(1500, 7000) * t)
    return x


def _write_job(job: tuple[str, float, int]) -> None:
    from birdrounds.data.audio import write_audio

    path, duration_s, seed = job
    write_audio(path, render(duration_s, seed), SR)


def generate(root: Path, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    """Write (or reuse, when made with the same settings) the folder at `fraction`; return its counts."""
    import pandas as pd

    from birdrounds.procs import spawn_pool

    params = {"version": GEN_VERSION, "fraction": fraction, "seed": args.seed, "clip_s": args.clip_s,
              "soundscape_s": args.soundscape_s, "duplicates": args.duplicates}
    marker = root / ".generated.json"
    if marker.is_file() and json.loads(marker.read_text()).get("params") == params:
        return json.loads(marker.read_text())["info"]
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    classes = class_counts(args.seed)
    table = plan_rows(classes, fraction, args.duplicates, args.seed)
    rng = np.random.default_rng(args.seed + 2)
    table["duration_s"] = rng.uniform(*args.clip_s, len(table)).round(2)
    dups = table["dup_of"] >= 0
    table.loc[dups, "duration_s"] = table["duration_s"].to_numpy()[table.loc[dups, "dup_of"]]
    originals = table[table["dup_of"] < 0]
    jobs = [(str(root / "train_audio" / f), float(d), args.seed * 1_000_003 + i)
            for i, (f, d) in enumerate(zip(originals["filename"], originals["duration_s"]))]
    n_scapes = max(2, round(FULL_SOUNDSCAPES * fraction))
    scapes = [root / "train_soundscapes" / f"H{k % 7 + 1:02d}_20240401_{k:06d}.ogg" for k in range(n_scapes)]
    jobs += [(str(p), args.soundscape_s, args.seed * 1_000_003 + 500_000 + k)
             for k, p in enumerate(scapes[:SOUNDSCAPE_POOL])]
    for label, _, _ in classes:
        (root / "train_audio" / label).mkdir(parents=True, exist_ok=True)
    (root / "train_soundscapes").mkdir(parents=True, exist_ok=True)
    with spawn_pool(args.num_workers) as pool:
        list(pool.map(_write_job, jobs, chunksize=8))
    for k, path in enumerate(scapes[SOUNDSCAPE_POOL:], start=SOUNDSCAPE_POOL):
        shutil.copyfile(scapes[k % SOUNDSCAPE_POOL], path)  # encoding every one would dominate the run
    for filename, src in zip(table["filename"], table["dup_of"]):
        if src >= 0:  # an exact copy of another row's file under a new XC id
            shutil.copyfile(root / "train_audio" / table.at[src, "filename"], root / "train_audio" / filename)
    table.drop(columns=["duration_s", "dup_of"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame([dict(primary_label=lab, inat_taxon_id=1_000_000 + k, scientific_name=f"Genus {lab}",
                       common_name=f"Name {lab}", class_name=cls) for k, (lab, cls, _) in enumerate(classes)]
                 ).to_csv(root / "taxonomy.csv", index=False)
    pd.DataFrame({"row_id": [f"soundscape_8565_{5 * k}" for k in (1, 2, 3)], **{lab: 0.0 for lab, _, _ in classes}}
                 ).to_csv(root / "sample_submission.csv", index=False)
    info = {"rows": len(table), "duplicates": int(dups.sum()), "soundscapes": n_scapes,
            "clip_mean_s": float(table["duration_s"].mean()),
            "audio_s": float(table["duration_s"].sum() + n_scapes * args.soundscape_s),
            "generate_s": round(time.perf_counter() - started, 2)}
    marker.write_text(json.dumps({"params": params, "info": info}))
    return info


def tree_bytes(folder: Path) -> int:
    """Sum of the sizes of the files under `folder` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0



def compose_cfg(args: argparse.Namespace) -> Any:
    from birdrounds.config import compose

    d = args.size_dir
    return compose(["data=birdclef2025", f"data.root={d / 'data'}", f"data.cache_dir={d / 'cache'}",
                    "data.external.enabled=false", f"data.num_workers={args.num_workers}", "model=tiny",
                    "logger=none", f"train.batch_size={args.batch_size}", f"train.num_workers={args.num_workers}",
                    "train.epochs=1", f"train.max_steps_per_epoch={args.train_steps}", f"seed={args.seed}",
                    f"data.sampler.samples_per_epoch={args.train_steps * args.batch_size}"])  # exactly N steps


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    from birdrounds.data.audio import AudioCache
    from birdrounds.data.layout import load_birdclef

    return load_birdclef(args.size_dir / "data", on_missing_file="error"), AudioCache(args.size_dir / "cache", SR)


def best_of(repeats: int, call: Any) -> tuple[float, Any]:
    """(shortest time of `repeats` calls, the last call's result): for stages short enough to suffer from load."""
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t)
    return min(times), result


def stage_layout(args: argparse.Namespace) -> dict[str, Any]:
    from birdrounds.data.layout import load_birdclef

    seconds, data = best_of(args.repeats, lambda: load_birdclef(args.size_dir / "data", on_missing_file="error"))
    return {"seconds": seconds, "rows": len(data.train), "workers": 0}


def stage_cache(args: argparse.Namespace) -> dict[str, Any]:
    data, audio = load(args)
    t = time.perf_counter()
    summary = audio.build([*data.train["path"], *map(str, data.soundscapes)], num_workers=args.num_workers,
                          progress=False)
    return {"seconds": time.perf_counter() - t, "files": summary.n_files, "decoded": summary.n_decoded,
            "audio_s": summary.seconds_of_audio, "skipped": len(summary.skipped), "workers": args.num_workers,
            "written_bytes": tree_bytes(args.size_dir / "cache")}


def stage_split(args: argparse.Namespace) -> dict[str, Any]:
    from birdrounds.data.split import assign_folds, near_duplicate_groups

    data, audio = load(args)
    seconds, _ = best_of(args.repeats, lambda: assign_folds(data.train, n_folds=5, seed=args.seed, audio=audio))
    joined = len(data.train) - int(near_duplicate_groups(data.train, audio).max() + 1)  # untimed check
    return {"seconds": seconds, "rows": len(data.train), "duplicates_joined": joined, "workers": 0}


def stage_mixed_val(args: argparse.Namespace) -> dict[str, Any]:
    from birdrounds.data.mixed_val import mixed_validation_from_config
    from birdrounds.data.prepare import prepare_data

    cfg = compose_cfg(args)
    prepared = prepare_data(cfg.data, seed=cfg.seed, progress=False)  # untimed
    held_out = prepared.data.train[prepared.folds == cfg.data.fold].reset_index(drop=True)
    t = time.perf_counter()
    mixed_validation_from_config(cfg.data.mixed_val, held_out, prepared.data.soundscapes, prepared.audio,
                                 prepared.data.classes)
    cap = cfg.data.mixed_val.max_background_files
    return {"seconds": time.perf_counter() - t, "background_files": min(len(prepared.data.soundscapes), cap),
            "full_background_files": cap, "workers": 0}


def stage_train(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator
    from hydra.utils import instantiate

    from birdrounds.data.prepare import prepare_data
    from birdrounds.rounds import build_datasets, build_model
    from birdrounds.train import fit

    cfg = compose_cfg(args)
    prepared = prepare_data(cfg.data, seed=cfg.seed, progress=False)  # cache already filled: untimed
    out = args.size_dir / "train"
    data_cfg = cfg.data.copy()
    data_cfg.mixed_val = None  # its own stage: it reads min(soundscapes, a cap) files, not rows
    t = time.perf_counter()
    parts = build_datasets(prepared, data_cfg, cfg.seed)
    dataset_s = time.perf_counter() - t
    model = build_model(cfg, len(prepared.data.classes), 0)
    metrics = fit(Accelerator(cpu=True), model, parts.train_set, instantiate(cfg.loss)(class_counts=parts.class_counts),
                  prepared.data.classes, out, instantiate(cfg.train), sampler=parts.sampler,
                  collate_fn=parts.collate_fn, window_s=cfg.data.window_s)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "dataset_s": dataset_s, "steps": metrics["step"], "rows": len(prepared.data.train),
            "step_s": (seconds - dataset_s) / max(1, metrics["step"]), "workers": args.num_workers,
            "written_bytes": tree_bytes(out)}


def stage_pseudo(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator

    from birdrounds.data.audio import CacheBuildSummary
    from birdrounds.data.prepare import PreparedData
    from birdrounds.data.soundscapes import window_starts
    from birdrounds.model import save_checkpoint
    from birdrounds.rounds import build_model, pseudo_label

    cfg = compose_cfg(args)
    data, audio = load(args)
    prepared = PreparedData(data=data, audio=audio, folds=np.zeros(len(data.train), dtype=int),
                            cache_summary=CacheBuildSummary(0, 0, 0))
    teacher = args.size_dir / "teacher.pt"
    save_checkpoint(teacher, build_model(cfg, len(data.classes), 0), data.classes, extra={"window_s": cfg.data.window_s})
    out = args.size_dir / "pseudo"
    t = time.perf_counter()
    pseudo_label(cfg, prepared, [teacher], 1, out, Accelerator(cpu=True))
    seconds = time.perf_counter() - t
    windows = np.load(out / "pseudo_partial" / "share_0of1.npy", mmap_mode="r").shape[0]
    per_file = len(window_starts(int(SOUNDSCAPE_S * SR), int(cfg.pseudo.window_s * SR), int(cfg.pseudo.stride_s * SR),
                                 int(2.5 * SR)))
    return {"seconds": seconds, "windows": windows, "full_windows": FULL_SOUNDSCAPES * per_file,
            "window_s": cfg.pseudo.window_s, "workers": 0, "written_bytes": tree_bytes(out)}


def run_child(args: argparse.Namespace) -> None:
    """Run one stage in this (fresh) process and print its result as one JSON line."""
    import gc
    import logging

    logging.basicConfig(level=logging.WARNING)
    result = globals()[f"stage_{args.stage}"](args)
    gc.collect()
    result["self_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The largest waited-for child. `import torch` runs `ldconfig -p` from a fork, whose peak is this
    # process's RSS at that moment: only stages with workers count children, where workers are larger.
    result["children_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["peak_mb"] = result["self_mb"] + result["workers"] * result["children_mb"]
    print(json.dumps(result))


def run_stage(stage: str, size_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    shutil.rmtree(size_dir / ("cache" if stage == "cache" else stage), ignore_errors=True)
    cmd = [sys.executable, __file__, "--stage", stage, "--size-dir", str(size_dir), "--seed", str(args.seed),
           "--num-workers", str(args.num_workers), "--batch-size", str(args.batch_size),
           "--train-steps", str(args.train_steps), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"stage {stage} failed in {size_dir} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])



def exponent(x: list[float], y: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x); None when the driver barely varied or a value is 0."""
    if min(y) <= 0 or np.ptp(np.log(x)) < math.log(1.1):
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def project(metric: str, x: list[float], y: list[float], full: float, b: float | None) -> float | None:
    """Full scale from the largest size: time/disk power law but >= linear; RAM also >= its linear trend.

    The linear trend (least-squares MB per driver unit over all sizes, >= 0) catches a linear term too
    small next to the fixed RAM for the exponent to show; fitted over every size, one noisy pair of
    measurements does not set it.
    """
    if b is None:
        return None
    if metric == "step_s":  # a per-step cost: the fitted law (it should not grow at all)
        return y[-1] * (full / x[-1]) ** b
    if metric != "peak_mb":
        return y[-1] * (full / x[-1]) ** max(b, 1.0)
    slope = max(float(np.polyfit(x, y, 1)[0]), 0.0)
    return max(y[-1] * (full / x[-1]) ** b, y[-1] + slope * (full - x[-1]))


def analyse(sizes: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One line per (stage, metric): values per size, growth exponent, full-scale projection, flags."""
    full = {"rows": FULL_ROWS, "audio_s": FULL_SOUNDSCAPES * SOUNDSCAPE_S + FULL_ROWS * args.train_audio_mean_s,
            "windows": sizes[-1]["stages"]["pseudo"]["full_windows"],
            "background_files": sizes[-1]["stages"]["mixed_val"]["full_background_files"]}
    lines = []
    for stage in STAGES:
        driver = DRIVERS[stage]
        x = [float(s["stages"][stage][driver]) for s in sizes]
        times = ("dataset_s", "step_s") if stage == "train" else ("seconds",)
        for metric in (*times, "peak_mb", "written_bytes"):
            y = [float(s["stages"][stage].get(metric, 0)) for s in sizes]
            if metric == "written_bytes" and max(y) == 0:
                continue
            b = exponent(x, y)
            value = project(metric, x, y, full[driver], b)
            flags = ["undetermined"] if b is None else (["superlinear"] if b > SUPERLINEAR else [])
            if metric == "peak_mb" and value is not None and value >= RAM_LIMIT_MB:
                flags.append(">=16GB")
            lines.append({"stage": stage, "metric": metric, "driver": driver, "x": x, "values": y,
                          "exponent": b, "full_driver": full[driver], "projected": value, "flags": flags})
    return lines


def cell(line: dict[str, Any], k: int, sizes: list[dict[str, Any]]) -> str:
    """A table cell: seconds, MB on disk, or peak RAM with its parts (own + workers x largest worker)."""
    if line["metric"] in TIME_NAMES:
        return f"{line['values'][k]:.2f}"
    if line["metric"] == "written_bytes":
        return f"{line['values'][k] / 2**20:.1f}"
    r = sizes[k]["stages"][line["stage"]]
    return f"{r['peak_mb']:.0f} ({r['self_mb']:.0f}+{r['workers']}x{r['children_mb']:.0f})" if r["workers"] else f"{r['peak_mb']:.0f}"


def report(sizes: list[dict[str, Any]], lines: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print("\n| fraction | train rows | duplicates (joined by split) | soundscapes | audio s | data MB | cache MB | generate s |")
    print("|---|---|---|---|---|---|---|---|")
    for s in sizes:
        print(f"| {s['fraction']:g} | {s['rows']} | {s['duplicates']} ({s['stages']['split']['duplicates_joined']}) | "
              f"{s['soundscapes']} | {s['audio_s']:.0f} | {s['data_bytes'] / 2**20:.1f} | "
              f"{s['cache_bytes'] / 2**20:.1f} | {s['generate_s']:.1f} |")
    names = {**TIME_NAMES, "peak_mb": "peak RAM MB (self+workers x child)", "written_bytes": "disk MB"}
    print("\n| stage | metric | driver | " + " | ".join(f"f={s['fraction']:g}" for s in sizes)
          + " | exponent | full scale (driver) | flag |")
    print("|---|---|---|" + "---|" * len(sizes) + "---|---|---|")
    for ln in lines:
        b, proj = ("n/a", "n/a") if ln["exponent"] is None else (
            f"{ln['exponent']:.2f}", f"{ln['projected'] / (2**20 if ln['metric'] == 'written_bytes' else 1):,.1f}")
        print(f"| {ln['stage']} | {names[ln['metric']]} | {ln['driver']} | "
              + " | ".join(cell(ln, k, sizes) for k in range(len(sizes)))
              + f" | {b} | {proj} ({ln['full_driver']:,.0f}) | {' '.join(ln['flags']) or 'ok'} |")
    last = sizes[-1]
    bps = last["cache_bytes"] / last["stages"]["cache"]["audio_s"]
    real_s = FULL_SOUNDSCAPES * SOUNDSCAPE_S + FULL_ROWS * args.train_audio_mean_s
    print(f"\nCache: {bps:,.0f} B per audio second measured (float16 at 32 kHz: {CACHE_BYTES_PER_S:,} B/s plus a "
          f"128-B .npy header per file). Real audio: {FULL_SOUNDSCAPES:,} x {SOUNDSCAPE_S:.0f} s soundscapes + "
          f"{FULL_ROWS:,} train clips x {args.train_audio_mean_s:g} s (ASSUMED mean clip length, "
          f"--train-audio-mean-s) = {real_s / 3600:,.0f} h -> cache {bps * real_s / 1e9:,.1f} GB "
          f"({CACHE_BYTES_PER_S * real_s / 1e9:,.1f} GB at exactly 64,000 B/s).")
    print(f"Split reads each train clip's cached audio once; its row-based projection assumes bench clips "
          f"(mean {last['clip_mean_s']:.1f} s): with {args.train_audio_mean_s:g}-s clips its time grows by up to "
          f"x{args.train_audio_mean_s / last['clip_mean_s']:.1f}. Train: build_datasets, then {args.train_steps} "
          f"steps of batch {args.batch_size} (time per step: fit's time / steps); a real round also holds the "
          f"mixed validation set (the mixed_val stage), which its loader workers inherit.")
    print("Projections start at the largest size: time and disk at least linearly, per-step time by the fitted "
          "law, RAM by the larger of the fitted power law and the least-squares MB per unit over all sizes "
          "(full-scale driver in parentheses); "
          "n/a: the driver did not vary (>= 1 row per class keeps 206+ rows below f ~ 0.004).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="everything is written here (required)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    parser.add_argument("--clip-s", type=float, nargs=2, default=[3.0, 8.0], metavar=("MIN", "MAX"),
                        help="train clip durations, uniform (default 3 8)")
    parser.add_argument("--soundscape-s", type=float, default=60.0, help="train soundscape duration (default 60)")
    parser.add_argument("--duplicates", type=float, default=0.01, help="share of extra exact-copy rows (>= 2)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="training and pseudo-labeling batch")
    parser.add_argument("--num-workers", type=int, default=2, help="cache build / DataLoader / generation workers")
    parser.add_argument("--train-audio-mean-s", type=float, default=35.0,
                        help="assumed mean length of a real train clip, for the cache projection (default 35)")
    parser.add_argument("--repeats", type=int, default=3, help="layout and split (~1 s each): best of N calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default WORKDIR/scale.json)")
    parser.add_argument("--reanalyse", type=Path, default=None, metavar="JSON",
                        help="print the tables again from a results file (no runs; its sizes and settings)")
    add_record_option(parser)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--size-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return run_child(args)
    if args.reanalyse:
        saved = json.loads(args.reanalyse.read_text())
        vars(args).update({k: v for k, v in saved["args"].items() if k not in ("reanalyse", "out", "record")})
        args.out = args.reanalyse
        return finish(saved["sizes"], args)
    if args.workdir is None or len(args.fractions) < 3:
        parser.error("give --workdir and at least 3 --fractions")
    sizes = []
    for fraction in sorted(args.fractions):
        size_dir = (args.workdir / f"f{fraction:g}").resolve()
        info = generate(size_dir / "data", fraction, args)
        stages = {stage: run_stage(stage, size_dir, args) for stage in STAGES}
        sizes.append({"fraction": fraction, **info, "stages": stages, "data_bytes": tree_bytes(size_dir / "data"),
                      "cache_bytes": stages["cache"]["written_bytes"]})
        print(f"f={fraction:g}: {info['rows']} rows, {info['soundscapes']} soundscapes; "
              + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in stages.items()), flush=True)
    finish(sizes, args)


def finish(sizes: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Tables, flags, the JSON results and the exit status."""
    lines = analyse(sizes, args)
    report(sizes, lines, args)
    ok = not any(ln["flags"] for ln in lines)
    out = Path(args.out or Path(args.workdir) / "scale.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "record"},
              "sizes": sizes, "lines": lines, "ok": ok}
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{'OK' if ok else 'FAIL'}: results in {out}")
    if args.record:
        record_result("scale", result)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
