"""ONNX export: graph contract, parity with PyTorch on a real recording, ensembles, INT8, the package folder."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from birdrounds.export import (
    INFER_FILES,
    EnsembleExport,
    ExportError,
    export_onnx,
    export_package,
    nchwc_friendly,
    quantizable_nodes,
    quantize_int8,
    undo_channel_scale_resizes,
    verify_onnx,
)
from birdrounds.model import (
    checkpoint_hash,
    load_checkpoint,
    save_checkpoint,
)
from conftest import EXPORT_CLASSES, EXPORT_WINDOW_S, REAL_AUDIO, config_model, tiny_checkpoint

SAMPLE_RATE_HZ = 32000
WINDOW_S = EXPORT_WINDOW_S
CLASSES = EXPORT_CLASSES
METADATA_KEYS = {
    "birdrounds.format_version", "birdrounds.classes", "birdrounds.sample_rate_hz", "birdrounds.window_s",
    "birdrounds.input", "birdrounds.frontend", "birdrounds.members",
}


@pytest.fixture(scope="module")
def chunks(real_chunks) -> np.ndarray:
    """11 overlapping 5 s windows [11, 160000] (0.5 s hop) of a real 10 s bird recording (conftest.real_chunks)."""
    return real_chunks


@pytest.fixture(scope="module")
def exported(exported_graphs):
    """exported(kind, head) -> (checkpoint, model.onnx, report), each pair exported once per session
    (conftest.exported_graphs)."""
    return exported_graphs


def reference_probs(checkpoints: list[Path], audio: np.ndarray) -> dict[str, np.ndarray]:
    """Member-averaged sigmoid outputs computed directly with the PyTorch models (not EnsembleExport)."""
    outs = []
    with torch.no_grad():
        for path in checkpoints:
            model, _ = load_checkpoint(path)
            outs.append({k: torch.sigmoid(v).numpy() for k, v in model(torch.from_numpy(audio)).items()})
    probs = {"probs": np.mean([o["logits"] for o in outs], axis=0)}
    if all("framewise_logits" in o for o in outs):
        probs["framewise_probs"] = np.mean([o["framewise_logits"] for o in outs], axis=0)
    return probs


def graph_input(kind: str, checkpoint: Path, audio: np.ndarray) -> np.ndarray:
    """What the graph takes for waveform windows: the windows, or their spectrograms by the torch frontend."""
    if kind == "waveform":
        return audio
    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return model.frontend(torch.from_numpy(audio)).numpy()


def run_onnx(path: Path | bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of an ONNX model (a path or serialized bytes) on CPU, by name."""
    session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: x})))


def node_scopes(node: onnx.NodeProto) -> set[str]:
    """Module-path components the dynamo exporter recorded for a node."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return {part for scope in eval(prop.value) for part in scope.split(".")}
    return set()


@pytest.mark.parametrize("head", ["sed", "clip"])
@pytest.mark.parametrize("kind", ["spectrogram", "waveform"])
def test_export_contract_and_parity(exported, chunks, kind, head):
    ckpt, onnx_path, report = exported(kind, head)
    model = onnx.load(onnx_path)
    onnx.checker.check_model(model)
    assert report["max_abs_diff"] <= 1e-4 and report["verify_inputs"] == "audio" and report["n_verify"] == len(chunks)

    # Inputs and outputs as the contract says; batch is the only symbolic dimension.
    (graph_in,) = model.graph.input
    assert graph_in.name == {"spectrogram": "spec", "waveform": "waveform"}[kind]
    dims = [d.dim_param or d.dim_value for d in graph_in.type.tensor_type.shape.dim]
    assert dims == (["batch", 1, 32, 79] if kind == "spectrogram" else ["batch", 160000])
    expected_outputs = ["probs", "framewise_probs"] if head == "sed" else ["probs"]
    assert [o.name for o in model.graph.output] == expected_outputs

    # Parity with the PyTorch model at batch 1 and batch 7, on real audio.
    for batch in (1, 7):
        audio = chunks[:batch]
        got = run_onnx(onnx_path, graph_input(kind, ckpt, audio))
        want = reference_probs([ckpt], audio)
        assert set(got) == set(want)
        for name in want:
            assert got[name].shape == want[name].shape and got[name].dtype == np.float32
            assert np.abs(got[name] - want[name]).max() <= 1e-4
        assert got["probs"].shape == (batch, len(CLASSES))
        if head == "sed":
            assert got["framewise_probs"].shape[0::2] == (batch, len(CLASSES))

    # Metadata: all strings, all parseable, matching the checkpoint.
    meta = {p.key: p.value for p in model.metadata_props}
    assert METADATA_KEYS <= set(meta)
    assert meta["birdrounds.format_version"] == "1" and meta["birdrounds.input"] == kind
    assert json.loads(meta["birdrounds.classes"]) == CLASSES
    assert int(meta["birdrounds.sample_rate_hz"]) == SAMPLE_RATE_HZ and float(meta["birdrounds.window_s"]) == WINDOW_S
    frontend = json.loads(meta["birdrounds.frontend"])
    assert frontend == {k: load_checkpoint(ckpt)[1]["model_kwargs"][k] for k in frontend}
    assert set(frontend) == {"sample_rate_hz", "n_fft", "hop_length", "n_mels", "f_min_hz", "f_max_hz", "top_db", "norm"}
    assert json.loads(meta["birdrounds.members"]) == [{"path": str(ckpt), "hash": checkpoint_hash(ckpt)}]


def squeeze_excite_graph() -> onnx.ModelProto:
    """x [batch, 16, 6, 10] -> conv -> SiLU -> SE (spatial ReduceMean, two convs, channel scale Mul) -> conv,
    plus a constant [1, C, 1, 1] scale and a Mul on a 1 x 1 map, which the rewrite must leave alone."""
    rng = np.random.default_rng(0)
    h = onnx.helper
    inits = {name: rng.normal(0, 0.3, shape).astype(np.float32) for name, shape in (
        ("w1", (32, 16, 1, 1)), ("w2", (8, 32, 1, 1)), ("w3", (32, 8, 1, 1)), ("w4", (16, 32, 3, 3)),
        ("const_scale", (1, 32, 1, 1)))}
    inits["axes"] = np.array([2, 3], np.int64)
    nodes = [
        h.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        h.make_node("Sigmoid", ["c1"], ["g1"], name="sig1"),
        h.make_node("Mul", ["c1", "g1"], ["silu"], name="silu"),
        h.make_node("ReduceMean", ["silu", "axes"], ["mean"], name="se_mean", keepdims=1),
        h.make_node("Conv", ["mean", "w2"], ["r"], name="se_reduce"),
        h.make_node("Relu", ["r"], ["rr"], name="se_relu"),
        h.make_node("Conv", ["rr", "w3"], ["e"], name="se_expand"),
        h.make_node("Sigmoid", ["e"], ["gate"], name="se_gate"),
        h.make_node("Mul", ["gate", "silu"], ["scaled"], name="se_scale"),  # the scale first: either order
        h.make_node("Mul", ["scaled", "const_scale"], ["scaled2"], name="const_mul"),
        h.make_node("Mul", ["mean", "gate"], ["tiny"], name="one_by_one_mul"),
        h.make_node("Conv", ["scaled2", "w4"], ["y"], name="conv_out", pads=[1, 1, 1, 1]),
    ]
    graph = h.make_graph(
        nodes, "se", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 16, 6, 10])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 16, 6, 10]),
         h.make_tensor_value_info("tiny", onnx.TensorProto.FLOAT, ["batch", 32, 1, 1])],
        [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


def optimized_op_types(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    """Op types of the graph ONNX Runtime runs (ORT_ENABLE_ALL, one thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


def test_nchwc_friendly_rewrite_is_exact_and_avoids_reorders(tmp_path):
    original = squeeze_excite_graph()
    rewritten = squeeze_excite_graph()
    assert nchwc_friendly(rewritten) == {"global_average_pool": 1, "channel_scale_resize": 1}
    onnx.checker.check_model(rewritten, full_check=True)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "ReduceMean" not in ops and ops.count("GlobalAveragePool") == 1 and ops.count("Resize") == 1
    assert ops.count("Mul") == 4  # SiLU, the SE scale, the constant scale and the 1 x 1 one
    assert "axes" not in {i.name for i in rewritten.graph.initializer}  # no unused initializer left

    x = np.random.default_rng(1).normal(size=(3, 16, 6, 10)).astype(np.float32)
    for batch in (x, x[:1]):
        want = run_onnx(original.SerializeToString(), batch)
        got = run_onnx(rewritten.SerializeToString(), batch)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)

    before, after = optimized_op_types(original, tmp_path), optimized_op_types(rewritten, tmp_path)
    if "ReorderInput" not in before:
        pytest.skip("this CPU has no NCHWc kernels in onnxruntime (x86 AVX2 / AVX-512 only)")
    # Before: the SE scale multiplies in NCHW, so its input is reordered out of NCHWc and back.
    reorders = lambda ops: ops.count("ReorderOutput") + ops.count("ReorderInput")  # noqa: E731
    assert reorders(after) < reorders(before)

    assert undo_channel_scale_resizes(rewritten) == 1
    assert "Resize" not in [n.op_type for n in rewritten.graph.node]
    onnx.checker.check_model(rewritten, full_check=True)
    np.testing.assert_allclose(run_onnx(rewritten.SerializeToString(), x)["y"], run_onnx(original.SerializeToString(), x)["y"],
                               rtol=1e-5, atol=1e-6)
    assert undo_channel_scale_resizes(rewritten) == 0


def test_window_s_defaults_to_5_when_checkpoint_has_none(tmp_path, chunks):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "a.pt", config_model(len(CLASSES), head="clip"), CLASSES)  # no window_s recorded
    report = export_onnx([tmp_path / "a.pt"], tmp_path / "m.onnx", "spectrogram", verify_audio=chunks[:2])
    assert report["metadata"]["birdrounds.window_s"] == "5.0"


@pytest.mark.slow
def test_ensemble_is_mean_of_members(tmp_path, chunks):
    a = tiny_checkpoint(tmp_path / "a.pt", "sed", seed=1)
    b = tiny_checkpoint(tmp_path / "b.pt", "sed", seed=2)
    report = export_onnx([a, b], tmp_path / "ens.onnx", "spectrogram", verify_audio=chunks)
    assert report["n_members"] == 2
    got = run_onnx(tmp_path / "ens.onnx", graph_input("spectrogram", a, chunks))
    pa, pb = reference_probs([a], chunks), reference_probs([b], chunks)
    assert not np.allclose(pa["probs"], pb["probs"], atol=1e-3)  # the members really differ
    for name in ("probs", "framewise_probs"):
        np.testing.assert_allclose(got[name], (pa[name] + pb[name]) / 2, atol=1e-5)
    # Waveform mode computes the shared frontend once for both members; same result.
    waveform_ensemble = EnsembleExport([load_checkpoint(a)[0], load_checkpoint(b)[0]], "waveform")
    assert waveform_ensemble.frontend_of == [0, 0]
    with torch.no_grad():
        wave_probs = waveform_ensemble(torch.from_numpy(chunks))[0].numpy()
    np.testing.assert_allclose(wave_probs, (pa["probs"] + pb["probs"]) / 2, atol=1e-6)
    members = json.loads(report["metadata"]["birdrounds.members"])
    assert [m["hash"] for m in members] == [checkpoint_hash(a), checkpoint_hash(b)]

    # One clip-head member: no framewise output for the ensemble.
    c = tiny_checkpoint(tmp_path / "c.pt", "clip", seed=3)
    export_onnx([a, c], tmp_path / "mixed.onnx", "spectrogram", verify_audio=chunks[:3])
    assert [o.name for o in onnx.load(tmp_path / "mixed.onnx").graph.output] == ["probs"]


def test_mismatched_classes_refused(tmp_path, chunks):
    a = tiny_checkpoint(tmp_path / "a.pt")
    b = tiny_checkpoint(tmp_path / "b.pt", classes=[*CLASSES[:4], "zzz"])
    with pytest.raises(ExportError, match="classes differ.*index 4"):
        export_onnx([a, b], tmp_path / "m.onnx", verify_audio=chunks)
    reordered = tiny_checkpoint(tmp_path / "r.pt", classes=CLASSES[::-1])
    with pytest.raises(ExportError, match="same order"):
        export_onnx([a, reordered], tmp_path / "m.onnx", "waveform", verify_audio=chunks)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_differing_frontends_need_the_waveform_kind(tmp_path, chunks):
    a = tiny_checkpoint(tmp_path / "a.pt", seed=1)
    b = tiny_checkpoint(tmp_path / "b.pt", seed=2, n_mels=24, f_max_hz=6000)
    with pytest.raises(ExportError, match="kind='waveform'.*") as info:
        export_onnx([a, b], tmp_path / "spec.onnx", "spectrogram", verify_audio=chunks)
    assert "n_mels" in str(info.value) and "f_max_hz" in str(info.value)

    # Random-noise verification this time (no audio given).
    report = export_onnx([a, b], tmp_path / "wave.onnx", "waveform")
    assert report["verify_inputs"] == "noise" and report["max_abs_diff"] <= 1e-4
    got = run_onnx(tmp_path / "wave.onnx", chunks[:4])
    want = reference_probs([a, b], chunks[:4])
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4)
    member_frontends = json.loads(report["metadata"]["birdrounds.member_frontends"])
    assert [f["n_mels"] for f in member_frontends] == [32, 24]


def test_verify_onnx_detects_a_different_model(exported, chunks, tmp_path):
    _, onnx_path, _ = exported("spectrogram", "sed")
    other, _ = load_checkpoint(tiny_checkpoint(tmp_path / "other.pt", "sed", seed=7))
    ensemble = EnsembleExport([other], "spectrogram")
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        verify_onnx(onnx_path, ensemble, ensemble.input_from_audio(torch.from_numpy(chunks)))


def test_export_refuses_and_writes_nothing_when_onnx_disagrees(tmp_path, chunks, monkeypatch):
    from birdrounds import export

    trace = export._trace_to_onnx

    def perturbed_trace(ensemble, example, opset):
        # Export a copy whose classifier weights were nudged, so ONNX and PyTorch truly differ.
        model, _ = load_checkpoint(tmp_path / "a.pt")
        with torch.no_grad():
            model.head.cla.weight.add_(0.05)
        return trace(EnsembleExport([model], ensemble.mode), example, opset)

    monkeypatch.setattr(export, "_trace_to_onnx", perturbed_trace)
    tiny_checkpoint(tmp_path / "a.pt")
    with pytest.raises(ExportError, match=r"max \|diff\|.*atol 0.0001"):
        export_onnx([tmp_path / "a.pt"], tmp_path / "m.onnx", verify_audio=chunks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_bad_verification_audio_refused(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "a.pt")
    with pytest.raises(ExportError, match=r"verify_audio must be windows \[B, 160000\]"):
        export_onnx([ckpt], tmp_path / "m.onnx", verify_audio=np.zeros((2, 1000), np.float32))


def test_int8_keeps_head_float_and_stays_close(exported, chunks, tmp_path):
    ckpt, onnx_path, _ = exported("spectrogram", "sed")
    spec = graph_input("spectrogram", ckpt, chunks)
    out = quantize_int8(onnx_path, tmp_path / "int8.onnx", spec)
    assert out == tmp_path / "int8.onnx" and sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]

    float_out, int8_out = run_onnx(onnx_path, spec), run_onnx(out, spec)
    assert set(int8_out) == {"probs", "framewise_probs"}
    for name in float_out:
        assert np.corrcoef(float_out[name].ravel(), int8_out[name].ravel())[0, 1] > 0.9
        assert np.abs(float_out[name] - int8_out[name]).max() < 0.05

    model = onnx.load(out)
    producer = {o: n for n in model.graph.node for o in n.output}
    initializers = {i.name: i for i in model.graph.initializer}
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # the backbone is quantized
    head_nodes = [n for n in model.graph.node if "head" in node_scopes(n)]
    assert {n.op_type for n in head_nodes} >= {"Conv", "Softmax", "MaxPool"}
    head_weights = {i for n in head_nodes for i in n.input if i.endswith((".weight", ".bias"))}
    assert head_weights == {f"members.0.head.{c}.{p}" for c in ("att", "cla") for p in ("weight", "bias")}
    assert all(initializers[w].data_type == onnx.TensorProto.FLOAT for w in head_weights)
    for node in head_nodes:
        # No Q/DQ inside the head: its weights stay float initializers. The one dequantized input
        # allowed is the boundary: the backbone's (quantized) output feature map.
        for name in node.input:
            if name in initializers:
                assert initializers[name].data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8), name
            source = producer.get(name)
            if source is None:
                continue
            assert source.op_type != "QuantizeLinear", node.name
            if source.op_type == "DequantizeLinear":
                quantized_from = producer[producer[source.input[0]].input[0]]
                assert "backbone" in node_scopes(quantized_from), (node.name, quantized_from.name)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["birdrounds.classes"]) == CLASSES
    assert json.loads(meta["birdrounds.quantization"])["exclude_head"] is True
    # The export's SE rewrite is there in the float graph and undone for INT8 (no NCHWc there).
    assert "Resize" in {n.op_type for n in onnx.load(onnx_path).graph.node}
    assert "Resize" not in {n.op_type for n in model.graph.node}


def test_int8_on_waveform_graph_never_quantizes_the_frontend(exported, chunks, tmp_path):
    _, onnx_path, _ = exported("waveform", "clip")
    out = quantize_int8(onnx_path, tmp_path / "int8.onnx", chunks, exclude_head=False)
    model = onnx.load(out)
    producer = {o: n for n in model.graph.node for o in n.output}
    frontend_nodes = [n for n in model.graph.node if "frontend" in node_scopes(n)]
    assert {"STFT", "MatMul"} <= {n.op_type for n in frontend_nodes}
    for node in frontend_nodes:
        assert all(producer[i].op_type != "DequantizeLinear" for i in node.input if i in producer), node.name
    np.testing.assert_allclose(run_onnx(out, chunks)["probs"], run_onnx(onnx_path, chunks)["probs"], atol=0.05)


def test_quantizable_nodes_rule(exported):
    model = onnx.load(exported("waveform", "sed")[1])
    backbone = set(quantizable_nodes(model, exclude_head=True))
    all_but_frontend = set(quantizable_nodes(model, exclude_head=False))
    by_name = {n.name: n for n in model.graph.node}
    assert backbone < all_but_frontend
    assert all("backbone" in node_scopes(by_name[name]) for name in backbone)
    assert not any("frontend" in node_scopes(by_name[name]) for name in all_but_frontend)
    assert any(n.op_type == "Softmax" for n in (by_name[name] for name in all_but_frontend - backbone))
    for node in model.graph.node:
        del node.metadata_props[:]
    with pytest.raises(ExportError, match="name_scopes"):
        quantizable_nodes(model)


@pytest.mark.slow
def test_export_package_writes_a_complete_folder(tmp_path, chunks):
    a = tiny_checkpoint(tmp_path / "a.pt", seed=1)
    b = tiny_checkpoint(tmp_path / "b.pt", seed=2)
    out_dir = tmp_path / "package"
    report = export_package([a, b], out_dir, "spectrogram", verify_audio=chunks[:4], int8=True, calibration=chunks)

    expected = {"model.onnx", "model_int8.onnx", "classes.json", "README.md", "export.json", *INFER_FILES}
    assert {p.name for p in out_dir.iterdir()} == expected  # no temporary files left behind
    assert set(report["files"]) == expected
    assert json.loads((out_dir / "classes.json").read_text()) == CLASSES
    saved = json.loads((out_dir / "export.json").read_text())
    assert saved["onnx"]["n_members"] == 2 and saved["onnx"]["max_abs_diff"] <= 1e-4
    assert saved["int8"]["n_calibration"] == len(chunks) and saved["int8"]["max_abs_diff_vs_float"] < 0.05
    assert "--model model.onnx" in (out_dir / "README.md").read_text()

    spec = graph_input("spectrogram", a, chunks[:2])
    assert run_onnx(out_dir / "model_int8.onnx", spec)["probs"].shape == (2, len(CLASSES))

    with pytest.raises(ExportError, match="calibration"):
        export_package([a], tmp_path / "no_calibration", int8=True)


def test_framewise_outputs_of_different_lengths_refused(tmp_path, chunks):
    a = tiny_checkpoint(tmp_path / "a.pt", seed=1)
    b = tiny_checkpoint(tmp_path / "b.pt", seed=2, hop_length=1024)  # twice the frames -> longer T'
    with pytest.raises(ExportError, match="different lengths T'"):
        export_onnx([a, b], tmp_path / "m.onnx", "waveform", verify_audio=chunks[:2])


def test_openvino_reads_the_spectrogram_graph(exported, chunks):
    openvino = pytest.importorskip("openvino")
    from birdrounds.export import openvino_model

    ckpt, onnx_path, _ = exported("spectrogram", "sed")
    spec = graph_input("spectrogram", ckpt, chunks[:3])
    ov_model = openvino_model(onnx_path)
    # The SE scales the export repeats for onnxruntime are broadcast again for OpenVINO.
    assert "Resize" in {n.op_type for n in onnx.load(onnx_path).graph.node}
    assert "Interpolate" not in {op.get_type_name() for op in ov_model.get_ops()}
    compiled = openvino.Core().compile_model(ov_model, "CPU")
    result = compiled(spec)
    want = run_onnx(onnx_path, spec)
    for output in compiled.outputs:
        np.testing.assert_allclose(result[output], want[output.get_any_name()], atol=1e-4)
    with pytest.raises(ExportError, match="spectrogram graphs only"):
        openvino_model(exported("waveform", "sed")[1])


@pytest.mark.slow
def test_package_runs_with_its_infer_script(tmp_path, chunks):
    """The copied infer.py reads the exported graph: a submission row per 5 s chunk of the recording."""
    ckpt = tiny_checkpoint(tmp_path / "a.pt", "sed")
    export_package([ckpt], tmp_path / "package", "waveform", verify_audio=chunks[:2])
    (tmp_path / "sounds").mkdir()
    shutil.copy(REAL_AUDIO, tmp_path / "sounds" / "rec.wav")
    command = [sys.executable, "infer.py", "--model", "model.onnx", "--input-dir", str(tmp_path / "sounds"),
               "--output", str(tmp_path / "submission.csv"), "--threads", "1"]
    subprocess.run(command, cwd=tmp_path / "package", check=True, capture_output=True, timeout=120)
    lines = (tmp_path / "submission.csv").read_text().splitlines()
    assert lines[0].split(",") == ["row_id", *CLASSES]
    rows = [line.split(",") for line in lines[1:]]
    assert [row[0] for row in rows[:2]] == ["rec_5", "rec_10"]  # a partial last chunk is infer.py's business
    assert all(0 <= float(p) <= 1 for row in rows for p in row[1:])


def test_predict_settings_are_recorded_and_checked(tmp_path, chunks):
    from birdrounds import infer

    ckpt = tiny_checkpoint(tmp_path / "a.pt", "clip")
    settings = infer.recorded_settings(infer.InferenceSettings(smoothing=(0.1, 0.8, 0.1), file_scale_alpha=0.2))
    report = export_onnx([ckpt], tmp_path / "m.onnx", verify_audio=chunks[:2], predict_settings=settings)
    meta = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert json.loads(meta["birdrounds.predict_settings"]) == settings == \
        json.loads(report["metadata"]["birdrounds.predict_settings"])
    assert infer.load_models([tmp_path / "m.onnx"])[0].info.predict_settings["smoothing"] == (0.1, 0.8, 0.1)
    for bad in ({"smoothing": [0.5, 0.5]}, {"batch_size": 8}):
        with pytest.raises(ExportError, match="predict_settings"):
            export_onnx([ckpt], tmp_path / "bad.onnx", verify_audio=chunks[:2], predict_settings=bad)
    assert not (tmp_path / "bad.onnx").exists()


def test_the_contract_is_defined_once_in_contract():
    """export.py, submit.py and infer.py take names, keys, the chunk length and the frontend keys from contract.py."""
    from birdrounds import contract, export, infer

    assert export.FRONTEND_KEYS is contract.FRONTEND_KEYS and export.FORMAT_VERSION is contract.FORMAT_VERSION
    assert infer.contract is contract  # the package's infer reads the package's contract, not a copy
    assert export.KINDS == tuple(contract.INPUT_KINDS) and export.DEFAULT_WINDOW_S == contract.SCORED_CHUNK_S
    for module in (export, infer, __import__("birdrounds.submit").submit):
        source = Path(module.__file__).read_text()
        for literal in ('"birdrounds.format_version"', '"birdrounds.classes"', '"birdrounds.input"', '"probs"',
                        '"framewise_probs"', '"sample_rate_hz", "n_fft"', "FORMAT_VERSION = "):
            assert literal not in source, (module.__name__, literal)
