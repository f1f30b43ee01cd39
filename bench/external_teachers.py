"""External teachers on real sound: own CNN vs BirdNET probe, zero-shot and ensemble, students vs controls.

For each teacher arm and seed, one run folder `--home/runs/<arm>_s<seed>`: `rounds/run.py teacher=<arm>
round=R control=true` on a BirdCLEF-layout folder whose labeled test soundscapes are passed as validation
soundscapes, with every epoch and round chosen by `val_mixed_auc` (`train.select_by=val_mixed_auc`), so that
no choice is made on the soundscapes scored. Reports, per arm, the test soundscape AUC (mean +- std over
seeds) of the teacher and of each round's student and equal-compute control; then how well `val_mixed_auc`
ranks every model against the test soundscapes (Spearman), and how far the choices made by it (each fit's
epoch, export's round) fall from the best by the test soundscapes. `--time-features N` times the external
model on N soundscapes with an empty cache and projects it to BirdCLEF's 9,726 one-minute soundscapes.
`--oracle-truth CSV --oracle-arms zero_shot` adds, per listed arm, `oracle_<arm>`: the same teacher, but every
student round trains on the true labels of the train soundscapes (`pseudo.truth`; no controls, which would
be the arm's own): what perfect pseudo-labels would give the student. An arm run without controls
(`control=false`) is compared with the controls of an arm of the same seed whose round-1 student started from
the same weights: after any external teacher the controls are the same models (labeled data only).

    python bench/external_teachers.py --home DIR --data-root DIR/dev0 [--seeds 0 1 2] [--arms cnn probe zero_shot ensemble]
    python bench/external_teachers.py --home DIR --data-root DIR/dev0 --report-only --record --data-name "dev0 ..."
    python bench/external_teachers.py --home DIR --data-root DIR/dev0 --time-features 10

Extra arguments are Hydra overrides for every run. Rounds already complete are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from birdrounds.artifacts import METRICS_FILE
from records import write_record

REPO = Path(__file__).resolve().parents[1]
KEY, SIGNAL = "val_soundscape_auc", "val_mixed_auc"  # scored on the test soundscapes; chosen by the mixed set
BIRDCLEF_SOUNDSCAPE_S = 9_726 * 60.0  # BirdCLEF 2025's train_soundscapes: 9,726 one-minute files


ORACLE = "oracle_"  # arm-name prefix: the arm's teacher, students on the true labels


def run_arm(home: Path, root: Path, arm: str, seed: int, rounds: int, overrides: list[str],
            truth: Path | None = None) -> Path:
    run_dir = home / "runs" / f"{arm}_s{seed}"
    teacher = arm.removeprefix(ORACLE)
    if arm.startswith(ORACLE):
        # The teacher is the arm's own (round 0 ignores pseudo.*): reuse it rather than train it again.
        own = home / "runs" / f"{teacher}_s{seed}" / "round_0"
        if not (run_dir / "round_0").exists() and (own / "DONE").is_file():
            shutil.copytree(own, run_dir / "round_0")
        overrides = [f"pseudo.truth={truth}", *overrides]
    env = {**os.environ, "BIRDROUNDS_HOME": str(home), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, str(REPO / "rounds" / "run.py"), "data=birdclef2025", f"data.root={root}",
           f"data.val_soundscapes_dir={root / 'test_soundscapes'}", f"data.val_solution={root / 'solution.csv'}",
           f"train.select_by={SIGNAL}", "logger=none", f"seed={seed}", f"teacher={teacher}", f"round={rounds}",
           f"control={str(not arm.startswith(ORACLE)).lower()}", f"run_dir={run_dir}", *overrides]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"{run_dir.name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return run_dir


def fits(run_dir: Path, rounds: int) -> dict[str, dict]:
    """Every finished fit of a run folder: teacher, student_k, control_k -> its metrics.json."""
    found = {}
    for name, folder in [("teacher", run_dir / "round_0"),
                         *[(f"{arm}_{k}", run_dir / f"round_{k}" / ("control" if arm == "control" else ""))
                           for k in range(1, rounds + 1) for arm in ("student", "control")]]:
        path = folder / METRICS_FILE
        if path.is_file():
            found[name] = json.loads(path.read_text())
        elif not name.startswith("control"):  # an arm may have been run without controls
            sys.exit(f"{path} is missing: that run has not finished (run without --report-only)")
    return found


def mean_std(values: list[float | None]) -> dict | None:
    """Mean, sample std and the values (None where nothing was measured)."""
    arr = np.array([v for v in values if v is not None], dtype=float)
    if not len(arr):
        return None
    return {"mean": round(float(arr.mean()), 4), "std": round(float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, 4),
            "n": int(len(arr)), "per_seed": [round(float(v), 4) for v in arr]}


def epoch_regret(metrics: dict) -> float | None:
    """Test AUC of the fit's best epoch minus that of the epoch `val_mixed_auc` chose."""
    history = [h for h in metrics.get("history", []) if h.get(KEY) is not None]
    if len(history) < 2:
        return None
    chosen = metrics.get("selected_epoch")
    picked = next((h[KEY] for h in history if h["epoch"] == chosen), None)
    return None if picked is None else max(h[KEY] for h in history) - picked


def controls_for(runs: dict[str, dict[int, dict[str, dict]]], arm: str, seed: int) -> tuple[str | None, dict]:
    """The arm's own controls, else those of another arm of the same seed whose round-1 student started from the
    same weights (`init_weights_hash`): a control trains on labeled data only, so after an external teacher
    (round-1 students from scratch) it does not depend on which teacher labeled the soundscapes. An oracle's
    controls are its arm's. Returns (the arm they come from, its fits), (None, {}) when none fits."""
    fits_ = runs[arm][seed]
    if any(name.startswith("control") for name in fits_):
        return arm, fits_
    start = fits_.get("student_1", {}).get("init_weights_hash")
    others = sorted(runs, key=lambda a: a != arm.removeprefix(ORACLE))  # an oracle's own arm first
    for other in others:
        theirs = runs[other].get(seed, {})
        if (other != arm and start is not None and "control_1" in theirs
                and theirs.get("student_1", {}).get("init_weights_hash") == start):
            return other, theirs
    return None, {}


def summarise(runs: dict[str, dict[int, dict[str, dict]]], rounds: int) -> dict:
    arms = {}
    for arm, seeds in runs.items():
        entry = {"teacher": mean_std([f["teacher"][KEY] for f in seeds.values()])}
        own = {seed: controls_for(runs, arm, seed) for seed in seeds}
        entry["controls_from"] = {seed: source for seed, (source, _) in own.items() if source not in (None, arm)}
        for k in range(1, rounds + 1):
            student = [f[f"student_{k}"][KEY] for f in seeds.values()]
            control = [fs.get(f"control_{k}", {}).get(KEY) for _, fs in own.values()]
            teacher = [f["teacher"][KEY] for f in seeds.values()]
            entry[f"round_{k}"] = {"student": mean_std(student), "control": mean_std(control),
                                   "gain_vs_control": mean_std([None if c is None else s - c
                                                                for s, c in zip(student, control)]),
                                   "student_minus_teacher": mean_std([s - t for s, t in zip(student, teacher)])}
        arms[arm] = entry
    # The selection signal: every model's val_mixed_auc against its test soundscape AUC.
    points = [(arm, seed, name, f[SIGNAL], f[KEY]) for arm, seeds in runs.items() for seed, fs in seeds.items()
              for name, f in fs.items() if f.get(SIGNAL) is not None and f.get(KEY) is not None
              and not (arm.startswith(ORACLE) and name == "teacher")]  # an oracle's teacher is its arm's
    rho = spearmanr([p[3] for p in points], [p[4] for p in points]).statistic if len(points) >= 3 else None
    # The choices val_mixed_auc makes in a run are among CNNs (epochs, rounds): its ranking of those alone.
    cnns = [p for p in points if p[2] != "teacher" or p[0] == "cnn"]
    rho_cnn = spearmanr([p[3] for p in cnns], [p[4] for p in cnns]).statistic if len(cnns) >= 3 else None
    per_seed = {}
    for seed in sorted({p[1] for p in points}):
        xs = [p for p in points if p[1] == seed]
        per_seed[seed] = round(float(spearmanr([p[3] for p in xs], [p[4] for p in xs]).statistic), 3)
    epoch_regrets = [r for seeds in runs.values() for fs in seeds.values() for f in fs.values()
                     if (r := epoch_regret(f)) is not None]
    round_regrets = []
    for seeds in runs.values():
        for fs in seeds.values():  # export's choice among the student rounds, by val_mixed_auc
            students = [fs[f"student_{k}"] for k in range(1, rounds + 1)]
            picked = max(students, key=lambda f: f[SIGNAL])
            round_regrets.append(max(f[KEY] for f in students) - picked[KEY])
    return {"arms": arms, "selection_signal": {
        "models": len(points), "spearman_pooled": None if rho is None else round(float(rho), 3),
        "cnn_models": len(cnns), "spearman_cnn_models": None if rho_cnn is None else round(float(rho_cnn), 3),
        "spearman_per_seed": per_seed,
        "epoch_choice_regret": mean_std(epoch_regrets), "round_choice_regret": mean_std(round_regrets),
        "points": [{"arm": a, "seed": s, "model": n, SIGNAL: round(x, 4), KEY: round(y, 4)} for a, s, n, x, y in points]}}


def time_features(root: Path, n: int, backend: str, threads: int) -> dict:
    """Seconds per audio second of the external model on `n` train soundscapes, cold cache, one process."""
    from birdrounds.data.audio import DirectAudio
    from birdrounds.data.soundscapes import SoundscapeChunks
    from birdrounds.external import FeatureCache, load_external

    model = load_external(backend, threads=threads)
    files = sorted((root / "train_soundscapes").glob("*.ogg"))[:n]
    audio = DirectAudio(32_000)
    chunks = SoundscapeChunks(files, audio, window_s=5.0, stride_s=5.0)
    waves = {str(f): np.asarray(audio.load(f), dtype=np.float32) for f in files}
    with tempfile.TemporaryDirectory() as folder:
        cache = FeatureCache(folder, model, 5.0)
        started = time.perf_counter()
        for f, wave in waves.items():
            cache.get(wave, 32_000, chunks.rows.loc[chunks.rows["file"] == f, "start_s"].tolist())
        seconds = time.perf_counter() - started
    audio_s = sum(len(w) for w in waves.values()) / 32_000
    rate = seconds / audio_s
    return {"model": model.name, "threads": threads, "soundscapes": len(files), "audio_s": round(audio_s, 1),
            "seconds": round(seconds, 1), "seconds_per_audio_hour": round(rate * 3600, 1),
            "birdclef_projection_hours_one_process": round(rate * BIRDCLEF_SOUNDSCAPE_S / 3600, 2)}


def print_report(summary: dict, rounds: int) -> None:
    def fmt(s: dict | None, signed: bool = False) -> str:
        if s is None:
            return "-"
        return f"{s['mean']:+.3f} +- {s['std']:.3f}" if signed else f"{s['mean']:.3f} +- {s['std']:.3f}"

    print(f"\ntest soundscape AUC ({KEY}), mean +- std over seeds; every choice by {SIGNAL}")
    for arm, entry in summary["arms"].items():
        print(f"  {arm:10s} teacher {fmt(entry['teacher'])}  (seeds {entry['teacher']['per_seed']})")
        for k in range(1, rounds + 1):
            r = entry[f"round_{k}"]
            print(f"  {'':10s} round {k}: student {fmt(r['student'])}, control {fmt(r['control'])}, "
                  f"gain {fmt(r['gain_vs_control'], True)}, student - teacher {fmt(r['student_minus_teacher'], True)}")
    sel = summary["selection_signal"]
    print(f"\n{SIGNAL} vs test soundscapes over {sel['models']} models: Spearman {sel['spearman_pooled']} pooled, "
          f"per seed {sel['spearman_per_seed']}; over the {sel['cnn_models']} CNNs alone {sel['spearman_cnn_models']}")
    print(f"  epoch chosen by {SIGNAL}: {fmt(sel['epoch_choice_regret'])} below the fit's best epoch (test AUC)")
    print(f"  round chosen by {SIGNAL}: {fmt(sel['round_choice_regret'])} below the best student round (test AUC)")


def table_record(summary: dict, rounds: int, timing: dict | None) -> list[dict]:
    """The summary as the results page's plain tables."""
    def ms(s: dict | None, signed: bool = False) -> str:
        if s is None:
            return "–"
        return (f"{s['mean']:+.3f} ± {s['std']:.3f}" if signed else f"{s['mean']:.3f} ± {s['std']:.3f}") + f" (n={s['n']})"

    rows = []
    for arm, entry in summary["arms"].items():
        rows.append([arm, "teacher (round 0)", ms(entry["teacher"]), "–", "–", "–"])
        for k in range(1, rounds + 1):
            r = entry[f"round_{k}"]
            borrowed = sorted(set(entry.get("controls_from", {}).values()))
            control = ms(r["control"]) + (f" ({', '.join(borrowed)}'s)" if borrowed and r["control"] else "")
            rows.append([arm, f"round {k} student", ms(r["student"]), control, ms(r["gain_vs_control"], True),
                         ms(r["student_minus_teacher"], True)])
    sel = summary["selection_signal"]
    tables = [{"caption": "Test soundscape AUC, every epoch and round chosen by val_mixed_auc",
               "columns": ["teacher", "model", "test AUC", "control", "gain vs control", "vs its teacher"], "rows": rows},
              {"caption": "How val_mixed_auc chooses, against the test soundscapes",
               "columns": ["models", "Spearman (all)", "per seed", "CNNs", "Spearman (CNNs)",
                           "epoch choice: below the best epoch", "round choice: below the best student round"],
               "rows": [[sel["models"], sel["spearman_pooled"], json.dumps(sel["spearman_per_seed"]), sel["cnn_models"],
                         sel["spearman_cnn_models"],
                         ms(sel["epoch_choice_regret"]), ms(sel["round_choice_regret"])]]}]
    if timing:
        tables.append({"caption": "External model features, cold cache, one process",
                       "columns": ["model", "threads", "audio", "seconds", "s per audio hour",
                                   "BirdCLEF's 9,726 soundscapes (hours, one process)"],
                       "rows": [[timing["model"], timing["threads"], f"{timing['audio_s']:.0f} s", timing["seconds"],
                                 timing["seconds_per_audio_hour"], timing["birdclef_projection_hours_one_process"]]]})
    return tables


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="BIRDROUNDS_HOME of the runs (runs/<arm>_s<seed>)")
    parser.add_argument("--data-root", type=Path, required=True, help="BirdCLEF-layout folder with test_soundscapes/ and solution.csv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["cnn", "probe", "zero_shot", "ensemble"], help="teacher= options")
    parser.add_argument("--oracle-arms", nargs="*", default=[], help="arms to add an oracle_<arm> for")
    parser.add_argument("--oracle-truth", type=Path, default=None, help="true labels of the train soundscapes (CSV)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="read finished runs, train nothing")
    parser.add_argument("--time-features", type=int, default=0, metavar="N", help="time the external model on N soundscapes")
    parser.add_argument("--backend", default="birdnet", help="external model backend for --time-features")
    parser.add_argument("--record", action="store_true", help="write results/external-teachers-<date>.json")
    parser.add_argument("--data-name", default=None, help="how the record names the data set")
    parser.add_argument("--note", default=None, help="a sentence the record keeps about how the runs were made")
    args, overrides = parser.parse_known_args()
    timing = None
    if args.time_features:
        timing = time_features(args.data_root.resolve(), args.time_features, args.backend, threads=1)
        print(json.dumps(timing, indent=1))
    runs: dict[str, dict[int, dict[str, dict]]] = {}
    if args.oracle_arms and args.oracle_truth is None:
        parser.error("--oracle-arms needs --oracle-truth")
    for arm in [*args.arms, *(ORACLE + a for a in args.oracle_arms)]:
        for seed in args.seeds:
            run_dir = args.home / "runs" / f"{arm}_s{seed}"
            if not args.report_only:
                run_arm(args.home.resolve(), args.data_root.resolve(), arm, seed, args.rounds, overrides,
                        truth=args.oracle_truth.resolve() if args.oracle_truth else None)
            elif not run_dir.exists():  # an arm measured on fewer seeds: its n says so
                print(f"not run: {run_dir.name} (left out)")
                continue
            runs.setdefault(arm, {})[seed] = fits(run_dir, args.rounds)
    summary = summarise(runs, args.rounds)
    print_report(summary, args.rounds)
    if args.record:
        path = write_record("external_teachers", "external-teachers", {"tables": table_record(summary, args.rounds, timing),
                            "summary": summary, "timing": timing}, overrides=overrides,
                            title=f"External teachers on {args.data_name or args.data_root.name}",
                            data=args.data_name or str(args.data_root.name), seeds=args.seeds,
                            **({"note": args.note} if args.note else {}))
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
