"""Shared test set-up: no network for wandb, configs composed from this checkout, models from them."""

import copy
import functools
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see rounds/run.py


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh BIRDROUNDS_HOME so data/ and runs/ land in tmp_path."""
    monkeypatch.setenv("BIRDROUNDS_HOME", str(tmp_path))
    return tmp_path


def built_once(tmp_path_factory, name: str, build: Callable[[Path], Any]) -> tuple[Path, Any]:
    """(folder, build(folder)'s JSON-able result) made once per test run, even under pytest-xdist, whose
    workers share the parent of their base temp folders: the first worker to get here builds under a file
    lock while the others wait, then all read the same folder (READ-ONLY) and result."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder, result = base / name, base / f"{name}.json"
    with FileLock(str(base / f"{name}.lock")):
        if not result.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            result.write_text(json.dumps(build(folder)))
    return folder, json.loads(result.read_text())


@functools.cache
def _model_section(option: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from birdrounds.config import compose

    return OmegaConf.to_container(compose([f"model={option}"]).model, resolve=True)


def model_config(option: str = "tiny") -> dict[str, Any]:
    """configs/model/<option>.yaml as the real tree composes it (interpolations resolved), as a plain dict."""
    return copy.deepcopy(_model_section(option))


def config_model(num_classes: int, option: str = "tiny", **overrides: Any):
    """The BirdModel of configs/model/<option>.yaml, built as training builds it (instantiate, then call
    with num_classes); `overrides` replace config arguments (keyword arguments of that call)."""
    from hydra.utils import instantiate

    return instantiate(model_config(option))(num_classes=num_classes, **overrides)


# ----------------------------------------------------------------------------- tiny exported ONNX graphs
# A torch.onnx export takes seconds even for model=tiny: every graph below is exported once per session and
# shared (READ-ONLY) by tests/test_export.py and tests/test_infer.py.

REAL_AUDIO = Path(__file__).parent / "fixtures" / "real_audio" / "birds_10s.wav"  # 10.13 s, 32 kHz mono
EXPORT_CLASSES = ["amerob", "blujay", "cangoo", "houspa", "norcar"]
EXPORT_WINDOW_S = 5.0


def tiny_checkpoint(path: Path, head: str = "sed", seed: int = 0, classes: list[str] = EXPORT_CLASSES,
                    **overrides: Any) -> Path:
    """A random-init `model=tiny` BirdModel (with `overrides`) saved as a checkpoint with a 5 s window."""
    import torch

    from birdrounds.model import save_checkpoint

    torch.manual_seed(seed)
    model = config_model(len(classes), head=head, **overrides)
    save_checkpoint(path, model, classes, extra={"window_s": EXPORT_WINDOW_S})
    return path


@pytest.fixture(scope="session")
def real_chunks():
    """11 overlapping 5 s windows [11, 160000] (0.5 s hop) of a real 10 s bird recording."""
    import numpy as np

    from birdrounds.data.audio import load_audio

    sample_rate_hz = 32000
    audio = load_audio(REAL_AUDIO, sample_rate_hz)
    window, hop = int(EXPORT_WINDOW_S * sample_rate_hz), sample_rate_hz // 2
    return np.stack([audio[s:s + window] for s in range(0, len(audio) - window + 1, hop)])


@pytest.fixture(scope="session")
def exported_graphs(tmp_path_factory, real_chunks):
    """exported_graphs(kind, head) -> (checkpoint, model.onnx, report): `tiny_checkpoint(head=head)` (seed 0)
    through `birdrounds.export.export_onnx` (verified on `real_chunks`), each pair exported once per test run."""
    from birdrounds.export import export_onnx

    def get(kind: str, head: str) -> tuple[Path, Path, dict]:
        def save(folder: Path) -> None:
            tiny_checkpoint(folder / "model.pt", head)

        ckpt = built_once(tmp_path_factory, f"tiny_{head}", save)[0] / "model.pt"  # one per head, every kind's
        folder, report = built_once(tmp_path_factory, f"exported_{head}_{kind}",
                                    lambda folder: export_onnx([ckpt], folder / "model.onnx", kind,
                                                               verify_audio=real_chunks))
        return ckpt, folder / "model.onnx", report

    return get

# ----------------------------------------------------------------------------- one shared smoke run
#
# Training is most of what the end-to-end tests cost, so they share one real run, made once per session
# the way README's first command makes it: `make demo` (synth, the Xeno-canto archive import, a teacher and
# two student rounds with their controls, export, predict) on the smoke experiment, logged to offline wandb
# with a secret given on the command line. One focal clip and one train soundscape are broken before it,
# so the run also shows what happens to unreadable audio. Tests that only read its results use it as it
# is (READ-ONLY); tests that change a run copy its folders into their tmp_path first (`copy_rounds`) and run
# there with `run_dir=...`, reading the shared data.

REPO = Path(__file__).resolve().parents[1]
HOOKS = REPO / "tests" / "hooks"  # sitecustomize.py: test-only delays so a run can be killed mid-step
SECRET = "sk-TEST-SECRET-1234"
DEMO_ROUNDS = 2


def entry_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment of a `rounds/run.py` / `birdrounds` subprocess: data and runs under `home`, offline wandb."""
    return {**os.environ, "BIRDROUNDS_HOME": str(home), "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def run_entry(home: Path, *overrides: str, cwd: Path | None = None, **env_extra: str):
    """`python rounds/run.py experiment=smoke <overrides>` as a user runs it."""
    import sys

    return subprocess.run([sys.executable, str(REPO / "rounds" / "run.py"), "experiment=smoke", *overrides],
                          capture_output=True, text=True, env=entry_env(home, **env_extra), cwd=cwd or home,
                          timeout=600)


def run_bench(script: str, *args: str, tmp_path: Path, **env_extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`python bench/<script>.py <args> --record` as a user runs it (cwd `tmp_path`), its record written into
    `tmp_path/records`: the process (exit 0 checked) and the one record it wrote (its path printed to stderr)."""
    import sys

    records = tmp_path / "records"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), *args, "--record"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BIRDROUNDS_RESULTS_DIR": str(records), **env_extra})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = records.glob(f"{script.replace('_', '-')}-*.json")
    assert f"record: {path}" in proc.stderr
    record = json.loads(path.read_text())
    assert record["benchmark"] == script and record["command"].startswith(f"python bench/{script}.py")
    return proc, record


def results_page(records: Path) -> str:
    """docs/results.md as `make results` renders the records in `records`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_results", REPO / "bench" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render(module.load_records(records))


def tree_hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> digest), leaving out the file names in `skip`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def copy_rounds(run_dir: Path, dest: Path, *names: str) -> Path:
    """Copy the round folders `names` (e.g. "round_0", "round_1") of a finished run into `dest`, without
    their wandb logs; a name ending in "/" leaves out the folder's control/ (the student only)."""
    for name in names:
        student_only = name.endswith("/")
        name = name.rstrip("/")
        ignore = shutil.ignore_patterns("wandb", *(("control",) if student_only else ()))
        shutil.copytree(run_dir / name, dest / name, ignore=ignore)
    return dest


@dataclass(frozen=True)
class SmokeRun:
    """The session's shared smoke run (see above). Do not write under `home`."""

    home: Path
    root: Path  # the synthetic smoke data
    run_dir: Path
    train_rows: int  # focal clips in train.csv
    broken_clip: Path
    broken_soundscape: Path
    demo: Any  # CompletedProcess of `make demo`
    again: Any  # CompletedProcess of `rounds/run.py round=2 control=true` afterwards: every round reused
    round0_mtime_ns: int  # round_0/model.pt before `again`

    def output(self, proc) -> str:
        return proc.stdout + proc.stderr


def copy_smoke_data(source_home: Path, home: Path) -> Path:
    """Copy the synthetic smoke data (data/synthetic_smoke) of `source_home` into `home`; `birdrounds synth`
    then finds it there and generates nothing. Returns the copy's root."""
    return Path(shutil.copytree(source_home / "data" / "synthetic_smoke", home / "data" / "synthetic_smoke"))


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """A home whose data/ holds the smoke experiment's data and its decoded-audio cache, made once: READ-ONLY.
    Copy it (`copy_smoke_data`), or give it as BIRDROUNDS_HOME to runs that read it, with a `run_dir` elsewhere."""
    from birdrounds import cli
    from birdrounds.config import compose
    from birdrounds.data.prepare import prepare_data

    def build(home: Path) -> None:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("BIRDROUNDS_HOME", str(home))
            assert cli.main(["synth", "experiment=smoke"]) == 0
            prepare_data(compose(["experiment=smoke"]).data, progress=False)  # fills data/cache

    return built_once(tmp_path_factory, "smoke_data", build)[0]


def _completed(proc: subprocess.CompletedProcess) -> dict:
    return {"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, smoke_data) -> SmokeRun:
    import sys

    import pandas as pd

    def build(home: Path) -> dict:
        wandb_dirs = {name: str(home / "wandb_home" / name.lower())
                      for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_DIR")}
        root = copy_smoke_data(smoke_data, home)
        train = pd.read_csv(root / "train.csv")
        broken_clip = root / "train_audio" / train.loc[0, "filename"]
        broken_clip.write_bytes(b"not audio at all")
        broken_soundscape = sorted((root / "train_soundscapes").glob("*.ogg"))[0]
        broken_soundscape.write_bytes(b"")

        env = entry_env(home, **wandb_dirs)
        env.pop("XC_API_KEY", None)
        # This interpreter's environment stands in for .venv; a fresh stamp keeps make from reinstalling it.
        stamp = home / "installed"
        stamp.touch()
        demo = subprocess.run(["make", "-C", str(REPO), "demo", f"VENV={Path(sys.executable).parent.parent}",
                               f"STAMP={stamp}", f"ROUNDS={DEMO_ROUNDS}", "EXPERIMENT=smoke",
                               f"ARGS=logger=wandb xc.api_key={SECRET}"],
                              capture_output=True, text=True, env=env, cwd=home, timeout=1200)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        stamp_ns = (home / "runs" / "smoke" / "round_0" / "model.pt").stat().st_mtime_ns
        again = run_entry(home, "logger=none", f"round={DEMO_ROUNDS}", "control=true")
        assert again.returncode == 0, again.stderr[-3000:]
        return {"train_rows": len(train), "broken_clip": str(broken_clip), "broken_soundscape": str(broken_soundscape),
                "demo": _completed(demo), "again": _completed(again), "round0_mtime_ns": stamp_ns}

    home, made = built_once(tmp_path_factory, "smoke_home", build)
    return SmokeRun(home=home, root=home / "data" / "synthetic_smoke", run_dir=home / "runs" / "smoke",
                    train_rows=made["train_rows"], broken_clip=Path(made["broken_clip"]),
                    broken_soundscape=Path(made["broken_soundscape"]),
                    demo=subprocess.CompletedProcess(**made["demo"]),
                    again=subprocess.CompletedProcess(**made["again"]), round0_mtime_ns=made["round0_mtime_ns"])
