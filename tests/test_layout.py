"""The BirdCLEF folder reader: class list, table validation, secondary labels, missing files."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from birdrounds.data.layout import LayoutError, data_path, load_birdclef, load_external, parse_label_list

CLASSES = ["aaa1", "bbb1", "ccc1"]


def write_layout(root: Path, train_rows: list[dict], with_val: bool = True) -> Path:
    """A minimal but complete competition folder with real OGG files."""
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"row_id": ["s1_5"], **{c: [0.0] for c in CLASSES}}).to_csv(root / "sample_submission.csv", index=False)
    pd.DataFrame({"primary_label": CLASSES, "inat_taxon_id": [1, 2, 3], "scientific_name": ["A a", "B b", "C c"],
                  "common_name": ["a", "b", "c"], "class_name": ["Aves"] * 3}).to_csv(root / "taxonomy.csv", index=False)
    pd.DataFrame(train_rows).to_csv(root / "train.csv", index=False)
    tone = (0.1 * np.sin(np.arange(32000) / 5)).astype("float32")
    for row in train_rows:
        path = root / "train_audio" / row["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, tone, 32000, format="OGG", subtype="VORBIS")
    (root / "train_soundscapes").mkdir(exist_ok=True)
    sf.write(root / "train_soundscapes" / "s0.ogg", np.tile(tone, 10), 32000, format="OGG", subtype="VORBIS")
    if with_val:
        (root / "val_soundscapes").mkdir(exist_ok=True)
        sf.write(root / "val_soundscapes" / "s1.ogg", np.tile(tone, 10), 32000, format="OGG", subtype="VORBIS")
        pd.DataFrame({"row_id": ["s1_5", "s1_10"], "aaa1": [1, 0], "bbb1": [0, 1], "ccc1": [0, 0]}).to_csv(
            root / "val_solution.csv", index=False)
    return root


def row(label: str, name: str, secondary: str = "[]") -> dict:
    return {"primary_label": label, "secondary_labels": secondary, "type": "['song']", "filename": f"{label}/{name}.ogg",
            "collection": "XC", "rating": 4.0, "url": "", "latitude": 0.0, "longitude": 0.0,
            "scientific_name": "x", "common_name": "x", "author": "me", "license": "cc"}


def test_reads_layout_classes_in_submission_order(tmp_path):
    root = write_layout(tmp_path / "d", [row("bbb1", "XC1", "['aaa1', 'zzz9']"), row("aaa1", "XC2")])
    data = load_birdclef(root)
    assert data.classes == CLASSES
    assert list(data.train["primary_label"]) == ["bbb1", "aaa1"]
    # Secondary labels are parsed; a label outside the class list is dropped and counted.
    assert data.train.loc[0, "secondary_labels"] == ["aaa1"]
    assert data.unknown_secondary == 1
    assert all(Path(p).is_file() for p in data.train["path"])
    assert [p.name for p in data.soundscapes] == ["s0.ogg"]
    assert [p.name for p in data.val_soundscapes] == ["s1.ogg"]
    assert list(data.val_solution.columns) == ["row_id", *CLASSES]


def test_unknown_primary_label_is_an_error_naming_it(tmp_path):
    root = write_layout(tmp_path / "d", [row("aaa1", "XC1")])
    table = pd.read_csv(root / "train.csv")
    table.loc[0, "primary_label"] = "nope1"
    table.to_csv(root / "train.csv", index=False)
    with pytest.raises(LayoutError, match="nope1"):
        load_birdclef(root)


def test_missing_column_is_an_error_naming_file_and_column(tmp_path):
    root = write_layout(tmp_path / "d", [row("aaa1", "XC1")])
    pd.read_csv(root / "train.csv").drop(columns=["filename"]).to_csv(root / "train.csv", index=False)
    with pytest.raises(LayoutError, match=r"train\.csv.*filename"):
        load_birdclef(root)


def test_missing_audio_file_warns_and_skips_or_errors(tmp_path, caplog):
    root = write_layout(tmp_path / "d", [row("aaa1", "XC1"), row("ccc1", "XC2")])
    (root / "train_audio" / "ccc1" / "XC2.ogg").unlink()
    data = load_birdclef(root)
    assert list(data.train["filename"]) == ["aaa1/XC1.ogg"]
    assert data.missing_files == ["ccc1/XC2.ogg"]
    assert "XC2.ogg" in caplog.text
    with pytest.raises(LayoutError, match="XC2.ogg"):
        load_birdclef(root, on_missing_file="error")


def test_solution_missing_class_column_is_an_error(tmp_path):
    root = write_layout(tmp_path / "d", [row("aaa1", "XC1")])
    pd.read_csv(root / "val_solution.csv").drop(columns=["ccc1"]).to_csv(root / "val_solution.csv", index=False)
    with pytest.raises(LayoutError, match="ccc1"):
        load_birdclef(root)


def test_taxonomy_must_cover_classes(tmp_path):
    root = write_layout(tmp_path / "d", [row("aaa1", "XC1")])
    pd.read_csv(root / "taxonomy.csv").iloc[:2].to_csv(root / "taxonomy.csv", index=False)
    with pytest.raises(LayoutError, match="ccc1"):
        load_birdclef(root)


def test_missing_root_and_optional_validation(tmp_path):
    with pytest.raises(LayoutError, match="does not exist"):
        load_birdclef(tmp_path / "nowhere")
    data = load_birdclef(write_layout(tmp_path / "d", [row("aaa1", "XC1")], with_val=False))
    assert data.val_solution is None and data.val_soundscapes == []


def test_tables_and_folders_can_live_outside_the_root(tmp_path):
    root = write_layout(tmp_path / "d", [row("aaa1", "XC1")])
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (root / "train_soundscapes").rename(moved / "unlabeled")
    (root / "val_solution.csv").rename(moved / "solution.csv")
    data = load_birdclef(root, soundscapes_dir=moved / "unlabeled", val_solution=moved / "solution.csv")
    assert [p.name for p in data.soundscapes] == ["s0.ogg"]
    assert list(data.val_solution["row_id"]) == ["s1_5", "s1_10"]
    assert data.paths["soundscapes_dir"] == moved / "unlabeled"
    assert data.paths["val_solution"] == moved / "solution.csv"
    assert data.paths["train_csv"] == root / "train.csv"  # not overridden: the competition layout
    assert data_path(root, "val_soundscapes_dir") == root / "val_soundscapes"
    assert data_path(root, "val_soundscapes_dir", str(moved)) == moved


def test_run_manifest_hashes_the_tables_data_names(tmp_path):
    """rounds.input_hashes follows `data.*` overrides, not the competition layout under the root."""
    from types import SimpleNamespace

    from birdrounds.data.prepare import EXTERNAL_COLUMN
    from birdrounds.rounds import input_hashes

    root = write_layout(tmp_path / "d", [row("aaa1", "XC1")])
    (root / "val_solution.csv").rename(tmp_path / "solution.csv")
    data = load_birdclef(root, val_solution=tmp_path / "solution.csv")
    hashes = input_hashes(SimpleNamespace(data=data))
    assert set(hashes["tables"]) == {"train.csv", "taxonomy.csv", "sample_submission.csv", "val_solution.csv"}
    before = hashes["tables"]["val_solution.csv"]
    pd.DataFrame({"row_id": ["s1_5"], "aaa1": [0], "bbb1": [1], "ccc1": [0]}).to_csv(tmp_path / "solution.csv", index=False)
    assert input_hashes(SimpleNamespace(data=data))["tables"]["val_solution.csv"] != before
    # Rows appended from data.external are listed on their own as well (a refusal names them, not train_audio).
    assert input_hashes(SimpleNamespace(data=data))["external_audio"]["files"] == 0
    extra = data.train.assign(**{EXTERNAL_COLUMN: True}, path=[str(tmp_path / "XC9.ogg")])
    data.train = pd.concat([data.train.assign(**{EXTERNAL_COLUMN: False}), extra], ignore_index=True)
    hashes = input_hashes(SimpleNamespace(data=data))
    assert (hashes["train_audio"]["files"], hashes["external_audio"]["files"]) == (2, 1)


@pytest.mark.parametrize("cell, expected", [
    ("['a', 'b']", ["a", "b"]), ("[]", []), (float("nan"), []), ("a b", ["a", "b"]), (["x"], ["x"]),
])
def test_parse_label_list(cell, expected):
    assert parse_label_list(cell) == expected


def test_external_rows_resolve_against_their_folder_and_are_capped(tmp_path):
    root = write_layout(tmp_path / "d", [row("aaa1", "XC1")])
    ext = write_layout(tmp_path / "ext", [row("ccc1", "XC7"), row("ccc1", "XC8"), row("ccc1", "XC9"), row("bbb1", "XC6")])
    (ext / "train_audio").rename(tmp_path / "audio")  # xc-download layout: <label>/XC<id>.ogg beside train.csv
    for folder in (tmp_path / "audio").iterdir():
        folder.rename(ext / folder.name)
    data = load_birdclef(root)
    extra = load_external([ext, tmp_path / "nothing_here"], data.classes, max_per_class=2)
    assert list(extra["filename"]) == ["ccc1/XC7.ogg", "ccc1/XC8.ogg", "bbb1/XC6.ogg"]
    assert all(Path(p).is_file() and Path(p).parent.parent == ext for p in extra["path"])
    assert set(extra["source"]) == {str(ext)}
    assert load_external([tmp_path / "nothing_here"], data.classes).empty
