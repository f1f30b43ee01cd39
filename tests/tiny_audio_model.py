"""A tiny ONNX audio model built in the tests: stands in for Perch or another pretrained model exported to ONNX.

float32 [batch, samples] at 16 kHz (2-s windows) -> `embedding` [batch, 24] (log band energies from a
fixed bank of windowed sinusoids, 400 Hz - 7 kHz) and `logits` [batch, len(labels)] (a seeded linear map of
the embedding). Written with onnx.helper, so no exporter runs in the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

SAMPLE_RATE_HZ, WINDOW_S, BANDS, KERNEL, HOP = 16_000, 2.0, 24, 256, 128


def build(folder: Path, labels: list[str], name: str = "tiny_audio", seed: int = 0) -> Path:
    """Write `name`.onnx, its card `name`.yaml and `name`_labels.txt into `folder`; returns the .onnx path."""
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(KERNEL) / SAMPLE_RATE_HZ
    freqs = np.geomspace(400, 7000, BANDS)
    bank = (np.sin(2 * np.pi * freqs[:, None] * t) * np.hanning(KERNEL)).astype(np.float32)[:, None, :]
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 1, (BANDS, max(len(labels), 1))).astype(np.float32)
    init = [numpy_helper.from_array(bank, "bank"), numpy_helper.from_array(weights, "classifier"),
            numpy_helper.from_array(np.array([0, 1, -1], dtype=np.int64), "shape"),
            numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "time_axis")]
    nodes = [
        helper.make_node("Reshape", ["audio", "shape"], ["wave"]),
        helper.make_node("Conv", ["wave", "bank"], ["bands"], strides=[HOP]),
        helper.make_node("Mul", ["bands", "bands"], ["power"]),
        helper.make_node("ReduceMean", ["power", "time_axis"], ["mean_power"], keepdims=0),
        helper.make_node("Add", ["mean_power", "one"], ["shifted"]),
        helper.make_node("Log", ["shifted"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "classifier"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", BANDS]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(labels)])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = folder / f"{name}.onnx"
    onnx.save(model, path)
    (folder / f"{name}_labels.txt").write_text("".join(f"{label}\n" for label in labels))
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "sample_rate_hz": SAMPLE_RATE_HZ, "window_s": WINDOW_S, "embedding_output": "embedding",
        "scores_output": "logits", "scores": "logits", "labels": f"{name}_labels.txt"}))
    return path
