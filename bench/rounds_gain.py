"""Do the rounds pay? The default `rounds/run.py round=2` for several seeds, teacher vs round-2 student.

Runs the embedded default (synthetic mini-BirdCLEF, demo model, pseudo=first_2025) once per seed, each
in its own run folder under --home (the generated data and audio cache are shared), then prints the
validation-soundscape macro AUC of the round-0 teacher and of every student per seed, with mean ± std,
and checks the goal: the round-2 student beats the teacher for every seed and by >= +0.02 on average.

    python bench/rounds_gain.py --home /tmp/rounds_gain [--seeds 0 1 2] [overrides ...]

Exit status 0 when the goal is met, 1 when not. Rounds already complete in a run folder are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MIN_MEAN_GAIN = 0.02


def run_seed(home: Path, seed: int, rounds: int, overrides: list[str]) -> tuple[list[dict], float]:
    """Run rounds 0..`rounds` for one seed; returns each round's metrics.json and the wall time."""
    run_dir = home / "runs" / f"seed{seed}"
    env = {**os.environ, "BIRDROUNDS_HOME": str(home), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    started = time.time()
    cmd = [sys.executable, str(REPO / "rounds" / "run.py"), f"round={rounds}", f"seed={seed}",
           f"run_dir={run_dir}", "logger=none", *overrides]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.time() - started
    if proc.returncode != 0:
        sys.exit(f"seed {seed} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    metrics = [json.loads((run_dir / f"round_{k}" / "metrics.json").read_text()) for k in range(rounds + 1)]
    return metrics, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="work folder (data, cache and run folders)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    args.home.mkdir(parents=True, exist_ok=True)
    key = "val_soundscape_auc"
    table = []
    for seed in args.seeds:
        metrics, seconds = run_seed(args.home.resolve(), seed, args.rounds, args.overrides)
        table.append(([m[key] for m in metrics], [m["val_clip_auc"] for m in metrics], seconds))
        print(f"seed {seed}: {key} by round {[round(v, 4) for v in table[-1][0]]} in {seconds:.0f} s", flush=True)

    soundscape = np.array([row[0] for row in table])
    clip = np.array([row[1] for row in table])
    gain = soundscape[:, -1] - soundscape[:, 0]
    heads = [f"round {k}" for k in range(args.rounds + 1)]
    print(f"\nvalidation soundscape macro AUC ({key}), round 0 = teacher\n")
    print("| seed | " + " | ".join(heads) + f" | student {args.rounds} − teacher | val_clip_auc r0 → r{args.rounds} | time |")
    print("| --- " * (len(heads) + 4) + "|")
    for seed, row, clip_row, g in zip(args.seeds, table, clip, gain):
        cells = " | ".join(f"{v:.3f}" for v in row[0])
        print(f"| {seed} | {cells} | {g:+.3f} | {clip_row[0]:.3f} → {clip_row[-1]:.3f} | {row[2] / 60:.1f} min |")
    mean, std = soundscape.mean(axis=0), soundscape.std(axis=0, ddof=1) if len(table) > 1 else np.zeros(len(heads))
    cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, std))
    gain_std = gain.std(ddof=1) if len(gain) > 1 else 0.0
    print(f"| mean ± std | {cells} | {gain.mean():+.3f} ± {gain_std:.3f} | "
          f"{clip[:, 0].mean():.3f} → {clip[:, -1].mean():.3f} | |")
    every = bool((gain > 0).all())
    ok = every and gain.mean() >= MIN_MEAN_GAIN
    print(f"\nstudent beats teacher in every seed: {every}; mean gain {gain.mean():+.3f} (goal >= +{MIN_MEAN_GAIN}): "
          f"{'MET' if ok else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
