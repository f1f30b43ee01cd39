"""Do the rounds pay at equal compute? Teacher, control, student and oracle per round, over seeds.

For each seed, two run folders under --home/runs (the generated data and audio cache are shared):
- `seed<s>`: `rounds/run.py round=R control=true`: the teacher, then per round the pseudo-labeled
  student and its equal-compute control (same initial weights, schedule and seed, labeled data only);
- `seed<s>_oracle`: the same teacher (round_0 copied, so it is reused, not retrained), then students
  trained on the synthetic data's true train-soundscape labels (`pseudo.truth`) through the same mixing
  code: the headroom any pseudo-labeling could reach.

Prints validation-soundscape macro AUC per seed and as mean ± std, the student's gain over its
control, the share of the oracle's headroom (oracle - control) it captures, the teacher's convergence
(how much val_clip_auc the round-1 control adds), the time of each arm, and checks the goals:

- teacher converged: the round-1 control adds < +0.01 val_clip_auc on average;
- oracle - control >= +0.05 on average (round 1);
- every student round beats its control by >= +0.02 on average;
- the last round beats its control by >= +0.03 in every seed, and by at least half the oracle's headroom;
- the last round beats its teacher (round 0) in every seed.

With `experiment=<preset>` among the overrides, `--record` files the result under the page's presets
section (results/rounds-gain-<preset>-<date>.json), not as the default recipe's headline.

    python bench/rounds_gain.py --home /tmp/rounds_gain [--seeds 0 1 2] [--rounds 2] [overrides ...]
    # another student recipe on the same teachers, in the same home:
    python bench/rounds_gain.py --home /tmp/rounds_gain --tag lr1e3 --teacher-from '' pseudo.student_train.lr=1e-3
    # a lever that changes only what students see: train students and oracles, reuse the untagged controls
    python bench/rounds_gain.py --home /tmp/rounds_gain --tag mw03 --teacher-from '' --controls-from '' pseudo.mixing.mix_weight=0.3
    # every arm scored on the 30 soundscapes of a 40-soundscape twin that no round chose its epoch on (bench/wide_val.py):
    python bench/rounds_gain.py --home /tmp/rounds_gain --report-only --val-soundscapes 40
    # also keep the result as a record in results/ (bench/records.py; `make results` renders docs/results.md):
    python bench/rounds_gain.py --home /tmp/rounds_gain --report-only --val-soundscapes 120 --record

Exit status 0 when every goal is met, 1 when not. Rounds already complete in a run folder are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from birdrounds.artifacts import DONE_FILE, MANIFEST_FILE, METRICS_FILE, MODEL_FILE, ROUND_CONFIG_FILE
from records import write_record

REPO = Path(__file__).resolve().parents[1]
KEY = "val_soundscape_auc"
CONVERGED_CLIP_GAIN = 0.01
MIN_ORACLE_HEADROOM = 0.05
MIN_MEAN_GAIN = 0.02
MIN_LAST_GAIN = 0.03
MIN_HEADROOM_SHARE = 0.5


def run(home: Path, run_dir: Path, seed: int, rounds: int, overrides: list[str]) -> None:
    """`rounds/run.py` for one arm; exits with its log on failure."""
    env = {**os.environ, "BIRDROUNDS_HOME": str(home), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, str(REPO / "rounds" / "run.py"), f"round={rounds}", f"seed={seed}",
           f"run_dir={run_dir}", "logger=none", *overrides]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"{run_dir.name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")


def arm(folder: Path) -> dict:
    """An arm's final metrics with its wall time (manifest.json) and folder."""
    for name in (METRICS_FILE, MANIFEST_FILE):
        if not (folder / name).is_file():
            sys.exit(f"{folder / name} is missing: that arm has not finished (run without --report-only)")
    metrics = json.loads((folder / METRICS_FILE).read_text())
    return {**metrics, "seconds": json.loads((folder / MANIFEST_FILE).read_text())["seconds"], "folder": folder}


def rescore(results: list[dict], n_soundscapes: int) -> int:
    """Replace every arm's val_soundscape_auc by its score on the wider validation set (bench/wide_val.py),
    without the data's own validation soundscapes: each round kept the epoch that scored best on those, so
    a score on them is optimistic."""
    from wide_val import ValidationSoundscapes

    teacher_dir = results[0]["teacher"]["folder"]
    wide = ValidationSoundscapes.build(OmegaConf.load(teacher_dir / ROUND_CONFIG_FILE).data, n_soundscapes, unseen=True)
    arms = [r["teacher"] for r in results] + [a for r in results for rk in r["rounds"] for a in rk.values()]
    for item in arms:
        item[KEY] = wide.score(item["folder"] / MODEL_FILE)
    return wide.n_files


def seed_dir(home: Path, seed: int, tag: str | None) -> Path:
    """The main run folder of one seed: `runs/seed<s>`, or `runs/seed<s>_<tag>`."""
    return home / "runs" / (f"seed{seed}_{tag}" if tag else f"seed{seed}")


def copy_teacher(source: Path, target: Path) -> None:
    """Copy a finished round_0, so the run reuses that teacher (its config hash is still checked)."""
    if (source / "round_0" / DONE_FILE).is_file() and not (target / "round_0" / DONE_FILE).is_file():
        shutil.rmtree(target / "round_0", ignore_errors=True)
        shutil.copytree(source / "round_0", target / "round_0")


def copy_controls(source: Path, target: Path, rounds: int) -> None:
    """Copy the finished controls of rounds 1..`rounds` into `target` (a student-only lever: same controls)."""
    for k in range(1, rounds + 1):
        control = source / f"round_{k}" / "control"
        if not (control / DONE_FILE).is_file():
            sys.exit(f"{control} has not finished: --controls-from needs that run's controls (run it first)")
        if not (target / f"round_{k}" / "control" / DONE_FILE).is_file():
            shutil.rmtree(target / f"round_{k}" / "control", ignore_errors=True)
            shutil.copytree(control, target / f"round_{k}" / "control")


def run_seed(home: Path, seed: int, rounds: int, truth: Path, overrides: list[str], tag: str | None = None,
             teacher_from: str | None = None, train: bool = True, controls_from: str | None = None) -> dict:
    """Both run folders of one seed; returns teacher, and per round student, control and oracle.

    `train=False` reads the finished folders as they are (e.g. runs made before the config gained keys).
    `controls_from=TAG` trains students without controls and reports the controls of the runs tagged TAG.
    """
    main_dir = seed_dir(home, seed, tag)
    oracle_dir = main_dir.with_name(main_dir.name + "_oracle")
    if train:
        if teacher_from is not None:
            copy_teacher(seed_dir(home, seed, teacher_from or None), main_dir)
        run(home, main_dir, seed, rounds, ["control=false" if controls_from is not None else "control=true", *overrides])
        if controls_from is not None:
            copy_controls(seed_dir(home, seed, controls_from or None), main_dir, rounds)
        copy_teacher(main_dir, oracle_dir)
        run(home, oracle_dir, seed, rounds, [f"pseudo.truth={truth}", *overrides])
    return {"teacher": arm(main_dir / "round_0"),
            "rounds": [{"student": arm(main_dir / f"round_{k}"), "control": arm(main_dir / f"round_{k}" / "control"),
                        "oracle": arm(oracle_dir / f"round_{k}")} for k in range(1, rounds + 1)]}


def share(gain: float, headroom: float) -> str:
    """The student's share of the oracle's headroom; undefined where the oracle is no better than the control."""
    return f"{gain / headroom:.2f}" if headroom > 0 else "– (no headroom)"


def fmt(values: np.ndarray, signed: bool = False) -> str:
    """Mean ± std (sample std) of a column."""
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():+.3f} ± {std:.3f}" if signed else f"{values.mean():.3f} ± {std:.3f}"


def summary(values: np.ndarray) -> dict:
    """Mean, sample std and the per-seed values of a column, for the benchmark's record."""
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "per_seed": [float(v) for v in values]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="work folder (data, cache and run folders)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--truth", type=Path, default=None,
                        help="true train-soundscape labels (default: the synthetic data's truth/train_soundscape_labels.csv)")
    parser.add_argument("--tag", default=None,
                        help="run folders runs/seed<s>_<tag>(_oracle), to compare recipes in one --home")
    parser.add_argument("--teacher-from", default=None, metavar="TAG",
                        help="reuse the round-0 teachers of the runs tagged TAG ('' = untagged) instead of "
                             "training them again (the teacher config must be the same; it is checked)")
    parser.add_argument("--controls-from", default=None, metavar="TAG",
                        help="train no controls: report those of the runs tagged TAG ('' = untagged), copied. "
                             "Only for overrides that change what students see, not the controls (e.g. "
                             "pseudo.mixing.mix_weight); use with --teacher-from TAG")
    parser.add_argument("--val-soundscapes", type=int, default=None, metavar="N",
                        help="score every arm after training on the same synthetic data with N labeled validation "
                             "soundscapes, less the data's own (the demo has 10, on which each round chose its "
                             "epoch; see bench/wide_val.py), instead of its metrics.json")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the finished run folders as they are")
    parser.add_argument("--record", action="store_true",
                        help="also write the result as a JSON record into results/ ($BIRDROUNDS_RESULTS_DIR if set; "
                             "bench/records.py)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    if args.controls_from is not None and args.teacher_from != args.controls_from:
        parser.error("--controls-from TAG needs --teacher-from TAG: the controls start from that run's teachers")
    home = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    truth = args.truth or home / "data" / "synthetic" / "truth" / "train_soundscape_labels.csv"
    if not truth.is_file() and not args.report_only:
        # The data is generated by the first run; the oracle needs its truth table.
        run(home, seed_dir(home, args.seeds[0], args.tag), args.seeds[0], 0, args.overrides)
    results = [run_seed(home, seed, args.rounds, truth, args.overrides, args.tag, args.teacher_from,
                        train=not args.report_only, controls_from=args.controls_from)
               for seed in args.seeds]
    n_files = None
    if args.val_soundscapes:
        n_files = rescore(results, args.val_soundscapes)
        print(f"\n{KEY} below: every model scored on {n_files} validation soundscapes that no round chose its "
              f"epoch on (the {args.val_soundscapes}-soundscape twin minus the data's own; bench/wide_val.py)")

    teacher = np.array([r["teacher"][KEY] for r in results])
    teacher_clip = np.array([r["teacher"]["val_clip_auc"] for r in results])
    control1_clip = np.array([r["rounds"][0]["control"]["val_clip_auc"] for r in results])
    clip_gain = control1_clip - teacher_clip
    print(f"\n### Teacher (round 0) and its convergence: val_clip_auc the round-1 control adds\n")
    print("| seed | teacher val_soundscape_auc | teacher val_clip_auc | round-1 control val_clip_auc | added | time (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed, r, g in zip(args.seeds, results, clip_gain):
        print(f"| {seed} | {r['teacher'][KEY]:.3f} | {r['teacher']['val_clip_auc']:.3f} | "
              f"{r['rounds'][0]['control']['val_clip_auc']:.3f} | {g:+.3f} | {r['teacher']['seconds']:.0f} |")
    print(f"| mean ± std | {fmt(teacher)} | {fmt(teacher_clip)} | {fmt(control1_clip)} | {fmt(clip_gain, True)} | |")

    gains, headrooms, over_teachers = [], [], []
    for k in range(1, args.rounds + 1):
        arms = {name: np.array([r["rounds"][k - 1][name][KEY] for r in results]) for name in ("control", "student", "oracle")}
        gain, headroom = arms["student"] - arms["control"], arms["oracle"] - arms["control"]
        over_teacher = arms["student"] - teacher
        gains.append(gain)
        headrooms.append(headroom)
        over_teachers.append(over_teacher)
        print(f"\n### Round {k}: {KEY} (gain = student - control; headroom = oracle - control; "
              f"over teacher = student - teacher)\n")
        print("| seed | control | student | oracle | gain | headroom | share of headroom | over teacher "
              "| time (s): student / control / oracle |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for i, (seed, r) in enumerate(zip(args.seeds, results)):
            rk = r["rounds"][k - 1]
            print(f"| {seed} | {arms['control'][i]:.3f} | {arms['student'][i]:.3f} | {arms['oracle'][i]:.3f} | "
                  f"{gain[i]:+.3f} | {headroom[i]:+.3f} | {share(gain[i], headroom[i])} | {over_teacher[i]:+.3f} | "
                  f"{rk['student']['seconds']:.0f} / {rk['control']['seconds']:.0f} / {rk['oracle']['seconds']:.0f} |")
        print(f"| mean ± std | {fmt(arms['control'])} | {fmt(arms['student'])} | {fmt(arms['oracle'])} | "
              f"{fmt(gain, True)} | {fmt(headroom, True)} | {share(gain.mean(), headroom.mean())} (of the means) | "
              f"{fmt(over_teacher, True)} | |")

    last_gain, last_headroom = gains[-1], headrooms[-1]
    goals = [
        (f"teacher converged: round-1 control adds {clip_gain.mean():+.3f} val_clip_auc (< +{CONVERGED_CLIP_GAIN})",
         clip_gain.mean() < CONVERGED_CLIP_GAIN),
        (f"oracle - control, round 1: {headrooms[0].mean():+.3f} (>= +{MIN_ORACLE_HEADROOM})",
         headrooms[0].mean() >= MIN_ORACLE_HEADROOM),
        *[(f"round {k} student - control: {g.mean():+.3f} on average (>= +{MIN_MEAN_GAIN})", g.mean() >= MIN_MEAN_GAIN)
          for k, g in enumerate(gains, start=1)],
        (f"round {args.rounds} student - control in every seed: {', '.join(f'{g:+.3f}' for g in last_gain)} "
         f"(>= +{MIN_LAST_GAIN})", bool((last_gain >= MIN_LAST_GAIN).all())),
        # Training longer is not self-training, but a round that ends below its teacher hands on a worse model.
        (f"round {args.rounds} student - teacher in every seed: {', '.join(f'{g:+.3f}' for g in over_teachers[-1])} "
         f"(> 0)", bool((over_teachers[-1] > 0).all())),
        # Without headroom (the oracle no better than the control) there is nothing to capture: not met.
        (f"round {args.rounds} share of the oracle's headroom: {last_gain.mean():+.3f} of {last_headroom.mean():+.3f} "
         f"(>= {MIN_HEADROOM_SHARE:.0%} of a positive headroom)",
         last_headroom.mean() > 0 and last_gain.mean() >= MIN_HEADROOM_SHARE * last_headroom.mean()),
    ]
    print("\n### Goals\n")
    for text, met in goals:
        print(f"- {'MET' if met else 'NOT MET'}: {text}")
    if args.record:
        rounds = [{"round": k, **{name: summary(np.array([r["rounds"][k - 1][name][KEY] for r in results]))
                                  for name in ("control", "student", "oracle")},
                   "gain": summary(g), "headroom": summary(h), "over_teacher": summary(t)}
                  for k, (g, h, t) in enumerate(zip(gains, headrooms, over_teachers), start=1)]
        record = {"metric": KEY, "scored_on_val_soundscapes": n_files, "seeds": args.seeds, "tag": args.tag,
                  "teacher": summary(teacher), "teacher_clip_auc_added_by_control": summary(clip_gain),
                  "rounds": rounds, "goals": [{"goal": text, "met": bool(met)} for text, met in goals]}
        # A preset (`experiment=...`) is measured on its own data: its own page section, not the headline.
        experiment = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("experiment=")), None)
        name = "-".join(["rounds-gain", *filter(None, (experiment, args.tag))])
        preset = {"section": "presets"} if experiment else {}
        path = write_record("rounds_gain", name, record, overrides=args.overrides, **preset,
                            title=f"bench/rounds_gain.py{f' experiment={experiment}' if experiment else ''}"
                                  f"{f' --tag {args.tag}' if args.tag else ''}, {len(args.seeds)} seeds, {args.rounds} round(s)")
        print(f"record: {path}", file=sys.stderr)
    return 0 if all(met for _, met in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
