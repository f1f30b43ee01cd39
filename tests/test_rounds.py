"""Round helpers: teacher ensemble paths, model init per round, what the config hash ignores."""

import pytest
import torch
from omegaconf import open_dict

from birdrounds.config import ConfigError, compose
from birdrounds.model import save_checkpoint
from birdrounds.rounds import build_model, config_hash, teacher_paths


def test_teacher_paths_add_extra_teachers_and_name_a_missing_one(tmp_path):
    extra = tmp_path / "other_seed.pt"
    model = build_model(compose(["experiment=smoke"]), 3, 0)
    save_checkpoint(extra, model, ["a", "b", "c"])
    cfg = compose(["experiment=smoke", f"pseudo.extra_teachers=[{extra}]"])
    assert teacher_paths(cfg, tmp_path, 2) == [tmp_path / "round_1" / "model.pt", extra]
    cfg = compose(["experiment=smoke", f"pseudo.extra_teachers=[{tmp_path / 'nope.pt'}]"])
    with pytest.raises(ConfigError, match="pseudo.extra_teachers: checkpoint not found"):
        teacher_paths(cfg, tmp_path, 1)


def test_build_model_is_seeded_per_round_and_students_get_their_drop_path():
    cfg = compose(["experiment=smoke", "pseudo.student_drop_path_rate=0.15"])
    first, again = build_model(cfg, 4, 0), build_model(cfg, 4, 0)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    other = build_model(cfg, 4, 1)
    assert not torch.equal(first.head.cla.weight, other.head.cla.weight)  # another round, another init
    assert first.init_kwargs["drop_path_rate"] == 0.0 and other.init_kwargs["drop_path_rate"] == 0.15
    # Stochastic depth is live in the student's blocks.
    rates = [m.drop_prob for m in other.backbone.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) > 0


def test_config_hash_ignores_where_and_how_not_what():
    base = compose(["experiment=smoke"])
    assert config_hash(base, 1) == config_hash(compose(["experiment=smoke", "predict.threads=1",
                                                        "export.int8=true", "logger=none",
                                                        "experiment_name=renamed"]), 1)
    assert config_hash(base, 0) == config_hash(compose(["experiment=smoke", "pseudo=second_2025"]), 0)
    # The weights' memory layout: on, off, or a run recorded before the key existed reuse the same rounds.
    nchw = compose(["experiment=smoke", "train.channels_last=false"])
    before_key = compose(["experiment=smoke"])
    with open_dict(before_key):
        del before_key.train["channels_last"]
    for round_idx in (0, 1):
        assert config_hash(base, round_idx) == config_hash(nchw, round_idx) == config_hash(before_key, round_idx)
    assert config_hash(base, 1) != config_hash(compose(["experiment=smoke", "pseudo=second_2025"]), 1)
    assert config_hash(base, 1) != config_hash(compose(["experiment=smoke", "pseudo.student_drop_path_rate=0.1"]), 1)
    # Students without external rows: the same teacher, other students; external weights change the teacher.
    no_ext = compose(["experiment=smoke", "data.external.in_students=false"])
    assert config_hash(base, 0) == config_hash(no_ext, 0) and config_hash(base, 1) != config_hash(no_ext, 1)
    assert config_hash(base, 0) != config_hash(compose(["experiment=smoke", "data.external.loss_weight=0.5"]), 0)


def test_changed_inputs_names_tables_and_audio_lists():
    from birdrounds.rounds import _changed_inputs

    before = {"tables": {"train.csv": "a", "taxonomy.csv": "b"}, "train_audio": {"files": 10, "hash": "x"},
              "train_soundscapes": {"files": 2, "hash": "y"}, "val_soundscapes": {"files": 1, "hash": "z"}}
    assert _changed_inputs(before, before) == []
    after = {**before, "tables": {"train.csv": "A", "taxonomy.csv": "b"}, "train_audio": {"files": 13, "hash": "w"}}
    assert _changed_inputs(before, after) == ["train.csv", "train_audio (10 -> 13 files)"]
    # Rows added to data.external (xc-download) are named as external audio, not as the data's train_audio.
    before = {**before, "external_audio": {"files": 0, "hash": "e"}}
    after = {**before, "external_audio": {"files": 3, "hash": "E"}, "train_audio": {"files": 13, "hash": "w"}}
    assert _changed_inputs(before, after) == ["external_audio (data.external) (0 -> 3 files)",
                                              "train_audio with external rows (10 -> 13 files)"]


def test_a_pseudo_table_from_another_teacher_is_refused(tmp_path):
    import numpy as np
    import pandas as pd
    from omegaconf import OmegaConf

    from birdrounds.config import ConfigError
    from birdrounds.model import checkpoint_hash
    from birdrounds.pseudo import write_pseudo_labels
    from birdrounds.rounds import check_pseudo_source

    teacher = tmp_path / "model.pt"
    teacher.write_bytes(b"teacher one")
    rows = pd.DataFrame({"row_id": ["s_5"], "file": ["s.ogg"], "start_s": [0.0], "end_s": [5.0]})
    path = tmp_path / "pseudo_labels.parquet"
    write_pseudo_labels(path, rows, np.array([[0.2, 0.9]]), ["a", "b"],
                        {"teachers": [{"path": str(teacher), "hash": checkpoint_hash(teacher)}]})
    cfg = OmegaConf.create({"pseudo": {"truth": None}})
    check_pseudo_source(path, cfg, [teacher], round_idx=1)  # same teacher: reused
    teacher.write_bytes(b"teacher two, retrained")
    with pytest.raises(ConfigError, match=r"run_dir: .*pseudo_labels.parquet was made from another teacher"):
        check_pseudo_source(path, cfg, [teacher], round_idx=1)


@pytest.mark.parametrize("strategy", ["mixup_max", "concat"])
def test_student_parts_swaps_the_training_set_in_a_copy(tmp_path, strategy):
    """A student's parts: the mixed set (and, for concat, a sampler over all its items) and the pseudo
    statistics, in a new RoundParts; the labeled parts stay as they were."""
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd
    from torch.utils.data import WeightedRandomSampler

    from birdrounds.data.clips import MixUpCollate
    from birdrounds.mixing import ConcatPseudoDataset, MixupMaxDataset
    from birdrounds.pseudo import pseudo_stats, write_pseudo_labels
    from birdrounds.rounds import RoundParts, student_parts

    classes = ["a", "b"]
    rows = pd.DataFrame({"row_id": ["s_5", "s_10"], "file": ["s.ogg"] * 2, "start_s": [0.0, 5.0], "end_s": [5.0, 10.0]})
    probs = np.array([[0.2, 0.9], [0.7, 0.1]], dtype=np.float32)
    path = tmp_path / "pseudo_labels.parquet"
    write_pseudo_labels(path, rows, probs, classes, {})
    labeled = [{"audio": torch.zeros(8), "target": torch.tensor([1.0, 0.0])}] * 3
    parts = RoundParts(train_set=labeled, sampler=WeightedRandomSampler(torch.ones(3, dtype=torch.double), 6),
                       collate_fn=MixUpCollate(None), train_table=pd.DataFrame({"primary_label": ["a", "b", "b"]}),
                       class_counts=[1, 2])
    cfg = compose(["experiment=smoke", f"pseudo.mixing.strategy={strategy}",
                   *(["+pseudo.mixing.ratio=1.0"] if strategy == "concat" else [])])
    prepared = SimpleNamespace(data=SimpleNamespace(classes=classes), audio=SimpleNamespace(sample_rate_hz=8000))

    student = student_parts(cfg, prepared, path, parts)

    assert parts.train_set is labeled and parts.pseudo_stats is None
    assert student.pseudo_stats == pseudo_stats(probs, classes)
    kept = ("collate_fn", "train_table", "class_counts", "val_clips", "val_soundscapes", "val_solution")
    assert all(getattr(student, name) is getattr(parts, name) for name in kept)
    if strategy == "concat":
        assert isinstance(student.train_set, ConcatPseudoDataset) and len(student.train_set) == 6
        assert student.sampler is not parts.sampler and len(student.sampler) == len(parts.sampler)
        assert len(student.sampler.weights) == len(student.train_set)
    else:
        assert isinstance(student.train_set, MixupMaxDataset) and len(student.train_set) == 3
        assert student.sampler is parts.sampler


def _finished_round(round_dir, cfg, round_idx):
    """A finished round's manifest as `write_round_record` writes it: the hash and the redacted config."""
    import json

    from birdrounds.config import redact_secrets

    round_dir.mkdir(parents=True)
    (round_dir / "manifest.json").write_text(json.dumps({"config_hash": config_hash(cfg, round_idx),
                                                         "config": redact_secrets(cfg)}))
    return round_dir


def test_a_changed_round_is_refused_naming_the_keys_that_changed(tmp_path):
    from birdrounds.rounds import check_unchanged

    round_dir = _finished_round(tmp_path / "round_1", compose(["experiment=smoke"]), 1)
    with pytest.raises(ConfigError) as info:
        check_unchanged(round_dir, 1, compose(["experiment=smoke", "pseudo.stride_s=10", "logger=none"]))
    message = str(info.value)
    # The key, old -> new; `logger` is not a result key, so not named; the way out is.
    assert "(pseudo.stride_s: 5.0 -> 10)" in message and "logger" not in message
    assert message.startswith("run_dir: round 1") and "pass recompute_from=1" in message
    many = ["seed=3", "data.fold=1", "train.epochs=7", "pseudo=none", "pseudo.student_init=scratch"]
    with pytest.raises(ConfigError, match=r"seed: 0 -> 3; data\.fold: 0 -> 1; .*; and \d+ more\)"):
        check_unchanged(round_dir, 1, compose(["experiment=smoke", *many]))
    # The teacher does not read `pseudo`: its round stays reusable.
    teacher_dir = _finished_round(tmp_path / "round_0", compose(["experiment=smoke"]), 0)
    check_unchanged(teacher_dir, 0, compose(["experiment=smoke", "pseudo=none"]))


def test_a_key_set_to_the_value_in_effect_is_no_change(tmp_path):
    from birdrounds.rounds import check_unchanged

    base = compose(["experiment=smoke"])
    same = [f"seed={base.seed}", f"pseudo.window_s={base.pseudo.window_s}", f"data.fold={base.data.fold}",
            "pseudo.truth=null", f"train.epochs={base.train.epochs}"]
    assert same == ["seed=0", "pseudo.window_s=20.0", "data.fold=0", "pseudo.truth=null", "train.epochs=2"]
    for round_idx in (0, 1):
        assert config_hash(compose(["experiment=smoke", *same]), round_idx) == config_hash(base, round_idx)
    # An int for a float is another hash (the hash keeps JSON's 20 vs 20.0), but the same value: reused.
    as_int = compose(["experiment=smoke", "pseudo.window_s=20"])
    assert config_hash(as_int, 1) != config_hash(base, 1)
    check_unchanged(_finished_round(tmp_path / "round_1", base, 1), 1, as_int)


def test_settings_that_do_nothing_warn_and_recompute_from_logs_where_rounds_went(tmp_path, caplog):
    from birdrounds.rounds import prepare_run_dir

    for k in (0, 1, 2):
        (tmp_path / f"round_{k}").mkdir()
    with caplog.at_level("INFO", logger="birdrounds.rounds"):
        prepare_run_dir(compose(["experiment=smoke", "round=0", "control=true", "recompute_from=1"]), tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith("control=true does nothing with round=0") for w in warnings)
    assert any(w.startswith("recompute_from=1 does nothing: this run stops at round=0") for w in warnings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0", "round_1", "round_2"]  # nothing set aside
    # A damaged teacher of the first redone round: named in one line, nothing renamed.
    (tmp_path / "round_0" / "model.pt").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match=r"round_0/model.pt: cannot be read.*recompute_from=0"):
        prepare_run_dir(compose(["experiment=smoke", "round=1", "recompute_from=1"]), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0", "round_1", "round_2"]
    (tmp_path / "round_0" / "model.pt").unlink()  # absent: round 0 is trained again first, so no refusal
    caplog.clear()
    with caplog.at_level("INFO", logger="birdrounds.rounds"):
        prepare_run_dir(compose(["experiment=smoke", "round=1", "recompute_from=1"]), tmp_path)
    kept = sorted(p.name for p in tmp_path.iterdir() if ".replaced-" in p.name)
    assert [name.split(".")[0] for name in kept] == ["round_1", "round_2"] and (tmp_path / "round_0").is_dir()
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(str(tmp_path / name) in logged for name in kept)


def test_code_version_is_read_once_per_process(monkeypatch):
    """A manifest names the code a run started with: the checkout changing during the run does not change it."""
    import subprocess

    from birdrounds import rounds

    answers = iter(["abc1234", "abc1234-dirty"])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=next(answers) + "\n"))
    rounds.code_version.cache_clear()
    try:
        assert rounds.code_version() == "abc1234" and rounds.code_version() == "abc1234"
    finally:
        rounds.code_version.cache_clear()
