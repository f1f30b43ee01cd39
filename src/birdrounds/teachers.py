"""Round 0 taught by a pretrained bird model (`teacher=probe`, `zero_shot` or `ensemble`) instead of our own CNN alone.

- **probe**: a small head (linear, or one hidden layer) trained on the external model's embeddings of the
  labeled recordings' 5-s chunks (Xeno-canto rows included), class-balanced, validated every few epochs
  and kept at its best epoch by `train.select_by`, like every round.
- **zero_shot**: the external model's own class scores, matched to `taxonomy.csv` by scientific name (case
  and spacing ignored); the matched and unmatched classes are written to the round folder. Classes it
  does not know score 0 everywhere.
- **ensemble**: our own CNN (trained first, like teacher=cnn) and one of the above, averaged class by class:
  `teacher.weight` x the external member + (1 - weight) x the CNN where the member knows the class, the CNN
  alone where it does not.

Either way the round is scored like any other (val_clip_auc on held-out recordings, val_soundscape_auc on
labeled soundscapes, val_mixed_auc on the mixed set) and writes its probabilities for every 5-s chunk of
`train_soundscapes/` to `teacher_chunks.parquet`, which round 1 de-noises into its pseudo-labels. The
embeddings come from a content-keyed cache (`birdrounds.external.FeatureCache`) under `data.cache_dir`,
computed over the processes of an `accelerate launch` (each its share of the files).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from birdrounds.artifacts import METRICS_FILE, TEACHER_CHUNKS_FILE, write_json_atomic
from birdrounds.config import ConfigError
from birdrounds.data.audio import AudioDecodeError
from birdrounds.data.prepare import PreparedData
from birdrounds.data.soundscapes import SoundscapeChunks, window_starts
from birdrounds.external import ExternalModel, FeatureCache, load_external, normalise_name
from birdrounds.contract import SCORED_CHUNK_S, row_id
from birdrounds.metrics import bootstrap_auc_interval, clip_arrays, scored_auc, soundscape_arrays
from birdrounds.pseudo import ROW_KEYS, model_probs, probs_for_rows, shard_range, write_pseudo_labels
from birdrounds.train import selected_index, selection_metric

log = logging.getLogger(__name__)

PROBE_FILE = "probe.pt"
ZERO_SHOT_FILE = "zero_shot_classes.json"


def is_external(cfg: DictConfig) -> bool:
    """Whether round 0 is taught by an external model (`teacher.kind` other than cnn)."""
    teacher = cfg.get("teacher")
    return teacher is not None and teacher.get("kind", "cnn") != "cnn"


# ------------------------------------------------------------------------------------------ features


@dataclass
class ChunkSet:
    """Chunks of one kind of audio: `starts[i]` (s) of `paths[i]`, flattened into rows by `owner`."""

    paths: list[str]
    starts: list[list[float]]
    embeddings: np.ndarray | None = None  # [rows, D]
    probs: np.ndarray | None = None  # [rows, C_external]
    owner: np.ndarray | None = None  # row -> index into paths

    def rows_of(self, keep: list[int]) -> None:
        """Drop paths that could not be read (`keep`: indices of those that could)."""
        self.paths = [self.paths[i] for i in keep]
        self.starts = [self.starts[i] for i in keep]


def recording_starts(n_samples: int, sample_rate_hz: int, max_chunks: int | None) -> list[float]:
    """5-s chunk starts over a recording (as soundscapes are cut), at most `max_chunks` of them, evenly spread."""
    window = int(round(SCORED_CHUNK_S * sample_rate_hz))
    starts = window_starts(n_samples, window, window, window // 2)
    if max_chunks and len(starts) > max_chunks:
        starts = [starts[int(i)] for i in np.linspace(0, len(starts) - 1, max_chunks).round()]
    return [s / sample_rate_hz for s in starts]


def item_audio(name: str, i: int, paths: list[str], audio: Any, mixed: Any) -> np.ndarray:
    """Item `i` of chunk set `name`: the mixed set's row `i` rendered, else the file `paths[i]` decoded."""
    if name == "mixed":
        return mixed.render(i)
    return np.asarray(audio.load(paths[i]), dtype=np.float32)


def compute_features(sets: dict[str, ChunkSet], cache: FeatureCache, prepared: PreparedData,
                     accelerator: Accelerator, mixed: Any = None,
                     prob_columns: np.ndarray | None = None) -> dict[str, ChunkSet] | None:
    """Every set with its embeddings and probabilities, each process computing its share of the files into the
    cache first; the main process then reads them all (the others get None).

    Only the external model's class columns `prob_columns` are kept in memory (None: no probabilities), so a
    6,522-class model over BirdCLEF's ~117,000 soundscape chunks stays small.
    """
    audio, sr = prepared.audio, prepared.audio.sample_rate_hz
    jobs = [(name, i) for name, s in sets.items() for i in range(len(s.paths))]
    n_mixed = len(mixed) if mixed is not None else 0
    jobs += [("mixed", i) for i in range(n_mixed)]
    rank, world = accelerator.process_index, accelerator.num_processes

    def wave_and_starts(name: str, i: int) -> tuple[np.ndarray, list[float]]:
        if name == "mixed":
            return item_audio(name, i, [], audio, mixed), [0.0]
        return item_audio(name, i, sets[name].paths, audio, mixed), sets[name].starts[i]

    kept: dict[tuple[str, int], tuple[np.ndarray, np.ndarray | None]] = {}  # this process's share, as it will be used

    def columns(p: np.ndarray | None) -> np.ndarray | None:
        return None if p is None or prob_columns is None else p[:, prob_columns].astype(np.float32)

    mine = shard_range(len(jobs), rank, world)
    log.info("external model %s: features of %d files and chunks (%d on process %d of %d)",
             cache.model.name, len(jobs), len(mine), rank, world)
    for j in tqdm(mine, desc=f"{cache.model.name} features", disable=not accelerator.is_local_main_process):
        name, i = jobs[j]
        try:
            wave, starts = wave_and_starts(name, i)
        except AudioDecodeError as err:
            log.warning("external teacher: skipping %s (%s)", sets[name].paths[i], err)
            continue
        e, p = cache.get(wave, sr, starts)
        if accelerator.is_main_process:
            kept[name, i] = e, columns(p)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    out: dict[str, ChunkSet] = {}
    for name, chunk_set in [*sets.items(), *([("mixed", ChunkSet([""] * n_mixed, [[0.0]] * n_mixed))] if n_mixed else [])]:
        embeddings, probs, owner, keep = [], [], [], []
        for i in range(len(chunk_set.paths)):
            if (name, i) in kept:
                e, p = kept[name, i]
            else:  # another process's share: read from the cache (its key needs the audio)
                try:
                    wave, starts = wave_and_starts(name, i)
                except AudioDecodeError:
                    continue  # warned above, by the process that owned it
                e, p = cache.get(wave, sr, starts)
                p = columns(p)
            keep.append(i)
            embeddings.append(e)
            probs.append(p)
            owner.extend([len(keep) - 1] * len(e))
        chunk_set = copy.copy(chunk_set)
        chunk_set.rows_of(keep)
        chunk_set.embeddings = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32)
        chunk_set.probs = np.concatenate(probs) if probs and probs[0] is not None else None
        chunk_set.owner = np.asarray(owner, dtype=np.int64)
        out[name] = chunk_set
    return out


# ------------------------------------------------------------------------------------------ scoring


def targets_of(table: pd.DataFrame, classes: list[str], secondary_weight: float) -> np.ndarray:
    """Recording targets [rows, C]: 1 for the primary label, `secondary_weight` for secondary labels."""
    index = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(table), len(classes)), dtype=np.float32)
    for r, (primary, secondary) in enumerate(zip(table["primary_label"], table.get("secondary_labels", [[]] * len(table)))):
        for label in secondary if isinstance(secondary, (list, tuple)) else []:
            if label in index:
                targets[r, index[label]] = max(targets[r, index[label]], secondary_weight)
        targets[r, index[str(primary)]] = 1.0
    return targets


class Scorer:
    """The round's validation scores from chunk probabilities of each validation set."""

    def __init__(self, feats: dict[str, ChunkSet], val_table: pd.DataFrame, classes: list[str],
                 solution: pd.DataFrame | None, mixed: Any) -> None:
        self.feats, self.classes, self.solution, self.mixed = feats, classes, solution, mixed
        by_path = {str(p): i for i, p in enumerate(val_table["path"].astype(str))}
        held = feats.get("held_out")
        self.clip_targets = (targets_of(val_table.iloc[[by_path[p] for p in held.paths]], classes, 0.0)
                             if held is not None and held.paths else None)
        vs = feats.get("val_soundscapes")
        self.val_row_ids = None
        if vs is not None and solution is not None and vs.paths:
            self.val_row_ids = np.array(_row_ids(vs))

    def arrays(self, probs: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        if self.clip_targets is not None and "held_out" in probs:
            held = self.feats["held_out"]
            per_recording = np.zeros((len(held.paths), len(self.classes)), dtype=np.float32)
            np.maximum.at(per_recording, held.owner, probs["held_out"])
            out["val_clip_auc"] = clip_arrays(per_recording, self.clip_targets)
        if self.val_row_ids is not None and "val_soundscapes" in probs:
            out["val_soundscape_auc"] = soundscape_arrays(probs["val_soundscapes"], self.val_row_ids, self.solution,
                                                          self.classes)
        if self.mixed is not None and "mixed" in probs:
            out["val_mixed_auc"] = self.mixed.arrays(probs["mixed"], np.arange(len(self.mixed)), self.classes)
        return out


def _row_ids(chunk_set: ChunkSet) -> list[str]:
    """Kaggle row ids of a soundscape set's chunks, in row order."""
    return [row_id(Path(chunk_set.paths[o]).stem, start + SCORED_CHUNK_S)
            for o, start in zip(chunk_set.owner, [s for starts in chunk_set.starts for s in starts])]


# ------------------------------------------------------------------------------------------ teachers


class ProbeHead(nn.Module):
    """Standardised embedding -> (dropout, hidden layer) -> class logits."""

    def __init__(self, dim: int, num_classes: int, hidden: int, dropout: float, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
        else:
            layers.append(nn.Linear(dim, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def probs(self, x: np.ndarray) -> np.ndarray:
        was = self.training
        self.eval()
        with torch.no_grad():
            out = torch.sigmoid(self(torch.as_tensor(x, dtype=torch.float32))).numpy()
        self.train(was)
        return out


def train_probe(settings: DictConfig, feats: dict[str, ChunkSet], train_table: pd.DataFrame, classes: list[str],
                secondary_weight: float, scorer: Scorer, select_by: str, seed: int) -> tuple[ProbeHead, list[dict], int, int]:
    """The probe's head at its selected epoch, the history, the selected index and the optimizer steps taken."""
    train = feats["train"]
    by_path = {str(p): i for i, p in enumerate(train_table["path"].astype(str))}
    rec_targets = targets_of(train_table.iloc[[by_path[p] for p in train.paths]], classes, secondary_weight)
    x, y = train.embeddings, rec_targets[train.owner]
    labeled_x = x
    primary = np.asarray(train_table.iloc[[by_path[p] for p in train.paths]]["primary_label"].astype(str))[train.owner]
    counts = pd.Series(primary).value_counts()
    weights = (1.0 / counts.reindex(primary).to_numpy()) ** float(settings.balance)
    weights = weights / weights.mean()
    unlabeled = feats.get("train_soundscapes")
    share = float(settings.unlabeled_weight)
    if share > 0 and unlabeled is not None and len(unlabeled.embeddings):
        # Unlabeled soundscape chunks as negatives of every class: each class is absent from nearly every chunk
        # (positive-unlabeled learning's simplest form). Without them the head never sees background sound and
        # gives it high probabilities, which make poor pseudo-labels.
        n = len(unlabeled.embeddings)
        x = np.concatenate([x, unlabeled.embeddings])
        y = np.concatenate([y, np.zeros((n, y.shape[1]), dtype=y.dtype)])
        weights = np.concatenate([weights, np.full(n, share * len(weights) / n)])
    torch.manual_seed(seed)
    head = ProbeHead(x.shape[1], len(classes), int(settings.hidden), float(settings.dropout),
                     labeled_x.mean(axis=0), labeled_x.std(axis=0) + 1e-6)
    optimizer = torch.optim.AdamW(head.parameters(), lr=float(settings.lr), weight_decay=float(settings.weight_decay))
    xt, yt, wt = (torch.as_tensor(a, dtype=torch.float32) for a in (x, y, weights))
    generator = torch.Generator().manual_seed(seed)
    history, best_state, steps = [], None, 0
    batch = int(settings.batch_size)
    for epoch in range(int(settings.epochs)):
        order = torch.randperm(len(xt), generator=generator)
        total = 0.0
        for first in range(0, len(order), batch):
            idx = order[first : first + batch]
            loss = (nn.functional.binary_cross_entropy_with_logits(head(xt[idx]), yt[idx], reduction="none")
                    .mean(dim=1) * wt[idx]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % int(settings.eval_every) and epoch + 1 != int(settings.epochs):
            continue
        probs = {name: head.probs(s.embeddings) for name, s in feats.items() if name != "train" and len(s.embeddings)}
        arrays = scorer.arrays(probs)
        history.append({"epoch": epoch, "train_loss": total / max(len(order), 1), "step": steps,
                        **{k: scored_auc(*v) for k, v in arrays.items()}})
        if selected_index(history, select_by) == len(history) - 1:
            best_state = copy.deepcopy(head.state_dict())
    chosen = selected_index(history, select_by)
    if best_state is not None and select_by != "last":
        head.load_state_dict(best_state)
    return head, history, chosen, steps


def zero_shot_map(model: ExternalModel, taxonomy: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """For each class, the index of the external label with its scientific name (-1: unknown), and the record."""
    if not model.labels:
        raise ConfigError(f"teacher.kind: zero_shot needs an external model with class scores and labels; "
                          f"{model.name} has none (use teacher=probe)")
    labels = {}
    for i, label in enumerate(model.labels):
        labels.setdefault(normalise_name(label), i)
    names = dict(zip(taxonomy["primary_label"].astype(str), taxonomy["scientific_name"].astype(str)))
    index = np.array([labels.get(normalise_name(names.get(c, "")), -1) for c in classes])
    matched = {c: model.labels[i] for c, i in zip(classes, index) if i >= 0}
    unmatched = {c: names.get(c, "") for c, i in zip(classes, index) if i < 0}
    if not matched:
        raise ConfigError(f"teacher.kind: zero_shot matched none of the {len(classes)} classes' scientific names "
                          f"(taxonomy.csv) to {model.name}'s labels (use teacher=probe)")
    record = {"model": model.name, "matched": matched, "unmatched": unmatched,
              "matched_count": len(matched), "classes": len(classes)}
    return index, record


def zero_shot_columns(index: np.ndarray) -> np.ndarray:
    """The external model's columns to keep for `zero_shot_map`'s index (one per class; unknown classes read 0)."""
    return np.maximum(index, 0)


def zero_shot_probs(selected: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Class probabilities from the external columns `zero_shot_columns(index)`: unknown classes score 0."""
    return np.where(index >= 0, selected, 0.0).astype(np.float32)


def model_chunk_probs(model: nn.Module, chunk_set: ChunkSet, wave_of: Callable[[int], np.ndarray], sample_rate_hz: int,
                      batch_size: int, device: Any) -> np.ndarray:
    """Our own model's probabilities [rows, C] for a chunk set's 5-s chunks, in its row order (`wave_of(i)`: the
    audio of `chunk_set.paths[i]`); a chunk that runs past the end is zero-padded, as soundscape chunks are."""
    window = int(round(SCORED_CHUNK_S * sample_rate_hz))
    model.eval().to(device)
    out, batch = [], []

    def flush() -> None:
        if batch:
            out.append(model_probs([model], torch.as_tensor(np.stack(batch)).to(device), framewise=False))
            batch.clear()

    with torch.inference_mode():
        for i, starts in enumerate(chunk_set.starts):
            wave = wave_of(i)
            for start in starts:
                first = int(round(start * sample_rate_hz))
                piece = np.zeros(window, dtype=np.float32)
                part = wave[first : first + window]
                piece[: len(part)] = part
                batch.append(piece)
                if len(batch) == batch_size:
                    flush()
        flush()
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def external_teacher_round(cfg: DictConfig, prepared: PreparedData, accelerator: Accelerator, round_dir: Path,
                           train_table: pd.DataFrame, val_table: pd.DataFrame, val_mixed: Any,
                           extra_metrics: dict[str, Any], cnn: nn.Module | None = None,
                           cnn_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Round 0 by an external model: features, the probe or the zero-shot mapping, scores, the chunk table.

    With `cnn` (teacher=ensemble: our own round-0 CNN, already trained, and its `cnn_metrics`), every chunk's
    probabilities are the class-by-class blend of the external member (`teacher.member`) and the CNN.
    """
    teacher = cfg.teacher
    kind = teacher.member if teacher.kind == "ensemble" else teacher.kind
    ext = OmegaConf.to_container(teacher.external, resolve=True)
    model = load_external(ext["backend"], ext.get("path"), card=ext.get("card"), labels=ext.get("labels"),
                          threads=int(ext.get("threads") or 1))
    data, audio = prepared.data, prepared.audio
    sr = audio.sample_rate_hz
    cache = FeatureCache(Path(cfg.data.cache_dir) / "features", model, SCORED_CHUNK_S)
    max_chunks = teacher.get("max_chunks_per_recording")

    def recordings(table: pd.DataFrame) -> ChunkSet:
        paths, starts = [], []
        for path in table["path"].astype(str):
            try:
                n = len(audio.load(path))
            except AudioDecodeError as err:
                log.warning("external teacher: skipping %s (%s)", path, err)
                continue
            paths.append(path)
            starts.append(recording_starts(n, sr, max_chunks))
        return ChunkSet(paths, starts)

    def soundscapes(files: list) -> tuple[ChunkSet, pd.DataFrame]:
        chunks = SoundscapeChunks(files, audio, window_s=SCORED_CHUNK_S, stride_s=SCORED_CHUNK_S)
        starts = chunks.rows.groupby("file", sort=False)["start_s"].agg(list)  # files in their row order
        return ChunkSet([str(f) for f in starts.index], starts.tolist()), chunks.rows[ROW_KEYS].reset_index(drop=True)

    sets: dict[str, ChunkSet] = {}
    if kind == "probe":
        sets["train"] = recordings(train_table)
    if len(val_table):
        sets["held_out"] = recordings(val_table)
    if data.val_solution is not None and data.val_soundscapes:
        sets["val_soundscapes"], _ = soundscapes(data.val_soundscapes)
    sets["train_soundscapes"], pseudo_rows = soundscapes(data.soundscapes)
    classes = list(data.classes)
    index, record = zero_shot_map(model, data.taxonomy, classes) if kind == "zero_shot" else (None, None)
    feats = compute_features(sets, cache, prepared, accelerator, mixed=val_mixed,
                             prob_columns=None if index is None else zero_shot_columns(index))
    if feats is None:
        accelerator.wait_for_everyone()
        return {}
    scorer = Scorer(feats, val_table, classes, data.val_solution if "val_soundscapes" in feats else None,
                    val_mixed)
    select_by = cfg.train.select_by
    round_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"kind": kind, **model.describe(), "backend": ext["backend"]}
    if kind == "probe":
        head, history, chosen, steps = train_probe(teacher.probe, feats, train_table, classes,
                                                   float(cfg.data.clips.secondary_weight), scorer, select_by, cfg.seed)

        def predict(chunk_set: ChunkSet) -> np.ndarray:
            return head.probs(chunk_set.embeddings)

        torch.save({"state_dict": head.state_dict(), "classes": classes, "external": info,
                    "settings": OmegaConf.to_container(teacher.probe, resolve=True)}, round_dir / PROBE_FILE)
        info.update(train_chunks=len(feats["train"].embeddings), embedding_dim=int(feats["train"].embeddings.shape[1]))
    else:
        write_json_atomic(round_dir / ZERO_SHOT_FILE, record)
        log.info("zero-shot: %d of %d classes matched to %s by scientific name (%s)", record["matched_count"],
                 len(classes), model.name, round_dir / ZERO_SHOT_FILE)

        def predict(chunk_set: ChunkSet) -> np.ndarray:
            return zero_shot_probs(chunk_set.probs, index)

        history, chosen, steps = [], 0, None
        info.update(matched_classes=record["matched_count"])
    chunk_probs = {name: predict(s) for name, s in feats.items() if name != "train" and len(s.embeddings)}
    arrays = scorer.arrays(chunk_probs)
    if kind == "zero_shot":
        history = [{"epoch": 0, **{k: scored_auc(*v) for k, v in arrays.items()}}]
    if cnn is not None:
        # The ensemble: the member's probabilities (at its selected epoch) blended with the CNN's on every chunk.
        known = index >= 0 if index is not None else np.ones(len(classes), dtype=bool)
        weight = np.where(known, float(teacher.weight), 0.0).astype(np.float32)

        member = dict(history[chosen])
        for name in chunk_probs:
            def wave_of(i: int, name: str = name) -> np.ndarray:
                return item_audio(name, i, feats[name].paths, audio, val_mixed)

            own = model_chunk_probs(cnn, feats[name], wave_of, sr, int(cfg.train.batch_size), accelerator.device)
            chunk_probs[name] = weight * chunk_probs[name] + (1.0 - weight) * own
        arrays = scorer.arrays(chunk_probs)
        history = [{"epoch": 0, **{k: scored_auc(*v) for k, v in arrays.items()}}]
        chosen, steps = 0, None
        info.update(kind="ensemble", member=kind, weight=float(teacher.weight), member_knows=int(known.sum()),
                    members={"cnn": {k: v for k, v in (cnn_metrics or {}).items() if k.startswith("val_")},
                             kind: {k: v for k, v in member.items() if k.startswith("val_") or k == "epoch"}})
    final = dict(history[chosen])
    key = selection_metric(select_by, final)
    selection: dict[str, Any] = {"selected_by": key, "mode": "last" if select_by == "last" else "best",
                                 "epoch": final["epoch"], "epochs": len(history)}
    if key is not None and key in arrays:
        low, high = bootstrap_auc_interval(*arrays[key])
        selection.update(score=final.get(key), last_epoch_score=history[-1].get(key),
                         interval_95=[round(low, 4), round(high, 4)])
    write_pseudo_labels(round_dir / TEACHER_CHUNKS_FILE, pseudo_rows, _aligned(feats["train_soundscapes"], pseudo_rows,
                                                                             chunk_probs.get("train_soundscapes"), classes),
                        classes, {"round": 0, "teacher": info, "window_s": SCORED_CHUNK_S})
    metrics = {**final, **({"step": steps} if steps is not None else {}), "num_processes": accelerator.num_processes,
               "selected_by": key, "selected_epoch": final["epoch"], "selection": selection, "history": history,
               "external_teacher": info, **extra_metrics}
    write_json_atomic(round_dir / METRICS_FILE, metrics)
    log.info("external teacher (%s, %s): %s", teacher.kind, model.name,
             {k: round(v, 4) for k, v in final.items() if k.startswith("val_") and v is not None})
    accelerator.wait_for_everyone()
    return metrics


def _aligned(chunk_set: ChunkSet, rows: pd.DataFrame, probs: np.ndarray | None, classes: list[str]) -> np.ndarray:
    """The train-soundscape chunk probabilities in `rows`' order (every row present, unreadable files at 0)."""
    if probs is None or not len(probs):
        return np.zeros((len(rows), len(classes)), dtype=np.float32)
    return probs_for_rows(_row_ids(chunk_set), probs, rows["row_id"])
