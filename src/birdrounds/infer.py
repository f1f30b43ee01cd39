"""Standalone inference: exported ONNX models + a folder of soundscapes -> BirdCLEF submission CSV.

This file is both a module of the package (`birdrounds predict` imports it) and a script copied into
a Kaggle submission folder and run offline on CPU:

    python infer.py --model model.onnx --input-dir test_soundscapes --output submission.csv

so it imports only the standard library, numpy, soundfile and onnxruntime (scipy when present, for a
faster FFT and for resampling), and four modules of the package that the export copies beside it:
contract.py (the ONNX contract and the row ids), audio_io.py (decoding), melspec.py (the numpy mel
frontend) and postprocess.py (smoothing, file scaling). It never imports torch or the rest of birdrounds.

The ONNX contract (constants in contract.py; `birdrounds.export` writes it) is read from the graph's
metadata_props:
  birdrounds.format_version  "1"
  birdrounds.classes         JSON list of class names, in output column order
  birdrounds.sample_rate_hz  sample rate the model expects
  birdrounds.window_s        window length the model was trained on (seconds)
  birdrounds.input           "spectrogram": input `spec` float32 [batch, 1, n_mels, n_frames], the
                             normalised log-mel of `birdrounds.model.MelFrontend` (computed here by
                             `MelFrontendNumpy`); "waveform": input `waveform` float32 [batch, n_samples]
  birdrounds.frontend        JSON dict: sample_rate_hz, n_fft, hop_length, n_mels, f_min_hz, f_max_hz,
                             top_db (float or null), norm ("standard" | "minmax" | "standard_minmax")
  birdrounds.members         JSON list describing the ensemble members averaged inside the graph
  birdrounds.predict_settings  optional JSON dict: the `birdrounds predict` settings of the export's
                             config (RECORDED_SETTINGS: smoothing, file scaling, window stride, TTA
                             shift, expected duration); this script's defaults, which its flags override
Outputs: `probs` float32 [batch, n_classes] (sigmoid, already averaged over members) and, for SED
heads, `framewise_probs` float32 [batch, T', n_classes].

Pipeline: files are decoded by a thread pool (libsndfile releases the GIL), cut into windows and
turned into spectrograms by a producer thread, while model workers (one per core by default) each
run onnxruntime on a batch of their own (which also releases the GIL). Each distinct (input kind,
frontend, window) is computed once per window and fed to every model that shares it. Per file, chunk
probabilities are the mean over models; smoothing along the chunk axis and file-level scaling are
optional post-processing steps.

Rows: every file gets a row '<stem>_<end second>' per 5-s chunk (`row_id`, `row_ids`; the package
uses these too). An unreadable file gets `expected_duration_s` of zero rows. A truncated file
(decoding stops early, or yields less than its header declares, or an Ogg stream lacks its end page)
keeps the rows of its declared duration, or of `expected_duration_s` when its header declares none;
the audio that is missing counts as silence (zeros run through the model). Both are named in a
warning and counted in the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import queue
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __name__ == "__main__":
    # As a script: one BLAS thread for the frontend's mel projection, set before numpy loads. A
    # multi-threaded BLAS spins on the cores that decoding and onnxruntime need (measured: 120 -> 156
    # chunks/s on 2 cores). Imported as a module, `predict_files` limits it with threadpoolctl instead.
    for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np

if TYPE_CHECKING:  # onnxruntime is imported where a session is made: most importers want only the constants
    import onnxruntime as ort


# The ONNX contract, audio reading, the numpy frontend and post-processing live in modules of their own, which
# the package imports too; an export copies them beside this file.
if __package__:  # birdrounds.infer
    from . import audio_io, contract, melspec, postprocess
else:  # a script in an exported folder: the copies beside it (`python -I` leaves its folder off sys.path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import audio_io
    import contract
    import melspec
    import postprocess

ModelFormatError = contract.ModelFormatError  # raised throughout this file

try:  # limits BLAS threads at run time when this file is imported as a module; optional
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # pragma: no cover
    _threadpool_limits = None


def _single_thread_blas() -> Any:
    """Context: BLAS on one thread (see the note at the imports); a no-op without threadpoolctl."""
    return _threadpool_limits(limits=1, user_api="blas") if _threadpool_limits is not None else contextlib.nullcontext()



log = logging.getLogger("birdrounds.infer")


class OutputError(ValueError):
    """An output file that cannot be written (its folder cannot be created or written to)."""


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelInfo:
    """The birdrounds metadata of one ONNX file."""

    classes: list[str]
    sample_rate_hz: int
    window_s: float
    input_kind: str
    frontend: melspec.FrontendConfig | None
    members: list[Any]
    predict_settings: dict[str, Any] = field(default_factory=dict)   # recorded at export; {} when none


def parse_metadata(meta: dict[str, str], source: str = "model") -> ModelInfo:
    """Validate and parse the `birdrounds.*` metadata_props of an ONNX graph."""
    def get(key: str) -> str:
        if key not in meta:
            raise ModelFormatError(f"{source}: metadata {key} missing (not a birdrounds ONNX export?)")
        return meta[key]

    try:
        version = get(contract.META_FORMAT_VERSION)
        if version != contract.FORMAT_VERSION:
            raise ModelFormatError(f"{source}: {contract.META_FORMAT_VERSION} is {version!r}, "
                                   f"this code reads {contract.FORMAT_VERSION!r}")
        input_kind = get(contract.META_INPUT)
        if input_kind not in contract.INPUT_KINDS:
            raise ModelFormatError(f"{source}: {contract.META_INPUT} must be one of {sorted(contract.INPUT_KINDS)}, "
                                   f"got {input_kind!r}")
        classes = json.loads(get(contract.META_CLASSES))
        if not isinstance(classes, list) or not classes or len(set(map(str, classes))) != len(classes):
            raise ModelFormatError(f"{source}: {contract.META_CLASSES} must be a non-empty JSON list of "
                                   "distinct names")
        frontend_json = meta.get(contract.META_FRONTEND)
        if input_kind == "spectrogram" and frontend_json is None:
            get(contract.META_FRONTEND)  # raises the missing-key error
        frontend = melspec.FrontendConfig.from_dict(json.loads(frontend_json)) if frontend_json is not None else None
        info = ModelInfo(
            classes=[str(c) for c in classes], sample_rate_hz=int(get(contract.META_SAMPLE_RATE_HZ)),
            window_s=float(get(contract.META_WINDOW_S)), input_kind=input_kind, frontend=frontend,
            members=json.loads(meta.get(contract.META_MEMBERS, "[]")),
            predict_settings=parse_predict_settings(meta.get(contract.META_PREDICT_SETTINGS)),
        )
    except ModelFormatError:
        raise
    except (TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise ModelFormatError(f"{source}: bad birdrounds metadata: {err}") from err
    if info.window_s <= 0 or info.sample_rate_hz <= 0:
        raise ModelFormatError(f"{source}: window_s and sample_rate_hz must be positive")
    if frontend is not None and frontend.sample_rate_hz != info.sample_rate_hz:
        raise ModelFormatError(f"{source}: frontend sample rate {frontend.sample_rate_hz} Hz "
                               f"!= model's {info.sample_rate_hz} Hz")
    return info


def parse_predict_settings(text: str | None) -> dict[str, Any]:
    """The `contract.META_PREDICT_SETTINGS` JSON as InferenceSettings values, validated ({} when absent)."""
    if text is None:
        return {}
    values = json.loads(text)
    if not isinstance(values, dict) or set(values) - set(contract.RECORDED_SETTINGS):
        raise ValueError(f"{contract.META_PREDICT_SETTINGS} must be a JSON dict with keys among "
                         f"{list(contract.RECORDED_SETTINGS)}")
    if "smoothing" in values:
        values["smoothing"] = tuple(float(w) for w in values["smoothing"] or ())
    InferenceSettings(**values)  # raises ValueError for a bad value
    return values


def recorded_settings(settings: InferenceSettings) -> dict[str, Any]:
    """The `contract.RECORDED_SETTINGS` of `settings` as JSON values: what an export stores under
    `contract.META_PREDICT_SETTINGS`."""
    stride = settings.window_stride_s
    return {"smoothing": [float(w) for w in settings.smoothing], "file_scale_alpha": float(settings.file_scale_alpha),
            "window_stride_s": None if stride is None else float(stride), "tta_shift_s": float(settings.tta_shift_s),
            "expected_duration_s": float(settings.expected_duration_s)}


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it, else all of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def session_options(intra_op_threads: int | None = None, inter_op_threads: int = 1,
                    allow_spinning: bool = False) -> ort.SessionOptions:
    """CPU session options with explicit thread counts (None: one per core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_op_threads or usable_cores())
    opts.inter_op_num_threads = int(inter_op_threads)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning idle ORT threads would take the cores the decode and frontend threads need.
    spin = "1" if allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return opts


class OnnxModel:
    """One exported birdrounds graph on onnxruntime's CPU provider, with its parsed metadata."""

    def __init__(self, path: str | os.PathLike, options: ort.SessionOptions | None = None) -> None:
        import onnxruntime as ort

        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"model not found: {self.path}")
        try:
            self.session = ort.InferenceSession(self.path, sess_options=options or session_options(),
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            first_line = (str(err).strip().splitlines() or [""])[0]
            raise ModelFormatError(
                f"{self.path}: not a readable ONNX model ({type(err).__name__}: {first_line})") from None
        self.info = parse_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        self.input_name = contract.INPUT_KINDS[self.info.input_kind]
        inputs = {i.name: i for i in self.session.get_inputs()}
        if self.input_name not in inputs:
            raise ModelFormatError(f"{self.path}: a {self.info.input_kind} graph needs input {self.input_name!r}, "
                                   f"has {sorted(inputs)}")
        self.input_shape = list(inputs[self.input_name].shape)
        self.outputs = [o.name for o in self.session.get_outputs()]
        if contract.OUTPUT_PROBS not in self.outputs:
            raise ModelFormatError(f"{self.path}: output {contract.OUTPUT_PROBS!r} missing (outputs: {self.outputs})")

    @property
    def has_framewise(self) -> bool:
        """Whether the graph has the SED head's `framewise_probs` output."""
        return contract.OUTPUT_FRAMEWISE in self.outputs

    def run(self, inputs: np.ndarray, framewise: bool = False) -> np.ndarray:
        """Clip probs [B, C], or framewise probs [B, T', C] when `framewise`."""
        name = contract.OUTPUT_FRAMEWISE if framewise else contract.OUTPUT_PROBS
        out = self.session.run([name], {self.input_name: inputs})[0]
        if out.shape[-1] != len(self.info.classes):
            raise ModelFormatError(f"{self.path}: {out.shape[-1]} outputs for {len(self.info.classes)} classes")
        return np.asarray(out, dtype=np.float32)


class OpenVinoModel(OnnxModel):
    """The same graph compiled by OpenVINO for the CPU (optional `openvino` package), f32 or bf16.

    Metadata, names and shapes are read through onnxruntime (as `OnnxModel`); `run` uses OpenVINO.
    Spectrogram graphs only: OpenVINO's ONNX reader cannot take the waveform graph's dynamic STFT.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, precision: str = "f32",
                 streams: int = 1) -> None:
        super().__init__(path, session_options(1))
        try:
            import openvino
        except ImportError as err:
            raise ModelFormatError("engine openvino needs the openvino package (pip install openvino)") from err
        if self.info.input_kind != "spectrogram":
            raise ModelFormatError(f"{self.path}: OpenVINO runs spectrogram graphs only, this one is "
                                   f"{self.info.input_kind!r}")
        # `streams` requests run side by side (one per model worker), each on `threads` threads.
        streams = max(1, int(streams))
        config = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": streams,
                  "INFERENCE_NUM_THREADS": streams * int(threads or usable_cores())}
        core = openvino.Core()
        model = core.read_model(self.path)
        broadcast_channel_scales(model)
        self.compiled = core.compile_model(model, "CPU", config)
        self.session = None  # metadata is kept; onnxruntime's copy of the weights is released
        self._local = threading.local()  # one infer request per calling thread (model workers)

    def run(self, inputs: np.ndarray, framewise: bool = False) -> np.ndarray:
        """Clip probs [B, C], or framewise probs [B, T', C] when `framewise` (thread-safe)."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        name = contract.OUTPUT_FRAMEWISE if framewise else contract.OUTPUT_PROBS
        out = request.infer({self.input_name: inputs})[self.compiled.output(name)]
        return np.array(out, dtype=np.float32)  # a copy: the request reuses its output memory


def broadcast_channel_scales(model: Any) -> int:
    """In an OpenVINO model, feed each Resize-repeated channel scale [N, C, 1, 1] to its Multiply directly.

    The export repeats squeeze-excitation scales over H x W for ONNX Runtime's NCHWc kernels
    (`birdrounds.export.nchwc_friendly`); OpenVINO broadcasts natively and runs the original form
    3-4% faster (measured on EfficientNet-B0, one thread, f32 and bf16). Same values either way.
    """
    undone = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Interpolate":
            continue
        source = op.input_value(0)
        shape = source.get_partial_shape()
        targets = list(op.output(0).get_target_inputs())
        if (shape.rank.is_dynamic or shape.rank.get_length() != 4 or shape[2] != 1 or shape[3] != 1
                or not targets or any(t.get_node().get_type_name() != "Multiply" for t in targets)):
            continue
        for target in targets:
            target.replace_source_output(source)
        undone += 1
    if undone:
        model.validate_nodes_and_infer_types()
    return undone


ENGINES = ("onnxruntime", "openvino", "openvino_bf16")


def load_models(paths: Sequence[str | os.PathLike], intra_op_threads: int | None = None,
                inter_op_threads: int = 1, allow_spinning: bool = False, engine: str = "onnxruntime",
                model_workers: int = 1) -> list[OnnxModel]:
    """Open every model with the same engine and thread settings (onnxruntime is the default engine).

    `model_workers`: threads that will call each model at once (OpenVINO compiles one stream each;
    an onnxruntime session serves concurrent calls as it is).
    """
    if not paths:
        raise ValueError("no model given")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "onnxruntime":
        precision = "bf16" if engine == "openvino_bf16" else "f32"
        return [OpenVinoModel(p, intra_op_threads, precision, model_workers) for p in paths]
    options = session_options(intra_op_threads, inter_op_threads, allow_spinning)
    return [OnnxModel(p, options) for p in paths]


def ensemble_classes(models: Sequence[OnnxModel]) -> tuple[list[str], list[np.ndarray]]:
    """The first model's class order and, per model, the column index that maps its outputs to it."""
    classes = models[0].info.classes
    orders = []
    for model in models:
        if model.info.sample_rate_hz != models[0].info.sample_rate_hz:
            raise ModelFormatError(f"models disagree on sample rate: {models[0].path} "
                                   f"{models[0].info.sample_rate_hz} Hz, {model.path} {model.info.sample_rate_hz} Hz")
        if set(model.info.classes) != set(classes):
            raise ModelFormatError(f"{model.path} has other classes than {models[0].path}")
        position = {c: i for i, c in enumerate(model.info.classes)}
        orders.append(np.array([position[c] for c in classes]))
    return classes, orders


# ---------------------------------------------------------------- settings, files, audio


@dataclass(frozen=True)
class InferenceSettings:
    """How to run: chunking, windows, threads, batching and post-processing (defaults: BirdCLEF, no TTA)."""

    chunk_s: float = contract.SCORED_CHUNK_S  # scored chunk length; row ids end at multiples of it
    batch_size: int = 4                    # windows per model call (bench/inference.py: 4 fastest on 2 cores)
    intra_op_threads: int | None = 1       # onnxruntime threads per model call (None: one per core)
    model_workers: int | None = None       # model calls run side by side, on their own batches (None: one per core)
    inter_op_threads: int = 1
    allow_spinning: bool = False           # let idle ORT threads spin (faster alone, slower when sharing cores)
    decode_workers: int = 2                # threads decoding files ahead of the model
    fft_workers: int = 1                   # scipy.fft threads inside the frontend
    prefetch_batches: int = 2              # prepared batches waiting for the model
    window_stride_s: float | None = None   # stride of windows longer than a chunk (None: min(chunk, window))
    tta_shift_s: float = 0.0               # > 0: also predict windows shifted by -/+ this and average
    smoothing: tuple[float, ...] = ()      # odd-length kernel along chunks within a file; () = off
    file_scale_alpha: float = 0.0          # p * (1 - a + a * file max of p); 0 = off
    expected_duration_s: float = 60.0      # rows of an unreadable file, or a truncated one whose header declares none
    min_duration_s: float = 0.0            # files shorter than this get zero-padded rows up to it
    progress_every: int = 50               # log a progress line every this many files (0: never)
    engine: str = "onnxruntime"            # or "openvino" / "openvino_bf16" (spectrogram graphs, optional package)

    def __post_init__(self) -> None:
        if self.chunk_s <= 0 or self.expected_duration_s <= 0 or self.min_duration_s < 0:
            raise ValueError("chunk_s and expected_duration_s must be > 0, min_duration_s >= 0")
        if min(self.batch_size, self.decode_workers, self.prefetch_batches, self.n_model_workers) < 1:
            raise ValueError("batch_size, decode_workers, prefetch_batches and model_workers must be >= 1")
        if self.tta_shift_s < 0 or (self.window_stride_s is not None and self.window_stride_s <= 0):
            raise ValueError("tta_shift_s must be >= 0 and window_stride_s > 0")
        if not 0.0 <= self.file_scale_alpha <= 1.0:
            raise ValueError(f"file_scale_alpha must be in [0, 1], got {self.file_scale_alpha}")
        if self.smoothing:
            postprocess.validate_kernel(self.smoothing)
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")

    @property
    def n_model_workers(self) -> int:
        """`model_workers`, None resolved to the number of cores."""
        return int(self.model_workers if self.model_workers is not None else usable_cores())


@dataclass
class FileInfo:
    """One input file: its rows and, when it could not be read, why."""

    path: str
    stem: str
    n_chunks: int
    duration_s: float | None = None   # decoded duration; None when unreadable
    error: str | None = None          # why it could not be read: its rows are zeros
    truncated: str | None = None      # why it is incomplete: rows past the cut are predicted on silence

    @property
    def readable(self) -> bool:
        return self.error is None


def _n_chunks(n_samples: int, chunk: int) -> int:
    """Chunks covering `n_samples` (a trailing partial chunk counts; at least one)."""
    return max(1, -(-n_samples // chunk))


def _decode(path: Path, sample_rate_hz: int, settings: InferenceSettings) -> tuple[FileInfo, np.ndarray | None]:
    """Decode one file; never raises: an unreadable file gets `expected_duration_s` of zero rows, a
    truncated one the rows of its declared duration (else `expected_duration_s`), silence past the cut."""
    chunk = round(settings.chunk_s * sample_rate_hz)
    min_chunks = _n_chunks(round(settings.min_duration_s * sample_rate_hz), chunk) if settings.min_duration_s else 1
    expected_chunks = _n_chunks(round(settings.expected_duration_s * sample_rate_hz), chunk)
    try:
        audio = audio_io.decode_audio(path, sample_rate_hz)
    except Exception as err:  # whatever goes wrong with one file, the others and its rows go on
        n_chunks = max(expected_chunks, min_chunks)
        log.warning("cannot read %s (%s); writing %d rows of zeros", path, err, n_chunks)
        return FileInfo(str(path), path.stem, n_chunks, error=str(err) or type(err).__name__), None
    n_chunks = max(_n_chunks(len(audio.wave), chunk), min_chunks)
    if audio.truncated is not None:
        declared = _n_chunks(round(audio.declared_s * sample_rate_hz), chunk) if audio.declared_s else None
        n_chunks = max(n_chunks, declared or expected_chunks)
        log.warning("truncated file %s (%s); writing %d rows, the audio missing after %.1f s predicted as silence",
                    path, audio.truncated, n_chunks, len(audio.wave) / sample_rate_hz)
    info = FileInfo(str(path), path.stem, n_chunks, duration_s=len(audio.wave) / sample_rate_hz,
                    truncated=audio.truncated)
    return info, audio.wave


def _decode_in_order(files: Sequence[Path], sample_rate_hz: int,
                     settings: InferenceSettings) -> Iterator[tuple[FileInfo, np.ndarray | None]]:
    """Decoded files in input order; at most 2 * decode_workers decoded ahead (bounded memory)."""
    pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")
    pending: deque = deque()
    try:
        for path in files:
            pending.append(pool.submit(_decode, Path(path), sample_rate_hz, settings))
            if len(pending) >= 2 * settings.decode_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- windows and streams


def _window_starts(n_chunks: int, chunk: int, window: int, stride: int) -> np.ndarray:
    """Window starts (samples) from 0 every `stride` until one reaches the end of the last chunk."""
    span = n_chunks * chunk
    starts = list(range(0, max(span - window, 0) + 1, stride))
    if starts[-1] + window < span:
        starts.append(starts[-1] + stride)
    return np.array(starts, dtype=np.int64)


def _cut_windows(wave: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Windows [n, length] starting at `starts` (may lie outside the file), zero-padded outside it."""
    out = np.zeros((len(starts), length), dtype=np.float32)
    for row, start in enumerate(starts.tolist()):
        lo, hi = max(start, 0), min(start + length, len(wave))
        if hi > lo:
            out[row, lo - start : hi - start] = wave[lo:hi]
    return out


@dataclass
class _Stream:
    """Models sharing one input: the same window length and frontend (or raw waveform)."""

    models: list[tuple[OnnxModel, np.ndarray]]   # (model, column order into the ensemble's classes)
    window: int                                   # samples
    stride: int                                   # samples between windows (framewise streams)
    chunk: int                                    # samples per scored chunk
    shifts: np.ndarray                            # TTA offsets in samples, 0 first
    frontend: melspec.MelFrontendNumpy | None

    @property
    def framewise(self) -> bool:
        """Windows other than the scored chunks need the framewise output."""
        return self.window != self.chunk

    def plan(self, n_chunks: int) -> tuple[np.ndarray, np.ndarray]:
        """(window starts, chunk of each window or -1) for a file of `n_chunks` chunks."""
        if self.framewise:
            base = _window_starts(n_chunks, self.chunk, self.window, self.stride)
            starts = (base[:, None] + self.shifts[None, :]).ravel()
            return starts, np.full(len(starts), -1, dtype=np.int64)
        chunks = np.repeat(np.arange(n_chunks, dtype=np.int64), len(self.shifts))
        return chunks * self.chunk + np.tile(self.shifts, n_chunks), chunks

    def prepare(self, waves: np.ndarray) -> np.ndarray:
        """Model input for a batch of windows: spectrograms, or the waveforms themselves."""
        return self.frontend(waves) if self.frontend is not None else waves

    def to_chunks(self, outputs: np.ndarray, starts: np.ndarray, chunk_of: np.ndarray, n_chunks: int) -> np.ndarray:
        """Chunk probs [n_chunks, C] (float64) from one model's outputs for all windows of a file."""
        if self.framewise:
            return postprocess.overlap_to_chunks(outputs, starts, self.window, n_chunks, self.chunk)
        total = np.zeros((n_chunks, outputs.shape[-1]), dtype=np.float64)
        np.add.at(total, chunk_of, outputs)
        return total / np.bincount(chunk_of, minlength=n_chunks)[:, None]


def _build_streams(models: Sequence[OnnxModel], orders: Sequence[np.ndarray],
                   settings: InferenceSettings) -> list[_Stream]:
    """Group models by input so each window's frontend runs once for all models that share it."""
    sr = models[0].info.sample_rate_hz
    chunk = round(settings.chunk_s * sr)
    shift = round(settings.tta_shift_s * sr)
    shifts = np.array([0, -shift, shift] if shift else [0], dtype=np.int64)
    streams: dict[tuple, _Stream] = {}
    for model, order in zip(models, orders):
        info = model.info
        window = round(info.window_s * sr)
        stride = round(settings.window_stride_s * sr) if settings.window_stride_s else min(chunk, window)
        if window != chunk and not model.has_framewise:
            raise ModelFormatError(f"{model.path}: window {info.window_s} s differs from the {settings.chunk_s}-s "
                                   "chunk, which needs the framewise_probs output (SED head)")
        if stride > window:
            raise ValueError(f"window stride {stride / sr} s leaves gaps between {info.window_s}-s windows")
        frontend = info.frontend if info.input_kind == "spectrogram" else None
        key = (info.input_kind, frontend, window, stride)
        if key not in streams:
            numpy_frontend = melspec.MelFrontendNumpy(frontend, settings.fft_workers) if frontend is not None else None
            streams[key] = _Stream([], window, stride, chunk, shifts, numpy_frontend)
        _check_input_shape(model, streams[key])
        streams[key].models.append((model, order))
    return list(streams.values())


def _check_input_shape(model: OnnxModel, stream: _Stream) -> None:
    """Refuse a graph whose static input dimensions disagree with what this stream feeds it."""
    if stream.frontend is not None:
        cfg = stream.frontend.config
        want = [None, 1, cfg.n_mels, stream.frontend.n_frames(stream.window)]
    else:
        want = [None, stream.window]
    got = model.input_shape
    if len(got) != len(want) or any(isinstance(g, int) and w is not None and g != w for g, w in zip(got, want)):
        raise ModelFormatError(f"{model.path}: input {model.input_name} has shape {got}, expected {want}")


# ---------------------------------------------------------------- the producer / consumer pipeline


@dataclass
class _Batch:
    """Prepared model input for windows of one stream, and where each window belongs."""

    stream: int
    inputs: np.ndarray
    file_index: np.ndarray
    starts: np.ndarray
    chunk_of: np.ndarray


@dataclass
class _Pending:
    """Windows of one stream waiting to fill a batch."""

    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    size: int = 0

    def add(self, waves: np.ndarray, file_index: int, starts: np.ndarray, chunk_of: np.ndarray) -> None:
        self.parts.append((waves, np.full(len(waves), file_index), starts, chunk_of))
        self.size += len(waves)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The first `n` windows (waves, file index, start, chunk), keeping the rest.

        Only the parts the batch needs are joined; a batch inside one part is a view of it (no copy).
        """
        head: list[tuple] = []
        taken = 0
        while taken < n and self.parts:
            part = self.parts[0]
            need = n - taken
            if len(part[0]) <= need:
                head.append(self.parts.pop(0))
            else:
                head.append(tuple(column[:need] for column in part))
                self.parts[0] = tuple(column[need:] for column in part)
            taken += len(head[-1][0])
        self.size -= taken
        if len(head) == 1:
            return head[0]
        return tuple(np.concatenate(column) for column in zip(*head))


_DONE = object()


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put unless the consumer has stopped; False when it has."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(files: Sequence[Path], streams: list[_Stream], sample_rate_hz: int, settings: InferenceSettings,
             out: queue.Queue, stop: threading.Event) -> None:
    """Producer thread: decode, cut windows, run the frontend; send FileInfo and _Batch items, then _DONE."""
    try:
        pending = [_Pending() for _ in streams]

        def flush(s: int, minimum: int) -> bool:
            while pending[s].size >= minimum and pending[s].size > 0:
                waves, file_index, starts, chunk_of = pending[s].take(settings.batch_size)
                batch = _Batch(s, streams[s].prepare(waves), file_index, starts, chunk_of)
                if not _put(out, batch, stop):
                    return False
            return True

        for index, (info, wave) in enumerate(_decode_in_order(files, sample_rate_hz, settings)):
            if not _put(out, (index, info), stop):
                return
            if wave is None:
                continue
            for s, stream in enumerate(streams):
                starts, chunk_of = stream.plan(info.n_chunks)
                pending[s].add(_cut_windows(wave, starts, stream.window), index, starts, chunk_of)
                if not flush(s, settings.batch_size):
                    return
        for s in range(len(streams)):
            if not flush(s, 1):
                return
        _put(out, _DONE, stop)
    except BaseException as err:  # handed to the consumer, which re-raises it
        _put(out, err, stop)


class _Collector:
    """Consumer side: run the models, gather window outputs per file, average models into chunk probs."""

    def __init__(self, streams: list[_Stream], n_files: int, n_classes: int, settings: InferenceSettings) -> None:
        self.streams = streams
        self.n_classes = n_classes
        self.n_models = sum(len(s.models) for s in streams)
        self.settings = settings
        self.files: list[FileInfo | None] = [None] * n_files
        self.results: list[np.ndarray | None] = [None] * n_files
        self._windows: dict[tuple[int, int], dict[str, list]] = {}
        self._expected: dict[tuple[int, int], int] = {}
        self._sums: dict[int, np.ndarray] = {}
        self._models_done: dict[int, int] = {}
        self.files_done = 0
        self.chunks_done = 0
        self.start = time.perf_counter()
        self._lock = threading.Lock()   # model workers file their outputs concurrently

    def add_file(self, index: int, info: FileInfo) -> None:
        """Register a decoded file; an unreadable one is complete at once (zeros)."""
        with self._lock:
            self._add_file(index, info)

    def _add_file(self, index: int, info: FileInfo) -> None:
        self.files[index] = info
        if not info.readable:
            self._finish(index, np.zeros((info.n_chunks, self.n_classes), dtype=np.float32))
            return
        self._sums[index] = np.zeros((info.n_chunks, self.n_classes), dtype=np.float64)
        self._models_done[index] = 0
        for s, stream in enumerate(self.streams):
            self._expected[(index, s)] = len(stream.plan(info.n_chunks)[0])
            self._windows[(index, s)] = {"starts": [], "chunk_of": [], "outputs": [[] for _ in stream.models]}

    def add_batch(self, batch: _Batch) -> None:
        """Run every model of the batch's stream and file the outputs under their files (thread-safe)."""
        stream = self.streams[batch.stream]
        outputs = [model.run(batch.inputs, stream.framewise)[..., order] for model, order in stream.models]
        with self._lock:
            self._file_outputs(batch, outputs)

    def _file_outputs(self, batch: _Batch, outputs: list[np.ndarray]) -> None:
        for index in np.unique(batch.file_index).tolist():
            rows = batch.file_index == index
            store = self._windows[(index, batch.stream)]
            store["starts"].append(batch.starts[rows])
            store["chunk_of"].append(batch.chunk_of[rows])
            for model_outputs, out in zip(store["outputs"], outputs):
                model_outputs.append(out[rows])
            if sum(len(s) for s in store["starts"]) == self._expected[(index, batch.stream)]:
                self._finish_stream(index, batch.stream)

    def _finish_stream(self, index: int, s: int) -> None:
        """All windows of file `index` in stream `s` are in: add each model's chunk probs to the file's sum."""
        store = self._windows.pop((index, s))
        del self._expected[(index, s)]
        stream, n_chunks = self.streams[s], self.files[index].n_chunks
        starts, chunk_of = np.concatenate(store["starts"]), np.concatenate(store["chunk_of"])
        for model_outputs in store["outputs"]:
            self._sums[index] += stream.to_chunks(np.concatenate(model_outputs), starts, chunk_of, n_chunks)
            self._models_done[index] += 1
        if self._models_done[index] == self.n_models:
            self._finish(index, (self._sums.pop(index) / self.n_models).astype(np.float32))

    def _finish(self, index: int, probs: np.ndarray) -> None:
        self.results[index] = probs
        self.files_done += 1
        self.chunks_done += len(probs)
        every = self.settings.progress_every
        if every and self.files_done % every == 0:
            elapsed = time.perf_counter() - self.start
            log.info("%d/%d files, %d chunks, %.1f s, %.1f chunks/s", self.files_done, len(self.files),
                     self.chunks_done, elapsed, self.chunks_done / max(elapsed, 1e-9))


# ---------------------------------------------------------------- the public entry points


@dataclass
class Predictions:
    """Chunk-level predictions for a list of files, rows in file order then chunk order."""

    classes: list[str]
    row_ids: list[str]
    file_index: np.ndarray   # [N] index into `files`
    raw_probs: np.ndarray    # [N, C] ensemble mean, before post-processing
    probs: np.ndarray        # [N, C] after smoothing and file scaling (equal to raw_probs when both are off)
    files: list[FileInfo]
    seconds: float

    @property
    def unreadable(self) -> list[FileInfo]:
        """Files that could not be decoded (rows of zeros)."""
        return [f for f in self.files if not f.readable]

    @property
    def truncated(self) -> list[FileInfo]:
        """Files cut short (rows up to their declared or expected duration, silence past the cut)."""
        return [f for f in self.files if f.truncated is not None]

    def summary(self) -> str:
        """One line: files, chunks, unreadable and truncated files, time and throughput."""
        rate = len(self.row_ids) / max(self.seconds, 1e-9)
        return (f"{len(self.files)} files, {len(self.row_ids)} chunks, {len(self.unreadable)} unreadable, "
                f"{len(self.truncated)} truncated, {self.seconds:.1f} s, {rate:.1f} chunks/s")


def predict_files(models: Sequence[OnnxModel], files: Sequence[str | os.PathLike],
                  settings: InferenceSettings = InferenceSettings()) -> Predictions:
    """Ensemble-mean chunk probabilities for `files` (every file gets its rows, readable or not)."""
    start = time.perf_counter()
    classes, orders = ensemble_classes(models)
    streams = _build_streams(models, orders, settings)
    files = [Path(f) for f in files]
    warn_shared_stems(files)
    sample_rate_hz = models[0].info.sample_rate_hz
    collector = _Collector(streams, len(files), len(classes), settings)
    messages: queue.Queue = queue.Queue(maxsize=settings.prefetch_batches)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(files, streams, sample_rate_hz, settings, messages, stop),
                                name="infer-producer", daemon=True)
    # Several model workers each run whole batches (onnxruntime's Run is thread-safe): on few cores,
    # two single-threaded runs side by side beat one run split over two threads, whose halves wait
    # for each other while decoding and the frontend hold the other core.
    workers = settings.n_model_workers
    runner = ThreadPoolExecutor(workers, thread_name_prefix="infer-model") if workers > 1 else None
    running: deque = deque()
    with _single_thread_blas():
        producer.start()
        try:
            while (item := messages.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                if not isinstance(item, _Batch):
                    collector.add_file(*item)  # before any of its batches, which follow it in the queue
                elif runner is None:
                    collector.add_batch(item)
                else:
                    running.append(runner.submit(collector.add_batch, item))
                    while len(running) > workers:  # at most one batch queued beyond the running ones
                        running.popleft().result()
            while running:
                running.popleft().result()
        finally:
            stop.set()
            if runner is not None:
                runner.shutdown(wait=True, cancel_futures=True)
            producer.join()
    infos = [info for info in collector.files if info is not None]
    probs = [p for p in collector.results if p is not None]
    raw = np.concatenate(probs) if probs else np.zeros((0, len(classes)), dtype=np.float32)
    file_index = np.repeat(np.arange(len(infos)), [info.n_chunks for info in infos])
    ids = [rid for info in infos for rid in contract.row_ids(info.stem, info.n_chunks, settings.chunk_s)]
    result = Predictions(classes, ids, file_index, raw,
                         postprocess.postprocess(raw, file_index, settings.smoothing, settings.file_scale_alpha),
                         infos, time.perf_counter() - start)
    log.info("done: %s", result.summary())
    return result


def check_run(models: Sequence[OnnxModel], settings: InferenceSettings) -> list[str]:
    """The ensemble's classes, once the models are known to run together with `settings` (before any file).

    Raises ModelFormatError (models that cannot be ensembled) or ValueError (settings they cannot use).
    """
    classes, orders = ensemble_classes(models)
    _build_streams(models, orders, settings)
    return classes


def warn_shared_stems(files: Sequence[str | os.PathLike]) -> dict[str, list[str]]:
    """Warn, naming the files, about files whose stems (and so row ids) coincide; returns {stem: paths}."""
    by_stem: dict[str, list[str]] = {}
    for path in files:
        by_stem.setdefault(Path(path).stem, []).append(str(path))
    shared = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    for stem, paths in shared.items():
        log.warning("duplicate row ids: %s share the stem %r, so their rows get the same row ids",
                    " and ".join(paths), stem)
    return shared


def check_output(path: str | os.PathLike) -> Path:
    """`path` once a file can be written there (its folder is created if missing); raises OutputError."""
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def predict_folder(model_paths: Sequence[str | os.PathLike], inputs: str | os.PathLike | Sequence[str | os.PathLike],
                   settings: InferenceSettings = InferenceSettings()) -> Predictions:
    """Load the models and predict every audio file of a folder (or an explicit list of files)."""
    files = audio_io.list_audio_files(inputs) if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    models = load_models(model_paths, settings.intra_op_threads, settings.inter_op_threads, settings.allow_spinning,
                         settings.engine, settings.n_model_workers)
    return predict_files(models, files, settings)


def read_submission_header(path: str | os.PathLike) -> list[str]:
    """The class columns of a sample submission (its header minus the leading row_id)."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if not header or header[0] != "row_id":
        raise ValueError(f"{path}: first column must be row_id, got {header[:1]}")
    return header[1:]


def align_columns(classes: Sequence[str], probs: np.ndarray, columns: Sequence[str]) -> np.ndarray:
    """`probs` with its class columns in the order of `columns`; the two class sets must be equal."""
    if list(classes) == list(columns):
        return probs
    missing, extra = sorted(set(columns) - set(classes)), sorted(set(classes) - set(columns))
    if missing or extra or len(columns) != len(set(columns)):
        raise ValueError(f"sample submission columns do not match the model classes: {len(missing)} not in the "
                         f"model (e.g. {missing[:5]}), {len(extra)} not in the sample submission (e.g. {extra[:5]})"
                         + ("; duplicate columns" if len(columns) != len(set(columns)) else ""))
    position = {c: i for i, c in enumerate(classes)}
    return probs[:, [position[c] for c in columns]]


def write_submission(path: str | os.PathLike, row_ids: Sequence[str], classes: Sequence[str], probs: np.ndarray,
                     sample_submission: str | os.PathLike | None = None, float_format: str = "%.7g") -> None:
    """Atomically write `row_id,<classes...>` CSV; columns follow the sample submission's header when given."""
    columns = list(classes)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(row_ids), len(columns)):
        raise ValueError(f"probs shape {probs.shape} does not match {len(row_ids)} rows x {len(columns)} classes")
    if sample_submission is not None:
        header = read_submission_header(sample_submission)
        probs, columns = align_columns(columns, probs, header), header
    line = "%s" + ("," + float_format) * len(columns) + "\n"
    # The write of birdrounds.artifacts.atomic_open, repeated: this file cannot import the package.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow(["row_id", *columns])
            for rid, row in zip(row_ids, probs.tolist()):
                f.write(line % (rid, *row))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- command line


def _kernel_arg(text: str) -> tuple[float, ...]:
    """'0.1,0.8,0.1' -> (0.1, 0.8, 0.1), validated; 'off' (or '1') -> () (no smoothing)."""
    if text.strip().lower() in ("off", "none", "1", "1.0", ""):
        return ()
    try:
        kernel = tuple(float(v) for v in text.split(",") if v.strip())
        postprocess.validate_kernel(kernel)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return kernel


def build_parser() -> argparse.ArgumentParser:
    """The command line; the contract.RECORDED_SETTINGS flags default to what the model's export recorded."""
    p = argparse.ArgumentParser(description="Predict BirdCLEF chunk probabilities with birdrounds ONNX models.")
    p.add_argument("--model", action="append", required=True, help="ONNX file; repeat to average several models")
    p.add_argument("--input-dir", required=True, help="folder of soundscapes (.ogg/.wav/.flac/.mp3)")
    p.add_argument("--output", default="submission.csv", help="CSV to write (atomically)")
    p.add_argument("--sample-submission", help="take the class columns (and their order) from this CSV's header")
    d = InferenceSettings()
    p.add_argument("--chunk-s", type=float, default=d.chunk_s, help="scored chunk length in seconds")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per model call")
    p.add_argument("--threads", type=int, default=d.intra_op_threads, help="threads per model call (0: all cores)")
    p.add_argument("--model-workers", type=int, default=None,
                   help="model calls run side by side on their own batches (default: one per core)")
    p.add_argument("--decode-workers", type=int, default=d.decode_workers, help="threads decoding audio files")
    p.add_argument("--min-duration-s", type=float, default=d.min_duration_s,
                   help="pad shorter files with rows up to this duration")
    p.add_argument("--progress-every", type=int, default=d.progress_every, help="files between progress lines")
    p.add_argument("--engine", choices=ENGINES, default=d.engine,
                   help="runtime for the model: onnxruntime (default) or OpenVINO f32/bf16 (spectrogram graphs)")
    recorded = p.add_argument_group(
        "settings recorded at export", "default: the `birdrounds predict` settings the first model was exported with "
        f"(its {contract.META_PREDICT_SETTINGS} metadata), else the value shown")
    recorded.add_argument("--smooth", dest="smoothing", type=_kernel_arg, default=None,
                          help="kernel along chunks, e.g. 0.1,0.8,0.1; 'off' (or 1) disables it (default: off)")
    recorded.add_argument("--file-scale-alpha", type=float, default=None,
                          help=f"p * (1 - a + a * file max of p); 0 = off (default: {d.file_scale_alpha})")
    recorded.add_argument("--window-stride-s", type=float, default=None,
                          help="stride of windows longer than a chunk (default: the shorter of chunk and window)")
    recorded.add_argument("--tta-shift-s", type=float, default=None,
                          help=f"also predict shifted by -/+ this (s); 0 = off (default: {d.tta_shift_s})")
    recorded.add_argument("--expected-duration-s", type=float, default=None,
                          help="rows of an unreadable file, or of a truncated one whose header declares no length "
                               f"(default: {d.expected_duration_s})")
    return p


def exported_settings(models: Sequence[OnnxModel]) -> dict[str, Any]:
    """The predict settings the first model's export recorded ({} if none); a warning when models disagree."""
    recorded = models[0].info.predict_settings
    for model in models[1:]:
        if model.info.predict_settings != recorded:
            log.warning("%s was exported with other predict settings than %s (%s against %s); using the first's",
                        model.path, models[0].path, model.info.predict_settings, recorded)
    return dict(recorded)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: predict a folder and write the submission CSV.

    Everything that can be checked before the run is: the models, the settings, the sample
    submission's columns and the output folder; an error there (or any input error) is one line, exit 2.
    """
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    try:
        settings = InferenceSettings(
            chunk_s=args.chunk_s, batch_size=args.batch_size, intra_op_threads=args.threads or None,
            model_workers=args.model_workers, decode_workers=args.decode_workers,
            min_duration_s=args.min_duration_s, progress_every=args.progress_every, engine=args.engine,
        )
        models = load_models(args.model, settings.intra_op_threads, settings.inter_op_threads, engine=settings.engine,
                             model_workers=settings.n_model_workers)
        given = {name: getattr(args, name) for name in contract.RECORDED_SETTINGS if getattr(args, name) is not None}
        settings = replace(settings, **{**exported_settings(models), **given})
        log.info("settings: %s", recorded_settings(settings))
        classes = check_run(models, settings)
        if args.sample_submission is not None:  # fail before the long run, not after it
            align_columns(classes, np.zeros((0, len(classes))), read_submission_header(args.sample_submission))
        check_output(args.output)
        result = predict_files(models, audio_io.list_audio_files(args.input_dir), settings)
        write_submission(args.output, result.row_ids, result.classes, result.probs, args.sample_submission)
    except (ValueError, OSError) as err:  # ModelFormatError and OutputError are ValueErrors
        message = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"infer: error: {message}", file=sys.stderr)
        return 2
    log.info("wrote %s (%d rows)", args.output, len(result.row_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
