"""The Accelerate training loop: schedule, sampler, a real single-process fit, a real 2-process
`accelerate launch` on CPU, kill-and-resume, and the wandb offline run it logs to.

The runs share tests/train_script.py: synthetic tone clips, the real ClipDataset/MixUp/sampler,
SoundscapeChunks, BirdModel on timm's tiny LayerNorm EfficientNet, BCELoss and `fit`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from hydra.utils import instantiate
from torch.utils.data import WeightedRandomSampler

import train_script
from birdrounds.config import compose, shipped
from birdrounds.model import load_checkpoint
from birdrounds.train import (
    COMPLETE_MARKER,
    STATE_FILE,
    EpochSampler,
    TrainSettings,
    complete_checkpoints,
    cosine_with_warmup,
    write_json_atomic,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(train_script.__file__)


@pytest.fixture(scope="module", autouse=True)
def offline_wandb(tmp_path_factory):
    """wandb never touches the network or the home folder (subprocesses inherit the environment)."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            patch.setenv(name, str(home / name.lower()))
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    train_script.make_data(root)
    return root


@pytest.fixture(scope="module")
def wandb_run(data, tmp_path_factory) -> tuple[Path, dict]:
    """One in-process fit (3 epochs x 2 steps, EMA on) logged to an offline wandb run."""
    out = tmp_path_factory.mktemp("fit")
    settings = train_script.settings(epochs=3, steps=2)
    result = train_script.train(data, out, Accelerator(log_with="wandb"), settings, logger=shipped("logger", "logger=wandb", project="test"))
    return out, result


def _env() -> dict[str, str]:
    """Subprocess environment: offline wandb (inherited), processes on the CPU even where GPUs exist,
    OpenMP threads that yield their core when idle (spinning ones crawl on a busy 2-core machine)."""
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[1]["state_dict"]


# ----------------------------------------------------------------------------- pieces


def test_cosine_schedule_warmup_restarts_and_floor():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = cosine_with_warmup(optimizer, steps_per_epoch=4, epochs=4, warmup_epochs=0.5, restart_epochs=2, min_lr=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # Warmup over 2 updates, cosine down over the rest of the first 8, a restart at update 8.
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[2:8] == sorted(lrs[2:8], reverse=True) and lrs[7] > 0.1
    assert lrs[8] == pytest.approx(1.0) and lrs[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert min(lrs) >= 0.1
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1)  # past the end: the floor, not a new cycle


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    base = WeightedRandomSampler(torch.ones(50, dtype=torch.double), num_samples=50)
    sampler = EpochSampler(50, seed=3, base=base, num_samples=20)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    second = list(sampler)
    fresh = EpochSampler(50, seed=3, base=WeightedRandomSampler(torch.ones(50, dtype=torch.double), 50))
    fresh.set_epoch(1)
    assert len(first) == 20 and first != second
    assert list(fresh)[:20] == first  # a new process (a resumed run) draws the same epoch
    shuffle = EpochSampler(10, seed=0)
    assert sorted(shuffle) == list(range(10))


def test_json_is_atomic_and_strict(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"auc": float("nan"), "loss": [1.0, float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"auc": None, "loss": [1.0, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_configs_build_settings_and_optimizer():
    cfg = compose(["train=smoke", "logger=none"])
    settings = instantiate(cfg.train)
    assert isinstance(settings, TrainSettings) and settings.max_steps_per_epoch == 3 and settings.seed == cfg.seed
    assert instantiate(cfg.logger).log_with is None
    default = instantiate(compose(["train=default"]).train)
    optimizer = default.optimizer(torch.nn.Linear(2, 2).parameters())
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == pytest.approx(1e-4)
    scheduler = default.scheduler(optimizer, steps_per_epoch=10, epochs=default.epochs)
    assert scheduler.get_last_lr()[0] == pytest.approx(5e-4 / 10)  # first warmup step
    wandb = instantiate(compose(["logger=wandb"]).logger)
    assert wandb.log_with == "wandb" and wandb.init_kwargs(Path("/x"))["wandb"]["mode"] == "offline"


def test_several_launched_processes_that_do_not_see_each_other_are_refused(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU"):
        train_script.train(data, tmp_path, Accelerator(), train_script.settings(epochs=1, steps=1))


def test_gradient_accumulation_matches_one_big_batch(data, tmp_path):
    """2 accumulated batches of 4 = 1 batch of 8 on the same samples (per-sample model, no MixUp/dropout)."""
    runs, accelerator = [], Accelerator()  # one Accelerator for both fits, as for successive rounds
    for batch_size, accum in ((8, 1), (4, 2)):
        settings = train_script.settings(epochs=1, batch_size=batch_size, steps=2, ema_decay=None)
        settings.grad_accum_steps = accum
        out = tmp_path / f"accum{accum}"
        runs.append(train_script.train(data, out, accelerator, settings, mixup_prob=0.0, drop_rate=0.0))
    # The second fit's checkpoint holds only its own model and optimizer.
    files = [{p.name for p in (tmp_path / f"accum{a}" / "checkpoints" / "epoch_000").iterdir()} for a in (1, 2)]
    assert files[0] == files[1] and "pytorch_model_1.bin" not in files[1]
    assert runs[0]["step"] == runs[1]["step"] == 2
    assert runs[1]["train_loss"] == pytest.approx(runs[0]["train_loss"], rel=1e-5)
    weights = [_state_dict(tmp_path / f"accum{accum}" / "model.pt") for accum in (1, 2)]
    # Summing 2 half-batch gradients rounds differently from 1 full batch; Adam divides by the gradient's
    # scale, so a weight whose gradient is near zero can move ~1e-5 apart (seen with timm 1.0.31). A broken
    # accumulation (an update per micro-batch, or a mis-scaled loss) moves weights apart by ~lr = 5e-4.
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=5e-5) for k in weights[0])


def test_channels_last_changes_the_layout_not_the_training(data, tmp_path):
    """NHWC weights (`train.channels_last`, the default) train the same model up to float rounding, and the
    saved checkpoint is in the usual contiguous layout either way."""
    runs, accelerator = {}, Accelerator()
    for channels_last in (False, True):
        settings = train_script.settings(epochs=1, steps=2, ema_decay=None)
        settings.channels_last = channels_last
        out = tmp_path / f"cl{int(channels_last)}"
        runs[channels_last] = train_script.train(data, out, accelerator, settings, mixup_prob=0.0, drop_rate=0.0)
    assert runs[True]["train_loss"] == pytest.approx(runs[False]["train_loss"], rel=1e-5)
    weights = {cl: _state_dict(tmp_path / f"cl{int(cl)}" / "model.pt") for cl in (False, True)}
    assert all(t.is_contiguous() for t in weights[True].values())
    # The epoch checkpoints hold the weights as trained: NHWC with the setting on, NCHW without.
    raw = {cl: torch.load(tmp_path / f"cl{int(cl)}" / "checkpoints" / "epoch_000" / "pytorch_model.bin",
                          weights_only=True) for cl in (False, True)}
    convs = [k for k, t in raw[True].items() if t.dim() == 4 and t.shape[1] > 1 and t.shape[2] > 1]
    assert convs and all(raw[True][k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    assert all(not raw[True][k].is_contiguous() and raw[False][k].is_contiguous() for k in convs)
    # As in the accumulation test: rounding moves a near-zero-gradient weight ~1e-5 under Adam, a wrong
    # model ~lr = 5e-4.
    assert all(torch.allclose(weights[False][k], weights[True][k], atol=5e-5) for k in weights[False])
    assert shipped("train").channels_last  # the shipped default


# ----------------------------------------------------------------------------- a real fit


def test_fit_writes_loadable_model_metrics_and_checkpoints(wandb_run):
    out, result = wandb_run
    model, ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["classes"] == train_script.CLASSES
    assert ckpt["extra"]["window_s"] == train_script.WINDOW_S and ckpt["extra"]["sample_rate_hz"] == 8000
    with torch.no_grad():
        assert model(torch.zeros(2, 8000))["logits"].shape == (2, 3)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert metrics["step"] == 6 and len(metrics["history"]) == 3
    # The kept epoch is the best by val_soundscape_auc (labeled soundscapes exist), the earliest of equals.
    scores = [h["val_soundscape_auc"] for h in metrics["history"]]
    assert metrics["selected_by"] == "val_soundscape_auc" and metrics["epoch"] == metrics["selected_epoch"]
    assert metrics["selected_epoch"] == scores.index(max(scores))
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert 0.0 <= metrics["val_clip_auc"] <= 1.0 and 0.0 <= metrics["val_soundscape_auc"] <= 1.0
    # Only the last two complete checkpoints are kept, each with its marker and state, beside the
    # selection's arrays (and the best epoch's weights when it was not the last epoch at the time).
    kept = complete_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == ["epoch_001", "epoch_002"]
    assert {p.name for p in (out / "checkpoints").iterdir()} - {"best.pt"} == {"epoch_001", "epoch_002", "best.npz"}
    assert json.loads((kept[-1] / STATE_FILE).read_text())["step"] == 6
    # The saved model holds the EMA weights, not the raw ones of the last checkpoint.
    raw = torch.load(kept[-1] / "pytorch_model.bin", weights_only=True)
    name = "head.cla.weight"
    assert not torch.equal(raw[name], ckpt["state_dict"][name])


def test_fit_is_the_one_writer_of_metrics_json_with_the_callers_keys(data, tmp_path, monkeypatch):
    """`extra_metrics` (a round's number, arm, ...) follow the metrics in the result and in metrics.json."""
    import functools

    from birdrounds import train

    extra = {"round": 1, "arm": "student", "init_weights_hash": "abc", "pseudo": {"chunks": 3}}
    monkeypatch.setattr(train_script, "fit", functools.partial(train.fit, extra_metrics=extra))
    out = tmp_path / "round_1"
    result = train_script.train(data, out, Accelerator(), train_script.settings(epochs=1, steps=1))
    assert list(result)[-len(extra) - 1:] == ["history", *extra] and {k: result[k] for k in extra} == extra
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))
    assert "round" not in load_checkpoint(out / "model.pt")[1]["extra"]  # the checkpoint keeps the metrics only


def _wandb_records(path: Path):
    """Records of a wandb offline transaction log: LevelDB log format (a 7-byte ':W&B' file header, then
    32 KiB blocks of records with 7-byte headers: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    raw, header = path.read_bytes(), 7
    assert raw[:4] == b":W&B"
    pos, pending = header, b""
    while pos + header <= len(raw):
        if 32768 - pos % 32768 < header:  # block trailer too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + header])
        pending += raw[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    """A logged item's name: wandb stores it in `key` or, split at "/", in `nested_key`."""
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_config_metrics_and_model_artifact(wandb_run):
    out, result = wandb_run
    (log_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, artifacts = {}, {}, []
    for record in _wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(row)
        elif kind == "config":
            config.update({_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "artifact":
            artifacts.append(record.artifact)
    last = history[result["step"]]  # the last epoch's metrics, whichever epoch the fit kept
    assert last["epoch/val_clip_auc"] == pytest.approx(result["history"][-1]["val_clip_auc"])
    assert last["epoch/train_loss"] == pytest.approx(result["history"][-1]["train_loss"])
    assert all("train/loss" in history[step] and "train/lr" in history[step] for step in range(1, 7))
    assert config["train"] == {"mixup_prob": 0.5, "drop_rate": 0.1}
    assert [a.type for a in artifacts] == ["model"]


# ----------------------------------------------------------------------------- multi-process, resume


@pytest.mark.slow
def test_two_process_accelerate_launch_matches_single_process(data, tmp_path):
    """Same global batch (2 x 4 vs 1 x 8) on the same samples per step, so the runs agree up to
    float summation order (DDP averages two half-batch gradients). MixUp and dropout are off and the
    backbone uses LayerNorm: with them each process would draw its own masks and partners and normalise
    over its half batch, which changes the loss by 10-25% here. Tolerance: 1e-4 relative."""
    options = ["--mixup-prob", "0", "--drop-rate", "0", "--epochs", "2", "--steps", "3"]
    accelerate = Path(sys.executable).parent / "accelerate"
    launch = [str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml")]
    subprocess.run([*launch, str(SCRIPT), "--data", str(data), "--out", str(tmp_path / "ddp"), "--batch-size", "4",
                    *options], check=True, env=_env(), cwd=REPO, timeout=300)
    single = train_script.train(data, tmp_path / "single", Accelerator(), train_script.settings(batch_size=8),
                                mixup_prob=0.0, drop_rate=0.0)
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["num_processes"] == 2 and single["num_processes"] == 1
    assert ddp["step"] == single["step"] == 6
    assert [h["lr"] for h in ddp["history"]] == pytest.approx([h["lr"] for h in single["history"]])
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
    # The same checkpoint format: model.pt keys and the files of an epoch checkpoint.
    assert _state_dict(tmp_path / "ddp" / "model.pt").keys() == _state_dict(tmp_path / "single" / "model.pt").keys()
    ddp_files, single_files = [{p.name for p in complete_checkpoints(d / "checkpoints")[-1].iterdir()}
                               for d in (tmp_path / "ddp", tmp_path / "single")]
    # Each process keeps its own RNG state.
    assert ddp_files - single_files == {"random_states_1.pkl"} and single_files <= ddp_files


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(data, tmp_path):
    """SIGKILL after the first epoch checkpoint is complete, rerun, compare with an uninterrupted run.
    Every epoch reseeds its sampler, windows, MixUp workers and dropout from (seed, epoch), so the
    resumed run is bitwise identical on CPU; the tolerance only absorbs nondeterministic kernels."""
    options = ["--data", str(data), "--epochs", "3", "--steps", "3", "--num-workers", "1"]
    subprocess.run([sys.executable, str(SCRIPT), *options, "--out", str(tmp_path / "straight")],
                   check=True, env=_env(), timeout=300, capture_output=True)

    out = tmp_path / "killed"
    # A slow collate (0.4 s per batch) leaves time to kill the run during its second epoch.
    command = [sys.executable, str(SCRIPT), *options, "--out", str(out), "--delay-s", "0.4"]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "epoch_000" / COMPLETE_MARKER
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert marker.exists() and not (out / "model.pt").exists()
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["epoch_000"]

    resumed = subprocess.run(command, env=_env(), timeout=300, capture_output=True, text=True, check=True)
    assert "resumed from" in resumed.stderr and "epoch_000" in resumed.stderr
    straight, again = _state_dict(tmp_path / "straight" / "model.pt"), _state_dict(out / "model.pt")
    for name, value in straight.items():
        assert torch.allclose(value.float(), again[name].float(), rtol=0, atol=1e-6), name
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "straight", out)]
    assert metrics[0]["train_loss"] == pytest.approx(metrics[1]["train_loss"], rel=1e-6)


def test_a_damaged_epoch_checkpoint_marked_complete_falls_back_to_the_one_before(data, tmp_path, caplog):
    """The newest complete epoch checkpoint's weights truncated on disk: the rerun names it, resumes from the
    one before, and ends with the weights of the uninterrupted run (every epoch reseeds from (seed, epoch))."""
    import logging

    out = tmp_path / "run"
    train_script.train(data, out, Accelerator(), train_script.settings(epochs=3))
    reference = _state_dict(out / "model.pt")
    done = complete_checkpoints(out / "checkpoints")
    assert [p.name for p in done] == ["epoch_001", "epoch_002"]
    weights = next(done[-1].glob("pytorch_model*"))
    weights.write_bytes(weights.read_bytes()[:1000])
    (out / "model.pt").unlink()
    with caplog.at_level(logging.INFO):
        train_script.train(data, out, Accelerator(), train_script.settings(epochs=3))
    text = caplog.text
    assert f"epoch checkpoint {done[-1]} cannot be read" in text and "resumed from" in text and "epoch_001" in text
    again = _state_dict(out / "model.pt")
    for name, value in reference.items():
        assert torch.allclose(value.float(), again[name].float(), rtol=0, atol=1e-6), name

    # Every epoch checkpoint damaged: one line naming the folder, no traceback from deep inside.
    for folder in complete_checkpoints(out / "checkpoints"):
        weights = next(folder.glob("pytorch_model*"))
        weights.write_bytes(b"")
    from birdrounds.model import CheckpointError

    with pytest.raises(CheckpointError, match="no epoch checkpoint there can be read"):
        train_script.train(data, out, Accelerator(), train_script.settings(epochs=3))
