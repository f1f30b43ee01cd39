"""The synthetic mini-BirdCLEF: layout, determinism, imbalance, duplicates, archive, idempotency, domain gap."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy import signal
from sklearn.metrics import roc_auc_score

from birdrounds.config import ConfigError, shipped
from birdrounds.data.prepare import synthesize
from birdrounds.data.synthetic import (
    CHUNK_S,
    GENERATOR_VERSION,
    Event,
    SynthSpec,
    chunk_labels,
    generate,
    make_plan,
)

# The demo's dataset (the shipped data.synth), shrunk.
TINY = shipped("data.synth", "data=synthetic", n_species=6, n_train_soundscapes=3, n_val_soundscapes=4,
               soundscape_s=20.0, max_files_per_class=6, n_archive_per_minority=2, minority_max_files=3,
               focal_max_s=12.0)
# A few files of a few seconds: for the folder-handling tests, where the audio does not matter.
MICRO = shipped("data.synth", "data=synthetic", n_species=2, n_train_soundscapes=0, n_val_soundscapes=1,
                soundscape_s=5.0, min_files_per_class=1, max_files_per_class=2, n_archive_per_minority=0,
                focal_min_s=1.0, focal_max_s=2.0)

TRAIN_COLUMNS = ["primary_label", "secondary_labels", "type", "filename", "collection", "rating", "url",
                 "latitude", "longitude", "scientific_name", "common_name", "author", "license"]
TAXONOMY_COLUMNS = ["primary_label", "inat_taxon_id", "scientific_name", "common_name", "class_name"]
# Field names of a Xeno-canto API v3 recording (v3 says `lon`/`grp`, where v2 said `lng`/`group`).
XC_V3_FIELDS = {"id", "gen", "sp", "ssp", "grp", "en", "rec", "cnt", "loc", "lat", "lon", "alt", "type", "sex",
                "stage", "method", "url", "file", "file-name", "sono", "osci", "lic", "q", "length", "time",
                "date", "uploaded", "also", "rmk", "animal-seen", "playback-used", "temp", "regnr", "auto",
                "dvc", "mic", "smp"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "mini", TINY, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def train(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "train.csv")


def read(path: Path) -> tuple[np.ndarray, int]:
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    return audio, sr


def test_layout_has_every_file_and_the_competition_columns(root: Path, train: pd.DataFrame) -> None:
    for name in ("train.csv", "taxonomy.csv", "sample_submission.csv", "val_solution.csv", "DONE.json",
                 "xc_archive/recordings.json", "truth/soundscape_events.csv"):
        assert (root / name).is_file(), name
    assert list(train.columns) == TRAIN_COLUMNS
    assert list(pd.read_csv(root / "taxonomy.csv").columns) == TAXONOMY_COLUMNS
    assert len(list((root / "train_soundscapes").glob("*.ogg"))) == TINY.n_train_soundscapes
    assert len(list((root / "val_soundscapes").glob("*.ogg"))) == TINY.n_val_soundscapes
    done = json.loads((root / "DONE.json").read_text())
    assert done["version"] == GENERATOR_VERSION and done["spec"]["n_species"] == TINY.n_species
    assert not list(root.parent.glob(".mini.*")), "temporary folder left behind"


def test_class_list_is_sorted_and_the_same_in_every_table(root: Path, train: pd.DataFrame) -> None:
    classes = list(pd.read_csv(root / "sample_submission.csv").columns[1:])
    assert len(classes) == TINY.n_species and classes == sorted(classes)
    assert classes == list(pd.read_csv(root / "taxonomy.csv")["primary_label"].astype(str))
    assert classes == list(pd.read_csv(root / "val_solution.csv").columns[1:])
    assert sorted(set(train["primary_label"].astype(str))) == classes
    secondary = {s for cell in train["secondary_labels"] for s in ast.literal_eval(cell)}
    assert secondary <= set(classes)
    assert any(c.isdigit() for c in classes) and any(not c.isdigit() for c in classes)


def test_row_ids_name_each_5s_chunk_of_each_val_soundscape(root: Path) -> None:
    solution = pd.read_csv(root / "val_solution.csv")
    submission = pd.read_csv(root / "sample_submission.csv")
    stems = sorted(p.stem for p in (root / "val_soundscapes").glob("*.ogg"))
    ends = range(int(CHUNK_S), int(TINY.soundscape_s) + 1, int(CHUNK_S))
    assert sorted(solution["row_id"]) == sorted(f"{s}_{e}" for s in stems for e in ends)
    assert list(submission["row_id"]) == list(solution["row_id"])
    assert (submission.iloc[:, 1:] == 0.0).all().all()
    assert set(np.unique(solution.iloc[:, 1:].to_numpy())) <= {0, 1}


def test_every_listed_file_decodes_as_32k_mono(root: Path, train: pd.DataFrame) -> None:
    for row in train.itertuples():
        stem = Path(row.filename).stem
        assert row.filename == f"{row.primary_label}/{stem}.ogg"
        assert re.fullmatch(rf"{row.collection}\d+", stem), stem
        audio, sr = read(root / "train_audio" / row.filename)
        assert sr == TINY.sample_rate_hz and audio.shape[1] == 1
        assert TINY.focal_min_s - 0.1 <= len(audio) / sr <= TINY.focal_max_s + 0.1
        assert np.isfinite(audio).all() and 0.05 < np.abs(audio).max() <= 1.0
        assert 0.0 <= row.rating <= 5.0 and (row.rating * 2) % 1 == 0
    for path in [*(root / "train_soundscapes").glob("*.ogg"), *(root / "val_soundscapes").glob("*.ogg")]:
        audio, sr = read(path)
        assert sr == TINY.sample_rate_hz and audio.shape == (int(TINY.soundscape_s * sr), 1)


def test_focal_counts_are_long_tailed(train: pd.DataFrame) -> None:
    counts = train["primary_label"].value_counts()
    assert counts.min() <= 3
    assert counts.max() >= TINY.max_files_per_class


def test_val_solution_matches_the_calls_placed(root: Path) -> None:
    solution = pd.read_csv(root / "val_solution.csv")
    classes = list(solution.columns[1:])
    labels = solution[classes].to_numpy()
    assert 0 < labels.sum() < labels.size
    events = pd.read_csv(root / "truth/soundscape_events.csv").query("split == 'val'")
    for name, group in events.groupby("filename"):
        expected = chunk_labels([Event(r.label, r.start_s, r.end_s, r.snr_db) for r in group.itertuples()],
                                TINY.soundscape_s, classes)
        rows = solution["row_id"].str.rsplit("_", n=1).str[0] == Path(name).stem
        np.testing.assert_array_equal(solution.loc[rows, classes].to_numpy(), expected)


def test_chunk_labels_need_half_a_second_of_a_call() -> None:
    events = [Event("a", 4.7, 6.0, 0.0), Event("b", 11.0, 11.4, 0.0)]
    labels = chunk_labels(events, 15.0, ["a", "b"])
    # a: 0.3 s in chunk 1 (too little), 1.0 s in chunk 2; b: a 0.4-s call, wholly inside chunk 3.
    np.testing.assert_array_equal(labels, [[0, 0], [1, 0], [0, 1]])


def test_same_seed_same_dataset_regardless_of_workers(root: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", TINY, num_workers=2, progress=False)
    for table in ("train.csv", "taxonomy.csv", "val_solution.csv", "xc_archive/recordings.json"):
        assert (again / table).read_bytes() == (root / table).read_bytes(), table
    focal = pd.read_csv(root / "train.csv")["filename"].iloc[-1]
    soundscape = sorted((root / "val_soundscapes").glob("*.ogg"))[0].name
    for rel in (f"train_audio/{focal}", f"val_soundscapes/{soundscape}"):
        np.testing.assert_array_equal(read(again / rel)[0], read(root / rel)[0])


def test_another_seed_gives_another_dataset(tmp_path: Path) -> None:
    plans = [make_plan(tmp_path, SynthSpec(**{**TINY.__dict__, "seed": seed})) for seed in (0, 1)]
    assert not plans[0].train.equals(plans[1].train)
    first, second = (plan.jobs[0].render()[0] for plan in plans)
    assert first.shape != second.shape or not np.allclose(first, second)


def test_near_duplicates_share_author_and_audio_across_collections(root: Path, train: pd.DataFrame) -> None:
    pairs = []
    for _, group in train.groupby(["primary_label", "author", "latitude", "longitude"]):
        xc, inat = group[group.collection == "XC"], group[group.collection == "iNat"]
        pairs += [(a, b) for a in xc["filename"] for b in inat["filename"]]
    found = 0
    for a, b in pairs:
        x, y = (read(root / "train_audio" / f)[0][:, 0] for f in (a, b))
        if len(x) == len(y) and np.corrcoef(x, y)[0, 1] > 0.95:  # re-encoded, so not bit-equal
            found += 1
    assert found >= 1, "no XC/iNat re-upload of the same recording"
    # Recording sessions: one author, one place, several files.
    session_sizes = train.groupby(["author", "latitude", "longitude"]).size()
    assert session_sizes.max() >= 2


def test_archive_is_xeno_canto_v3_shaped_and_serves_minority_classes(root: Path, train: pd.DataFrame) -> None:
    records = json.loads((root / "xc_archive/recordings.json").read_text())
    taxonomy = pd.read_csv(root / "taxonomy.csv")
    train_ids = {int(Path(f).stem[2:]) for f in train["filename"] if Path(f).stem.startswith("XC")}
    assert records and all(set(r) == XC_V3_FIELDS for r in records)
    for rec in records:
        assert int(rec["id"]) not in train_ids
        assert rec["file"] == f"audio/XC{rec['id']}.mp3"
        assert f"{rec['gen']} {rec['sp']}" in set(taxonomy["scientific_name"])
        audio, sr = read(root / "xc_archive" / rec["file"])
        minutes, seconds = map(int, rec["length"].split(":"))
        assert sr == int(rec["smp"]) and abs(len(audio) / sr - (60 * minutes + seconds)) < 1.0
    archived = pd.Series([r["en"] for r in records]).value_counts()
    assert set(archived) == {TINY.n_archive_per_minority}
    counts = train["common_name"].value_counts()
    assert set(archived.index) == set(counts[counts <= TINY.minority_max_files].index)


def test_second_call_returns_at_once_and_a_changed_spec_is_refused(tmp_path: Path) -> None:
    out = generate(tmp_path / "d", MICRO, num_workers=0, progress=False)
    stamp = (out / "DONE.json").stat().st_mtime_ns
    started = time.perf_counter()
    assert generate(out, MICRO, num_workers=0, progress=False) == out
    assert time.perf_counter() - started < 1.0 and (out / "DONE.json").stat().st_mtime_ns == stamp
    changed = SynthSpec(**{**MICRO.__dict__, "seed": 7})
    with pytest.raises(ValueError, match="different spec"):
        generate(out, changed, num_workers=0, progress=False)
    generate(out, changed, num_workers=0, progress=False, overwrite=True)
    assert json.loads((out / "DONE.json").read_text())["spec"]["seed"] == 7
    assert not list(tmp_path.glob(".d.*")), "temporary or old folder left behind"


def test_a_folder_that_is_not_a_dataset_is_never_replaced(tmp_path: Path) -> None:
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        generate(keep, MICRO, num_workers=0, progress=False, overwrite=True)
    assert (keep / "notes.txt").read_text() == "precious"


def test_synthesize_names_data_root_and_deletes_only_its_own_datasets(tmp_path: Path) -> None:
    """From a config (CLI, rounds), a taken folder is a one-line ConfigError naming data.root, never replaced."""
    spec_cfg = OmegaConf.create({"_target_": "birdrounds.data.synthetic.SynthSpec", **MICRO.__dict__})
    out = synthesize(spec_cfg, tmp_path / "d", num_workers=0)
    spec_cfg.n_train_soundscapes = 1  # e.g. a newer default than the data already generated there
    with pytest.raises(ConfigError, match=r"^data\.root: .*different spec.*'n_train_soundscapes': \(0, 1\).*"
                       r"remove that folder to generate it anew") as err:
        synthesize(spec_cfg, out, num_workers=0)
    assert "overwrite=True" not in str(err.value) and "\n" not in str(err.value)
    assert json.loads((out / "DONE.json").read_text())["spec"]["n_train_soundscapes"] == 0
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not a synthetic dataset") as err:
        synthesize(spec_cfg, keep, num_workers=0)
    assert "remove" not in str(err.value) and (keep / "notes.txt").read_text() == "precious"


def test_spec_is_validated_and_hydra_instantiable() -> None:
    with pytest.raises(ValueError, match="soundscape_s"):
        dataclasses.replace(MICRO, soundscape_s=7.0)
    spec = instantiate({"_target_": "birdrounds.data.synthetic.SynthSpec", **MICRO.__dict__, "n_species": 3, "seed": 2})
    assert spec == dataclasses.replace(MICRO, n_species=3, seed=2)
    with pytest.raises(TypeError, match="n_species"):  # the config holds every size: none is made up here
        SynthSpec(**{k: v for k, v in MICRO.__dict__.items() if k != "n_species"})


# ---------------------------------------------------------------------------------------------------
# Domain gap: a spectral-template classifier fitted on focal clips must do clearly worse on soundscapes
# ---------------------------------------------------------------------------------------------------

def band_profile(audio: np.ndarray, sr: int) -> np.ndarray:
    """Foreground spectral profile of a window: loud frames minus the typical frame, 64 bands, unit norm."""
    _, _, power = signal.spectrogram(audio, sr, nperseg=512, noverlap=256)
    bands = np.log(power[:256].reshape(64, 4, -1).mean(axis=1) + 1e-10)
    profile = np.percentile(bands, 90, axis=1) - np.median(bands, axis=1)
    profile -= profile.mean()
    return profile / (np.linalg.norm(profile) + 1e-12)


def loud_to_floor_db(audio: np.ndarray) -> float:
    """How far the loud 23-ms frames (95th percentile) stand above the quiet ones (10th), in dB."""
    frames = audio[: len(audio) // 736 * 736].reshape(-1, 736)
    energy_db = 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)
    return float(np.percentile(energy_db, 95) - np.percentile(energy_db, 10))


def macro_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC-AUC over the classes that have both positives and negatives."""
    scored = [c for c in range(truth.shape[1]) if 0 < truth[:, c].sum() < len(truth)]
    return float(np.mean([roc_auc_score(truth[:, c], scores[:, c]) for c in scored]))


def test_soundscapes_are_harder_than_focal_clips_but_learnable(root: Path, train: pd.DataFrame) -> None:
    sr, window = TINY.sample_rate_hz, int(CHUNK_S * TINY.sample_rate_hz)
    classes = list(pd.read_csv(root / "sample_submission.csv").columns[1:])
    profiles: dict[str, list[np.ndarray]] = {c: [] for c in classes}
    focal_x, focal_y = [], []
    for label, group in train.groupby("primary_label"):
        for k, name in enumerate(group["filename"]):
            audio = read(root / "train_audio" / name)[0][:, 0]
            if k == 0:  # each class's first clip is held out, cut into 5-s windows
                for start in range(0, len(audio) - window + 1, window):
                    focal_x.append(band_profile(audio[start:start + window], sr))
                    focal_y.append(np.eye(len(classes))[classes.index(str(label))])
            else:
                profiles[str(label)].append(band_profile(audio[:window], sr))
    templates = np.stack([np.mean(profiles[c], axis=0) for c in classes])

    solution = pd.read_csv(root / "val_solution.csv").set_index("row_id")
    chunk_x, chunk_y = [], []
    for path in sorted((root / "val_soundscapes").glob("*.ogg")):
        audio = read(path)[0][:, 0]
        for k in range(len(audio) // window):
            chunk_x.append(band_profile(audio[k * window:(k + 1) * window], sr))
            chunk_y.append(solution.loc[f"{path.stem}_{int(CHUNK_S) * (k + 1)}"].to_numpy())
    # Focal clips: calls far above a quiet floor; soundscapes: calls near a loud, changing background.
    focal_range_db = np.median([loud_to_floor_db(read(root / "train_audio" / f)[0][:window, 0])
                                for f in train["filename"]])
    soundscape_range_db = np.median([loud_to_floor_db(read(p)[0][:, 0]) for p in (root / "val_soundscapes").glob("*")])
    assert focal_range_db >= soundscape_range_db + 10, \
        f"SNR gap too small: focal {focal_range_db:.0f} dB, soundscapes {soundscape_range_db:.0f} dB"
    focal_auc = macro_auc(np.array(focal_y), np.array(focal_x) @ templates.T)
    soundscape_auc = macro_auc(np.array(chunk_y), np.array(chunk_x) @ templates.T)
    # Seeds 0-5 gave focal 0.98-1.00 and soundscapes 0.80-0.89; the ranges are ~32 and ~13 dB.
    assert focal_auc >= 0.9, f"focal classes are not separable: AUC {focal_auc:.2f}"
    assert soundscape_auc <= focal_auc - 0.05, f"no domain gap: focal {focal_auc:.2f}, soundscape {soundscape_auc:.2f}"
    assert soundscape_auc >= 0.65, f"soundscapes not learnable from focal clips: AUC {soundscape_auc:.2f}"


def test_soundscape_dialect_shifts_soundscape_calls_only(tmp_path: Path) -> None:
    """With `soundscape_dialect`, both soundscape folders hear each species shifted in pitch and tempo;
    focal recordings, tables and the plan's random draws stay the same; 0 changes nothing."""
    from birdrounds.data.synthetic import _done_record, regional_dialect

    plain, shifted = make_plan(tmp_path, TINY), make_plan(tmp_path, SynthSpec(**{**TINY.__dict__, "soundscape_dialect": 0.2}))
    pd.testing.assert_frame_equal(plain.train, shifted.train)
    assert [job.path for job in plain.jobs] == [job.path for job in shifted.jobs]
    assert plain.jobs[len(plain.train_soundscapes) + len(plain.val_soundscapes):] == \
        shifted.jobs[len(shifted.train_soundscapes) + len(shifted.val_soundscapes):]  # focal + archive jobs
    by_label = {sp.label: sp for sp in plain.species}
    for job in (*shifted.train_soundscapes, *shifted.val_soundscapes):
        for sp in job.species:
            if sp.label in by_label:
                pitch, tempo = sp.f0_hz / by_label[sp.label].f0_hz, sp.rate_hz / by_label[sp.label].rate_hz
                assert 0.1 - 1e-9 <= abs(pitch - 1) <= 0.2 + 1e-9 and 0.1 - 1e-9 <= abs(tempo - 1) <= 0.2 + 1e-9
    assert regional_dialect(plain.species, 0.0, 0) is plain.species
    # A folder made before the option existed (no key in DONE.json) still matches the default spec.
    assert "soundscape_dialect" not in _done_record(TINY)["spec"]
    with pytest.raises(ValueError, match="soundscape_dialect"):
        dataclasses.replace(TINY, soundscape_dialect=0.6)
