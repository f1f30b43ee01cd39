"""`python rounds/run.py` as a user runs it: smoke experiment, round records, reuse, bad audio skipped."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from birdrounds import cli
from birdrounds.artifacts import LOCK_FILE, LOCK_HOLDER_FILE
from birdrounds.config import REDACTED
from birdrounds.model import checkpoint_hash, load_checkpoint
from birdrounds.pseudo import read_pseudo_labels
from birdrounds.train import COMPLETE_MARKER
from conftest import HOOKS, REPO, copy_smoke_data, run_entry

RUN_LOG_AND_LOCK = ("run.log", LOCK_FILE, LOCK_HOLDER_FILE)  # what every command writes into its run folder


def run_rounds(home: Path, *overrides: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python rounds/run.py experiment=smoke <overrides>` with data and runs under `home` (conftest.run_entry)."""
    return run_entry(home, *overrides, cwd=cwd)


@pytest.mark.slow
def test_smoke_run_writes_round0_and_skips_bad_audio(smoke_run, tmp_path):
    # The shared run's data had one focal clip and one soundscape broken before the run (conftest.smoke_run).
    home, root, broken_clip, broken_soundscape = smoke_run.home, smoke_run.root, smoke_run.broken_clip, smoke_run.broken_soundscape
    train = pd.read_csv(root / "train.csv")
    round_dir = smoke_run.run_dir / "round_0"
    for name in ("model.pt", "metrics.json", "manifest.json", "config.yaml", "DONE"):
        assert (round_dir / name).is_file(), name
    manifest = json.loads((round_dir / "manifest.json").read_text())
    assert set(manifest["data"]["unreadable_audio"]) == {str(broken_clip.resolve()), str(broken_soundscape.resolve())}
    # Every focal clip but the broken one, plus the rows `make demo` imported from the Xeno-canto archive.
    imported = len(pd.read_csv(home / "external_data" / "xeno_canto" / "train.csv"))
    assert manifest["data"]["external_clips"] == imported > 0
    assert manifest["data"]["train_clips"] == len(train) - 1 + imported
    assert broken_clip.name in smoke_run.output(smoke_run.demo)  # named in a warning
    metrics = json.loads((round_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["val_soundscape_auc"] <= 1.0 and 0.0 <= metrics["val_clip_auc"] <= 1.0
    assert 0.0 <= metrics["val_mixed_auc"] <= 1.0  # the smoke data's mixed set, its backgrounds subtracted
    model, ckpt = load_checkpoint(round_dir / "model.pt")
    assert ckpt["classes"] == list(pd.read_csv(root / "sample_submission.csv").columns[1:])
    assert "data" in ckpt["config"] and (round_dir / "config.yaml").read_text().count("experiment_name: smoke") == 1

    # A second call finds round 0 complete and does not train it again; the demo added two student rounds.
    again = smoke_run.again
    assert (round_dir / "model.pt").stat().st_mtime_ns == smoke_run.round0_mtime_ns
    assert "round 0 already complete" in again.stdout + again.stderr
    for k in (1, 2):
        student_dir = round_dir.parent / f"round_{k}"
        table, provenance = read_pseudo_labels(student_dir / "pseudo_labels.parquet")
        teacher = round_dir.parent / f"round_{k - 1}" / "model.pt"
        assert provenance["round"] == k and provenance["teacher_hash"] == checkpoint_hash(teacher)
        assert len(table) > 0 and set(ckpt["classes"]) <= set(table.columns)
        metrics = json.loads((student_dir / "metrics.json").read_text())
        assert metrics["round"] == k and metrics["pseudo"]["chunks"] == len(table)
        manifest = json.loads((student_dir / "manifest.json").read_text())
        assert manifest["teachers"] == [{"path": str(teacher), "hash": checkpoint_hash(teacher)}]
        assert manifest["model_hash"] == checkpoint_hash(student_dir / "model.pt")
        assert manifest["inputs"]["train_soundscapes"]["files"] == 2  # 3 generated, 1 emptied above
        assert set(manifest["inputs"]["tables"]) >= {"train.csv", "sample_submission.csv"}
        assert (student_dir / "DONE").is_file() and load_checkpoint(student_dir / "model.pt")[1]["classes"] == ckpt["classes"]

    # A changed student setting (on a copy of the run): round 0 is still reused, round 1 is refused in one
    # line naming the way out.
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run.run_dir, run_dir, ignore=shutil.ignore_patterns("wandb"))
    round_dir = run_dir / "round_0"
    stamp = (round_dir / "model.pt").stat().st_mtime_ns
    changed = run_rounds(home, "logger=none", "round=2", "pseudo.stride_s=10", f"run_dir={run_dir}", cwd=tmp_path)
    assert changed.returncode == 2
    assert "run_dir: round 1" in changed.stdout + changed.stderr and "Traceback" not in changed.stderr
    # recompute_from=1 sets aside rounds 1 and 2 (and their controls); redoing round 1 is enough to check it.
    redo = run_rounds(home, "logger=none", "round=1", "pseudo.stride_s=10", "recompute_from=1", f"run_dir={run_dir}",
                      cwd=tmp_path)
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert (round_dir / "model.pt").stat().st_mtime_ns == stamp
    assert "round 0 already complete" in redo.stdout + redo.stderr
    assert len(list(round_dir.parent.glob("round_1.replaced-*"))) == 1
    assert len(list(round_dir.parent.glob("round_2.replaced-*"))) == 1
    provenance = read_pseudo_labels(round_dir.parent / "round_1" / "pseudo_labels.parquet")[1]
    assert provenance["stride_s"] == 10


@pytest.mark.slow
def test_bad_config_stops_before_work_with_one_line(home):
    proc = run_rounds(home, "data.fold=5")
    assert proc.returncode == 2
    assert "data.fold: must be in [0, data.n_folds=3)" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not (home / "data").exists() and not (home / "runs").exists()  # not even the run folder or its run.log


def add_external_rows(home: Path, n: int = 3, root: Path | None = None) -> Path:
    """`n` labeled rows in xc-download's layout under external_data/xeno_canto (copies of focal clips of `root`,
    by default the home's smoke data)."""
    root = root or home / "data" / "synthetic_smoke"
    train = pd.read_csv(root / "train.csv")
    ext = home / "external_data" / "xeno_canto"
    rows = train.iloc[:n].copy()
    rows["filename"] = [f"{label}/XC99900{i}.ogg" for i, label in enumerate(rows["primary_label"])]
    for src, dst in zip(train.iloc[:n]["filename"], rows["filename"]):
        (ext / dst).parent.mkdir(parents=True, exist_ok=True)
        (ext / dst).write_bytes((root / "train_audio" / src).read_bytes())
    rows.to_csv(ext / "train.csv", index=False)
    return ext


def test_round0_data_picks_up_external_rows_in_training_folds_only(home):
    """Rows under external_data/xeno_canto (xc-download's layout) join training, never validation."""
    from birdrounds.config import compose
    from birdrounds.data.prepare import prepare_data
    from birdrounds.data.split import ALWAYS_TRAIN

    cfg = compose(["experiment=smoke"])
    assert cli.main(["synth", "experiment=smoke"]) == 0
    n_train = len(pd.read_csv(home / "data" / "synthetic_smoke" / "train.csv"))
    ext = add_external_rows(home)

    prepared = prepare_data(cfg.data, progress=False)
    assert prepared.summary()["external_clips"] == 3 and len(prepared.data.train) == n_train + 3
    is_external = prepared.data.train["path"].str.startswith(str(ext))
    assert is_external.sum() == 3 and (prepared.folds[is_external.to_numpy()] == ALWAYS_TRAIN).all()
    assert (prepared.external == is_external.to_numpy()).all()

    cfg.data.external.enabled = False
    assert prepare_data(cfg.data, progress=False).summary()["external_clips"] == 0


def test_external_rows_loss_and_sample_weights_and_student_switch(home):
    """data.external.loss_weight / sample_weight scale external rows only; in_students=false keeps them
    in the teacher's training set and out of every later round's (student and control alike)."""
    from birdrounds.config import compose
    from birdrounds.data.prepare import prepare_data
    from birdrounds.rounds import build_datasets

    assert cli.main(["synth", "experiment=smoke"]) == 0
    ext = str(add_external_rows(home))
    cfg = compose(["experiment=smoke"])
    prepared = prepare_data(cfg.data, progress=False)

    assert cfg.data.external.sample_weight == 2.0  # the measured default (README, Measured)
    cfg.data.external.sample_weight = 1.0
    plain = build_datasets(prepared, cfg.data, cfg.seed, round_idx=0)
    cfg.data.external.loss_weight, cfg.data.external.sample_weight = 0.25, 3.0
    weighted = build_datasets(prepared, cfg.data, cfg.seed, round_idx=0)
    is_ext = weighted.train_table["path"].str.startswith(ext).to_numpy()
    assert weighted.n_external == is_ext.sum() == 3
    assert np.allclose(weighted.train_set.weights[is_ext], 0.25) and np.allclose(weighted.train_set.weights[~is_ext], 1.0)
    assert np.allclose(plain.train_set.weights, 1.0)
    # Draw probabilities: external rows x3 relative to the rest, everything else unchanged.
    p_plain, p_weighted = plain.sampler.weights.numpy(), weighted.sampler.weights.numpy()
    ratio = (p_weighted / p_weighted[~is_ext].sum()) / (p_plain / p_plain[~is_ext].sum())
    assert np.allclose(ratio[is_ext], 3.0) and np.allclose(ratio[~is_ext], 1.0)

    assert build_datasets(prepared, cfg.data, cfg.seed, round_idx=1).n_external == 3  # in_students: true (default)
    cfg.data.external.in_students = False
    student = build_datasets(prepared, cfg.data, cfg.seed, round_idx=1)
    assert student.n_external == 0 and not student.train_table["path"].str.startswith(ext).any()
    assert len(student.train_table) == len(plain.train_table) - 3
    assert build_datasets(prepared, cfg.data, cfg.seed, round_idx=0).n_external == 3


def test_a_single_recording_class_without_external_data_is_an_ordinary_labeled_row(home):
    """Fold -1 holds a class found in one recording (always trained on); it is not an external row: no
    external count, no external weights, and in_students=false keeps it in the students' training."""
    from birdrounds.config import compose
    from birdrounds.data.prepare import prepare_data
    from birdrounds.data.split import ALWAYS_TRAIN
    from birdrounds.rounds import build_datasets

    assert cli.main(["synth", "experiment=smoke"]) == 0
    csv = home / "data" / "synthetic_smoke" / "train.csv"
    train = pd.read_csv(csv)
    rare = train["primary_label"].value_counts().index[-1]
    train = pd.concat([train[train["primary_label"] != rare], train[train["primary_label"] == rare].iloc[:1]])
    train.to_csv(csv, index=False)
    cfg = compose(["experiment=smoke", "data.external.loss_weight=0.25", "data.external.sample_weight=3.0",
                   "data.external.in_students=false"])
    prepared = prepare_data(cfg.data, progress=False)
    is_rare = (prepared.data.train["primary_label"] == rare).to_numpy()
    assert is_rare.sum() == 1 and (prepared.folds[is_rare] == ALWAYS_TRAIN).all()
    assert prepared.summary()["external_clips"] == 0 and not prepared.external.any()
    for round_idx in (0, 1):
        parts = build_datasets(prepared, cfg.data, cfg.seed, round_idx=round_idx)
        assert parts.n_external == 0 and (parts.train_table["primary_label"] == rare).sum() == 1
        assert np.allclose(parts.train_set.weights, 1.0)  # no external loss weight on it


@pytest.mark.slow
def test_real_layout_folder_then_reuse_refuses_a_round_whose_inputs_changed(smoke_data, home):
    """`experiment=smoke data=birdclef2025 data.root=...`: the quick check on a real-layout folder synthesizes
    nothing and writes nothing there but its cache. Then Xeno-canto rows added after round 0: the teacher is
    not silently reused; recompute_from redoes it."""
    real = home / "birdclef-2025"
    shutil.copytree(smoke_data / "data" / "synthetic_smoke", real, ignore=shutil.ignore_patterns("truth", "xc_archive"))
    (real / "DONE.json").unlink()  # not a generated folder any more
    before = sorted(p.relative_to(real) for p in real.rglob("*"))
    on_real = ("data=birdclef2025", f"data.root={real}", "logger=none")
    proc = run_rounds(home, *on_real)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest_path = home / "runs" / "smoke" / "round_0" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["config"]["data"]["root"] == str(real) and manifest["config"]["data"].get("synth") is None
    assert manifest["config"]["model"]["backbone"] == "test_efficientnet"
    assert manifest["data"]["external_clips"] == 0
    added = {p.relative_to(real).parts[0] for p in real.rglob("*")} - {p.parts[0] for p in before}
    assert added <= {".birdrounds_cache"} and not (real / "DONE.json").exists()
    assert not (home / "data" / "synthetic_smoke").exists()

    add_external_rows(home, root=real)
    proc = run_rounds(home, *on_real)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "recompute_from" in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "round 0" in lines[0] and "train_audio" in lines[0] and "recompute_from=0" in lines[0]
    redo = run_rounds(home, *on_real, "recompute_from=0")
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert json.loads(manifest_path.read_text())["data"]["external_clips"] == 3
    assert run_rounds(home, *on_real).returncode == 0  # now unchanged: reused


# Short pseudo windows with a 1-s stride and small batches: ~24 teacher batches to kill in between. Without
# the mixed validation set (an evaluation only, tested on the shared smoke run): with batches of 2 it would
# be most of each of this test's four trainings.
RESUME_OVERRIDES = ("logger=none", "round=1", "pseudo.window_s=5", "pseudo.stride_s=1", "train.batch_size=2",
                    "data.mixed_val.enabled=false")


def start_rounds(home: Path, env_extra: dict, *overrides: str, cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "BIRDROUNDS_HOME": str(home), "WANDB_MODE": "offline", "PYTHONPATH": str(HOOKS), **env_extra}
    return subprocess.Popen([sys.executable, str(REPO / "rounds" / "run.py"), "experiment=smoke", *overrides],
                            env=env, cwd=cwd or home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(process: subprocess.Popen, ready, timeout_s: float = 300) -> None:
    """SIGKILL `process` as soon as `ready()` is true (fails if it ended or never got there)."""
    deadline = time.monotonic() + timeout_s
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before the kill point"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert ready()


def train_soundscape_chunks(home: Path, window_s: float, stride_s: float):
    """The smoke run's train soundscapes cut as the pseudo-labeling step cuts them."""
    from birdrounds.config import compose
    from birdrounds.data.audio import AudioCache
    from birdrounds.data.soundscapes import SoundscapeChunks

    cfg = compose(["experiment=smoke", f"paths.root={home}"])
    audio = AudioCache(cfg.data.cache_dir, cfg.data.sample_rate_hz, dtype=cfg.data.cache_dtype)
    soundscapes = sorted(str(p) for p in (home / "data" / "synthetic_smoke" / "train_soundscapes").glob("*.ogg"))
    return SoundscapeChunks(soundscapes, audio, window_s=window_s, stride_s=stride_s)


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_round_killed_in_pseudo_labeling_and_in_training_resumes_to_the_same_result(smoke_data, tmp_path):
    """SIGKILL during the teacher's inference, then during the student's second epoch; the rerun
    recomputes neither finished batches nor the pseudo-label table and ends bitwise where an
    uninterrupted run ends. Both runs train their own teacher, on the shared smoke data (own run folders)."""
    home, killed_dir, straight_dir = smoke_data, tmp_path / "killed", tmp_path / "straight"
    overrides = (*RESUME_OVERRIDES, f"run_dir={killed_dir}")
    straight = run_rounds(home, *RESUME_OVERRIDES, f"run_dir={straight_dir}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    round_dir = killed_dir / "round_1"
    calls = tmp_path / "teacher_batches.log"
    delays = {"BIRDROUNDS_TEST_PSEUDO_DELAY_S": "0.25", "BIRDROUNDS_TEST_PSEUDO_LOG": str(calls)}
    # 1. Killed once the first part of the teacher's outputs (10 batches) is on disk.
    parts_dir = round_dir / "pseudo_partial" / "rank_0of1"
    kill_when(start_rounds(home, delays, *overrides, cwd=tmp_path), lambda: any(parts_dir.glob("part_*.npy")))
    assert not (round_dir / "pseudo_labels.parquet").exists()
    saved = sum(len(np.load(p)) for p in parts_dir.glob("part_*.npy"))
    calls_before = len(calls.read_text().split())
    total = len(train_soundscape_chunks(home, window_s=5.0, stride_s=1.0))
    assert 0 < saved < total and sum(map(int, calls.read_text().split())) >= saved

    # 2. Rerun: only the windows not saved are labeled; killed again once the student's epoch 0 is saved.
    marker = round_dir / "checkpoints" / "epoch_000" / COMPLETE_MARKER
    delays["BIRDROUNDS_TEST_COLLATE_DELAY_S"] = "0.5"
    kill_when(start_rounds(home, delays, *overrides, cwd=tmp_path), marker.exists)
    batches_after = [int(n) for n in calls.read_text().split()[calls_before:]]
    assert sum(batches_after) == total - saved
    table_stamp = (round_dir / "pseudo_labels.parquet").stat().st_mtime_ns
    assert not (round_dir / "model.pt").exists()

    # 3. Rerun without delays: training resumes after epoch 0, the table is not rewritten.
    done = run_rounds(home, *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log_text = done.stdout + done.stderr
    assert "round 0 already complete" in log_text and "resumed from" in log_text and "epoch_000" in log_text
    assert "windows (process" not in log_text  # no teacher inference started
    assert (round_dir / "pseudo_labels.parquet").stat().st_mtime_ns == table_stamp
    assert len(calls.read_text().split()) == calls_before + len(batches_after)

    ref_dir = straight_dir
    for k in (0, 1):
        ours, theirs = _weights(killed_dir / f"round_{k}" / "model.pt"), _weights(ref_dir / f"round_{k}" / "model.pt")
        for name, value in theirs.items():
            assert torch.equal(value, ours[name]), (k, name)
    killed_table, ref_table = (read_pseudo_labels(d / "pseudo_labels.parquet")[0] for d in (round_dir, ref_dir / "round_1"))
    # The same chunks, files and probabilities (both runs read the same data folder).
    pd.testing.assert_frame_equal(killed_table, ref_table)
    assert (killed_dir / "report.md").is_file() and (killed_dir / "report.png").is_file()


@pytest.mark.slow
def test_two_process_launch_trains_the_teacher_and_splits_pseudo_labeling(smoke_data, tmp_path):
    """`accelerate launch` with the shipped CPU config runs rounds/run.py as 2 DDP processes over gloo, round=1:
    the teacher trains on both processes; each process labels half the windows; the joined table equals
    the teacher's single-process labels through the round's de-noising, and the student trains on both processes."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from birdrounds.pseudo import chunk_rows, predict_chunks

    home, run_dir = smoke_data, tmp_path / "run"  # the shared smoke data, a run folder of its own
    env = {**os.environ, "BIRDROUNDS_HOME": str(home), "ACCELERATE_USE_CPU": "1", "WANDB_MODE": "offline"}
    launcher = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(launcher), "launch", "--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml"),
                           str(REPO / "rounds/run.py"), "experiment=smoke", "logger=none", "round=1",
                           "pseudo.window_s=5", "pseudo.stride_s=2.5", f"run_dir={run_dir}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Round 0 (was test_two_process_launch_of_the_entry_point): trained by both processes.
    round_dir = run_dir / "round_0"
    metrics = json.loads((round_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and (round_dir / "DONE").is_file()
    # the mixed set's rows and background-alone items, split over both processes and gathered
    assert 0.0 <= metrics["val_mixed_auc"] <= 1.0
    model, ckpt = load_checkpoint(round_dir / "model.pt")
    assert ckpt["extra"]["num_processes"] == 2

    shares = [np.load(run_dir / "round_1" / "pseudo_partial" / f"share_{r}of2.npy") for r in (0, 1)]
    assert len(shares[0]) > 0 and abs(len(shares[0]) - len(shares[1])) <= 1
    table, provenance = read_pseudo_labels(run_dir / "round_1" / "pseudo_labels.parquet")
    assert provenance["processes"] == 2

    teacher, ckpt = load_checkpoint(run_dir / "round_0" / "model.pt")
    chunks = train_soundscape_chunks(home, window_s=5.0, stride_s=2.5)
    rows = chunk_rows(chunks)
    # The default de-noising (first_2025) scales each chunk by its class's max over the file, so the joined
    # shares must arrive in file order for it: compare after the same transform, applied in one process.
    transform = instantiate(OmegaConf.load(run_dir / "round_1" / "config.yaml").pseudo.transform)
    assert "file_scale" in transform.describe(1)
    expected, _ = transform(predict_chunks([teacher], chunks, batch_size=4), round_idx=1, files=rows["file"].to_numpy())
    order = pd.Index(rows["row_id"]).get_indexer(table["row_id"])
    assert (order >= 0).all() and len(table) == len(rows)
    np.testing.assert_allclose(table[ckpt["classes"]].to_numpy(), expected[order], atol=1e-5)

    metrics = json.loads((run_dir / "round_1" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["round"] == 1 and (run_dir / "round_1" / "DONE").is_file()
    assert "| 1 |" in (run_dir / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("fault, code, expected", [
    ("RuntimeError", 1, f"the run failed (overrides: experiment=smoke logger=none xc.api_key={REDACTED} run_dir="),
    ("KeyboardInterrupt", 130, "interrupted: run the same command again to resume where it stopped"),
])
def test_a_crash_or_ctrl_c_prints_no_secret(fault, code, expected, smoke_data, tmp_path):
    """A crash is reported with its traceback but without Hydra's list of overrides (it would echo the API
    key); Ctrl-C is one line, no traceback."""
    env = {**os.environ, "BIRDROUNDS_HOME": str(smoke_data), "WANDB_MODE": "offline", "PYTHONPATH": str(HOOKS),
           "BIRDROUNDS_TEST_RAISE": fault}
    proc = subprocess.run([sys.executable, str(REPO / "rounds" / "run.py"), "experiment=smoke", "logger=none",
                           "xc.api_key=hunter2", f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == code and expected in output, output[-3000:]
    assert "hunter2" not in output and "Error executing job" not in output
    assert "hunter2" not in "".join(p.read_text(errors="replace") for p in (tmp_path / "run").rglob("*") if p.is_file())
    if fault == "KeyboardInterrupt":
        assert "Traceback" not in output
    else:
        assert "RuntimeError: raised by tests/hooks for the test" in output


@pytest.mark.slow
def test_a_damaged_teacher_checkpoint_is_named_with_the_round_that_rebuilds_it(smoke_run, tmp_path):
    """round_0/model.pt truncated: with round 1 still to train, and with round 1 done (whose reuse check then
    finds its teacher changed), one line names the file and recompute_from=0, exit 2, no traceback."""
    from conftest import copy_rounds, tree_hashes

    home = smoke_run.home
    for name, rounds in (("fresh", ("round_0",)), ("reused", ("round_0", "round_1"))):
        run_dir = copy_rounds(smoke_run.run_dir, tmp_path / name, *rounds)
        model = run_dir / "round_0" / "model.pt"
        model.write_bytes(model.read_bytes()[:4096])
        before = tree_hashes(run_dir, skip=RUN_LOG_AND_LOCK)
        proc = run_entry(home, "logger=none", "round=1", f"run_dir={run_dir}", cwd=tmp_path)
        output = proc.stdout + proc.stderr
        assert tree_hashes(run_dir, skip=RUN_LOG_AND_LOCK) == before  # the log and the lock are all it wrote
        assert proc.returncode == 2, output[-3000:]
        assert (f"{model}: cannot be read, truncated or corrupt" in output
                and "rerun with recompute_from=0 to rebuild it, or delete it" in output), output[-3000:]
        assert "Traceback" not in output
