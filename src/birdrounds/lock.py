"""One writer per run folder: an OS file lock (`filelock`) held for the whole command.

`rounds/run.py` / `birdrounds run`, `export` and `predict` take `run_dir/.lock` before they write into the
folder; a second command on the same folder stops at once with one line naming the holder (its pid, host,
start time and command, from `.lock.json`), exit 2. The lock is the operating system's (`flock`): a killed
holder releases it as it dies (its forked DataLoader workers a few seconds later, which the next command
waits for), and the stale `.lock.json` left behind is simply overwritten. Under `accelerate launch` only the
launch's main process (RANK 0) takes it, for all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from birdrounds.artifacts import LOCK_FILE, LOCK_HOLDER_FILE, write_json_atomic
from birdrounds.config import ConfigError, redact_argv


class RunFolderBusy(ConfigError):
    """Another command holds the run folder: reported in one line, exit 2, like bad config."""


def launch_main() -> bool:
    """Whether this is the process that locks: the only one, or RANK 0 of an `accelerate launch`."""
    return os.environ.get("RANK", "0") == "0"


# A killed holder's forked children (DataLoader workers) keep the lock until they notice and exit (seconds).
ORPHAN_WAIT_S = 30.0


def holder_info(run_dir: Path) -> dict | None:
    """The holder file's record, None where it is missing or unreadable (not written yet)."""
    try:
        info = json.loads((run_dir / LOCK_HOLDER_FILE).read_text())
        return info if isinstance(info, dict) and "pid" in info else None
    except (OSError, ValueError):
        return None


def holder(run_dir: Path) -> str:
    """Who holds `run_dir`'s lock, in words."""
    info = holder_info(run_dir)
    if info is None:
        return "another command (it has not said which yet)"
    return (f"pid {info['pid']} on {info.get('host')} since {info.get('started')} "
            f"({' '.join(str(a) for a in info.get('command', []))})")


def holder_gone(run_dir: Path) -> bool:
    """Whether the recorded holder is a process of this host that no longer exists."""
    info = holder_info(run_dir)
    if info is None or info.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


@contextlib.contextmanager
def run_folder_lock(run_dir: str | os.PathLike, key: str = "run_dir") -> Iterator[None]:
    """Hold `run_dir`'s lock for the block (created if missing); RunFolderBusy names the holder where another
    command has it, ConfigError names `key` where the folder cannot be created or written."""
    if not launch_main():
        yield
        return
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / LOCK_FILE)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not holder_gone(run_dir):
                raise
            # The holder was killed; its forked children still hold the lock for a moment.
            lock.acquire(timeout=ORPHAN_WAIT_S)
    except Timeout:
        raise RunFolderBusy(f"{key}: {run_dir} is in use by {holder(run_dir)}; wait for it to finish or stop it, "
                            f"or pass another {key}") from None
    except OSError as err:
        raise ConfigError(f"{key}: cannot write into {run_dir} ({err.strerror or err}); "
                          f"choose a writable folder") from None
    try:
        write_json_atomic(run_dir / LOCK_HOLDER_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": redact_argv(sys.argv)})
        yield
    finally:
        with contextlib.suppress(OSError):
            (run_dir / LOCK_HOLDER_FILE).unlink()
        lock.release()
