"""xc-download against a real local HTTP server serving v3-shaped JSON and audio, with injected faults."""

from __future__ import annotations

import copy
import io
import json
import re
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from birdrounds.config import ConfigError, shipped
from birdrounds.data.audio import load_audio
from birdrounds.data.layout import load_birdclef, prepare_train_table
from birdrounds.data.synthetic import generate
from birdrounds.xeno_canto import (
    XCClient,
    XCSettings,
    build_query,
    download_xeno_canto,
    licence_tokens,
    parse_length_s,
    select_species,
)

FIXTURES = Path(__file__).parent / "fixtures" / "xeno-canto"
CLASSES = ["bad", "lar", "pip", "spa"]
TAXONOMY = {"bad": "Badus badus", "lar": "Larus marinus", "pip": "Pipilo maculatus", "spa": "Passerina amoena"}


def audio_bytes(fmt: str, seconds: float = 1.5, rate_hz: int = 48000, channels: int = 2) -> bytes:
    """A short tone encoded in `fmt` (WAV, OGG or MP3)."""
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    tone = 0.3 * np.sin(2 * np.pi * 1500 * t)
    data = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    buf = io.BytesIO()
    subtype = {"OGG": "VORBIS", "MP3": "MPEG_LAYER_III", "WAV": "PCM_16"}[fmt]
    sf.write(buf, data, rate_hz, format=fmt, subtype=subtype)
    return buf.getvalue()


def make_record(template: dict, xc_id: str, name: str, base: str, **changes) -> dict:
    """A v3 record built from a real fixture body, re-pointed at the test server."""
    rec = copy.deepcopy(template)
    rec["id"], (rec["gen"], rec["sp"]) = xc_id, name.split()
    rec["file"] = f"{base}/audio/{xc_id}"
    rec["file-name"] = f"XC{xc_id}-test.{changes.pop('ext', 'wav')}"
    rec.update(changes)
    return rec


class FakeXC:
    """State of the fake API: pages per species, audio per id, queued faults, hit counts."""

    def __init__(self) -> None:
        self.pages: dict[str, list[list[dict]]] = {}
        self.audio: dict[str, bytes] = {}
        self.faults: dict[tuple, list[str]] = {}
        self.hits: Counter = Counter()
        self.base = ""

    def add_archive(self, root: Path) -> int:
        """Serve a synthetic dataset's xc_archive (recordings.json + audio/) one record per page."""
        records = json.loads((root / "xc_archive" / "recordings.json").read_text())
        for rec in records:
            self.audio[rec["id"]] = (root / "xc_archive" / rec["file"]).read_bytes()
            rec = {**rec, "file": f"{self.base}/audio/{rec['id']}"}
            self.pages.setdefault(f"{rec['gen']} {rec['sp']}", []).append([rec])
        return len(records)

    def handler(fake) -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def send(self, code: int, body: bytes, length: int | None = None, headers: dict | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def fault(self, key: tuple, body: bytes) -> bool:
                queue = fake.faults.get(key, [])
                action = queue.pop(0) if queue and queue[0] != "always" else (queue[0] if queue else None)
                if action is None:
                    return False
                if action == "429":
                    self.send(429, b"{}", headers={"Retry-After": "2"})
                elif action in ("500", "404"):
                    self.send(int(action), b"oops")
                elif action == "truncated":
                    self.send(200, body[: len(body) // 2], length=len(body))
                else:  # "malformed" or "always": a JSON page cut in the middle
                    self.send(200, b'{"numPages": 1, "recordings": [{"id": ')
                return True

            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                if url.path.startswith("/audio/"):
                    xc_id = url.path.rsplit("/", 1)[1]
                    fake.hits[("audio", xc_id)] += 1
                    body = fake.audio[xc_id]
                    if not self.fault(("audio", xc_id), body):
                        self.send(200, body)
                    return
                params = dict(urllib.parse.parse_qsl(url.query))
                if params.get("key") != "good-key":
                    self.send(401, (FIXTURES / "xc_v3_error_401_real.json").read_bytes())
                    return
                match = re.search(r'sp:"([^"]+)"', params.get("query", ""))
                if not match or "per_page" not in params:
                    self.send(400, (FIXTURES / "xc_error_nested_documented.json").read_bytes())
                    return
                name, page = match.group(1), int(params.get("page", "1"))
                fake.hits[("api", name, page)] += 1
                pages = fake.pages.get(name, [[]])
                body = json.dumps({"numRecordings": str(sum(map(len, pages))), "numSpecies": "1", "page": page,
                                   "numPages": len(pages), "recordings": pages[page - 1]}).encode()
                if not self.fault(("api", name, page), body):
                    self.send(200, body)

        return Handler


@pytest.fixture
def fake_xc():
    fake = FakeXC()
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.base = f"http://127.0.0.1:{server.server_address[1]}"
    records = json.loads((FIXTURES / "xc_v3_response_assembled_2recs.json").read_text())["recordings"]
    spa_tpl, lar_tpl = records  # real bodies: Passerina amoena (https urls), Larus marinus (// urls)
    b = fake.base
    fake.pages["Passerina amoena"] = [
        [make_record(spa_tpl, "254462", "Passerina amoena", b, also=["Pipilo maculatus", "Larus marinus", "Homo sapiens"]),
         make_record(spa_tpl, "111", "Passerina amoena", b)],  # already in train.csv
        [make_record(spa_tpl, "1001", "Passerina amoena", b, ext="mp3", q="C"),
         make_record(spa_tpl, "1002", "Passerina amoena", b, lic="//creativecommons.org/licenses/by-nc-nd/4.0/")],
    ]
    fake.pages["Larus marinus"] = [[
        make_record(lar_tpl, "737917", "Larus marinus", b, ext="ogg"),
        make_record(lar_tpl, "2001", "Larus marinus", b, length="0:03"),
        make_record(lar_tpl, "2002", "Larus marinus", b),  # audio does not decode
    ]]
    fake.audio.update({"254462": audio_bytes("WAV"), "1001": audio_bytes("MP3", channels=1, rate_hz=44100),
                       "737917": audio_bytes("OGG", rate_hz=24000), "2002": b"not audio at all" * 50,
                       "2001": audio_bytes("WAV"), "1002": audio_bytes("WAV"), "111": audio_bytes("WAV")})
    fake.faults = {
        ("api", "Passerina amoena", 1): ["429"],
        ("api", "Passerina amoena", 2): ["malformed"],
        ("api", "Larus marinus", 1): ["500"],
        ("api", "Badus badus", 1): ["always"],
        ("audio", "254462"): ["truncated"],
        ("audio", "737917"): ["500"],
    }
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    pd.DataFrame({"primary_label": list(TAXONOMY), "scientific_name": list(TAXONOMY.values())}).to_csv(
        root / "taxonomy.csv", index=False)
    rows = [{"primary_label": "spa", "filename": "spa/XC111.ogg", "url": "https://xeno-canto.org/111"}]
    rows += [{"primary_label": "pip", "filename": f"pip/XC{900 + i}.ogg", "url": ""} for i in range(25)]
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def settings_for(fake: FakeXC, root: Path, out: Path, **changes) -> XCSettings:
    values = {"data_root": str(root), "out_dir": str(out), "api_url": f"{fake.base}/api/3/recordings",
              "api_key": "good-key", "per_page": 2, "min_length_s": 5.0, "min_interval_s": 0.0, "max_retries": 2,
              "backoff_base_s": 0.001, "timeout_s": 10.0, "progress": False}
    return shipped("xc", **{**values, **changes})


def audio_hits(fake: FakeXC) -> int:
    return sum(n for k, n in fake.hits.items() if k[0] == "audio")


def test_full_run_with_faults_then_resume(fake_xc, data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("XC_API_KEY", raising=False)
    out = tmp_path / "xc"
    sleeps: list[float] = []
    summaries = {s.label: s for s in download_xeno_canto(settings_for(fake_xc, data_root, out), sleep=sleeps.append)}

    assert set(summaries) == {"bad", "lar", "spa"}  # pip has 25 rows >= min_recordings
    assert 2.0 in sleeps  # Retry-After honoured
    spa, lar, bad = summaries["spa"], summaries["lar"], summaries["bad"]
    assert (spa.found, spa.selected, spa.downloaded, spa.failed) == (4, 2, 2, 0)
    assert spa.skipped == {"already_in_train": 1, "license": 1}
    assert (lar.found, lar.selected, lar.downloaded, lar.failed) == (3, 2, 1, 1)
    assert lar.skipped == {"too_short": 1}
    assert bad.error and "malformed" in bad.error and bad.downloaded == 0
    assert fake_xc.hits[("api", "Badus badus", 1)] == 3  # retried, then given up
    assert fake_xc.hits[("audio", "254462")] == 2  # truncated once, then complete

    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and ".api_cache" not in p.parts)
    assert files == ["lar/XC737917.ogg", "spa/XC1001.ogg", "spa/XC254462.ogg", "summary.json", "train.csv"]
    for ogg in out.rglob("*.ogg"):
        info = sf.info(str(ogg))
        assert (info.samplerate, info.channels, info.format) == (32000, 1, "OGG")
        assert len(load_audio(ogg, 32000)) > 32000

    table = pd.read_csv(out / "train.csv")
    prepared, missing, _ = prepare_train_table(table, out, CLASSES, out / "train.csv", on_missing_file="error")
    assert missing == [] and len(prepared) == 3
    row = prepared.set_index("filename").loc["spa/XC254462.ogg"]
    assert row["secondary_labels"] == ["lar", "pip"] and row["rating"] == 5.0 and row["collection"] == "XC"
    assert row["latitude"] == pytest.approx(43.6571) and row["license"].startswith("https://")
    lar_row = prepared.set_index("filename").loc["lar/XC737917.ogg"]
    assert lar_row["url"] == "https://xeno-canto.org/737917" and lar_row["author"] == "Alan Dalton"
    summary = json.loads((out / "summary.json").read_text())
    assert {s["label"]: s["downloaded"] for s in summary} == {"bad": 0, "lar": 1, "spa": 2}

    # Resume: cached pages are reused, present files are not fetched again; only the failed one is retried.
    api_before, audio_before = dict(fake_xc.hits), audio_hits(fake_xc)
    again = {s.label: s for s in download_xeno_canto(settings_for(fake_xc, data_root, out), sleep=sleeps.append)}
    assert fake_xc.hits[("api", "Passerina amoena", 1)] == api_before[("api", "Passerina amoena", 1)]
    assert fake_xc.hits[("api", "Larus marinus", 1)] == api_before[("api", "Larus marinus", 1)]
    assert audio_hits(fake_xc) - audio_before == 1 and fake_xc.hits[("audio", "2002")] == 2
    assert (again["spa"].existing, again["spa"].downloaded) == (2, 0)
    assert len(pd.read_csv(out / "train.csv")) == 3
    assert not list(out.rglob("*.part")) and not list(out.rglob(".XC*"))


def test_dry_run_downloads_no_audio(fake_xc, data_root, tmp_path, capsys):
    out = tmp_path / "xc"
    download_xeno_canto(settings_for(fake_xc, data_root, out, dry_run=True), sleep=lambda s: None)
    assert audio_hits(fake_xc) == 0
    assert [p.name for p in out.iterdir()] == [".api_cache"]
    printed = capsys.readouterr().out
    assert "XC254462" in printed and "XC737917" in printed and "XC1002" not in printed


def test_rejected_and_missing_key(fake_xc, data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("XC_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="rejected the API key.*account page"):
        download_xeno_canto(settings_for(fake_xc, data_root, tmp_path / "xc", api_key="wrong"))
    with pytest.raises(ConfigError, match="no Xeno-canto API key.*register"):
        download_xeno_canto(settings_for(fake_xc, data_root, tmp_path / "xc", api_key=None))
    monkeypatch.setenv("XC_API_KEY", "good-key")
    assert settings_for(fake_xc, data_root, tmp_path, api_key=None).key() == "good-key"


def test_untagged_query_names_query_and_api_message(fake_xc, data_root, tmp_path):
    client = XCClient(settings_for(fake_xc, data_root, tmp_path / "xc"), sleep=lambda s: None)
    with pytest.raises(ConfigError, match="Passerina amoena.*no query specified"):
        client.page("Passerina amoena", 1)


def test_cli_dry_run_flag(fake_xc, data_root, tmp_path, monkeypatch):
    from birdrounds.cli import main

    monkeypatch.setenv("XC_API_KEY", "good-key")
    out = tmp_path / "cli"
    rc = main(["xc-download", "--dry-run", f"data.root={data_root}", f"xc.out_dir={out}",
               f"xc.api_url={fake_xc.base}/api/3/recordings", "xc.min_interval_s=0", "xc.max_retries=1",
               "xc.backoff_base_s=0.001", "xc.progress=false", "xc.species=[spa]"])
    assert rc == 0 and audio_hits(fake_xc) == 0 and not (out / "train.csv").exists()
    assert fake_xc.hits[("api", "Passerina amoena", 2)] == 2  # malformed once, then fine


def test_audio_404_fails_that_file_only(fake_xc, data_root, tmp_path):
    fake_xc.faults[("audio", "1001")] = ["404"]
    out = tmp_path / "xc"
    [spa] = download_xeno_canto(settings_for(fake_xc, data_root, out, species=["spa"]), sleep=lambda s: None)
    assert (spa.downloaded, spa.failed) == (1, 1)
    assert sorted(p.name for p in (out / "spa").iterdir()) == ["XC254462.ogg"]


def test_min_interval_between_requests(fake_xc, data_root, tmp_path):
    fake_xc.faults.clear()
    waits: list[float] = []
    client = XCClient(settings_for(fake_xc, data_root, tmp_path / "xc", min_interval_s=5.0), sleep=waits.append)
    assert len(client.search('sp:"Passerina amoena"')) == 4  # two pages: the second waits its turn
    assert len(waits) == 1 and 4.0 < waits[0] <= 5.0


def test_synthetic_archive_extends_minority_classes(fake_xc, tmp_path, monkeypatch):
    monkeypatch.delenv("XC_API_KEY", raising=False)
    root = generate(tmp_path / "synth", shipped(
        "data.synth", "data=synthetic", n_species=4, n_train_soundscapes=0, n_val_soundscapes=1, soundscape_s=5.0,
        sample_rate_hz=16000, min_files_per_class=1, max_files_per_class=4, n_archive_per_minority=2,
        minority_max_files=2, focal_min_s=1.0, focal_max_s=2.0), num_workers=1)
    n_archive = fake_xc.add_archive(root)
    out = tmp_path / "xc"
    summaries = download_xeno_canto(settings_for(fake_xc, root, out, min_recordings=3, min_length_s=None,
                                                 exclude_licenses=[]), sleep=lambda s: None)
    assert sum(s.downloaded for s in summaries) == n_archive > 0 and not any(s.failed for s in summaries)
    data = load_birdclef(root, train_csv=out / "train.csv", train_audio_dir=out, on_missing_file="error")
    assert len(data.train) == n_archive and set(data.train["collection"]) == {"XC"}
    focal = pd.read_csv(root / "train.csv")["primary_label"].value_counts()
    assert all(focal[label] <= 2 for label in data.train["primary_label"])

    # The same archive imported from its folder (xc.source, no key, no server) gives the same result.
    from birdrounds.cli import main

    local = tmp_path / "xc_local"
    hits = sum(fake_xc.hits.values())
    assert main(["xc-download", f"data.root={root}", f"xc.out_dir={local}", "xc.source=${data.root}/xc_archive",
                 "xc.api_key=null", "xc.min_recordings=3", "xc.exclude_licenses=[]", "xc.progress=false"]) == 0
    assert sum(fake_xc.hits.values()) == hits
    assert (local / "train.csv").read_bytes() == (out / "train.csv").read_bytes()
    oggs = sorted(p.relative_to(out) for p in out.rglob("*.ogg"))
    assert oggs == sorted(p.relative_to(local) for p in local.rglob("*.ogg")) and len(oggs) == n_archive
    for rel in oggs:
        assert np.array_equal(load_audio(out / rel, 32000), load_audio(local / rel, 32000))
    by_label = {s["label"]: s for s in json.loads((local / "summary.json").read_text())}
    for s in summaries:
        assert (by_label[s.label]["found"], by_label[s.label]["downloaded"]) == (s.found, s.downloaded)


def test_helpers():
    assert parse_length_s("4:13") == 253 and parse_length_s("1:00:05") == 3605 and parse_length_s("?") is None
    assert licence_tokens("//creativecommons.org/licenses/by-nc-nd/4.0/") == {"by", "nc", "nd"}
    s = shipped("xc", data_root=".", out_dir=".", quality=">C", length="10-60", group="birds")
    assert build_query("Larus marinus", s) == 'sp:"Larus marinus" q:>C len:10-60 grp:birds'


def test_select_species_threshold_list_and_synonyms():
    train = pd.DataFrame({"primary_label": ["a"] * 3 + ["b"] * 30})
    tax = pd.DataFrame({"primary_label": ["a", "b", "c"], "scientific_name": ["Regulus calendula", "B b", "C c"]})
    s = shipped("xc", data_root=".", out_dir=".", synonyms={"c": "Cc renamed"})
    plans = select_species(train, tax, s)
    assert [(p.label, p.xc_name, p.n_train) for p in plans] == [("a", "Corthylio calendula", 3), ("c", "Cc renamed", 0)]
    s.species = ["b"]
    assert [p.label for p in select_species(train, tax, s)] == ["b"]
    s.species = ["zzz"]
    with pytest.raises(ConfigError, match="xc.species"):
        select_species(train, tax, s)


def closed_port_url() -> str:
    """An API URL on 127.0.0.1 where nothing listens: every connection is refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/3/recordings"


def cli_download(data_root: Path, out: Path, api_url: str, *overrides: str) -> int:
    from birdrounds.cli import main

    return main(["xc-download", f"data.root={data_root}", f"xc.out_dir={out}", f"xc.api_url={api_url}",
                 "xc.api_key=good-key", "xc.min_interval_s=0", "xc.max_retries=1", "xc.backoff_base_s=0.001",
                 "xc.progress=false", "xc.min_length_s=5", "xc.per_page=2", *overrides])


def test_unreachable_server_exits_1_and_keeps_train_csv(fake_xc, data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("XC_API_KEY", raising=False)  # the key comes from xc.api_key= on the command line
    fake_xc.faults.clear()
    live, down = f"{fake_xc.base}/api/3/recordings", closed_port_url()
    out = tmp_path / "xc"
    assert cli_download(data_root, out, live, "xc.species=[spa]") == 0
    good = (out / "train.csv").read_bytes()
    assert len(pd.read_csv(out / "train.csv")) == 2
    capsys.readouterr()

    assert cli_download(data_root, out, down) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == (
        "birdrounds xc-download: error: 3 of 3 species failed (bad, lar, spa), 0 recording(s) failed; "
        "rerun to retry what is missing")
    assert "3 species: 0 downloaded" in captured.out
    assert (out / "train.csv").read_bytes() == good
    assert {s["status"] for s in json.loads((out / "summary.json").read_text())} == {"failed"}

    # A first run that gets nothing writes no (header-only) table at all.
    assert cli_download(data_root, tmp_path / "fresh", down) == 1
    assert not (tmp_path / "fresh" / "train.csv").exists()

    # Partly successful: still exit 1, and the new rows join the earlier ones.
    fake_xc.faults[("api", "Badus badus", 1)] = ["always"]
    assert cli_download(data_root, out, live) == 1
    assert "1 of 3 species failed (bad)" in capsys.readouterr().err
    lines = (out / "train.csv").read_text().splitlines()
    assert set(good.decode().splitlines()) <= set(lines) and len(lines) == 4  # header, 2 spa, 1 lar


def test_recording_failures_count(fake_xc, data_root, tmp_path, monkeypatch, capsys):
    """A species whose every selected recording fails has failed; one failed file alone only warns."""
    fake_xc.faults[("audio", "737917")] = ["always"]  # served, but not audio
    out = tmp_path / "xc"
    assert cli_download(data_root, out, f"{fake_xc.base}/api/3/recordings", "xc.species=[lar]") == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "1 of 1 species failed (lar), 2 recording(s) failed; rerun to retry what is missing")
    assert not (out / "train.csv").exists()

    fake_xc.faults[("audio", "1001")] = ["404"]
    assert cli_download(data_root, out, f"{fake_xc.base}/api/3/recordings", "xc.species=[spa]") == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == (
        "birdrounds xc-download: warning: 1 recording(s) failed; rerun to retry what is missing")
    assert pd.read_csv(out / "train.csv")["filename"].tolist() == ["spa/XC254462.ogg"]


def test_runs_merge_into_train_csv(fake_xc, data_root, tmp_path):
    """A later run for other species adds its rows; earlier rows stay exactly as written."""
    fake_xc.faults.clear()
    out = tmp_path / "xc"
    download_xeno_canto(settings_for(fake_xc, data_root, out, species=["spa"]), sleep=lambda s: None)
    spa_lines = (out / "train.csv").read_text().splitlines()
    assert len(spa_lines) == 3
    [lar] = download_xeno_canto(settings_for(fake_xc, data_root, out, species=["lar"]), sleep=lambda s: None)
    assert lar.downloaded == 1
    lines = (out / "train.csv").read_text().splitlines()
    assert set(spa_lines) <= set(lines) and len(lines) == 4
    table = pd.read_csv(out / "train.csv")
    assert table["filename"].tolist() == ["lar/XC737917.ogg", "spa/XC1001.ogg", "spa/XC254462.ogg"]
    prepared, missing, _ = prepare_train_table(table, out, CLASSES, out / "train.csv", on_missing_file="error")
    assert missing == [] and len(prepared) == 3


def test_foreign_train_csv_stops_before_any_request(fake_xc, data_root, tmp_path):
    out = tmp_path / "xc"
    out.mkdir()
    (out / "train.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="xc.out_dir: .*train.csv has no filename column"):
        download_xeno_canto(settings_for(fake_xc, data_root, out), sleep=lambda s: None)
    assert not fake_xc.hits and (out / "train.csv").read_text() == "a,b\n1,2\n"
