"""The mixed validation (data/mixed_val.py): held-out clips only, deterministic, Kaggle rows; its wiring."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from birdrounds.config import compose, shipped_config
from birdrounds.data import mixed_val
from birdrounds.data.mixed_val import _active_level, far_away, mixed_validation_from_config
from birdrounds.rounds import config_hash

SR = 8000
CLASSES = ["a", "b", "c", "d"]

# The tests build from the shipped data.mixed_val's values, the raw set (calls as recorded, raw probabilities)
# unless they ask for distance or subtraction, which the shipped config turns on.
SHIPPED = {k: v for k, v in OmegaConf.to_container(shipped_config("data.mixed_val", "data=birdclef2025"), resolve=True).items()
           if k != "enabled"}
build_mixed_validation = functools.partial(mixed_val.build_mixed_validation, **{**SHIPPED, "distance": (0.0, 0.0),
                                                                                 "subtract_background": False})


class DictAudio:
    """An audio source over in-memory waveforms."""

    sample_rate_hz = SR

    def __init__(self, waves: dict[str, np.ndarray]) -> None:
        self.waves = waves

    def load(self, path):
        return self.waves[str(path)]


@pytest.fixture
def toy():
    rng = np.random.default_rng(0)
    waves, rows = {}, []
    for i, label in enumerate(CLASSES * 3):
        t = np.arange(int(SR * rng.uniform(2, 9))) / SR
        waves[f"clip{i}.ogg"] = (0.3 * np.sin(2 * np.pi * (1200 + 300 * CLASSES.index(label)) * t)).astype(np.float32)
        rows.append({"primary_label": label, "secondary_labels": ["d"] if i == 0 else [], "path": f"clip{i}.ogg",
                     "fold": i % 3})
    for k in range(3):  # 30-s soundscapes whose loudness varies by segment
        envelope = np.repeat(rng.uniform(0.01, 0.2, 6), 5 * SR)
        waves[f"scape{k}.ogg"] = (rng.standard_normal(30 * SR) * envelope).astype(np.float32)
    table = pd.DataFrame(rows)
    return table, [f"scape{k}.ogg" for k in range(3)], DictAudio(waves)


def test_uses_held_out_clips_only_and_has_kaggle_row_format(toy):
    table, scapes, audio = toy
    held_out = table[table["fold"] == 0].reset_index(drop=True)
    mixed = build_mixed_validation(held_out, scapes, audio, CLASSES, n_rows=40, seed=1, quiet_fraction=0.5)
    used = {call.path for calls in mixed.calls for call in calls}
    assert used and used <= set(held_out["path"])
    # Solution: row_id + one 0/1 column per class, one row per item, ids like Kaggle's '<stem>_<end second>'.
    assert list(mixed.solution.columns) == ["row_id", *CLASSES] and len(mixed.solution) == len(mixed) == 40
    assert mixed.solution["row_id"].is_unique and (mixed.solution["row_id"] == mixed.rows["row_id"]).all()
    assert all(re.fullmatch(r"mixed\d+_\d+", r) for r in mixed.solution["row_id"])
    assert mixed.solution["row_id"].iloc[0] == "mixed0_5" and mixed.solution["row_id"].iloc[12] == "mixed1_5"
    labels = mixed.solution[CLASSES].to_numpy()
    assert set(np.unique(labels)) <= {0, 1}
    no_call = (mixed.rows["n_calls"] == 0).to_numpy()
    assert no_call.any() and (~no_call).any()
    assert (labels[no_call] == 0).all() and (labels[~no_call].sum(axis=1) >= 1).all()
    for k, calls in enumerate(mixed.calls):  # each call's primary label (and clip 0's secondary) is positive
        for call in calls:
            clip = held_out.set_index("path").loc[call.path]
            assert labels[k, CLASSES.index(clip["primary_label"])] == 1
            if call.path == "clip0.ogg":
                assert labels[k, CLASSES.index("d")] == 1
    # Backgrounds: only the quieter half of the 5-s soundscape segments.
    segments = sorted(float(np.sqrt(np.mean(audio.load(s)[i * 5 * SR:(i + 1) * 5 * SR] ** 2)))
                      for s in scapes for i in range(6))
    for _, row in mixed.rows.iterrows():
        piece = audio.load(row["background"])[row["background_start"]:row["background_start"] + 5 * SR]
        assert np.sqrt(np.mean(piece ** 2)) <= segments[len(segments) // 2] + 1e-6
    item = mixed[0]
    assert item["audio"].shape == (5 * SR,) and item["audio"].dtype.is_floating_point and int(item["index"]) == 0


def test_is_deterministic_and_follows_the_seed(toy):
    table, scapes, audio = toy
    build = functools.partial(build_mixed_validation, table, scapes, audio, CLASSES, n_rows=24)
    first, again, other = build(seed=3), build(seed=3), build(seed=4)
    pd.testing.assert_frame_equal(first.solution, again.solution)
    pd.testing.assert_frame_equal(first.rows, again.rows)
    assert all(np.array_equal(first.render(k), again.render(k)) for k in range(len(first)))
    assert not (first.rows.equals(other.rows) and first.solution.equals(other.solution))


def test_calls_sit_at_the_asked_level_over_the_background(toy):
    table, scapes, audio = toy
    mixed = build_mixed_validation(table, scapes, audio, CLASSES, n_rows=12, seed=0, snr_db=(6.0, 6.0),
                                   calls_per_row=(0.0, 1.0), call_s=(5.0, 5.0))
    for k, calls in enumerate(mixed.calls):
        (call,) = calls
        background = audio.load(mixed.rows.at[k, "background"])
        start = mixed.rows.at[k, "background_start"]
        bg_rms = np.sqrt(np.mean(background[start:start + 5 * SR].astype(np.float64) ** 2))
        piece = call.gain * audio.load(call.path)[call.clip_start:call.clip_start + call.length]
        assert abs(20 * np.log10(np.sqrt(np.mean(piece ** 2)) / bg_rms) - 6.0) < 1.0  # a steady tone: active = mean


def test_far_calls_lose_high_frequencies_gain_a_tail_and_keep_their_level():
    rng = np.random.default_rng(0)
    dry = (0.1 * rng.standard_normal(SR)).astype(np.float32)  # white: energy at every frequency

    def high_share(x):
        power = np.abs(np.fft.rfft(x)) ** 2
        return power[np.fft.rfftfreq(len(x), 1 / SR) > 2000].sum() / power.sum()

    assert far_away(dry, SR, 0.0, seed=1) is dry
    near, far = far_away(dry, SR, 0.3, seed=1), far_away(dry, SR, 1.0, seed=1)
    assert len(dry) < len(near) < len(far) == len(dry) + int(0.8 * SR) - 1  # RT60 0.1 + 0.7 * distance
    assert high_share(far) < high_share(near) < high_share(dry)
    for wave in (near, far):
        assert _active_level(wave, SR) == pytest.approx(_active_level(dry, SR), rel=1e-4)  # the drawn SNR holds
    np.testing.assert_array_equal(far, far_away(dry, SR, 1.0, seed=1))


def test_distance_option_renders_every_call_from_afar(toy):
    table, scapes, audio = toy
    build = functools.partial(build_mixed_validation, table, scapes, audio, CLASSES, n_rows=24, seed=5)
    plain, far = build(), build(distance=(0.5, 1.0))
    assert all(call.distance == 0.0 for calls in plain.calls for call in calls)
    distances = [call.distance for calls in far.calls for call in calls]
    assert distances and all(0.5 <= d <= 1.0 for d in distances)
    k = next(i for i, calls in enumerate(far.calls) if calls)
    np.testing.assert_array_equal(far.render(k), build(distance=(0.5, 1.0)).render(k))  # deterministic
    via_config = mixed_validation_from_config(OmegaConf.create({"enabled": True, "n_rows": 24, "seed": 5,
                                                                "distance": [0.5, 1.0]}), table, scapes, audio, CLASSES)
    pd.testing.assert_frame_equal(via_config.rows, far.rows)
    for bad in ((0.5, 0.2), (0.0, 1.5), (-0.1, 0.5)):
        with pytest.raises(ValueError, match="distance"):
            build(distance=bad)


def test_distance_from_snr_puts_faint_calls_far_and_keeps_everything_else(toy):
    table, scapes, audio = toy
    build = functools.partial(build_mixed_validation, table, scapes, audio, CLASSES, n_rows=24, seed=5,
                              snr_db=(-6.0, 10.0), distance=(0.2, 1.0), calls_per_row=(0.0, 1.0))
    drawn, coupled = build(), build(distance_from_snr=True)
    pd.testing.assert_frame_equal(coupled.rows, drawn.rows)
    pd.testing.assert_frame_equal(coupled.solution, drawn.solution)
    level, distance = [], []
    for k, (calls, twins) in enumerate(zip(coupled.calls, drawn.calls)):
        (call,), (twin,) = calls, twins
        assert (call.path, call.clip_start, call.length, call.offset, call.gain, call.seed) == \
               (twin.path, twin.clip_start, twin.length, twin.offset, twin.gain, twin.seed)
        background = audio.load(coupled.rows.at[k, "background"])
        start = coupled.rows.at[k, "background_start"]
        bg_rms = np.sqrt(np.mean(background[start:start + 5 * SR].astype(np.float64) ** 2))
        piece = audio.load(call.path)[call.clip_start:call.clip_start + call.length]
        level.append(20 * np.log10(call.gain * _active_level(piece, SR) / bg_rms))  # the drawn SNR
        distance.append(call.distance)
    level, distance = np.array(level), np.array(distance)
    # The drawn SNR maps linearly onto the distance range: 10 dB -> 0.2, -6 dB -> 1.0.
    np.testing.assert_allclose(distance, 0.2 + 0.8 * (10.0 - level) / 16.0, atol=1e-3)
    assert not np.allclose([c.distance for (c,) in drawn.calls], distance)  # the uniform draws differ
    via_config = mixed_validation_from_config(OmegaConf.create({"enabled": True, "n_rows": 24, "seed": 5,
                                                                "snr_db": [-6.0, 10.0], "distance": [0.2, 1.0],
                                                                "calls_per_row": [0.0, 1.0], "distance_from_snr": True}),
                                              table, scapes, audio, CLASSES)
    assert [c.distance for (c,) in via_config.calls] == distance.tolist()


def test_background_labels_limit_backgrounds_to_empty_segments(toy, tmp_path):
    """Only segments a labels CSV marks all-zero serve as backgrounds; the quiet ranking applies among them."""
    table, scapes, audio = toy
    labels = pd.DataFrame({"row_id": [f"{Path(s).stem}_{5 * (i + 1)}" for s in scapes for i in range(6)]})
    for c in CLASSES:
        labels[c] = 0
    labels.loc[labels["row_id"].str.startswith("scape0") | labels["row_id"].isin(["scape1_10", "scape1_5"]), "a"] = 1
    path = tmp_path / "labels.csv"
    labels.to_csv(path, index=False)
    mixed = build_mixed_validation(table, scapes, audio, CLASSES, n_rows=60, seed=2, quiet_fraction=1.0,
                                   background_labels=path)
    used = {(row["background"], row["background_start"] // (5 * SR)) for _, row in mixed.rows.iterrows()}
    empty = {(s, i) for s in scapes for i in range(6) if s != "scape0.ogg"} - {("scape1.ogg", 0), ("scape1.ogg", 1)}
    assert used <= empty and len(used) > 3
    via_config = mixed_validation_from_config(OmegaConf.create({"enabled": True, "n_rows": 60, "seed": 2,
                                                                "quiet_fraction": 1.0, "background_labels": str(path)}),
                                              table, scapes, audio, CLASSES)
    pd.testing.assert_frame_equal(via_config.rows, mixed.rows)
    labels[CLASSES] = 1
    labels.to_csv(path, index=False)
    with pytest.raises(ValueError, match="listed as empty in background_labels"):
        build_mixed_validation(table, scapes, audio, CLASSES, n_rows=5, background_labels=path)


def test_background_subtraction_scores_what_the_calls_changed(toy):
    """With subtract_background every background used is also an item alone; a row scores its probabilities
    minus its background's, so a class already present in a background (scored absent) stops counting."""
    table, scapes, audio = toy
    build = functools.partial(build_mixed_validation, table, scapes, audio, CLASSES, n_rows=36, seed=5)
    plain, subtracting = build(), build(subtract_background=True)
    n = len(plain)
    assert not plain.subtracts_background and subtracting.subtracts_background
    # The scored rows, their calls and the solution are the same; the backgrounds alone follow them.
    pd.testing.assert_frame_equal(subtracting.rows.iloc[:n][plain.rows.columns], plain.rows)
    pd.testing.assert_frame_equal(subtracting.solution, plain.solution)
    assert subtracting.calls[:n] == plain.calls and all(c == [] for c in subtracting.calls[n:])
    alone = subtracting.rows.iloc[n:]
    used = set(zip(plain.rows["background"], plain.rows["background_start"]))
    assert len(alone) == len(used) == len(set(zip(alone["background"], alone["background_start"])))
    assert not alone["row_id"].isin(subtracting.solution["row_id"]).any()
    for k in range(n):
        j = int(subtracting.rows.at[k, "background_row"])
        assert j >= n and (subtracting.rows.loc[j, ["background", "background_start"]] ==
                           subtracting.rows.loc[k, ["background", "background_start"]]).all()
        start = int(subtracting.rows.at[k, "background_start"])
        expected = audio.load(subtracting.rows.at[k, "background"])[start:start + 5 * SR]
        np.testing.assert_array_equal(subtracting.render(j), expected)
    # A model that hears a background bird of class "a" in some segments and every added call: the raw
    # score counts those segments' "a" as false alarms, the subtracted one does not.
    truth = subtracting.solution[CLASSES].to_numpy().astype(float)
    loud_a = {bg: i % 2 == 0 for i, bg in enumerate(sorted(used))}
    background = np.array([[0.9 if loud_a[(r["background"], r["background_start"])] else 0.05, 0.05, 0.05, 0.05]
                           for _, r in subtracting.rows.iterrows()])
    probs = background.copy()
    probs[:n] = np.minimum(1.0, background[:n] + 0.6 * truth)
    order = np.random.default_rng(0).permutation(len(subtracting))  # items may come back in any order
    assert subtracting.score(probs[order], order, CLASSES) == pytest.approx(1.0)
    assert plain.score(probs[:n], np.arange(n), CLASSES) < 0.99  # class a: 0.85 here
    with pytest.raises(ValueError, match="no prediction"):
        subtracting.score(probs[:n], np.arange(n), CLASSES)
    via_config = mixed_validation_from_config(OmegaConf.create({"enabled": True, "n_rows": 36, "seed": 5,
                                                                "subtract_background": True}),
                                              table, scapes, audio, CLASSES)
    pd.testing.assert_frame_equal(via_config.rows, subtracting.rows)


def test_config_switch(toy):
    table, scapes, audio = toy
    assert mixed_validation_from_config(None, table, scapes, audio, CLASSES) is None
    assert mixed_validation_from_config(OmegaConf.create({"enabled": False}), table, scapes, audio, CLASSES) is None
    assert mixed_validation_from_config(OmegaConf.create({"enabled": True}), table.iloc[:0], scapes, audio, CLASSES) is None
    on = mixed_validation_from_config(OmegaConf.create({"enabled": True, "n_rows": 7, "snr_db": [-3, 3]}),
                                      table, scapes, audio, CLASSES)
    assert len(on) == 7


def test_config_defaults_and_hash_ignores_it():
    base = compose(["experiment=smoke"])
    assert base.data.mixed_val.enabled is True and compose([]).data.mixed_val.enabled is False  # the demo: off
    assert compose(["data=birdclef2025", "data.root=/x"]).data.mixed_val.n_rows == 300
    older = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    del older.data["mixed_val"]  # a round completed before data.mixed_val existed is reused, not refused
    for k in (0, 1):
        assert config_hash(base, k) == config_hash(older, k)
        assert config_hash(base, k) == config_hash(compose(["experiment=smoke", "data.mixed_val.n_rows=10"]), k)
        assert config_hash(base, k) == config_hash(compose(["experiment=smoke", "data.mixed_val=null"]), k)
        assert config_hash(base, k) != config_hash(compose(["experiment=smoke", "data.fold=1"]), k)


def test_split_seed_fixes_the_held_out_fold_across_training_seeds(home):
    from birdrounds import cli, rounds
    from birdrounds.data.prepare import prepare_data

    assert cli.main(["synth", "experiment=smoke"]) == 0
    cfg = compose(["experiment=smoke", "logger=none"])
    folds = {seed: prepare_data(cfg.data, seed=seed, progress=False).folds for seed in (0, 1, 2)}
    assert any(not np.array_equal(folds[0], folds[seed]) for seed in (1, 2))  # null: the fold follows the seed
    fixed = compose(["experiment=smoke", "logger=none", "data.split_seed=0"])
    for seed in (1, 2):
        assert np.array_equal(prepare_data(fixed.data, seed=seed, progress=False).folds, folds[0])
    # null is the behaviour before the key existed: finished rounds keep their hash; a fixed split does not.
    old = cfg.copy()
    OmegaConf.set_struct(old, False)
    old.data.pop("split_seed")
    assert rounds.config_hash(cfg, 1) == rounds.config_hash(old, 1)
    assert rounds.config_hash(fixed, 1) != rounds.config_hash(cfg, 1)


def test_build_datasets_mixes_the_held_out_fold_only(home):
    from birdrounds import cli
    from birdrounds.data.prepare import prepare_data
    from birdrounds.rounds import build_datasets

    assert cli.main(["synth", "experiment=smoke"]) == 0
    cfg = compose(["experiment=smoke", "logger=none", "data.mixed_val.n_rows=24"])
    prepared = prepare_data(cfg.data, progress=False)
    parts = build_datasets(prepared, cfg.data, cfg.seed)
    held_out = set(prepared.data.train["path"][prepared.folds == cfg.data.fold])
    used = {call.path for calls in parts.val_mixed.calls for call in calls}
    assert used and used <= held_out and not used & set(parts.train_table["path"])
    assert set(parts.val_mixed.rows["background"]) <= {str(p) for p in prepared.data.soundscapes}
    cfg.data.mixed_val = None
    assert build_datasets(prepared, cfg.data, cfg.seed).val_mixed is None


def test_fit_scores_val_mixed_auc_every_epoch(tmp_path, toy):
    """fit logs val_mixed_auc (backgrounds subtracted) beside the other metrics, in every history entry and
    metrics.json."""
    import train_script
    from accelerate import Accelerator

    from birdrounds import train
    from birdrounds.data.audio import DirectAudio

    data = tmp_path / "data"
    train_script.make_data(data)
    table = pd.read_pickle(data / "clips.pkl")
    audio = DirectAudio(train_script.SAMPLE_RATE_HZ)
    mixed = build_mixed_validation(table[table["split"] == "val"], sorted(map(str, data.glob("scape*.wav"))), audio,
                                   train_script.CLASSES, n_rows=12, seed=0, quiet_fraction=1.0, call_s=(0.5, 1.0),
                                   chunk_s=train_script.WINDOW_S, subtract_background=True)
    patched = functools.partial(train.fit, val_mixed=mixed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_script, "fit", patched)
        out = tmp_path / "out"
        result = train_script.train(data, out, Accelerator(), train_script.settings(epochs=2, steps=1))
    assert len(result["history"]) == 2 and all(0.0 <= h["val_mixed_auc"] <= 1.0 for h in result["history"])
    assert "val_soundscape_auc" in result and json.loads((out / "metrics.json").read_text())["val_mixed_auc"] == \
        result["val_mixed_auc"]


def test_report_has_a_val_mixed_auc_column(tmp_path):
    from birdrounds.report import write_report

    for k, (scape, clip, mixed) in enumerate([(0.6, 0.9, 0.62), (0.7, 0.85, 0.69)]):
        folder = tmp_path / f"round_{k}"
        folder.mkdir()
        metrics = {"round": k, "val_soundscape_auc": scape, "val_clip_auc": clip, "val_mixed_auc": mixed}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "manifest.json").write_text(json.dumps({"round": k, "seconds": 1.0}))
        (folder / "DONE").write_text("{}")
    report = write_report(tmp_path).read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert "| val_mixed_auc | change | control | gain vs control |" in table[0]
    assert table[0].count("|") == table[1].count("|") == table[3].count("|")
    assert table[3].split(" | ")[10:12] == ["0.690", "+0.070"]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["rounds"][1]["val_mixed_auc"] == 0.69
