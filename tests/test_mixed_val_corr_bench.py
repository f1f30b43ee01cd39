"""bench/mixed_val_corr.py: which folders it scores, and the split-half ceiling of the soundscape score."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from mixed_val_corr import merge_tables, reference_scores, parse_variant, run_facts, run_mixed_cfg, split_half_reliability, teacher_solution, variant_backgrounds, within_run_rho  # noqa: E402
from records import model_folders  # noqa: E402  (shared with bench/snr_tiers.py)


def finished(folder: Path, weights: bytes, done: bool = True) -> Path:
    folder.mkdir(parents=True)
    for name in ("metrics.json", "config.yaml"):
        (folder / name).write_text("{}")
    (folder / "model.pt").write_bytes(weights)
    if done:
        (folder / "DONE").write_text("")
    return folder


def test_model_folders_finished_only_once_each_in_run_round_order(tmp_path):
    main, oracle = tmp_path / "seed0", tmp_path / "seed0_oracle"
    teacher = finished(main / "round_0", b"teacher")
    student = finished(main / "round_1", b"student")
    control = finished(main / "round_1" / "control", b"control")
    finished(main / "round_2", b"killed student", done=False)  # not finished: skipped
    third = finished(main / "round_3", b"third")
    finished(main / "round_10", b"late")  # after round_3, though it sorts before it by name
    finished(main / "round_backup", b"not a round")
    finished(oracle / "round_0", b"teacher")  # the oracle run's copy of the teacher: counted once
    oracle_1 = finished(oracle / "round_1", b"oracle")
    assert model_folders([main, oracle]) == [teacher, student, control, third, main / "round_10", oracle_1]


def test_parse_variant_reads_yaml_values():
    assert parse_variant("far:distance=[1,4];quiet_fraction=0.2") == ("far", {"distance": [1, 4], "quiet_fraction": 0.2})
    assert parse_variant("plain") == ("plain", {})


def test_a_variant_can_take_its_backgrounds_from_another_folder(tmp_path):
    own = [tmp_path / "train_soundscapes" / "a.ogg"]
    other = tmp_path / "unseen"
    other.mkdir()
    for name in ("b.ogg", "c.wav", "notes.txt"):
        (other / name).write_bytes(b"")
    name, overrides = parse_variant(f"unseen:background_dir={other};quiet_fraction=0.2")
    assert variant_backgrounds(overrides, own) == ({"quiet_fraction": 0.2}, [other / "b.ogg", other / "c.wav"])
    assert variant_backgrounds({"quiet_fraction": 0.2}, own) == ({"quiet_fraction": 0.2}, own)


def test_teacher_solution_is_the_external_models_zero_shot_labels_above_the_threshold(tmp_path):
    """val_teacher_auc's labels: each chunk's matched external probability against the threshold; unknown classes 0."""
    import tiny_audio_model
    from birdrounds.data.audio import DirectAudio, write_audio
    from birdrounds.data.soundscapes import SoundscapeChunks
    from birdrounds.external import load_external

    model = load_external("onnx", path=str(tiny_audio_model.build(tmp_path / "models", ["Turdus merula", "Parus major"])))
    taxonomy = pd.DataFrame({"primary_label": ["blackbird", "greti1", "frog1"],
                             "scientific_name": ["Turdus merula", "Parus major", "Rana temporaria"]})
    rng = np.random.default_rng(0)
    files = [tmp_path / f"S{i}.ogg" for i in range(2)]
    for f in files:
        write_audio(f, 0.1 * rng.standard_normal(32_000 * 15).astype(np.float32), 32_000)
    audio = DirectAudio(32_000)
    chunks = SoundscapeChunks(files, audio, window_s=5.0, stride_s=5.0)
    classes = ["blackbird", "frog1", "greti1"]
    solutions = {t: teacher_solution(model, taxonomy, classes, chunks, audio, tmp_path / "cache", t)
                 for t in (0.0, 0.5, 1.01)}
    assert list(solutions[0.0]["row_id"]) == list(chunks.rows["row_id"]) and len(chunks.rows) == 6
    assert solutions[0.0][["blackbird", "greti1"]].to_numpy().all()  # every probability reaches 0
    assert not solutions[0.0]["frog1"].any() and not solutions[1.01][classes].to_numpy().any()
    middle = solutions[0.5][classes].to_numpy()
    assert (middle <= solutions[0.0][classes].to_numpy()).all()
    assert any((tmp_path / "cache" / "features").rglob("*.npz"))  # read through the runs' feature cache


def toy_scores(noise: list[float], seed: int = 0, n_files: int = 24, rows: int = 12, n_classes: int = 4):
    """Chunk probabilities of one model per noise level: the truth plus that much Gaussian noise."""
    rng = np.random.default_rng(seed)
    classes = [f"c{i}" for i in range(n_classes)]
    row_ids = np.array([f"S{f:02d}_{5 * (r + 1)}" for f in range(n_files) for r in range(rows)])
    truth = (rng.random((len(row_ids), n_classes)) < 0.3).astype(int)
    solution = pd.DataFrame(truth, columns=classes)
    solution.insert(0, "row_id", row_ids)
    scores = [truth + sigma * rng.standard_normal(truth.shape) for sigma in noise]
    return scores, row_ids, solution, classes


def test_split_half_reliability_high_for_real_differences_low_for_noise():
    # Models far apart in quality rank the same on every half of the files.
    mean, low, high = split_half_reliability(*toy_scores([0.3, 0.6, 1.0, 1.6, 2.5, 4.0]), n_splits=10)
    assert mean > 0.9 and low <= mean <= high <= 1.0
    # Models equal in quality (independent noise of the same size): the halves disagree on their order.
    mean, low, high = split_half_reliability(*toy_scores([1.0] * 8), n_splits=12)
    assert mean < 0.5 and low < 0 < high
    # The same splits for the same seed.
    scores = toy_scores([0.5, 1.0, 2.0, 1.5])
    assert split_half_reliability(*scores, n_splits=5, seed=3) == split_half_reliability(*scores, n_splits=5, seed=3)


def test_within_run_rho_ranks_inside_each_split_seed():
    # Each seed's metric is off by its own constant (another held-out fold): pooled, the order is lost;
    # within each seed it is exact, and removing the seed means restores it.
    truth = [0.80, 0.82, 0.84, 0.86]
    table = [{"seed": seed, "val_soundscape_auc": t, "m": t + offset}
             for seed, offset in ((0, 0.0), (1, -0.1), (2, 0.1)) for t in truth]
    table.append({"seed": 3, "val_soundscape_auc": 0.9, "m": 0.1})  # a lone model: no within-seed rank
    out = within_run_rho(table, "m")
    assert out["per_seed"] == {0: (1.0, 4), 1: (1.0, 4), 2: (1.0, 4)}
    assert out["mean"] == 1.0 and out["std"] == 0.0
    assert out["centred"][0] > 0.99
    reversed_table = [{**row, "m": -row["m"]} for row in table]
    assert within_run_rho(reversed_table, "m")["mean"] == -1.0


def test_run_facts_reads_seeds_and_oracle(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 2\ndata: {}\npseudo:\n  truth: /data/truth.csv\n")
    facts = run_facts(OmegaConf.load(tmp_path / "config.yaml"))
    assert facts == {"seed": 2, "split_seed": 2, "oracle": True}  # a run from before split_seed
    (tmp_path / "config.yaml").write_text("seed: 1\ndata:\n  split_seed: 0\npseudo:\n  truth: null\n")
    assert run_facts(OmegaConf.load(tmp_path / "config.yaml")) == {"seed": 1, "split_seed": 0, "oracle": False}


def test_within_run_rho_groups_by_split_seed_not_training_seed():
    truth = [0.80, 0.82, 0.84]
    table = [{"seed": seed, "split_seed": 0, "val_soundscape_auc": t, "m": t} for seed, t in enumerate(truth)]
    assert within_run_rho(table, "m")["per_seed"] == {0: (1.0, 3)}


def test_merge_tables_counts_a_copied_model_once_and_keeps_shared_columns(tmp_path):
    teacher = finished(tmp_path / "a" / "round_0", b"teacher")
    copy = finished(tmp_path / "b" / "round_0", b"teacher")  # --teacher-from copied it: same weights
    student = finished(tmp_path / "b" / "round_1", b"student")
    scores = {"val_soundscape_auc": 0.8, "val_clip_auc": 0.9, "val_mixed_auc": 0.85}
    first = [{"model": str(teacher), **scores, "val_raw_auc": 0.7},
             {"model": "/gone/round_1", **scores}]  # a folder deleted since: known by its path
    second = [{"model": str(copy), **scores}, {"model": str(student), **scores},
              {"model": "/gone/round_1", **scores}]
    merged = merge_tables([first, second])
    assert [row["model"] for row in merged] == [str(teacher), "/gone/round_1", str(student)]
    assert all("val_raw_auc" not in row and row["val_mixed_auc"] == 0.85 for row in merged)


def test_reference_scores_find_a_model_by_its_weights_wherever_it_was_copied(tmp_path):
    from birdrounds.model import checkpoint_hash

    teacher = finished(tmp_path / "a" / "round_0", b"teacher")
    copy = finished(tmp_path / "b" / "round_0", b"teacher")
    other = finished(tmp_path / "b" / "round_1", b"student")
    scores = reference_scores([[{"model": str(teacher), "val_soundscape_auc": 0.81},
                                {"model": "/gone/round_1", "val_soundscape_auc": 0.5}]])
    assert scores == {checkpoint_hash(copy / "model.pt"): 0.81}
    assert checkpoint_hash(other / "model.pt") not in scores


def test_an_older_runs_mixed_set_is_built_with_the_legacy_values_not_todays(monkeypatch):
    # A run recorded before data.mixed_val.distance / subtract_background / ... existed: the bench must build
    # the set that run's own code builds (config.LEGACY), not the shipped YAML's newer design.
    import birdrounds.data.mixed_val as mixed_val
    from birdrounds.config import LEGACY, shipped_config

    old_run = OmegaConf.create({"data": {"mixed_val": {"n_rows": 40, "seed": 3}}})
    built = {}
    monkeypatch.setattr(mixed_val, "build_mixed_validation", lambda *args, **kwargs: built.update(kwargs))
    mixed_val.mixed_validation_from_config(OmegaConf.create({**run_mixed_cfg(old_run), "enabled": True}),
                                           pd.DataFrame({"filename": ["a.ogg"]}), ["s.ogg"], None, ["c"])
    shipped = shipped_config("data.mixed_val", "data=birdclef2025")
    assert (built["n_rows"], built["seed"]) == (40, 3)
    for key in ("distance", "subtract_background", "distance_from_snr"):
        assert built[key] == LEGACY[f"data.mixed_val.{key}"], key
    assert list(shipped.distance) != LEGACY["data.mixed_val.distance"] or shipped.subtract_background  # today differs
    assert built["snr_db"] == [float(v) for v in shipped.snr_db]  # a key without a legacy value: today's
    assert run_mixed_cfg(OmegaConf.create({"data": {}})) == {}


def test_from_json_record_holds_the_table_and_the_printed_correlations(tmp_path):
    rng = np.random.default_rng(1)
    table = []
    for split_seed in (0, 1):
        for k in range(4):
            truth = 0.6 + 0.05 * k + 0.01 * split_seed
            table.append({"model": str(tmp_path / f"gone{split_seed}" / f"round_{k}"), "arm": "student", "round": k,
                          "seed": split_seed, "split_seed": split_seed, "oracle": k == 3, "val_soundscape_auc": truth,
                          "val_clip_auc": truth + rng.normal(0, 0.05), "val_mixed_auc": truth + rng.normal(0, 0.01)})
    saved, out = tmp_path / "table.json", tmp_path / "records"
    saved.write_text(json.dumps(table))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "mixed_val_corr.py"), "--from-json", str(saved),
                           "--record"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BIRDROUNDS_RESULTS_DIR": str(out)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [path] = out.glob("mixed-val-corr-*.json")
    assert f"record: {path}" in proc.stderr
    record = json.loads(path.read_text())
    assert record["benchmark"] == "mixed_val_corr" and record["command"].startswith("python bench/mixed_val_corr.py")
    assert record["results"]["table"] == table  # the --json table it read, as it is
    rows = record["results"]["correlations"]
    subsets = {"all": table, "without oracle students": [row for row in table if not row["oracle"]]}
    assert [(r["models"], r["n_models"], r["metric"]) for r in rows] == [
        (label, len(models), metric) for label, models in subsets.items() for metric in ("val_clip_auc", "val_mixed_auc")]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("| val_")]
    assert len(printed) == len(rows) == 4
    for r, line in zip(rows, printed):
        models = subsets[r["models"]]
        expected = spearmanr([m[r["metric"]] for m in models], [m["val_soundscape_auc"] for m in models])
        assert np.isclose(r["rho"], expected.statistic) and np.isclose(r["p"], expected.pvalue)
        within = within_run_rho(models, r["metric"])
        seeds = r["within_split_seed"]
        assert seeds == {str(seed): {"rho": rho, "models": n} for seed, (rho, n) in within["per_seed"].items()}
        assert line.startswith(f"| {r['metric']} | {r['rho']:.3f} | {r['p']:.2g} | "
                               f"0: {seeds['0']['rho']:.3f} ({seeds['0']['models']}), 1: ")
        assert line.endswith(f"| {r['within_mean']:.3f} ± {r['within_std']:.3f} | "
                             f"{r['centred_rho']:.3f} ({r['centred_p']:.2g}) |")
    # The record renders on the results page, in the mixed-validation section, as a table of those rows.
    from render_results import load_records, render

    page = render(load_records(out))
    assert "## Validation without labeled soundscapes" in page
    assert ("| models | n_models | metric | rho | p | within_split_seed | within_mean | within_std | centred_rho "
            "| centred_p |") in page
    assert page.count("| without oracle students | 6 | val_") == 2
