"""The one training loop for teachers and students, written out with HF Accelerate's calls.

The same code runs on one CPU, one GPU or many processes under `accelerate launch`: the launcher
decides how many processes, the loop has no DDP branches. Only the main process writes files and
logs; validation gathers predictions from every process with `gather_for_metrics`.

Every random choice of an epoch is a function of (seed, epoch), so a run resumed from an epoch
checkpoint reaches the same weights as one that was never interrupted: the sample order
(EpochSampler), the dataset's windows and augmentation and the collate's RNG (their `set_epoch`), the
DataLoader workers' seeds (and so MixUp run in workers), and dropout (global RNGs, reseeded per
process). A collate that keeps its own RNG without `set_epoch` is only reproducible in workers
(num_workers > 0): in the main process its state would restart with the resumed process.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from birdrounds.artifacts import METRICS_FILE, MODEL_FILE, atomic_open, json_safe, write_json_atomic
from birdrounds.checks import SELECTION_ORDER, TRAIN_RULES
from birdrounds.config import redact_secrets, redacted_argv
from birdrounds.metrics import ROW_ID_COLUMN, bootstrap_auc_interval, clip_arrays, scored_auc, soundscape_arrays
from birdrounds.model import CheckpointError, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from birdrounds.data.mixed_val import MixedValidation

log = get_logger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "state.json"
LOOP_STATE_FILE = "loop_state.pt"
BEST_FILE = "best.pt"          # checkpoints/best.pt: the epoch the selection metric prefers so far
BEST_ARRAYS_FILE = "best.npz"  # its validation truth and scores, for the bootstrap interval after a resume

LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor, "torch.Tensor | None"], dict[str, torch.Tensor]]


# ----------------------------------------------------------------------------- settings


@dataclass
class _CosineWarmup:
    """LR factor at optimizer update `step`: linear warmup, then cosine cycles down to `floor`.

    A plain object (not a lambda) so LambdaLR's state_dict stores its numbers in checkpoints.
    """

    total_steps: int
    warmup_steps: int
    cycle_steps: int
    floor: float

    def __call__(self, step: int) -> float:
        if step >= self.total_steps:
            return self.floor
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        cycle = step // self.cycle_steps
        # The first cycle's cosine starts after the warmup; later cycles restart at full LR.
        start = max(self.warmup_steps, cycle * self.cycle_steps)
        end = min(self.total_steps, (cycle + 1) * self.cycle_steps)
        position = min(1.0, (step - start) / max(1, end - start))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * position))


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float,
    restart_epochs: float | None,
    min_lr: float,
) -> LambdaLR:
    """Per-update schedule: linear warmup to each group's lr, cosine to `min_lr`, restarting every `restart_epochs`."""
    total = max(1, steps_per_epoch * epochs)
    warmup = round(warmup_epochs * steps_per_epoch)
    cycle = max(1, round(restart_epochs * steps_per_epoch)) if restart_epochs else total
    factors = [_CosineWarmup(total, warmup, cycle, min(1.0, min_lr / group["lr"])) for group in optimizer.param_groups]
    return LambdaLR(optimizer, factors)


@dataclass(kw_only=True)
class TrainSettings:
    """How to train; Hydra builds it from configs/train/*.yaml (optimizer and scheduler as partials), which
    hold every value (`birdrounds.config.shipped("train")` builds the shipped one outside a run).

    `batch_size` is per process: one optimizer update sees
    batch_size x num_processes x grad_accum_steps samples. `mixed_precision` is read by whoever builds
    the Accelerator ("no" on CPU, "bf16"/"fp16" on GPU); fit itself takes it from the Accelerator.
    `channels_last` trains with NHWC weights (checkpoints are written in the usual layout).
    """

    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., LRScheduler]
    epochs: int
    batch_size: int
    val_batch_size: int | None
    num_workers: int
    prefetch_factor: int
    grad_accum_steps: int
    max_grad_norm: float | None
    max_steps_per_epoch: int | None
    seed: int
    ema_decay: float | None
    mixed_precision: str | None
    channels_last: bool
    keep_checkpoints: int
    log_every_steps: int
    select_by: str

    def __post_init__(self) -> None:
        for name, rule in TRAIN_RULES.items():  # the rules config.validate checks before a run
            rule.check(f"train.{name}", getattr(self, name))


@dataclass(kw_only=True)
class LoggerSettings:
    """Accelerate trackers (configs/logger/*.yaml hold every value): `log_with: null` turns logging off."""

    log_with: str | None
    project: str
    mode: str
    run_name: str | None
    tags: list[str]
    log_model_artifact: bool

    def init_kwargs(self, out_dir: Path) -> dict[str, dict[str, Any]]:
        """Per-tracker `init_trackers` kwargs; the wandb run folder goes under `out_dir`."""
        wandb = {"mode": self.mode, "dir": str(out_dir), "name": self.run_name, "tags": list(self.tags)}
        return {"wandb": wandb}


# ----------------------------------------------------------------------------- data


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """A well-mixed 32-bit seed for (seed, epoch, ...)."""
    return int(np.random.SeedSequence([seed, epoch, *more]).generate_state(1, np.uint32)[0])


class EpochSampler(Sampler[int]):
    """One epoch of indices as a pure function of (seed, epoch): the caller's sampler or a permutation.

    Owns the generator of `base` (e.g. a WeightedRandomSampler) so that every process draws the same
    global order, which Accelerate then shards; `num_samples` caps the epoch (smoke runs).
    """

    def __init__(self, dataset_len: int, seed: int, base: Sampler[int] | None = None, num_samples: int | None = None):
        self.dataset_len, self.seed, self.base = dataset_len, seed, base
        self.generator = torch.Generator()
        if base is not None:
            if not hasattr(base, "generator"):
                raise TypeError(f"{type(base).__name__} has no `generator`; fit cannot make its order reproducible")
            base.generator = self.generator
        full = len(base) if base is not None else dataset_len
        self.num_samples = full if num_samples is None else min(full, num_samples)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Reseed so this epoch's order depends only on (seed, epoch)."""
        self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.base is not None:
            order: Iterable[int] = self.base
        else:
            order = torch.randperm(self.dataset_len, generator=self.generator).tolist()
        return itertools.islice(iter(order), self.num_samples)


def _loader_kwargs(settings: TrainSettings, accelerator: Accelerator) -> dict[str, Any]:
    """DataLoader options shared by training and validation."""
    kwargs: dict[str, Any] = dict(
        num_workers=settings.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    if settings.num_workers > 0:
        # Non-persistent workers: each epoch's workers get a fresh copy of the dataset, so
        # `set_epoch` reaches them (persistent workers would keep epoch 0's windows forever).
        kwargs.update(persistent_workers=False, prefetch_factor=settings.prefetch_factor)
    return kwargs


def _train_loader(
    train_set: Dataset, sampler: Sampler[int] | None, collate_fn: Callable | None,
    settings: TrainSettings, accelerator: Accelerator,
) -> tuple[DataLoader, EpochSampler]:
    """Training loader over an EpochSampler; full batches only (BatchNorm cannot train on one sample)."""
    cap = None
    if settings.max_steps_per_epoch is not None:
        per_update = settings.batch_size * accelerator.num_processes * settings.grad_accum_steps
        cap = settings.max_steps_per_epoch * per_update
    epoch_sampler = EpochSampler(len(train_set), settings.seed, sampler, cap)
    loader = DataLoader(
        train_set, batch_size=settings.batch_size, sampler=epoch_sampler, collate_fn=collate_fn,
        drop_last=True, **_loader_kwargs(settings, accelerator),
    )
    return loader, epoch_sampler


def _eval_loader(dataset: Dataset | None, settings: TrainSettings, accelerator: Accelerator) -> DataLoader | None:
    """In-order loader for validation; Accelerate pads the last batch and gather_for_metrics drops the pad."""
    if dataset is None:
        return None
    batch_size = settings.val_batch_size or settings.batch_size
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **_loader_kwargs(settings, accelerator))


def _seed_epoch(accelerator: Accelerator, seed: int, epoch: int, parts: Iterable[Any]) -> None:
    """Reseed global RNGs (per process) and everything with `set_epoch` (the same on every process)."""
    set_seed(epoch_seed(seed, epoch, accelerator.process_index))
    for part in parts:
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


class _WaitClock:
    """Accumulates the time spent blocked on the next batch, to tell data-bound from compute-bound."""

    def __init__(self) -> None:
        self.wait_s = 0.0

    def iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """Yield from `iterable`, timing each `next`."""
        iterator = iter(iterable)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.wait_s += time.perf_counter() - start
            yield item


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Run:
    """The prepared objects and counters one `fit` call threads through its steps."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    train_loader: DataLoader
    loss_fn: LossFn
    settings: TrainSettings
    ema: ModelEmaV3 | None
    batch_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    steps_per_epoch: int = 0  # optimizer updates per epoch
    step: int = 0
    lr: float = 0.0  # of the latest update

    def eval_model(self) -> nn.Module:
        """The weights that are validated and saved: the EMA copy when on."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)


def fit(
    accelerator: Accelerator,
    model: nn.Module,
    train_set: Dataset,
    loss_fn: LossFn,
    classes: Sequence[str],
    out_dir: str | os.PathLike,
    settings: TrainSettings,
    *,
    sampler: Sampler[int] | None = None,
    collate_fn: Callable | None = None,
    batch_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    val_clips: Dataset | None = None,
    val_soundscapes: Dataset | None = None,
    val_solution: pd.DataFrame | None = None,
    val_mixed: MixedValidation | None = None,
    config: Mapping[str, Any] | None = None,
    logger: LoggerSettings | None = None,
    window_s: float | None = None,
    extra_metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `model`, resuming from the last complete epoch checkpoint in `out_dir`; return final metrics.

    Writes (main process only) out_dir/checkpoints/epoch_NNN/, out_dir/model.pt and out_dir/metrics.json
    (their only writer). `val_soundscapes` (SoundscapeChunks) needs `val_solution` (row_id + class
    columns). `val_mixed` (data.mixed_val.MixedValidation: held-out calls in soundscape backgrounds,
    scored by its own `score`) gives `val_mixed_auc`. `batch_transform` maps each training batch
    on the device before the forward pass (`data.augment_on: device`). `extra_metrics` follow the metrics in
    the result and in metrics.json (a round's number and arm). The caller owns the Accelerator (one per
    process, reusable for the next fit) and calls `end_training()` at the end.
    """
    out_dir = Path(out_dir)
    _check_launch(accelerator)
    if (val_soundscapes is None) != (val_solution is None):
        raise ValueError("val_soundscapes and val_solution come together")
    config = _plain_config(config)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    # Checkpoints must hold exactly this fit's model and optimizer: forget objects prepared earlier
    # on this Accelerator (e.g. by the previous round), or save_state would number them first.
    accelerator.free_memory()
    accelerator.gradient_accumulation_steps = settings.grad_accum_steps

    # Build: loaders, optimizer, EMA (a clean copy made before prepare), then let Accelerate wrap them.
    train_loader, epoch_sampler = _train_loader(train_set, sampler, collate_fn, settings, accelerator)
    model = model.to(accelerator.device)
    if settings.channels_last:
        # NHWC convolutions: on 2 CPU cores the demo model's step alone is 17-24% faster, its loop +6% (docs/results.md).
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=settings.ema_decay) if settings.ema_decay else None
    optimizer = settings.optimizer(model.parameters())
    model, optimizer, train_loader, clip_loader, soundscape_loader = accelerator.prepare(
        model, optimizer, train_loader,
        _eval_loader(val_clips, settings, accelerator), _eval_loader(val_soundscapes, settings, accelerator),
    )
    mixed_loader = accelerator.prepare(_eval_loader(val_mixed, settings, accelerator)) if val_mixed is not None else None
    # The schedule counts optimizer updates; stepped by hand once per update rather than prepared,
    # because a prepared scheduler advances num_processes times per update. It and the EMA are
    # checkpointed beside save_state's files (see _save_epoch_checkpoint).
    updates_per_epoch = math.ceil(len(train_loader) / settings.grad_accum_steps)
    scheduler = settings.scheduler(optimizer, steps_per_epoch=updates_per_epoch, epochs=settings.epochs)
    run = _Run(accelerator, model, optimizer, scheduler, train_loader, loss_fn, settings, ema, batch_transform,
               steps_per_epoch=updates_per_epoch)
    per_update = settings.batch_size * accelerator.num_processes * settings.grad_accum_steps
    log.info(f"schedule: {settings.epochs} epochs x {updates_per_epoch} optimizer steps = "
             f"{settings.epochs * updates_per_epoch} steps ({per_update} clips per step, "
             f"{len(epoch_sampler)} clips drawn per epoch)", main_process_only=True)

    start_epoch, history = _resume(run, out_dir / CHECKPOINTS_DIR)
    if logger is not None:
        with redacted_argv():  # the tracker records the config and the command line: no secrets in either
            accelerator.init_trackers(logger.project, config=redact_secrets(config),
                                      init_kwargs=logger.init_kwargs(out_dir))
    for epoch in range(start_epoch, settings.epochs):
        _seed_epoch(accelerator, settings.seed, epoch, [train_loader, epoch_sampler, train_set, collate_fn,
                                                       batch_transform])
        metrics = {"epoch": epoch, **_train_one_epoch(run, epoch)}
        arrays = _validate(run, classes, clip_loader, soundscape_loader, val_soundscapes, val_solution)
        if mixed_loader is not None:
            probs, index = _predict(run, mixed_loader, "index")
            arrays["val_mixed_auc"] = val_mixed.arrays(probs, index, classes)
        metrics.update({key: scored_auc(*pair) for key, pair in arrays.items()})
        accelerator.log({f"epoch/{k}": v for k, v in metrics.items()}, step=run.step)
        history.append(metrics)
        _keep_if_selected(run, out_dir / CHECKPOINTS_DIR, history, arrays, classes)
        _save_epoch_checkpoint(run, out_dir / CHECKPOINTS_DIR, epoch, history)
    return _finish(run, out_dir, history, classes, config, logger, window_s, extra_metrics or {})


def _check_launch(accelerator: Accelerator) -> None:
    """Fail fast when the launcher started several processes but each one thinks it is alone.

    Each would train its own copy and all would write the same files. Happens on machines without
    GPUs unless ACCELERATE_USE_CPU=1 (see configs/accelerate/cpu_2proc.yaml).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes but Accelerate sees {accelerator.num_processes}; "
            "without GPUs set ACCELERATE_USE_CPU=1 so they train together on the CPU"
        )


def _train_one_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """One pass over the training loader; returns epoch means of the loss terms, LR and throughput."""
    acc, settings = run.accelerator, run.settings
    run.model.train()
    sums: dict[str, torch.Tensor] = {}
    n_samples = 0
    clock, start = _WaitClock(), time.perf_counter()
    progress = tqdm(run.train_loader, desc=f"epoch {epoch}", disable=not acc.is_local_main_process, leave=False)
    for batch in clock.iterate(progress):
        if run.batch_transform is not None:
            batch = run.batch_transform(batch)
        with acc.accumulate(run.model):
            outputs = run.model(batch["audio"])
            terms = run.loss_fn(outputs, batch["target"], batch.get("weight"))
            acc.backward(terms["loss"])
            if acc.sync_gradients and settings.max_grad_norm:
                acc.clip_grad_norm_(run.model.parameters(), settings.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        batch_size = len(batch["audio"])
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() * batch_size
        n_samples += batch_size
        if acc.sync_gradients:
            _after_update(run, terms, progress)
    elapsed_s = time.perf_counter() - start
    means = _epoch_means(acc, sums, n_samples)
    samples_per_s = means.pop("train_n_samples") / elapsed_s
    # Wait share and throughput are the main process's view; they tell data-bound from compute-bound.
    return {**means, "lr": run.lr,
            "samples_per_s": samples_per_s, "data_wait_share": clock.wait_s / elapsed_s}


def _after_update(run: _Run, terms: dict[str, torch.Tensor], progress: tqdm) -> None:
    """Bookkeeping after an optimizer update: schedule, EMA, step counter, step logs."""
    acc = run.accelerator
    run.step += 1
    run.lr = run.scheduler.get_last_lr()[0]
    # An fp16 update skipped for overflow must not advance the schedule.
    if not acc.optimizer_step_was_skipped:
        run.scheduler.step()
    if run.ema is not None:
        run.ema.update(acc.unwrap_model(run.model), step=run.step)
    if run.step % run.settings.log_every_steps == 0:
        values = {f"train/{name}": value.item() for name, value in terms.items()}
        acc.log({**values, "train/lr": run.lr}, step=run.step)
        progress.set_postfix(loss=f"{values['train/loss']:.4f}")


def _epoch_means(acc: Accelerator, sums: dict[str, torch.Tensor], n_samples: int) -> dict[str, float]:
    """Per-sample means of the loss terms over all processes (`train_<term>`) and the sample count."""
    names = sorted(sums)
    local = torch.stack([torch.as_tensor(sums[n], device=acc.device) for n in names]
                        + [torch.tensor(float(n_samples), device=acc.device)])
    total = acc.reduce(local, reduction="sum").cpu()
    count = float(total[-1])
    means = {f"train_{name}": float(total[i]) / max(count, 1.0) for i, name in enumerate(names)}
    return {**means, "train_n_samples": count}


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def _predict(run: _Run, loader: DataLoader, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities [N, C] and `batch[key]` for the whole dataset, gathered from all processes."""
    model = run.eval_model()
    was_training = model.training
    model.eval()
    probs, keys = [], []
    for batch in tqdm(loader, desc=f"validate {key}", disable=not run.accelerator.is_local_main_process, leave=False):
        with run.accelerator.autocast():
            logits = model(batch["audio"])["logits"]
        p, k = run.accelerator.gather_for_metrics((torch.sigmoid(logits.float()), batch[key]))
        probs.append(p.cpu())
        keys.append(k.cpu())
    model.train(was_training)
    return torch.cat(probs).numpy(), torch.cat(keys).numpy()


def _validate(
    run: _Run, classes: Sequence[str], clip_loader: DataLoader | None, soundscape_loader: DataLoader | None,
    soundscapes: Any, solution: pd.DataFrame | None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(truth, scores) for val_clip_auc on held-out clips and val_soundscape_auc on labeled 5-s chunks, where given."""
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if clip_loader is not None:
        probs, targets = _predict(run, clip_loader, "target")
        arrays["val_clip_auc"] = clip_arrays(probs, targets)
    if soundscape_loader is not None:
        # Kaggle's 5-s rows (`soundscapes.rows.row_id`; items carry their `index`) against the solution.
        probs, index = _predict(run, soundscape_loader, "index")
        row_ids = soundscapes.rows[ROW_ID_COLUMN].to_numpy()[index]
        arrays["val_soundscape_auc"] = soundscape_arrays(probs, row_ids, solution, classes)
    return arrays


# ----------------------------------------------------------------------------- checkpoint selection


def selection_metric(select_by: str, metrics: Mapping[str, Any]) -> str | None:
    """The validation score that chooses (and describes) a fit's model: `select_by`, or for `auto`/`last`
    the first of SELECTION_ORDER the fit computes; None when it computes none."""
    candidates = SELECTION_ORDER if select_by in ("auto", "last") else (select_by,)
    return next((key for key in candidates if key in metrics), None)


def selected_index(history: Sequence[Mapping[str, Any]], select_by: str) -> int:
    """Index in `history` of the epoch a fit keeps: the last for `last` (or with no finite score), else the
    best by the selection metric (the earliest of equals)."""
    key = selection_metric(select_by, history[-1])
    if select_by == "last" or key is None:
        return len(history) - 1
    scores = [h.get(key) for h in history]
    finite = [i for i, v in enumerate(scores) if v is not None and np.isfinite(v)]
    return max(finite, key=lambda i: (scores[i], -i)) if finite else len(history) - 1


def _keep_if_selected(run: _Run, root: Path, history: list[dict[str, Any]],
                      arrays: dict[str, tuple[np.ndarray, np.ndarray]], classes: Sequence[str]) -> None:
    """When the newest epoch is the one selection keeps so far: its weights to best.pt (unless it is kept as
    the last epoch anyway) and its selection arrays to best.npz; both before the epoch's checkpoint is complete."""
    select_by = run.settings.select_by
    if selected_index(history, select_by) != len(history) - 1 or not run.accelerator.is_main_process:
        return
    epoch = history[-1]["epoch"]
    if select_by != "last":
        save_checkpoint(root / BEST_FILE, run.eval_model(), list(classes), extra={"epoch": epoch})
    key = selection_metric(select_by, history[-1])
    if key is not None:
        with atomic_open(root / BEST_ARRAYS_FILE, "wb") as f:
            np.savez(f, truth=arrays[key][0], scores=arrays[key][1], epoch=epoch)


def _selection(run: _Run, root: Path, history: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(index into history of the kept epoch, metrics.json's `selection` record); loads best.pt's weights
    into the model when an earlier epoch than the last is kept."""
    select_by = run.settings.select_by
    chosen = selected_index(history, select_by)
    epoch = history[chosen]["epoch"]
    if chosen != len(history) - 1:
        _, ckpt = load_checkpoint(root / BEST_FILE)
        if ckpt["extra"].get("epoch") != epoch:
            log.warning(f"{root / BEST_FILE} holds epoch {ckpt['extra'].get('epoch')}, not the selected epoch "
                        f"{epoch}: keeping the last epoch", main_process_only=True)
            chosen, epoch = len(history) - 1, history[-1]["epoch"]
        else:
            run.eval_model().load_state_dict(ckpt["state_dict"])
    key = selection_metric(select_by, history[chosen])
    record: dict[str, Any] = {"selected_by": key, "mode": "last" if select_by == "last" else "best",
                              "epoch": epoch, "epochs": len(history)}
    if key is not None:
        record.update(score=history[chosen].get(key), last_epoch_score=history[-1].get(key))
        interval = _selection_interval(root, epoch)
        if interval is not None:
            record["interval_95"] = list(interval)
        log.info(f"kept epoch {epoch} of {len(history)} by {key} = {record['score']:.4f} "
                 f"(95% bootstrap interval {interval}; last epoch {record['last_epoch_score']:.4f})",
                 main_process_only=True)
    return chosen, record


def _selection_interval(root: Path, epoch: int) -> tuple[float, float] | None:
    """The kept epoch's bootstrap interval of its selection score, from best.npz (None if it holds another epoch)."""
    path = root / BEST_ARRAYS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as saved:
            if int(saved["epoch"]) != epoch:
                return None
            truth, scores = saved["truth"], saved["scores"]
    except (OSError, ValueError, KeyError, EOFError) as err:  # damaged: the interval is left out, not the round
        log.warning(f"{path} cannot be read ({type(err).__name__}); the selection interval is left out",
                    main_process_only=True)
        return None
    low, high = bootstrap_auc_interval(truth, scores)
    return round(low, 4), round(high, 4)


# ----------------------------------------------------------------------------- checkpoints


def complete_checkpoints(root: Path) -> list[Path]:
    """Epoch checkpoint folders whose COMPLETE marker was written, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("epoch_*") if (p / COMPLETE_MARKER).is_file())


def _resume(run: _Run, root: Path) -> tuple[int, list[dict[str, Any]]]:
    """Load the latest complete checkpoint, if any; return the next epoch and the metric history."""
    done = complete_checkpoints(root)
    for folder in reversed(done):  # the newest that reads: a damaged one (marked COMPLETE) falls back
        try:
            run.accelerator.load_state(str(folder))
            loop_state = torch.load(folder / LOOP_STATE_FILE, map_location=run.accelerator.device, weights_only=True)
            run.scheduler.load_state_dict(loop_state["scheduler"])
            if run.ema is not None:
                run.ema.load_state_dict(loop_state["ema"])
            state = json.loads((folder / STATE_FILE).read_text())
        except Exception as err:  # torch, safetensors and json each raise their own for a damaged file
            log.warning(f"epoch checkpoint {folder} cannot be read ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); trying the one before it",
                        main_process_only=True)
            continue
        run.step = state["step"]
        log.info(f"resumed from {folder} (epoch {state['epoch']}, step {run.step})", main_process_only=True)
        return state["epoch"] + 1, state["history"]
    if done:
        raise CheckpointError(f"{root}: no epoch checkpoint there can be read ({', '.join(p.name for p in done)}); "
                              f"delete the folder to train the round from its start")
    return 0, []


def _save_epoch_checkpoint(run: _Run, root: Path, epoch: int, history: list[dict[str, Any]]) -> None:
    """Accelerate state (model, optimizer, RNG), scheduler + EMA, state.json, then the COMPLETE marker."""
    acc = run.accelerator
    path = root / f"epoch_{epoch:03d}"
    if acc.is_main_process and path.exists():
        shutil.rmtree(path)  # an incomplete folder left by a killed run
    acc.wait_for_everyone()
    # torch.save rather than safetensors: safetensors refuses to load a buffer that views part of a
    # larger storage, which torchaudio's periodic STFT window does.
    acc.save_state(str(path), safe_serialization=False)
    acc.wait_for_everyone()
    if acc.is_main_process:
        ema = run.ema.state_dict() if run.ema is not None else None
        torch.save({"scheduler": run.scheduler.state_dict(), "ema": ema}, path / LOOP_STATE_FILE)
        write_json_atomic(path / STATE_FILE, {"epoch": epoch, "step": run.step, "history": history})
        _fsync_tree(path)
        write_json_atomic(path / COMPLETE_MARKER, {"epoch": epoch})
        for old in sorted(root.glob("epoch_*"))[: -run.settings.keep_checkpoints]:
            shutil.rmtree(old)
    acc.wait_for_everyone()


def _fsync_tree(path: Path) -> None:
    """Flush every file under `path` to disk, so the marker never outlives the data after a crash."""
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _plain_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The resolved config as plain dicts (OmegaConf containers are converted)."""
    if config is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config)


# ----------------------------------------------------------------------------- final outputs


def _finish(
    run: _Run, out_dir: Path, history: list[dict[str, Any]], classes: Sequence[str],
    config: dict[str, Any], logger: LoggerSettings | None, window_s: float | None,
    extra_metrics: Mapping[str, Any],
) -> dict[str, Any]:
    """Write model.pt and metrics.json (main process), log the model artifact, finish the trackers."""
    acc = run.accelerator
    acc.wait_for_everyone()  # best.pt and best.npz are written by the main process
    chosen, selection = _selection(run, out_dir / CHECKPOINTS_DIR, history) if history else (None, {})
    final = {**(history[chosen] if history else {}), "step": run.step, "num_processes": acc.num_processes,
             "steps_per_epoch": run.steps_per_epoch, "selected_by": selection.get("selected_by"),
             "selected_epoch": selection.get("epoch"), "selection": selection}
    result = {**final, "history": history, **extra_metrics}
    if acc.is_main_process:
        model = run.eval_model()
        extra = {**final, "window_s": window_s, "sample_rate_hz": getattr(model, "sample_rate_hz", None)}
        save_checkpoint(out_dir / MODEL_FILE, model, list(classes), config, extra=json_safe(extra))
        write_json_atomic(out_dir / METRICS_FILE, result)
        if logger is not None and logger.log_model_artifact:
            _log_model_artifact(acc, out_dir / MODEL_FILE, final)
    acc.wait_for_everyone()
    # Finish this run's trackers but keep the process group (end_training would destroy it): the
    # caller may train again (the next round) and calls accelerator.end_training() when all is done.
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers.clear()
    acc.free_memory()
    return result


def _log_model_artifact(acc: Accelerator, path: Path, metrics: dict[str, Any]) -> None:
    """Attach the final checkpoint to the wandb run as a model artifact (no-op without wandb)."""
    if "wandb" not in [tracker.name for tracker in acc.trackers]:
        return
    import wandb

    run = acc.get_tracker("wandb", unwrap=True)
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=json_safe(metrics))
    # "immutable": reference the finished file in place instead of copying it to wandb's staging area.
    artifact.add_file(str(path), policy="immutable")
    run.log_artifact(artifact)
