"""ONNX export of trained `BirdModel` checkpoints: ensemble graph, metadata, parity check, INT8, package.

Two graph kinds (recorded in the metadata key `birdrounds.input`):
  "spectrogram": input `spec` [batch, 1, n_mels, n_frames] (the output of `model.frontend`) -> heads;
  "waveform":    input `waveform` [batch, n_samples] -> each member's own frontend -> heads (most portable).
Outputs: `probs` [batch, n_classes] = sigmoid(logits) averaged over members, plus `framewise_probs`
[batch, T', n_classes] when every member has an SED head. The contract (names, metadata keys, format
version) is defined in `birdrounds.infer`, which reads these graphs without birdrounds installed. Only the batch dimension is dynamic: the
frontend and the SED head make torch.export specialise the time axis to the window length.

Every export is checked against PyTorch in ONNX Runtime before it is written (`verify_onnx`); a model
that disagrees is never written under its final name.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import birdrounds
from birdrounds.artifacts import EXPORT_REPORT_FILE, atomic_open, write_json_atomic
from birdrounds.contract import (
    FORMAT_VERSION,
    FRONTEND_KEYS,
    INPUT_KINDS,
    META_CLASSES,
    META_FORMAT_VERSION,
    META_FRONTEND,
    META_INPUT,
    META_MEMBER_FRONTENDS,
    META_MEMBERS,
    META_PREDICT_SETTINGS,
    META_QUANTIZATION,
    META_SAMPLE_RATE_HZ,
    META_WINDOW_S,
    OUTPUT_FRAMEWISE,
    OUTPUT_PROBS,
    SCORED_CHUNK_S,
)
from birdrounds.infer import parse_predict_settings
from birdrounds.model import BirdModel, MelFrontend, checkpoint_hash, load_checkpoint

log = logging.getLogger(__name__)

KINDS = tuple(INPUT_KINDS)
# The window of a checkpoint that recorded none: it was trained on the scored chunks.
DEFAULT_WINDOW_S = SCORED_CHUNK_S
# Example batch for tracing: 2, because torch.export specialises a dimension traced at size 1.
_TRACE_BATCH = 2
# Written by the dynamo exporter on every node: the module path(s) the op came from.
_SCOPE_KEY = "pkg.torch.onnx.name_scopes"
# Marks the nodes `nchwc_friendly` adds, so that `undo_channel_scale_resizes` finds them.
_REWRITE_KEY = "birdrounds.rewrite"
PROTOBUF_LIMIT_BYTES = 2**31 - 1


class ExportError(RuntimeError):
    """An export that cannot be done, or whose ONNX output disagrees with PyTorch."""


# ---------------------------------------------------------------- the exported module


class EnsembleExport(nn.Module):
    """1..N BirdModels (eval mode) -> (probs [B, K], framewise_probs [B, T', K] if all heads are SED).

    mode "spectrogram" takes `spec` [B, 1, n_mels, n_frames] and runs `forward_spec` (members must
    share one frontend); "waveform" takes `waveform` [B, n_samples] and runs each member's frontend.
    """

    def __init__(self, models: Sequence[BirdModel], mode: str = "spectrogram") -> None:
        super().__init__()
        if mode not in KINDS:
            raise ExportError(f"kind must be one of {KINDS}, got {mode!r}")
        if not models:
            raise ExportError("an ensemble needs at least one model")
        frontends = [frontend_kwargs(m.init_kwargs) for m in models]
        if mode == "spectrogram":
            _check_same_frontend(frontends)
        self.mode = mode
        self.members = nn.ModuleList(models)
        self.framewise = all(m.init_kwargs["head"] == "sed" for m in models)
        # Members with equal frontend arguments share one spectrogram (waveform mode): index of the first.
        self.frontend_of = [frontends.index(f) for f in frontends]
        self.eval()

    @property
    def input_name(self) -> str:
        """Name of the graph input: "spec" or "waveform"."""
        return INPUT_KINDS[self.mode]

    @property
    def output_names(self) -> list[str]:
        """Names of the graph outputs, in the order `forward` returns them."""
        return [OUTPUT_PROBS, OUTPUT_FRAMEWISE] if self.framewise else [OUTPUT_PROBS]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Member-averaged sigmoid probabilities (probabilities, not logits, are averaged)."""
        probs, framewise = [], []
        specs: dict[int, torch.Tensor] = {}
        for member, source in zip(self.members, self.frontend_of):
            if self.mode == "spectrogram":
                spec = x
            else:
                if source not in specs:
                    specs[source] = self.members[source].frontend(x)
                spec = specs[source]
            out = member.forward_spec(spec)
            probs.append(torch.sigmoid(out["logits"]))
            if self.framewise:
                framewise.append(torch.sigmoid(out["framewise_logits"]))
        if not self.framewise:
            return (torch.stack(probs).mean(dim=0),)
        lengths = sorted({int(f.shape[1]) for f in framewise})
        if len(lengths) > 1:
            # Members with different hop lengths or backbone strides; averaging would need resampling.
            raise ExportError(f"members' framewise outputs have different lengths T' {lengths}; cannot average them")
        return torch.stack(probs).mean(dim=0), torch.stack(framewise).mean(dim=0)

    def input_from_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """The graph input for waveform windows [B, n_samples]: the waveform itself or its spectrogram."""
        if self.mode == "waveform":
            return audio
        with torch.no_grad():
            return self.members[0].frontend(audio)


def frontend_kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """MelFrontend arguments from a model's init kwargs (a checkpoint's "model_kwargs")."""
    return {key: model_kwargs[key] for key in FRONTEND_KEYS}


def _check_same_frontend(frontends: list[dict[str, Any]]) -> None:
    """ExportError naming the differing keys unless all members share one frontend."""
    for i, other in enumerate(frontends[1:], start=1):
        differing = {k: (frontends[0][k], other[k]) for k in FRONTEND_KEYS if frontends[0][k] != other[k]}
        if differing:
            raise ExportError(
                f"a spectrogram graph needs one frontend for all members, but member 0 and member {i} differ in "
                f"{differing}; export kind='waveform' instead (each member then runs its own frontend)"
            )


# ---------------------------------------------------------------- loading members


def load_ensemble(checkpoints: Sequence[str | os.PathLike], kind: str = "spectrogram") -> tuple[EnsembleExport, dict[str, str]]:
    """The ensemble module and its ONNX metadata_props (all strings) from checkpoint files."""
    if not checkpoints:
        raise ExportError("no checkpoints given")
    models, ckpts = zip(*(load_checkpoint(path) for path in checkpoints))
    classes = ckpts[0]["classes"]
    for path, ckpt in zip(checkpoints, ckpts):
        if ckpt["classes"] != classes:
            raise ExportError(
                f"{path}: classes differ from {checkpoints[0]} ({len(ckpt['classes'])} vs {len(classes)} names, "
                f"first difference {_first_difference(ckpt['classes'], classes)}); ensemble members must share "
                "the class list in the same order"
            )
    rates = {ckpt["audio"]["sample_rate_hz"] for ckpt in ckpts}
    windows = {checkpoint_window_s(ckpt) for ckpt in ckpts}
    if len(rates) > 1 or len(windows) > 1:
        raise ExportError(f"members disagree on audio input: sample_rate_hz {sorted(rates)}, window_s {sorted(windows)}")
    ensemble = EnsembleExport(list(models), kind)
    frontends = [frontend_kwargs(ckpt["model_kwargs"]) for ckpt in ckpts]
    metadata = {
        META_FORMAT_VERSION: FORMAT_VERSION,
        META_CLASSES: json.dumps(list(classes)),
        META_SAMPLE_RATE_HZ: str(rates.pop()),
        META_WINDOW_S: str(windows.pop()),
        META_INPUT: kind,
        # The first member's; a waveform graph whose members differ also lists each one below.
        META_FRONTEND: json.dumps(frontends[0]),
        META_MEMBERS: json.dumps([{"path": str(path), "hash": checkpoint_hash(path)} for path in checkpoints]),
    }
    if any(f != frontends[0] for f in frontends):
        metadata[META_MEMBER_FRONTENDS] = json.dumps(frontends)
    return ensemble, metadata


def checkpoint_window_s(ckpt: dict[str, Any]) -> float:
    """The checkpoint's training window in seconds (DEFAULT_WINDOW_S when it was not recorded)."""
    window_s = ckpt["audio"].get("window_s")
    return float(DEFAULT_WINDOW_S if window_s is None else window_s)


def _first_difference(a: list[str], b: list[str]) -> str:
    """'index i: x != y' for the first position where two class lists differ."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"index {i}: {x!r} != {y!r}"
    return f"lengths {len(a)} != {len(b)}"


# ---------------------------------------------------------------- export and verification


def export_onnx(
    checkpoints: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    kind: str = "spectrogram",
    opset: int = 18,
    verify_audio: np.ndarray | None = None,
    atol: float = 1e-4,
    predict_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export checkpoints as one ONNX ensemble, check it in ONNX Runtime, then write it atomically.

    verify_audio: waveform windows [B, window_samples] (real soundscape chunks) for the parity check;
    None -> seeded random noise. Raises ExportError when ONNX and PyTorch differ by more than `atol`.
    predict_settings: `birdrounds.infer.recorded_settings(...)` of the predict config, stored as the
    graph's META_PREDICT_SETTINGS (infer.py's defaults); None stores none (infer.py then uses its own).
    """
    start = time.perf_counter()
    ensemble, metadata = load_ensemble(checkpoints, kind)
    if predict_settings is not None:
        metadata[META_PREDICT_SETTINGS] = json.dumps(predict_settings)
        try:
            parse_predict_settings(metadata[META_PREDICT_SETTINGS])
        except (TypeError, ValueError) as err:
            raise ExportError(f"predict_settings: {err}") from None
    window_samples = round(float(metadata[META_WINDOW_S]) * int(metadata[META_SAMPLE_RATE_HZ]))
    audio, audio_source = _verification_audio(verify_audio, window_samples)
    inputs = ensemble.input_from_audio(audio)

    example = inputs[:1].expand(_TRACE_BATCH, *inputs.shape[1:]).contiguous()
    with torch.no_grad():
        ensemble(example)  # eager dry run: an ensemble that cannot work fails here with a readable ExportError
    model_proto = _trace_to_onnx(ensemble, example, opset)
    rewrites = nchwc_friendly(model_proto)
    onnx.helper.set_model_props(model_proto, metadata)
    onnx.checker.check_model(model_proto)
    model_bytes = model_proto.SerializeToString()
    export_s = time.perf_counter() - start

    diffs = verify_onnx(model_bytes, ensemble, inputs, atol)
    out_path = Path(out_path)
    with atomic_open(out_path, "wb") as f:
        f.write(model_bytes)
    return {
        "path": str(out_path),
        "kind": kind,
        "n_members": len(ensemble.members),
        "opset": opset,
        "input_name": ensemble.input_name,
        "input_shape": ["batch", *inputs.shape[1:]],
        "output_names": ensemble.output_names,
        "max_abs_diff": max(diffs.values()),
        "max_abs_diff_by_output": diffs,
        "graph_rewrites": rewrites,
        "atol": atol,
        "verify_inputs": audio_source,
        "n_verify": int(inputs.shape[0]),
        "size_bytes": len(model_bytes),
        "export_s": round(export_s, 3),
        "seconds": round(time.perf_counter() - start, 3),
        "metadata": metadata,
    }


def _verification_audio(verify_audio: np.ndarray | None, window_samples: int) -> tuple[torch.Tensor, str]:
    """Waveform windows [B, window_samples] float32 and where they came from ("audio" | "noise")."""
    if verify_audio is None:
        # Noise alone exercises the graph but not realistic activations, hence "noise" in the report.
        rng = np.random.default_rng(0)
        return torch.from_numpy(0.1 * rng.standard_normal((4, window_samples), dtype=np.float32)), "noise"
    audio = np.asarray(verify_audio, dtype=np.float32)
    if audio.ndim != 2 or audio.shape[1] != window_samples or audio.shape[0] == 0:
        raise ExportError(f"verify_audio must be windows [B, {window_samples}], got shape {audio.shape}")
    return torch.from_numpy(np.ascontiguousarray(audio)), "audio"


def _trace_to_onnx(ensemble: EnsembleExport, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """The dynamo exporter's ModelProto (weights inside, batch dimension dynamic)."""
    batch = torch.export.Dim("batch")
    try:
        program = torch.onnx.export(
            ensemble, (example,), dynamo=True, opset_version=opset, input_names=[ensemble.input_name],
            output_names=ensemble.output_names, dynamic_shapes=({0: batch},), external_data=False, verbose=False,
        )
    except Exception as e:  # the exporter raises many types; one readable error for the caller
        raise ExportError(f"torch.onnx.export (dynamo, opset {opset}) failed: {type(e).__name__}: {e}") from e
    model_proto = program.model_proto
    if model_proto.ByteSize() > PROTOBUF_LIMIT_BYTES:
        # One self-contained file is the point of the artifact; external data would split it.
        raise ExportError(f"model is {model_proto.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB single-file limit")
    return model_proto


def nchwc_friendly(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite squeeze-excitation blocks so ONNX Runtime's CPU layout (NCHWc) runs them without reorders.

    Exact rewrites, in place; returns how many nodes each one changed:
      "global_average_pool": ReduceMean over the spatial axes of a 4-D tensor (keepdims) ->
          GlobalAveragePool, which has an NCHWc kernel (ReduceMean has none);
      "channel_scale_resize": Mul(x [N, C, H, W], s [N, C, 1, 1]) -> Mul(x, Resize(s)), the scale
          repeated over H x W by nearest-neighbour Resize (integer scales, so an exact copy). ONNX
          Runtime's NCHWc Mul needs both inputs of one proven shape, so the Resize output is declared
          with x's shape; a broadcasting Mul makes it convert both tensors to NCHW and back.
    On EfficientNet-B0 (128 mels x 313 frames, one thread) ONNX Runtime went from 5.0 to 4.8 ms per
    window in an interleaved probe. H and W must be static (they are: only the batch is dynamic). The new
    nodes keep the original node's metadata (the module scope INT8 quantization selects nodes by).
    """
    graph = model.graph
    shapes = _static_shapes(model)
    constants = {init.name: init for init in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    counts = {"global_average_pool": 0, "channel_scale_resize": 0}
    axes_inputs = set()
    for node in graph.node:
        if node.op_type == "ReduceMean" and node.domain in ("", "ai.onnx") and _spatial_mean(node, shapes, constants):
            gap = onnx.helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name)
            gap.metadata_props.extend(node.metadata_props)
            nodes.append(gap)
            axes_inputs.add(node.input[1])
            counts["global_average_pool"] += 1
            continue
        scaled = _channel_scale(node, shapes, constants)
        if scaled is not None:
            big, small = scaled
            height, width = shapes[node.input[big]][2:]
            prefix = f"birdrounds_repeat_{counts['channel_scale_resize']}"
            scales, repeated = f"{prefix}_scales", f"{prefix}_{node.input[small]}"
            graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, 1, height, width], np.float32), scales))
            resize = onnx.helper.make_node(
                "Resize", [node.input[small], "", scales], [repeated], name=prefix, mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")
            onnx.helper.set_metadata_props(resize, {**_metadata(node), _REWRITE_KEY: "channel_scale_resize"})
            graph.value_info.append(onnx.helper.make_tensor_value_info(
                repeated, onnx.TensorProto.FLOAT, shapes[node.input[big]]))
            inputs = list(node.input)
            inputs[small] = repeated
            del node.input[:]
            node.input.extend(inputs)
            nodes += [resize, node]
            counts["channel_scale_resize"] += 1
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name in axes_inputs - used]  # the ReduceMeans' axes
    for init in unused:
        graph.initializer.remove(init)
    return counts


def undo_channel_scale_resizes(model: onnx.ModelProto) -> int:
    """Undo `nchwc_friendly`'s Resize of channel scales in place (Mul broadcasts again); returns how many.

    For INT8: ONNX Runtime's quantized kernels do not use NCHWc, and the quantized graph with the
    repeats runs 25% slower (5.6 against 4.5 ms per window on EfficientNet-B0, one thread).
    """
    graph = model.graph
    repeats = {node.output[0]: node for node in graph.node
               if node.op_type == "Resize" and _metadata(node).get(_REWRITE_KEY) == "channel_scale_resize"}
    if not repeats:
        return 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in repeats:
                node.input[i] = repeats[name].input[0]
    scales = {node.input[2] for node in repeats.values()}
    kept_nodes = [node for node in graph.node if node.output[0] not in repeats]
    kept_info = [info for info in graph.value_info if info.name not in repeats]
    kept_inits = [init for init in graph.initializer if init.name not in scales]
    for field, kept in ((graph.node, kept_nodes), (graph.value_info, kept_info), (graph.initializer, kept_inits)):
        del field[:]
        field.extend(kept)
    return len(repeats)


def _metadata(node: onnx.NodeProto) -> dict[str, str]:
    """A node's metadata_props as a dict."""
    return {prop.key: prop.value for prop in node.metadata_props}


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Float tensors' shapes after ONNX shape inference: ints where static, dim_param names otherwise ("?")."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int | str]] = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor = info.type.tensor_type
        if tensor.elem_type != onnx.TensorProto.FLOAT or not tensor.HasField("shape"):
            continue
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return shapes


def _spatial_mean(node: onnx.NodeProto, shapes: dict[str, list[int | str]],
                  constants: dict[str, onnx.TensorProto]) -> bool:
    """True for ReduceMean(x 4-D float, axes = the last two, keepdims=1), with axes as a constant input."""
    if len(shapes.get(node.input[0], [])) != 4 or len(node.input) != 2:
        return False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("keepdims", 1) != 1 or attrs.get("noop_with_empty_axes", 0) != 0:
        return False
    if node.input[1] not in constants:
        return False
    axes = onnx.numpy_helper.to_array(constants[node.input[1]])
    return sorted(int(a) % 4 for a in axes.reshape(-1)) == [2, 3]


def _channel_scale(node: onnx.NodeProto, shapes: dict[str, list[int | str]],
                   constants: dict[str, onnx.TensorProto]) -> tuple[int, int] | None:
    """(index of x, index of s) for Mul(x [N, C, H, W], s [N, C, 1, 1]) with static H, W > 1 x 1; else None."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    a, b = (shapes.get(name) for name in node.input)
    if not a or not b or len(a) != 4 or len(b) != 4:
        return None
    for big, small in ((0, 1), (1, 0)):
        x, s = (a, b) if big == 0 else (b, a)
        static_hw = all(isinstance(d, int) and d > 0 for d in x[2:]) and x[2:] != [1, 1]
        same_nc = x[:2] == s[:2] and x[0] != "?" and x[1] != "?"
        if static_hw and same_nc and s[2:] == [1, 1] and node.input[small] not in constants:
            return big, small
    return None


def verify_onnx(
    onnx_model: str | os.PathLike | bytes,
    module: nn.Module,
    inputs: torch.Tensor,
    atol: float = 1e-4,
) -> dict[str, float]:
    """Max |ONNX - PyTorch| per output on `inputs` (whole batch and batch 1); ExportError above `atol`.

    `module` returns a tuple of tensors in the graph's output order (an `EnsembleExport`).
    """
    session = _cpu_session(onnx_model)
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]
    with torch.no_grad():
        expected = [t.numpy() for t in module.eval()(inputs)]
    if len(expected) != len(output_names):
        raise ExportError(f"ONNX graph has outputs {output_names}, PyTorch returns {len(expected)} tensors")
    diffs = dict.fromkeys(output_names, 0.0)
    # The whole batch, then one row alone: checks the dynamic batch dimension on real values too.
    for feed, reference in ((inputs, expected), (inputs[:1], [e[:1] for e in expected])):
        got = session.run(output_names, {input_name: feed.numpy()})
        for name, g, e in zip(output_names, got, reference):
            if g.shape != e.shape:
                raise ExportError(f"ONNX output {name!r} has shape {g.shape}, PyTorch {e.shape}")
            diffs[name] = max(diffs[name], float(np.abs(g - e).max()))
    worst = max(diffs.values())
    if not worst <= atol:  # also catches NaN
        raise ExportError(f"ONNX Runtime disagrees with PyTorch: max |diff| per output {diffs} > atol {atol}")
    return diffs


def _cpu_session(onnx_model: str | os.PathLike | bytes) -> ort.InferenceSession:
    """An ONNX Runtime session on CPUExecutionProvider, from a path or serialized bytes."""
    source = onnx_model if isinstance(onnx_model, bytes) else os.fspath(onnx_model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- INT8 static quantization


def quantize_int8(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: np.ndarray,
    exclude_head: bool = True,
    batch_size: int = 8,
) -> Path:
    """Static INT8 quantization (QDQ, per-channel int8 weights, uint8 activations) calibrated on `calibration`.

    calibration: graph inputs [N, ...] (spectrograms for a spectrogram graph), from real soundscape chunks.
    Which nodes are quantized is decided by `quantizable_nodes`: the frontend never, the head and
    the ensemble averaging only when exclude_head=False. Written atomically; returns `out_path`.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    source = onnx.load(os.fspath(onnx_path))
    undo_channel_scale_resizes(source)
    input_name = source.graph.input[0].name
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as tmp_dir:
        # Shape inference first, so the quantizer knows every tensor's type; no ORT graph optimization,
        # which would fuse nodes and drop the module-scope metadata used to pick nodes. ONNX's own shape
        # inference is complete here (only the batch is dynamic); ORT's symbolic one cannot type STFT's
        # output nor prove the batch of a Resize output equal to its input's (onnxruntime 1.32).
        prepared = Path(tmp_dir) / "prepared.onnx"
        quant_pre_process(source, prepared, skip_optimization=True, skip_symbolic_shape=True)
        prepared_model = onnx.load(prepared)
        keep = set(quantizable_nodes(prepared_model, exclude_head))
        excluded = [node.name for node in prepared_model.graph.node if node.name not in keep]
        quantized = Path(tmp_dir) / "quantized.onnx"
        quantize_static(
            prepared, quantized, _ArrayReader(input_name, calibration, batch_size), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
        )
        model = onnx.load(quantized)
        props = {p.key: p.value for p in source.metadata_props}
        props[META_QUANTIZATION] = json.dumps({
            "scheme": "static int8 QDQ, per-channel int8 weights, uint8 activations, MinMax calibration",
            "n_calibration": len(calibration), "exclude_head": exclude_head,
            "n_quantizable_nodes": len(keep), "n_float_nodes": len(excluded),
        })
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, props)
        with atomic_open(out_path, "wb") as f:
            f.write(model.SerializeToString())
    return out_path


def quantizable_nodes(model: onnx.ModelProto, exclude_head: bool = True) -> list[str]:
    """Names of the nodes INT8 may touch, chosen by the module scope the dynamo exporter records.

    Every node carries `pkg.torch.onnx.name_scopes`, the nn.Module path it came from (for example
    ['', 'members', 'members.0', 'members.0.backbone', 'members.0.backbone.blocks', ...]). Node names
    themselves ("node_Conv_342") say nothing about the module, so the rule reads the scopes:
      exclude_head=True:  only nodes inside a member's `backbone` (conv stem ... conv_head + its SiLU);
                          head, pooling, sigmoid and member averaging stay float;
      exclude_head=False: every node except the frontend (STFT, mel matmul, dB, normalisation).
    A node without scope metadata (added by a graph rewrite) stays float.
    """
    scoped = [(node.name, _module_path_parts(node)) for node in model.graph.node]
    if not any(parts for _, parts in scoped):
        raise ExportError(f"no node carries {_SCOPE_KEY!r} metadata; export the model with birdrounds.export first")
    if exclude_head:
        names = [name for name, parts in scoped if "backbone" in parts]
    else:
        names = [name for name, parts in scoped if parts and "frontend" not in parts]
    if not names:
        raise ExportError("found no backbone nodes to quantize in the graph")
    return names


def _module_path_parts(node: onnx.NodeProto) -> set[str]:
    """Components of the node's module scopes ({'members', '0', 'backbone', ...}); empty if unknown."""
    for prop in node.metadata_props:
        if prop.key == _SCOPE_KEY:
            return {part for scope in ast.literal_eval(prop.value) for part in scope.split(".")}
    return set()


class _ArrayReader:
    """onnxruntime CalibrationDataReader over an in-memory array, `batch_size` rows per feed."""

    def __init__(self, input_name: str, data: np.ndarray, batch_size: int) -> None:
        self.input_name, self.data, self.batch_size = input_name, data, batch_size
        self._batches: Iterator[dict[str, np.ndarray]] = iter(())
        self.set_range(0, len(data))

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next feed {input_name: batch}, or None when the range is used up."""
        return next(self._batches, None)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict feeds to rows [start_index, end_index) (ORT's calibration calls this)."""
        starts = range(start_index, end_index, self.batch_size)
        self._batches = iter([{self.input_name: self.data[s:min(s + self.batch_size, end_index)]} for s in starts])


# ---------------------------------------------------------------- OpenVINO


def openvino_model(onnx_path: str | os.PathLike) -> Any:
    """An OpenVINO model read straight from a spectrogram .onnx (OpenVINO needs no separate conversion).

    `openvino` is optional (pip install openvino). Compile with `openvino.Core().compile_model(m, "CPU")`,
    or write IR with `openvino.save_model(m, "model.xml")`. Waveform graphs are refused: OpenVINO
    2026.4's ONNX reader needs a static signal shape for STFT and does not convert ReduceL2-18.
    """
    try:
        import openvino
    except ImportError as e:
        raise ExportError("openvino is not installed: pip install openvino") from e
    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    kind = {p.key: p.value for p in model.metadata_props}.get(META_INPUT)
    if kind != "spectrogram":
        raise ExportError(f"{onnx_path}: OpenVINO reads spectrogram graphs only, this one is {kind!r}")
    from birdrounds.infer import broadcast_channel_scales

    ov_model = openvino.Core().read_model(os.fspath(onnx_path))
    broadcast_channel_scales(ov_model)  # OpenVINO runs the SE scales faster broadcast (see nchwc_friendly)
    return ov_model


# ---------------------------------------------------------------- package


def export_package(
    checkpoints: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    kind: str = "spectrogram",
    verify_audio: np.ndarray | None = None,
    int8: bool = False,
    calibration: np.ndarray | None = None,
    predict_settings: dict[str, Any] | None = None,
    atol: float = 1e-4,
    extra_kinds: Sequence[str] = (),
) -> dict[str, Any]:
    """A self-contained inference folder: model.onnx (+ model_int8.onnx), classes.json, infer.py and its
    modules (INFER_FILES), README.md.

    verify_audio, calibration: waveform windows [B, window_samples] from soundscapes; int8 calibrates on
    `calibration`, or on `verify_audio` when it is None. predict_settings: see `export_onnx` (the
    package's infer.py then writes what `birdrounds predict` with those settings writes). extra_kinds:
    further graph kinds, each exported as model_<kind>.onnx and reported under its kind. Writes
    out_dir/export.json (the report, with the seconds it all took) last; nothing else writes it.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"onnx": export_onnx(checkpoints, out_dir / "model.onnx", kind, verify_audio=verify_audio,
                                                  atol=atol, predict_settings=predict_settings)}
    metadata = report["onnx"]["metadata"]
    write_json_atomic(out_dir / "classes.json", json.loads(metadata[META_CLASSES]))
    files = ["model.onnx", "classes.json"]
    if int8:
        report["int8"] = _export_int8(out_dir, metadata, calibration if calibration is not None else verify_audio)
        files.append("model_int8.onnx")
    files += _copy_infer_files(out_dir)
    with atomic_open(out_dir / "README.md", "w") as f:
        f.write(_package_readme(metadata, int8))
    files += ["README.md", EXPORT_REPORT_FILE]
    report["files"] = files
    for extra in extra_kinds:
        report[extra] = export_onnx(checkpoints, out_dir / f"model_{extra}.onnx", extra, verify_audio=verify_audio,
                                    atol=atol, predict_settings=predict_settings)
        files.insert(1, f"model_{extra}.onnx")
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out_dir / EXPORT_REPORT_FILE, report)
    return report


def _export_int8(out_dir: Path, metadata: dict[str, str], calibration_audio: np.ndarray | None) -> dict[str, Any]:
    """Quantize out_dir/model.onnx to model_int8.onnx; report its max |diff| to float on the calibration set."""
    if calibration_audio is None:
        raise ExportError("int8 needs calibration audio (soundscape windows); random noise would calibrate wrong ranges")
    start = time.perf_counter()
    inputs = np.asarray(calibration_audio, dtype=np.float32)
    if metadata[META_INPUT] == "spectrogram":
        frontend = MelFrontend(**json.loads(metadata[META_FRONTEND])).eval()
        with torch.no_grad():
            inputs = frontend(torch.from_numpy(inputs)).numpy()
    path = quantize_int8(out_dir / "model.onnx", out_dir / "model_int8.onnx", inputs)
    input_name = INPUT_KINDS[metadata[META_INPUT]]
    float_probs = _cpu_session(out_dir / "model.onnx").run([OUTPUT_PROBS], {input_name: inputs})[0]
    int8_probs = _cpu_session(path).run([OUTPUT_PROBS], {input_name: inputs})[0]
    return {
        "path": str(path),
        "n_calibration": len(inputs),
        "max_abs_diff_vs_float": float(np.abs(int8_probs - float_probs).max()),
        "size_bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - start, 3),
    }


# The standalone script and the package modules it imports (numpy, soundfile and onnxruntime only).
INFER_FILES = ("infer.py", "contract.py", "audio_io.py", "melspec.py", "postprocess.py")


def _copy_infer_files(out_dir: Path) -> list[str]:
    """Copy infer.py and the modules it imports beside the model; [] (with a warning) if one is missing."""
    package = Path(birdrounds.__file__).parent
    missing = [name for name in INFER_FILES if not (package / name).is_file()]
    if missing:
        log.warning("%s not found in %s; the export has no infer.py", ", ".join(missing), package)
        return []
    for name in INFER_FILES:
        with open(package / name, "rb") as src, atomic_open(out_dir / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return list(INFER_FILES)


PACKAGE_COMMAND = "python infer.py --model model.onnx --input-dir {input_dir} --output submission.csv"


def _package_readme(metadata: dict[str, str], int8: bool) -> str:
    """README.md of an exported package: what is in it and how to run it on a Kaggle test set."""
    n_classes = len(json.loads(metadata[META_CLASSES]))
    n_members = len(json.loads(metadata[META_MEMBERS]))
    int8_line = "- `model_int8.onnx`: the same graph with the backbone quantized to INT8 (head in float)\n" if int8 else ""
    int8_run = "\nFor the INT8 model pass `--model model_int8.onnx`; `--model` may be repeated to average models.\n"
    recorded = metadata.get(META_PREDICT_SETTINGS)
    if recorded is None:
        settings_text = ("No `birdrounds predict` settings were recorded at export: infer.py's own defaults apply "
                         "(no smoothing, no file scaling, no TTA).\n")
    else:
        settings_text = ("By default it applies the `birdrounds predict` settings recorded at export "
                         f"(`{META_PREDICT_SETTINGS}` in the model's metadata): `{recorded}`, so its CSV is the one "
                         "`birdrounds predict` writes with them. Flags override them: `--smooth off`, "
                         "`--smooth 0.1,0.8,0.1`, `--file-scale-alpha 0`, `--tta-shift-s 0`, `--window-stride-s`, "
                         "`--expected-duration-s`.\n")
    return (
        "# birdrounds ONNX package\n\n"
        f"- `model.onnx`: {metadata[META_INPUT]} graph, {n_members} member(s) averaged, {n_classes} classes, "
        f"{metadata[META_WINDOW_S]} s windows at {metadata[META_SAMPLE_RATE_HZ]} Hz; classes, "
        "frontend, members and recorded predict settings are in its metadata_props\n"
        f"{int8_line}"
        "- `classes.json`: the class names, in output order\n"
        "- `infer.py`: soundscapes -> submission CSV, with the modules it imports beside it (`contract.py`, "
        "`audio_io.py`, `melspec.py`, `postprocess.py`); needs only numpy, soundfile and onnxruntime (scipy to "
        "resample a file that is not at the model's rate, and for a faster FFT)\n"
        f"- `{EXPORT_REPORT_FILE}`: the export report (parity against PyTorch, timings)\n\n"
        "## Run\n\n"
        "```bash\n"
        f"{PACKAGE_COMMAND.format(input_dir='/kaggle/input/<competition>/test_soundscapes')}\n"
        "```\n\n"
        f"{settings_text}\n"
        "Add `--sample-submission sample_submission.csv` to take the column order from it (checked against the "
        "model's classes before the run).\n\n"
        "It uses every core it may run on: one model worker per core, each running onnxruntime on one thread "
        "(`--model-workers`, `--threads`), batches of 4 windows (`--batch-size`); `python infer.py --help` lists "
        "the other options.\n"
        f"{int8_run if int8 else ''}"
    )
