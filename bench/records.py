"""Benchmark records, and the few helpers the scripts of bench/ share: bench/'s one shared module.

A record says what was measured and how to measure it again: the code version (git SHA, read when the script
starts), the date, the
machine (CPU model and core count), the exact command, and the figures, per seed where there are seeds.
`bench/render_results.py` (`make results`) turns the folder into docs/results.md; records are never
edited after the fact, a new measurement is a new file.

    from records import write_record
    write_record("rounds_gain", "rounds-gain", {...}, overrides=[...])   # results/rounds-gain-2026-12-05.json

Every script that prints figures takes `--record` (`add_record_option`) and writes what it printed with
`record_result`: benchmark = the script's name, name = the same with "-" for "_".

    python bench/loader_rate.py --record data.augment.pitch_p=0          # results/loader-rate-<date>.json

The scripts are run as `python bench/<name>.py`, which puts bench/ on sys.path: they import this module
(and each other) by name.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from birdrounds.artifacts import CONTROL_DIR, DONE_FILE, METRICS_FILE, MODEL_FILE, ROUND_CONFIG_FILE, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "results"
SCHEMA = 1


def git_sha(repo: Path = REPO) -> str | None:
    """The checked-out commit, with "-dirty" when tracked files differ from it; None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{sha}-dirty" if dirty else sha


# The code version a benchmark started with: a long one may outlast the checkout it was started from.
STARTED_AT_SHA = git_sha()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on: CPU model, cores the process may use, and the rest of the system."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": usable,
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: `python bench/<script>.py args...`, quoted for a shell."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    shown = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else argv[0]
    return shlex.join(["python", shown, *argv[1:]])


def write_record(benchmark: str, name: str, results: dict[str, Any], overrides: list[str] | None = None,
                 folder: Path | None = None, **fields: Any) -> Path:
    """Write results/<name>-<date>.json atomically (a numbered suffix if that file exists); returns its path."""
    today = dt.datetime.now(dt.timezone.utc)
    folder = Path(folder or os.environ.get("BIRDROUNDS_RESULTS_DIR") or RESULTS_DIR)
    record = {"schema": SCHEMA, "name": name, "benchmark": benchmark, "measured": today.date().isoformat(),
              "measured_at": today.isoformat(timespec="seconds"), "git_sha": STARTED_AT_SHA,
              "machine": machine(), "command": command_line(), "overrides": list(overrides or []),
              "source": "written by the benchmark", "reproducible_by_one_command": True, **fields,
              "results": results}
    path = folder / f"{name}-{record['measured']}.json"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"{name}-{record['measured']}-{n}.json"
    write_json_atomic(path, record)
    return path


def add_record_option(parser: argparse.ArgumentParser) -> None:
    """A benchmark's `--record` flag."""
    parser.add_argument("--record", action="store_true",
                        help="also write the result as a JSON record into results/ ($BIRDROUNDS_RESULTS_DIR if set; "
                             "bench/records.py)")


def record_result(benchmark: str, results: dict[str, Any], overrides: list[str] | None = None, **fields: Any) -> Path:
    """`write_record` under the benchmark's own names (`benchmark`: the script's name; the file:
    results/<benchmark with "-" for "_">-<date>.json), its path printed to stderr; returns the path."""
    path = write_record(benchmark, benchmark.replace("_", "-"), results, overrides=overrides, **fields)
    print(f"record: {path}", file=sys.stderr)
    return path


def model_folders(run_dirs: list[Path]) -> list[Path]:
    """Completed round and control folders, in run, round order; a model copied into another run
    (an oracle run reuses its teacher) counts once."""
    from birdrounds.model import checkpoint_hash  # torch: only for the scripts that score models

    found, seen = [], set()
    for run_dir in run_dirs:
        rounds = [p for p in run_dir.glob("round_*") if p.name.removeprefix("round_").isdigit()]
        for folder in sorted(rounds, key=lambda p: int(p.name.removeprefix("round_"))):
            for candidate in (folder, folder / CONTROL_DIR):
                if all((candidate / f).is_file() for f in (DONE_FILE, MODEL_FILE, METRICS_FILE, ROUND_CONFIG_FILE)):
                    digest = checkpoint_hash(candidate / MODEL_FILE)
                    if digest not in seen:
                        seen.add(digest)
                        found.append(candidate)
    return found
