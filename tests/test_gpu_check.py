"""bench/gpu_check.sh: the one-GPU check, run here through its CPU path (--cpu) at tiny size."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_smoke_data

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    subprocess.run(["bash", "-n", str(REPO / "bench" / "fetch_wheels.sh")], check=True)
    help_text = subprocess.run(["bash", str(SCRIPT), "--help"], check=True, capture_output=True, text=True).stdout
    assert "--cpu" in help_text


@pytest.mark.slow
def test_gpu_check_cpu_path_end_to_end(smoke_data, tmp_path):
    out = tmp_path / "out"
    copy_smoke_data(smoke_data, tmp_path / "work")  # its `birdrounds synth` step then finds the data there
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           # the venv's scripts first, so `python -m accelerate...` children find the same interpreter
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=840)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu"
    assert summary["samples_per_s"] > 0
    assert 0 <= summary["data_wait_share"] <= 1
    assert summary["pseudo_windows_per_s"] > 0
    assert summary["pseudo"]["windows"] > 0 and summary["pseudo"]["soundscape_s_per_s"] > 0
    assert summary["verdict"] in ("OK", "DATA-BOUND")
    # The default workers' augmentation, then the same workers with augmentation and MixUp on the device.
    workers, device = summary["training"].values()
    assert (workers["augment_on"], device["augment_on"]) == ("workers", "device")
    assert workers["num_workers"] == device["num_workers"]
    for run in (workers, device):
        assert run["epochs"] and all(e["samples_per_s"] > 0 for e in run["epochs"])
    # The teacher trained with augmentation on the device (rounds/run.py, data.augment_on=device): its round_0
    # metrics.json, with a finite training loss every epoch (was test_device_augment.py's own smoke teacher).
    (device_name,) = [name for name, run in summary["training"].items() if run["augment_on"] == "device"]
    manifest = json.loads((tmp_path / "work" / "runs" / device_name / "round_0" / "manifest.json").read_text())
    assert manifest["config"]["data"]["augment_on"] == "device" and manifest["arm"] == "teacher"
    history = json.loads((out / f"metrics_{device_name}.json").read_text())["history"]
    assert len(history) >= 1 and all(math.isfinite(h["train_loss"]) for h in history)
    for name in ("gpu_check.log", "env.txt", "pseudo.json", *(f"metrics_{n}.json" for n in summary["training"])):
        assert (out / name).is_file(), name
    # What the device tool brings back: at most 8 files, none deeper than 2 folders.
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8
