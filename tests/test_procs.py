"""Pool workers die with their parent: `kill -9` of a run leaves no worker or resource tracker behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from birdrounds.procs import spawn_pool

PARENT = """
import multiprocessing.resource_tracker as rt, sys, time
from birdrounds.procs import spawn_pool
pool = spawn_pool(2)
futures = [pool.submit(time.sleep, 120) for _ in range(2)]
time.sleep(1.0)
print(*pool._processes, rt._resource_tracker._pid or 0, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    """Running (a zombie left for an init that does not reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_pool_runs_work():
    with spawn_pool(2) as pool:
        assert list(pool.map(abs, [-1, -2, 3])) == [1, 2, 3]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_and_resource_tracker_exit_when_the_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        workers, tracker = pids[:-1], pids[-1]
        assert len(workers) == 2 and all(alive(p) for p in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        left = [p for p in [*workers, tracker] if p]
        while time.monotonic() < deadline and any(alive(p) for p in left):
            time.sleep(0.2)
        assert not [p for p in left if alive(p)], "processes left behind after kill -9 of their parent"
    finally:
        parent.kill()
