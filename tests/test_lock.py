"""One writer per run folder (birdrounds.lock): a second command stops with one line, a dead holder's lock is
taken over, an unwritable folder is named."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from birdrounds import cli
from birdrounds.config import ConfigError
from birdrounds.lock import RunFolderBusy, run_folder_lock
from conftest import REPO, entry_env, run_entry, tree_hashes


def test_second_holder_is_refused_with_the_first_named(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    with run_folder_lock(run_dir):
        holder = json.loads((run_dir / ".lock.json").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
        with pytest.raises(RunFolderBusy, match=rf"run_dir: {run_dir} is in use by pid {os.getpid()} on "):
            with run_folder_lock(run_dir):
                pass
    assert not (run_dir / ".lock.json").exists()
    with run_folder_lock(run_dir):  # released: free again
        pass


def test_export_and_predict_are_refused_while_another_command_holds_the_folder(home, capsys):
    run_dir = home / "runs" / "smoke"
    run_dir.mkdir(parents=True)
    (run_dir / "submission.csv").write_text("row_id,a\n")
    before = tree_hashes(run_dir)
    with run_folder_lock(run_dir):
        for command in ("export", "predict"):
            assert cli.main([command, "experiment=smoke"]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"birdrounds {command}: error: run_dir: {run_dir} is in use by pid" in err
    after = tree_hashes(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith(".lock")} == before


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    """Killed with a forked child alive 2 s longer (as a DataLoader worker): the next command takes the lock
    (filelock 4 closes it in forked children; with older versions the command waits for the child) instead
    of naming a dead holder."""
    run_dir = tmp_path / "run"
    code = (f"from birdrounds.lock import run_folder_lock\nimport os, time\n"
            f"with run_folder_lock({str(run_dir)!r}):\n"
            f"    if os.fork() == 0:\n        time.sleep(2)\n        os._exit(0)\n"
            f"    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"pid {proc.pid} "):
            with run_folder_lock(run_dir):
                pass
    finally:
        proc.kill()
        proc.wait()
    assert json.loads((run_dir / ".lock.json").read_text())["pid"] == proc.pid  # left behind by the killed holder
    with run_folder_lock(run_dir):
        assert json.loads((run_dir / ".lock.json").read_text())["pid"] == os.getpid()


def test_a_folder_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=rf"run_dir: cannot write into {blocker / 'run'} \("):
        with run_folder_lock(blocker / "run"):
            pass


@pytest.mark.slow
def test_two_runs_on_one_folder_the_second_stops_at_once(smoke_data, tmp_path):
    """The race of issue 38: a second rounds/run.py on a folder a first one is filling stops with one line
    naming the first (exit 2) and writes nothing there; the first goes on."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(REPO / "rounds" / "run.py"), "experiment=smoke", "logger=none",
                              f"run_dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=entry_env(smoke_data), cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (run_dir / ".lock.json").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the second could start"
        log = run_dir / "run.log"
        log_before = log.read_bytes() if log.is_file() else b""
        second = run_entry(smoke_data, "logger=none", f"run_dir={run_dir}", "train.optimizer.lr=0.002", cwd=tmp_path)
        assert second.returncode == 2
        assert f"rounds/run.py: error: run_dir: {run_dir} is in use by pid {first.pid} on " in second.stderr
        assert "Traceback" not in second.stderr and second.stderr.count("\n") == 1
        assert not log.is_file() or log.read_bytes().startswith(log_before)  # the second wrote no line there
        assert first.poll() is None  # the first goes on
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
