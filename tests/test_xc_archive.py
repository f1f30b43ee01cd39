"""xc-download from a local Xeno-canto archive (`xc.source=DIR`): saved API v3 pages and their audio."""

from __future__ import annotations

import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

import birdrounds.xeno_canto as xc
from birdrounds.config import ConfigError, shipped
from birdrounds.data.audio import load_audio
from birdrounds.data.layout import TRAIN_COLUMNS, prepare_train_table
from birdrounds.xeno_canto import LocalArchive, XCSettings, archive_query, download_xeno_canto
from test_xeno_canto import audio_bytes

FIXTURES = Path(__file__).parent / "fixtures" / "xeno-canto"
# Real v3 bodies: Passerina amoena (https urls), Larus marinus (// urls); `file` is a download URL.
SPA, LAR = json.loads((FIXTURES / "xc_v3_response_assembled_2recs.json").read_text())["recordings"]
TAXONOMY = {"bad": "Badus badus", "lar": "Larus marinus", "pip": "Pipilo maculatus", "spa": "Passerina amoena",
            "rcki": "Regulus calendula"}  # Xeno-canto (IOC) spells the last one Corthylio calendula


def record(template: dict, xc_id: str, name: str, **changes) -> dict:
    rec = copy.deepcopy(template)
    rec["id"], (rec["gen"], rec["sp"]) = xc_id, name.split()
    rec["url"], rec["file"] = f"https://xeno-canto.org/{xc_id}", f"https://xeno-canto.org/{xc_id}/download"
    rec["file-name"] = f"XC{xc_id}-test.mp3"
    rec.update(changes)
    return rec


def write(path: Path, data: bytes | str | object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1))


@pytest.fixture
def archive(tmp_path) -> Path:
    """Two API v3 result pages, a plain list of recordings, a Kaggle manifest, and audio in three layouts."""
    root = tmp_path / "archive"
    spa_page1 = [record(SPA, "254462", "Passerina amoena", also=["Pipilo maculatus", "Homo sapiens"]),
                 record(SPA, "111", "Passerina amoena"),  # already in train.csv
                 record(SPA, "1002", "Passerina amoena", lic="//creativecommons.org/licenses/by-nc-nd/4.0/")]
    spa_page2 = [record(SPA, "1001", "Passerina amoena", q="C", file="audio/XC1001.mp3")]
    write(root / "passerina_p1.json", {"numRecordings": "4", "numSpecies": "1", "page": 1, "numPages": 2,
                                       "recordings": spa_page1})
    write(root / "passerina_p2.json", {"numRecordings": "4", "numSpecies": "1", "page": 2, "numPages": 2,
                                       "recordings": spa_page2})
    write(root / "others.json", [
        record(LAR, "737917", "Larus marinus", url="//xeno-canto.org/737917", **{"file-name": "XC737917 gull.ogg"}),
        record(LAR, "2001", "Larus marinus", length="0:03"),  # too short
        record(LAR, "2003", "Larus marinus", q="B"),  # its audio is not in the archive
        record(LAR, "2004", "Larus marinus", q="B"),  # its audio does not decode
        record(SPA, "3001", "Pipilo maculatus"),  # pip has enough train rows
        record(SPA, "4001", "Corthylio calendula", id=4001),  # a synonym, and an integer id
        record(SPA, "5001", "Homo sapiens"),  # not in taxonomy.csv
    ])
    write(root / "dataset-metadata.json", {"title": "xeno-canto minority archive", "id": "someone/xc"})
    write(root / "audio" / "XC254462.wav", audio_bytes("WAV"))  # found as audio/XC<id>.*
    write(root / "audio" / "XC1001.mp3", audio_bytes("MP3", channels=1, rate_hz=44100))  # named by `file`
    write(root / "audio" / "XC737917 gull.ogg", audio_bytes("OGG", rate_hz=24000))  # audio/<file-name>
    write(root / "XC4001-test.mp3", audio_bytes("MP3"))  # <file-name> at the top
    write(root / "XC2004-test.mp3", b"not audio at all" * 50)
    for xc_id in ("111", "1002", "2001", "3001", "5001"):
        write(root / "audio" / f"XC{xc_id}.wav", audio_bytes("WAV"))
    return root


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    write(root / "taxonomy.csv", pd.DataFrame({"primary_label": list(TAXONOMY),
                                               "scientific_name": list(TAXONOMY.values())}).to_csv(index=False))
    rows = [{"primary_label": "spa", "filename": "spa/XC111.ogg", "url": "https://xeno-canto.org/111"}]
    rows += [{"primary_label": "pip", "filename": f"pip/XC{900 + i}.ogg", "url": ""} for i in range(25)]
    write(root / "train.csv", pd.DataFrame(rows).to_csv(index=False))
    return root


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv("XC_API_KEY", raising=False)  # a local archive needs none


def settings_for(archive: Path, root: Path, out: Path, **changes) -> XCSettings:
    values = {"data_root": str(root), "out_dir": str(out), "source": str(archive), "min_length_s": 5.0,
              "progress": False, "api_url": "http://127.0.0.1:9/unused"}
    return shipped("xc", **{**values, **changes})


def cli(archive: Path, root: Path, out: Path, *overrides: str) -> int:
    from birdrounds.cli import main

    return main(["xc-download", f"data.root={root}", f"xc.out_dir={out}", f"xc.source={archive}",
                 "xc.progress=false", "xc.min_length_s=5", *overrides])


def imported(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_import_selects_dedupes_converts(archive, data_root, tmp_path, caplog):
    out = tmp_path / "xc"
    with caplog.at_level(logging.WARNING, logger="birdrounds.xeno_canto"):
        summaries = {s.label: s for s in download_xeno_canto(settings_for(archive, data_root, out))}

    assert set(summaries) == {"bad", "lar", "rcki", "spa"}  # pip has 25 rows >= min_recordings
    spa, lar, rcki, bad = summaries["spa"], summaries["lar"], summaries["rcki"], summaries["bad"]
    assert (spa.found, spa.selected, spa.downloaded, spa.failed) == (4, 2, 2, 0)  # two pages
    assert spa.skipped == {"already_in_train": 1, "license": 1}
    assert (lar.found, lar.selected, lar.downloaded, lar.failed) == (4, 3, 1, 2)
    assert lar.skipped == {"too_short": 1} and not lar.species_failed
    assert (rcki.xc_name, rcki.found, rcki.downloaded) == ("Corthylio calendula", 1, 1)
    assert (bad.found, bad.error, bad.species_failed) == (0, None, False)
    assert not (out / ".api_cache").exists()

    # A missing or undecodable archive file fails that recording alone, with a warning naming the file.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("XC2003" in w and f"{archive / 'XC2003-test.mp3'}: no such file in the archive" in w
               for w in warnings)
    assert any("XC2004" in w and f"{archive / 'XC2004-test.mp3'} does not decode" in w for w in warnings)

    assert imported(out) == ["lar/XC737917.ogg", "rcki/XC4001.ogg", "spa/XC1001.ogg", "spa/XC254462.ogg",
                             "summary.json", "train.csv"]
    for ogg in out.rglob("*.ogg"):
        info = sf.info(str(ogg))
        assert (info.samplerate, info.channels, info.format, info.subtype) == (32000, 1, "OGG", "VORBIS")
        assert len(load_audio(ogg, 32000)) > 32000

    table = pd.read_csv(out / "train.csv")
    assert list(table.columns) == list(TRAIN_COLUMNS)  # the API path's schema, in its order
    prepared, missing, _ = prepare_train_table(table, out, list(TAXONOMY), out / "train.csv", on_missing_file="error")
    assert missing == [] and len(prepared) == 4
    rows = prepared.set_index("filename")
    spa_row = rows.loc["spa/XC254462.ogg"]
    assert spa_row["secondary_labels"] == ["pip"] and spa_row["rating"] == 5.0 and spa_row["collection"] == "XC"
    assert spa_row["url"] == "https://xeno-canto.org/254462" and spa_row["license"].startswith("https://")
    assert rows.loc["spa/XC1001.ogg", "rating"] == 3.0
    assert rows.loc["lar/XC737917.ogg", "author"] == "Alan Dalton"
    assert rows.loc["rcki/XC4001.ogg", "primary_label"] == "rcki"
    summary = {s["label"]: s for s in json.loads((out / "summary.json").read_text())}
    assert summary["lar"]["failed"] == 2 and summary["lar"]["status"] == "ok"


def test_resume_converts_nothing_new(archive, data_root, tmp_path, monkeypatch):
    out = tmp_path / "xc"
    download_xeno_canto(settings_for(archive, data_root, out))
    table = (out / "train.csv").read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.ogg")}

    conversions: list[Path] = []
    real_convert = xc.convert

    def counting_convert(raw: Path, final: Path, rate_hz: int) -> None:
        conversions.append(final)
        real_convert(raw, final, rate_hz)

    monkeypatch.setattr(xc, "convert", counting_convert)
    again = {s.label: s for s in download_xeno_canto(settings_for(archive, data_root, out))}
    assert [p.name for p in conversions] == ["XC2004.ogg"]  # only the undecodable one is tried again
    assert (again["spa"].existing, again["spa"].downloaded) == (2, 0)
    assert (again["lar"].existing, again["lar"].downloaded, again["lar"].failed) == (1, 0, 2)
    assert (out / "train.csv").read_bytes() == table
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.ogg")} == mtimes
    assert not list(out.rglob("*.part")) and not list(out.rglob(".XC*"))

    # The missing file turns up in the archive: the next run imports just that one.
    write(archive / "XC2003-test.mp3", audio_bytes("MP3"))
    conversions.clear()
    [lar] = download_xeno_canto(settings_for(archive, data_root, out, species=["lar"]))
    assert [p.name for p in conversions] == ["XC2003.ogg", "XC2004.ogg"]
    assert (lar.existing, lar.downloaded, lar.failed) == (1, 1, 1)
    filenames = pd.read_csv(out / "train.csv")["filename"].tolist()
    assert len(filenames) == 5 and "lar/XC2003.ogg" in filenames


def test_cli_import_without_key(archive, data_root, tmp_path, capsys):
    out = tmp_path / "xc"
    assert cli(archive, data_root, out) == 0
    captured = capsys.readouterr()
    assert "4 species: 4 downloaded" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        "birdrounds xc-download: warning: 2 recording(s) failed; rerun to retry what is missing")

    # Every selected recording of a species failing is a failed species, as with the API.
    assert cli(archive, data_root, tmp_path / "xc2", "xc.species=[lar]", "xc.qualities=[B]") == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "1 of 1 species failed (lar), 2 recording(s) failed; rerun to retry what is missing")


def test_dry_run_lists_and_writes_nothing(archive, data_root, tmp_path, capsys):
    out = tmp_path / "xc"
    download_xeno_canto(settings_for(archive, data_root, out, dry_run=True))
    printed = capsys.readouterr().out
    assert "XC254462" in printed and "XC4001" in printed and "XC1002" not in printed
    assert "6 recording(s) would be downloaded" in printed
    assert not out.exists()


def test_query_tags_filter_like_the_api(archive, data_root, tmp_path):
    out = tmp_path / "xc"
    [spa] = download_xeno_canto(settings_for(archive, data_root, out, species=["spa"], quality=">C", dry_run=True))
    assert spa.query == 'sp:"Passerina amoena" q:>C' and spa.found == 3  # XC1001 is rated C
    [lar] = download_xeno_canto(settings_for(archive, data_root, out, species=["lar"], length="10-30",
                                             group="birds", min_length_s=None, dry_run=True))
    assert lar.found == 3  # 0:21 each, except XC2001 (0:03)
    [lar] = download_xeno_canto(settings_for(archive, data_root, out, species=["lar"], group="frogs", dry_run=True))
    assert lar.found == 0


@pytest.mark.parametrize(("query", "matching"), [
    ('sp:"larus MARINUS"', {"1", "2", "3", "4", "5"}),
    ('sp:"Larus marinus" q:A', {"1", "5"}),
    ('sp:"Larus marinus" q:">C"', {"1", "2", "5"}),
    ('sp:"Larus marinus" q:"<C"', {"4"}),
    ('sp:"Larus marinus" q:0', {"3"}),
    ('sp:"Larus marinus" len:10', {"1"}),
    ('sp:"Larus marinus" len:10-60', {"1", "2", "3"}),
    ('sp:"Larus marinus" len:"<30"', {"1", "3", "4"}),
    ('sp:"Larus marinus" len:">30"', {"2", "5"}),
    ('sp:"Larus marinus" len:"=65"', {"5"}),
    ('sp:"Larus marinus" grp:birds', {"1", "2", "3", "5"}),
    ('sp:"Larus marinus" grp:1 q:A', {"1", "5"}),
    ("sp:marinus grp:grasshoppers", {"4", "5"}),
])
def test_archive_query_tags(query, matching):
    """The API's documented meaning of each tag build_query writes; a record without grp is kept."""
    recs = [{"id": "1", "gen": "Larus", "sp": "marinus", "q": "A", "length": "0:10", "grp": "birds"},
            {"id": "2", "gen": "Larus", "sp": "marinus", "q": "B", "length": "0:45", "grp": "Birds"},
            {"id": "3", "gen": "Larus", "sp": "marinus", "q": "no score", "length": "0:30", "grp": "birds"},
            {"id": "4", "gen": "Larus", "sp": "marinus", "q": "E", "length": "0:03", "grp": "grasshoppers"},
            {"id": "5", "gen": "Larus", "sp": "marinus", "q": "A", "length": "1:05"},  # no grp (older dump)
            {"id": "6", "gen": "Larus", "sp": "fuscus", "q": "A", "length": "0:10", "grp": "birds"}]
    match = archive_query(query)
    assert {r["id"] for r in recs if match(r)} == matching


@pytest.mark.parametrize("query", ['sp:"Larus marinus" cnt:Ireland', 'Larus marinus', 'sp:"a b" q:F',
                                   'sp:"a b" len:"<5-6"', 'sp:"a b" grp:fish'])
def test_archive_query_refuses_what_it_cannot_answer(query):
    with pytest.raises(ConfigError, match="xc"):
        archive_query(query)


MALFORMED = {
    "bad JSON": ('{"recordings": [{"id": ', "not valid JSON"),
    "no recordings": ({"error": {"code": "missing_parameter"}}, "neither an API v3 result page"),
    "not an object": ({"recordings": ["XC1"]}, "recording 0 is not an object"),
    "no id": ([{"gen": "Larus", "sp": "marinus"}], "recording 0 has no numeric 'id'"),
    "id not a number": ([{"id": "../../x", "gen": "Larus", "sp": "marinus"}], "recording 0 has no numeric 'id'"),
    "no sp": ({"recordings": [{"id": "7", "gen": "Larus"}]}, "recording XC7 has no 'sp'"),
    "file outside": ([{"id": "7", "gen": "Larus", "sp": "marinus", "file": "../secret.wav"}], "outside the archive"),
    "absolute file": ([{"id": "7", "gen": "Larus", "sp": "marinus", "file": "/etc/passwd"}], "outside the archive"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_archive_is_refused_naming_the_file(case, archive, data_root, tmp_path, capsys):
    body, reason = MALFORMED[case]
    page = archive / "zz_broken.json"
    write(page, body)
    with pytest.raises(ConfigError) as err:
        download_xeno_canto(settings_for(archive, data_root, tmp_path / "xc"))
    assert str(err.value).startswith(f"xc.source: {page}: ") and reason in str(err.value)
    assert "\n" not in str(err.value)

    assert cli(archive, data_root, tmp_path / "xc") == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith(f"birdrounds xc-download: error: xc.source: {page}: ")
    assert not (tmp_path / "xc").exists()  # refused before any work


def test_source_must_be_an_archive_folder(archive, data_root, tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        LocalArchive(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no \\*.json result pages"):
        LocalArchive(tmp_path / "empty")
    with pytest.raises(ConfigError, match="xc.out_dir: must not be the archive folder"):
        download_xeno_canto(settings_for(archive, data_root, archive))


def test_audio_outside_the_archive_is_not_read(archive, data_root, tmp_path, caplog):
    outside = tmp_path / "elsewhere.wav"
    outside.write_bytes(audio_bytes("WAV"))
    (archive / "audio" / "XC254462.wav").unlink()
    (archive / "audio" / "XC254462.wav").symlink_to(outside)
    out = tmp_path / "xc"
    with caplog.at_level(logging.WARNING, logger="birdrounds.xeno_canto"):
        [spa] = download_xeno_canto(settings_for(archive, data_root, out, species=["spa"]))
    assert (spa.downloaded, spa.failed) == (1, 1)
    assert any("XC254462" in r.getMessage() and "outside the archive folder" in r.getMessage()
               for r in caplog.records)
    assert imported(out) == ["spa/XC1001.ogg", "summary.json", "train.csv"]
