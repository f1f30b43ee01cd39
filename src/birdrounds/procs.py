"""Worker process pools whose workers exit when their parent dies (no orphans after `kill -9`).

A `ProcessPoolExecutor` worker waits on a queue whose write end it holds itself, so when the parent
is killed outright it never sees end-of-file: it and the multiprocessing resource tracker (which
waits for every holder of its pipe) stay alive, holding memory. `spawn_pool` gives every worker a
parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`) and, on other systems, a thread that watches
the parent id; once the workers are gone the resource tracker exits on its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _set_parent_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    os._exit(1)


def exit_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this worker when `parent_pid` dies (also if it died before we got here)."""
    if not _set_parent_death_signal():
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died while this worker was starting
        os._exit(1)


def spawn_pool(max_workers: int) -> ProcessPoolExecutor:
    """A spawn-based pool (forking a process that holds torch/BLAS threads can deadlock) that dies with us."""
    return ProcessPoolExecutor(max_workers=max_workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))
