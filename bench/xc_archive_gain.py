"""Does the Xeno-canto extension help the teacher? Round-0 teachers with and without the archive, over seeds.

1. generates the default synthetic dataset under --home (if absent) and imports its Xeno-canto-like
   archive the way `make demo` does: `birdrounds xc-download 'xc.source=${data.root}/xc_archive'`
   (minority classes, converted to 32 kHz OGG under <home>/external_data/xeno_canto);
2. per seed, trains two round-0 teachers with `rounds/run.py`, the same schedule, seed and initial
   weights: `data.external.enabled=false` ("without") and `true` ("with", plus the lever overrides);
3. prints, per seed and as mean ± std over seeds, the validation-soundscape AUC change of the extended
   classes (those the import gave clips), the macro AUC of both arms, and each arm's time;
4. with --students, also trains round-1 students from each "with" teacher (its round 0 copied, so
   reused) with `data.external.in_students=true` and `false`, and prints the same comparison for them
   (issue 15: do external rows belong in the student rounds too?).

Goal (issue 15): extended classes +0.02 mean or better, macro AUC not lower, under the default loss.

    python bench/xc_archive_gain.py --home /tmp/xc_gain [--seeds 0 1 2]
    # a lever on the "with" arm only (same "without" teachers, reused):
    python bench/xc_archive_gain.py --home /tmp/xc_gain --tag lw05 data.external.loss_weight=0.5
    # a change to both arms (e.g. the loss): its own "without" teachers
    python bench/xc_archive_gain.py --home /tmp/xc_gain --tag softce --both loss=soft_ce
    # students with and without the external rows, from the default "with" teachers
    python bench/xc_archive_gain.py --home /tmp/xc_gain --students
    # students keeping the rows, without vs with a lever (here: drop clips the teacher does not detect)
    python bench/xc_archive_gain.py --home /tmp/xc_gain --students --student-lever filt02 \
        data.external.filter_min_prob=0.2
    # the same models scored on 40 validation soundscapes instead of 10 (bench/wide_val.py)
    python bench/xc_archive_gain.py --home /tmp/xc_gain --val-soundscapes 40

Teachers already complete in a run folder are reused as they are. Results also go to <home>/xc_gain_<tag>.json,
and with --record to results/xc-archive-gain-<date>.json (the same figures).
Exit status 0 when the goal is met, 1 when not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from birdrounds.artifacts import DONE_FILE, MANIFEST_FILE, MODEL_FILE
from birdrounds.config import compose
from records import add_record_option, record_result
from wide_val import ValidationSoundscapes

REPO = Path(__file__).resolve().parents[1]
MIN_EXTENDED_GAIN = 0.02
MIN_STUDENT_GAIN = 0.0  # --students: keeping the rows should not cost the extended classes anything


def birdrounds_env(home: Path) -> dict[str, str]:
    return {**os.environ, "BIRDROUNDS_HOME": str(home), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def import_archive(home: Path, overrides: list[str]) -> list[str]:
    """`birdrounds xc-download` from the synthetic archive, as `make demo` runs it; returns the extended labels."""
    cli = Path(sys.executable).parent / "birdrounds"
    cmd = [str(cli), "xc-download", "xc.source=${data.root}/xc_archive", "xc.progress=false", *overrides]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=birdrounds_env(home), cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"xc-download failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    table = pd.read_csv(home / "external_data" / "xeno_canto" / "train.csv")
    return sorted(table["primary_label"].astype(str).unique())


def train_round(home: Path, name: str, seed: int, overrides: list[str], round_idx: int = 0) -> tuple[Path, float]:
    """Round `round_idx` through `rounds/run.py`, as a user runs it; returns the model path and the round's time (s).

    A run folder whose round is complete is taken as it is (its name says what it is), so the
    "without" teachers serve every lever of the same --both overrides."""
    round_dir = home / "runs" / name / f"round_{round_idx}"
    if (round_dir / DONE_FILE).is_file():
        print(f"reusing {round_dir}", flush=True)
        return round_dir / MODEL_FILE, float(json.loads((round_dir / MANIFEST_FILE).read_text())["seconds"])
    cmd = [sys.executable, str(REPO / "rounds" / "run.py"), f"experiment_name={name}", f"seed={seed}", "logger=none",
           f"round={round_idx}", *overrides]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=birdrounds_env(home), cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return round_dir / MODEL_FILE, float(json.loads((round_dir / MANIFEST_FILE).read_text())["seconds"])


def mean_std(values: list[float], signed: bool = False) -> str:
    arr = np.asarray(values, dtype=float)
    sign = "+" if signed else ""
    return f"{arr.mean():{sign}.3f} ± {arr.std(ddof=1) if len(arr) > 1 else 0.0:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="BIRDROUNDS_HOME for data, imports and runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tag", default="default", help="names the 'with' arm's run folders and the result file")
    parser.add_argument("--both", nargs="*", default=[], metavar="OVERRIDE",
                        help="Hydra overrides for both arms (the 'without' teachers then get their own folders)")
    parser.add_argument("--students", action="store_true",
                        help="round-1 students from the 'with' teachers of --tag, external rows out vs in")
    parser.add_argument("--student-lever", metavar="NAME", default=None,
                        help="with --students: compare students keeping the external rows without (in) and with "
                             "the positional overrides (NAME: its run folders), instead of rows out vs in")
    parser.add_argument("--val-soundscapes", type=int, default=None, metavar="N",
                        help="score on the same data with N labeled validation soundscapes (the demo has 10; "
                             "bench/wide_val.py); results go to xc_gain_<tag>_val<N>.json")
    add_record_option(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the 'with' arm only (the lever)")
    args = parser.parse_args()
    home = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["BIRDROUNDS_HOME"] = str(home)
    cfg = compose(list(args.both))
    val = ValidationSoundscapes.build(cfg.data, args.val_soundscapes)
    root = Path(cfg.data.root)
    extended = import_archive(home, list(args.both))
    print(f"extended classes ({len(extended)}): {' '.join(extended)}", flush=True)

    base = "xc_without" + ("_" + "_".join(o.replace("=", "-").replace(".", "-") for o in args.both) if args.both else "")
    suffix = f"_val{val.n_files}" if args.val_soundscapes else ""
    print(f"scored on {val.n_files} validation soundscapes ({val.root})", flush=True)
    recording = {"record": args.record, "overrides": [*args.both, *args.overrides]}
    if args.students and args.student_lever:
        arms = (("in", ["data.external.in_students=true"]),
                (args.student_lever, ["data.external.in_students=true", *args.overrides]))
        return compare(home, root, extended, val, args.seeds, f"students_{args.tag}_{args.student_lever}{suffix}",
                       lambda seed: student_pair(home, seed, args.tag, list(args.both), arms),
                       ("in", args.student_lever), MIN_STUDENT_GAIN, lever=" ".join(args.overrides), **recording)
    if args.students:
        arms = (("out", ["data.external.in_students=false"]), ("in", ["data.external.in_students=true"]))
        return compare(home, root, extended, val, args.seeds, f"students_{args.tag}{suffix}",
                       lambda seed: student_pair(home, seed, args.tag, [*args.both, *args.overrides], arms),
                       ("in_students=false", "in_students=true"), MIN_STUDENT_GAIN, **recording)
    return compare(home, root, extended, val, args.seeds, f"{args.tag}{suffix}",
                   lambda seed: (train_round(home, f"{base}_s{seed}", seed, [*args.both, "data.external.enabled=false"]),
                                 train_round(home, f"xc_with_{args.tag}_s{seed}", seed,
                                               [*args.both, "data.external.enabled=true", *args.overrides])),
                   ("without", "with"), MIN_EXTENDED_GAIN, lever=" ".join(args.overrides), both=" ".join(args.both),
                   **recording)


def student_pair(home: Path, seed: int, tag: str, overrides: list[str],
                 arms: tuple[tuple[str, list[str]], tuple[str, list[str]]]) -> tuple[tuple[Path, float], tuple[Path, float]]:
    """Round-1 students from the "with" teacher of `tag`, one per arm (name, its overrides): e.g. external
    rows out of (a) and in (b) the student's data. Each arm's folder gets a copy of the teacher (reused)."""
    teacher = home / "runs" / f"xc_with_{tag}_s{seed}" / "round_0"
    if not (teacher / DONE_FILE).is_file():
        sys.exit(f"--students needs the teachers of --tag {tag} first: {teacher} is not complete")
    results = []
    for arm, arm_overrides in arms:
        name = f"xc_students_{tag}_{arm}_s{seed}"
        if not (home / "runs" / name / "round_0" / DONE_FILE).is_file():
            shutil.rmtree(home / "runs" / name / "round_0", ignore_errors=True)
            shutil.copytree(teacher, home / "runs" / name / "round_0")
        results.append(train_round(home, name, seed, ["data.external.enabled=true", *overrides, *arm_overrides],
                                   round_idx=1))
    return results[0], results[1]


def compare(home: Path, root: Path, extended: list[str], val: ValidationSoundscapes, seeds: list[int], tag: str,
            train_pair, names: tuple[str, str], goal: float, lever: str = "",
            both: str = "", record: bool = False, overrides: list[str] | None = None) -> int:
    """Train both arms per seed (`train_pair(seed)` -> ((model a, s), (model b, s))), print and save the table;
    with `record`, also as a record under results/ (`overrides`: the command's Hydra overrides)."""
    a, b = names
    per_seed, per_class = [], {}
    for seed in seeds:
        started = time.time()
        (model_a, t_a), (model_b, t_b) = train_pair(seed)
        auc = pd.DataFrame({a: val.per_class(model_a), b: val.per_class(model_b)})
        change = (auc[b] - auc[a]).reindex(extended).dropna()
        per_class[seed] = change
        per_seed.append({"seed": seed, "extended_change": float(change.mean()), "extended_scored": len(change),
                         "macro_a": float(auc[a].mean()), "macro_b": float(auc[b].mean()),
                         "seconds_a": t_a, "seconds_b": t_b})
        print(f"seed {seed}: extended {change.mean():+.3f} over {len(change)} classes, macro "
              f"{auc[a].mean():.3f} -> {auc[b].mean():.3f} ({time.time() - started:.0f} s)", flush=True)

    table = pd.DataFrame(per_class)
    focal = pd.read_csv(root / "train.csv")["primary_label"].astype(str).value_counts()
    imported = pd.read_csv(home / "external_data" / "xeno_canto" / "train.csv")["primary_label"].astype(str).value_counts()
    table.insert(0, "focal", focal.reindex(table.index).fillna(0).astype(int))
    table.insert(1, "imported", imported.reindex(table.index).fillna(0).astype(int))
    table["mean"] = table[list(per_class)].mean(axis=1)
    print(f"\nper extended class: val soundscape AUC change ({b} - {a}) by seed "
          f"(classes without a positive validation row are not scored); lever: {lever or 'none'}"
          f"{'; both arms: ' + both if both else ''}")
    print(table.round(3).to_string())
    rows = pd.DataFrame(per_seed)
    print(f"\n| seed | extended classes: AUC change | macro AUC {a} | macro AUC {b} | macro change "
          f"| time {a} (s) | time {b} (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in per_seed:
        print(f"| {r['seed']} | {r['extended_change']:+.3f} | {r['macro_a']:.3f} | {r['macro_b']:.3f} "
              f"| {r['macro_b'] - r['macro_a']:+.3f} | {r['seconds_a']:.0f} | {r['seconds_b']:.0f} |")
    macro_change = (rows["macro_b"] - rows["macro_a"]).tolist()
    print(f"| mean ± std | {mean_std(rows['extended_change'].tolist(), True)} | {mean_std(rows['macro_a'].tolist())} "
          f"| {mean_std(rows['macro_b'].tolist())} | {mean_std(macro_change, True)} "
          f"| {rows['seconds_a'].mean():.0f} | {rows['seconds_b'].mean():.0f} |")
    met = rows["extended_change"].mean() >= goal and np.mean(macro_change) >= 0
    print(f"\ngoal (extended >= {goal:+.2f} mean, macro not lower): {'met' if met else 'NOT met'}")
    result = {"tag": tag, "arms": names, "lever": lever, "both": both, "extended": extended,
              "per_seed": per_seed, "per_class": {str(k): v.to_dict() for k, v in per_class.items()}, "goal_met": bool(met)}
    (home / f"xc_gain_{tag}.json").write_text(json.dumps(result, indent=1))
    if record:
        record_result("xc_archive_gain", result, overrides=overrides)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
