"""Extend a training set with Xeno-canto recordings of under-represented species (API v3 or a local archive).

Recordings come from one of two sources with the same interface (`search(query)`, `download(file, dest)`):
`XCClient` (the API v3 over HTTP) or `LocalArchive` (`xc.source=DIR`: saved API v3 result pages and the
audio they name). Species selection, query, filters, dedupe, conversion and tables are shared.

Layout written under `out_dir`: `<label>/XC<id>.ogg` (32 kHz mono Vorbis), `train.csv` in the
competition schema, `summary.json`, and (API only) `.api_cache/<hash>.json` (raw API pages, reused).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from birdrounds.artifacts import atomic_open
from birdrounds.config import ConfigError
from birdrounds.data.audio import AudioDecodeError, load_audio, write_audio
from birdrounds.data.layout import TRAIN_COLUMNS

log = logging.getLogger(__name__)

KEY_HELP = ("register at https://xeno-canto.org, then copy the API key from your account page "
            "(https://xeno-canto.org/account) into the XC_API_KEY environment variable or xc.api_key")
QUALITY_RATING = {"A": 5.0, "B": 4.0, "C": 3.0, "D": 2.0, "E": 1.0}
# Names Xeno-canto (IOC taxonomy) spells differently from the eBird/Clements taxonomy used by BirdCLEF.
DEFAULT_SYNONYMS: dict[str, str] = {"Regulus calendula": "Corthylio calendula"}
_CHUNK_BYTES = 1 << 16


class XCFetchError(RuntimeError):
    """A request that still failed after all retries (or returned an unusable body)."""


class _Retryable(Exception):
    """One attempt failed in a way worth retrying; `retry_after_s` overrides the backoff when set."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(kw_only=True)
class XCSettings:
    """Everything `download_xeno_canto` needs; built by Hydra from configs/xc/default.yaml, which holds every
    value (`birdrounds.config.shipped("xc")` builds the shipped one outside a run)."""

    data_root: str
    out_dir: str
    train_csv: str | None
    taxonomy_csv: str | None
    api_url: str
    api_key: str | None
    source: str | None  # a local archive folder instead of the API (see LocalArchive)
    min_recordings: int
    species: list[str] | None
    synonyms: dict[str, str]
    quality: str | None
    length: str | None
    group: str | None
    per_page: int
    max_pages: int
    qualities: list[str] | None
    max_per_species: int
    exclude_licenses: list[str]
    min_length_s: float | None
    max_length_s: float | None
    sample_rate_hz: int
    min_interval_s: float
    max_retries: int
    backoff_base_s: float
    timeout_s: float
    dry_run: bool
    progress: bool

    def key(self) -> str:
        """The API key from XC_API_KEY or the config; ConfigError explaining how to get one if absent."""
        key = os.environ.get("XC_API_KEY") or self.api_key
        if not key:
            raise ConfigError(f"xc.api_key: no Xeno-canto API key; {KEY_HELP}")
        return str(key)


# ---------------------------------------------------------------- HTTP with retries and caching


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form only; dates fall back to backoff)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error_message(body: bytes) -> str:
    """The API's message from an error body (v3 flat or nested form), else the raw text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:200]
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(data.get("message", data)) if isinstance(data, dict) else str(data)


class XCClient:
    """Polite HTTP access to the v3 API and its audio files: rate limit, retries, page cache."""

    def __init__(self, settings: XCSettings, sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self.sleep = sleep
        self.cache_dir = Path(settings.out_dir) / ".api_cache"
        self._last_request = -float("inf")

    def _wait_turn(self) -> None:
        wait = self._last_request + self.settings.min_interval_s - time.monotonic()
        if wait > 0:
            self.sleep(wait)
        self._last_request = time.monotonic()

    def _attempts(self, what: str, attempt: Callable[[], object]) -> object:
        """Run `attempt` until it succeeds, retrying _Retryable with exponential backoff."""
        s = self.settings
        for n in range(s.max_retries + 1):
            self._wait_turn()
            try:
                return attempt()
            except _Retryable as err:
                if n == s.max_retries:
                    raise XCFetchError(f"{what}: {err} (gave up after {n + 1} attempts)") from None
                delay = err.retry_after_s if err.retry_after_s is not None else s.backoff_base_s * 2**n
                log.warning("%s: %s; retrying in %.1f s", what, err, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")

    def _open(self, url: str, query: str | None):
        """Open a URL; map HTTP errors to key/query errors (fatal) or _Retryable."""
        try:
            return urllib.request.urlopen(url, timeout=self.settings.timeout_s)
        except urllib.error.HTTPError as err:
            body = err.read()
            if err.code == 429 or err.code >= 500:
                raise _Retryable(f"HTTP {err.code}", _retry_after_s(err.headers.get("Retry-After"))) from None
            if query is None:  # an audio file: fails alone (e.g. 404, restricted recording)
                raise XCFetchError(f"{url}: HTTP {err.code}") from None
            if err.code in (401, 403):
                raise ConfigError(f"xc.api_key: Xeno-canto rejected the API key (HTTP {err.code}: "
                                  f"{_error_message(body)}); {KEY_HELP}") from None
            raise ConfigError(f"xc: Xeno-canto refused query {query!r} (HTTP {err.code}: "
                              f"{_error_message(body)})") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            raise _Retryable(f"connection error: {err}") from None

    def _cache_path(self, params: dict[str, str]) -> Path:
        public = json.dumps({"url": self.settings.api_url, **params}, sort_keys=True)
        return self.cache_dir / f"{hashlib.sha256(public.encode()).hexdigest()[:24]}.json"

    def page(self, query: str, page: int) -> dict:
        """One page of search results, from the cache when present."""
        params = {"query": query, "page": str(page), "per_page": str(self.settings.per_page)}
        cached = self._cache_path(params)
        if cached.is_file():
            return json.loads(cached.read_text())
        url = f"{self.settings.api_url}?{urllib.parse.urlencode({**params, 'key': self.settings.key()})}"

        def attempt() -> dict:
            with self._open(url, query) as resp:
                body = resp.read()
            try:
                data = json.loads(body)
            except ValueError as err:
                raise _Retryable(f"malformed JSON page: {err}") from None
            if not isinstance(data, dict) or not isinstance(data.get("recordings"), list):
                raise _Retryable("malformed JSON page: no 'recordings' list")
            return data

        data = self._attempts(f"query {query!r} page {page}", attempt)
        _atomic_write_text(cached, json.dumps(data))
        return data

    def search(self, query: str) -> list[dict]:
        """All recordings matching `query`, following numPages (capped at `max_pages`)."""
        first = self.page(query, 1)
        records = list(first["recordings"])
        num_pages = min(int(first.get("numPages", 1) or 1), self.settings.max_pages)
        for page in range(2, num_pages + 1):
            records.extend(self.page(query, page)["recordings"])
        return records

    def download(self, url: str, dest: Path) -> int:
        """Stream `url` to `dest`, retrying until the byte count matches Content-Length; returns bytes."""

        def attempt() -> int:
            n_bytes, expected = 0, None
            try:
                with self._open(url, None) as resp, open(dest, "wb") as out:
                    length = resp.headers.get("Content-Length")
                    expected = int(length) if length else None
                    while chunk := resp.read(_CHUNK_BYTES):
                        out.write(chunk)
                        n_bytes += len(chunk)
            except (http.client.HTTPException, OSError) as err:
                dest.unlink(missing_ok=True)
                raise _Retryable(f"download broken after {n_bytes} bytes: {err}") from None
            if n_bytes == 0 or (expected is not None and n_bytes != expected):
                dest.unlink(missing_ok=True)
                raise _Retryable(f"truncated download: {n_bytes} of {expected} bytes")
            return n_bytes

        return self._attempts(f"download {url}", attempt)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write text atomically (temp file beside `path`, then rename)."""
    with atomic_open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------- species selection and queries


@dataclass
class SpeciesPlan:
    """One class to extend: its label, the name Xeno-canto knows it by, and how many clips it has."""

    label: str
    xc_name: str
    n_train: int


def read_tables(settings: XCSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train.csv, taxonomy.csv) of the data folder, honouring table overrides."""
    root = Path(settings.data_root)
    train_path = Path(settings.train_csv) if settings.train_csv else root / "train.csv"
    tax_path = Path(settings.taxonomy_csv) if settings.taxonomy_csv else root / "taxonomy.csv"
    for path in (train_path, tax_path):
        if not path.is_file():
            raise ConfigError(f"xc: table not found: {path} (set data.root or data.train_csv/taxonomy_csv)")
    return pd.read_csv(train_path), pd.read_csv(tax_path)


def select_species(train: pd.DataFrame, taxonomy: pd.DataFrame, settings: XCSettings) -> list[SpeciesPlan]:
    """Classes with fewer than `min_recordings` train rows (or the explicit list), named for Xeno-canto."""
    counts = train["primary_label"].astype(str).value_counts()
    names = dict(zip(taxonomy["primary_label"].astype(str), taxonomy["scientific_name"].astype(str)))
    synonyms = {**DEFAULT_SYNONYMS, **(settings.synonyms or {})}
    if settings.species:
        unknown = sorted(set(map(str, settings.species)) - set(names))
        if unknown:
            raise ConfigError(f"xc.species: not in taxonomy.csv: {unknown[:10]}")
        labels = [str(s) for s in settings.species]
    else:
        labels = sorted(lab for lab in names if counts.get(lab, 0) < settings.min_recordings)
    # The synonym table maps either the label or the taxonomy name to Xeno-canto's spelling.
    return [SpeciesPlan(lab, synonyms.get(lab, synonyms.get(names[lab], names[lab])), int(counts.get(lab, 0)))
            for lab in labels]


def build_query(scientific_name: str, settings: XCSettings) -> str:
    """A tagged v3 query: sp:"genus species" plus the configured quality, length and group tags."""
    parts = [f'sp:"{scientific_name}"']
    for tag, value in (("q", settings.quality), ("len", settings.length), ("grp", settings.group)):
        if value:
            parts.append(f"{tag}:{value}" if " " not in str(value) else f'{tag}:"{value}"')
    return " ".join(parts)


# ---------------------------------------------------------------- filters


def parse_length_s(text: str | None) -> float | None:
    """Seconds from Xeno-canto's "m:ss" / "h:mm:ss" length, None when unparseable."""
    try:
        total = 0.0
        for part in str(text).split(":"):
            total = total * 60 + float(part)
        return total
    except ValueError:
        return None


def known_xc_ids(train: pd.DataFrame) -> set[str]:
    """XC ids already used by train.csv, from `XC123` in filenames and xeno-canto.org/123 in urls."""
    ids: set[str] = set()
    for col, pattern in (("filename", r"XC(\d+)"), ("url", r"xeno-canto\.org/(\d+)")):
        if col in train.columns:
            for value in train[col].dropna().astype(str):
                ids.update(re.findall(pattern, value))
    return ids


def licence_tokens(lic: str | None) -> set[str]:
    """Licence parts from a CC URL, e.g. //creativecommons.org/licenses/by-nc-nd/4.0/ -> {by, nc, nd}."""
    match = re.search(r"licenses/([a-z-]+)", str(lic or "").lower())
    return set(match.group(1).split("-")) if match else set()


def skip_reason(rec: dict, settings: XCSettings, known: set[str]) -> str | None:
    """Why a recording is not used (None = keep it)."""
    if str(rec.get("id")) in known:
        return "already_in_train"
    if licence_tokens(rec.get("lic")) & {t.lower() for t in settings.exclude_licenses or []}:
        return "license"
    if settings.qualities and str(rec.get("q", "")) not in {str(q) for q in settings.qualities}:
        return "quality"
    length = parse_length_s(rec.get("length"))
    if settings.min_length_s is not None and (length is None or length < settings.min_length_s):
        return "too_short"
    if settings.max_length_s is not None and (length is None or length > settings.max_length_s):
        return "too_long"
    if not rec.get("file"):
        return "no_file"
    return None


def choose_recordings(records: list[dict], settings: XCSettings, known: set[str]) -> tuple[list[dict], dict[str, int]]:
    """Apply filters, duplicates and the per-species cap; returns (kept, skip counts by reason)."""
    kept, skipped, seen = [], {}, set()
    for rec in records:
        reason = "duplicate" if str(rec.get("id")) in seen else skip_reason(rec, settings, known)
        if reason is None and len(kept) >= settings.max_per_species:
            reason = "cap"
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        seen.add(str(rec.get("id")))
        kept.append(rec)
    return kept, skipped


# ---------------------------------------------------------------- a local archive instead of the API

XC_GROUPS = {"0": "soundscape", "1": "birds", "2": "grasshoppers", "3": "bats", "4": "frogs", "5": "land mammals"}
_GRADES = ("A", "B", "C", "D", "E")  # best first
_QUERY_TAG = re.compile(r'(\w+):(?:"([^"]*)"|(\S+))')
# Kaggle's dataset manifest sits beside the pages of a shared archive; it is not a result page.
ARCHIVE_IGNORED = frozenset({"dataset-metadata.json"})


def parse_query(query: str) -> dict[str, str]:
    """The tags of a tagged query (`sp:"a b" q:>C`), tag -> value; ValueError for anything else."""
    tags, pos = {}, 0
    for match in _QUERY_TAG.finditer(query):
        if query[pos:match.start()].strip():
            raise ValueError(f"untagged text {query[pos:match.start()].strip()!r}")
        tags[match.group(1).lower()] = match.group(2) if match.group(2) is not None else match.group(3)
        pos = match.end()
    if query[pos:].strip() or not tags:
        raise ValueError(f"untagged text {query[pos:].strip() or query!r}")
    return tags


def _name_test(value: str) -> Callable[[dict], bool]:
    """sp:"genus species" (or "genus species subspecies", or the epithet alone), case-insensitive."""
    words = value.lower().split()
    fields = {1: ("sp",), 2: ("gen", "sp"), 3: ("gen", "sp", "ssp")}.get(len(words))
    if fields is None:
        raise ValueError("expected a scientific name")
    return lambda rec: [str(rec.get(f) or "").strip().lower() for f in fields] == words


def _quality_test(value: str) -> Callable[[dict], bool]:
    """q:A (exactly A), q:">C" (better than C: A, B), q:"<C" (worse: D, E), q:0 (unrated)."""
    text = value.strip().upper()
    if text == "0":
        return lambda rec: str(rec.get("q") or "").strip().upper() not in _GRADES
    op, grade = (text[0], text[1:]) if text[:1] in "<>" else ("", text)
    if grade not in _GRADES:
        raise ValueError("expected A-E, optionally after < or >, or 0")
    limit = _GRADES.index(grade)

    def test(rec: dict) -> bool:
        q = str(rec.get("q") or "").strip().upper()
        if q not in _GRADES:  # unrated recordings never match a rating
            return False
        rank = _GRADES.index(q)
        return rank < limit if op == ">" else rank > limit if op == "<" else rank == limit

    return test


def _length_test(value: str) -> Callable[[dict], bool]:
    """len:10 (10 s within 1%), len:10-60, len:"<30" (30 s or shorter), len:">120" (longer), len:"=19.8"."""
    match = re.fullmatch(r"([<>=]?)(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?", value.replace(" ", ""))
    if not match or (match.group(1) and match.group(3)):
        raise ValueError("expected seconds: N, A-B, <N, >N or =N")
    op, low, high = match.group(1), float(match.group(2)), match.group(3)

    def test(rec: dict) -> bool:
        length = parse_length_s(rec.get("length"))
        if length is None:
            return False
        if high is not None:
            return low <= length <= float(high)
        return {"<": length <= low, ">": length > low, "=": length == low}.get(op, abs(length - low) <= 0.01 * low)

    return test


def _group_test(value: str) -> Callable[[dict], bool]:
    """grp:birds or its id (grp:1); a recording without `grp` (an older dump) is kept."""
    want = XC_GROUPS.get(value.strip(), value.strip().lower())
    if want not in XC_GROUPS.values():
        raise ValueError(f"expected one of {', '.join(XC_GROUPS.values())} or 0-5")
    return lambda rec: not rec.get("grp") or str(rec["grp"]).strip().lower() == want


_TAG_TESTS = {"sp": _name_test, "q": _quality_test, "len": _length_test, "grp": _group_test}


def archive_query(query: str) -> Callable[[dict], bool]:
    """A record predicate for a query `build_query` writes, with the API's meaning of each tag."""
    try:
        tags = parse_query(query)
    except ValueError as err:
        raise ConfigError(f"xc.source: cannot search the local archive for {query!r} ({err})") from None
    tests = []
    for tag, value in tags.items():
        if tag not in _TAG_TESTS:
            raise ConfigError(f"xc.source: the local archive cannot search by {tag}: (query {query!r}); "
                              f"it knows {', '.join(_TAG_TESTS)}")
        try:
            tests.append(_TAG_TESTS[tag](value))
        except ValueError as err:
            raise ConfigError(f"xc: bad {tag}:{value!r} in query {query!r} ({err})") from None
    return lambda rec: all(test(rec) for test in tests)


def _is_url(text: str) -> bool:
    return text.startswith("//") or re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", text) is not None


def _inside_relative(name: str) -> bool:
    """A relative path that stays inside its folder (no absolute path, no `..`)."""
    path = PurePosixPath(name.replace("\\", "/"))
    drive = re.match(r"[A-Za-z]:", name) is not None  # a Windows drive (C:...)
    return bool(name.strip()) and not drive and not path.is_absolute() and ".." not in path.parts


def read_archive_page(path: Path) -> list[dict]:
    """The recordings of one archive page; ConfigError naming the file when it is not a usable page."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"xc.source: {path}: {what}")

    try:
        data = json.loads(path.read_bytes())
    except OSError as err:
        raise bad(f"cannot read it ({err.strerror or err})") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise bad(f"not valid JSON ({err})") from None
    records = data.get("recordings") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise bad('neither an API v3 result page ({"recordings": [...]}) nor a list of recordings')
    for n, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise bad(f"recording {n} is not an object")
        xc_id = str(rec.get("id", "")).strip()
        if not xc_id.isdigit() or not xc_id.isascii():
            raise bad(f"recording {n} has no numeric 'id' (got {rec.get('id')!r})")
        for key in ("gen", "sp"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise bad(f"recording XC{xc_id} has no '{key}'")
        file = rec.get("file")
        if file is not None and not isinstance(file, str):
            raise bad(f"recording XC{xc_id}: 'file' is not a string")
        if file and not _is_url(file) and not _inside_relative(file):
            raise bad(f"recording XC{xc_id}: file {file!r} is outside the archive folder")
        rec["id"] = xc_id
    return records


class LocalArchive:
    """A folder of saved API v3 result pages and the audio they name, searched and fetched like the API.

    Pages: every `*.json` file directly in the folder (by name; hidden files and Kaggle's
    `dataset-metadata.json` aside), each an API v3 response body `{"recordings": [...], ...}` or a plain
    list of recordings. Every recording needs `id`, `gen` and `sp`. Its audio is the first of these that
    exists, relative to the folder: `file` when that is a path (not a URL), `file-name`,
    `audio/<file-name>`, `audio/XC<id>.*`, `XC<id>.*`. Audio is read only inside the folder.
    """

    def __init__(self, folder: str | os.PathLike):
        self.root = Path(folder).expanduser()
        if not self.root.is_dir():
            raise ConfigError(f"xc.source: {self.root} is not a folder (expected a local Xeno-canto archive: "
                              f"API v3 result pages as *.json and the audio they name)")
        pages = sorted(p for p in self.root.glob("*.json")
                       if p.is_file() and p.name not in ARCHIVE_IGNORED and not p.name.startswith("."))
        if not pages:
            raise ConfigError(f"xc.source: no *.json result pages in {self.root}")
        self.records = [rec for page in pages for rec in read_archive_page(page)]
        self._by_name: dict[str, list[dict]] = {}  # "genus species" -> records, so a query needs no full scan
        for rec in self.records:
            self._by_name.setdefault(f"{rec['gen'].strip()} {rec['sp'].strip()}".lower(), []).append(rec)
        log.info("xeno-canto: local archive %s: %d recording(s) in %d page file(s)",
                 self.root, len(self.records), len(pages))

    def audio_path(self, rec: dict) -> Path:
        """The archive file of a recording: the first candidate that exists, else the first candidate."""
        xc_id = str(rec["id"])
        names = []
        if isinstance(rec.get("file"), str) and rec["file"].strip() and not _is_url(rec["file"]):
            names.append(rec["file"].strip())
        if isinstance(rec.get("file-name"), str) and rec["file-name"].strip():
            names += [rec["file-name"].strip(), f"audio/{rec['file-name'].strip()}"]
        names = [n for n in names if _inside_relative(n)]
        for name in names:
            if (self.root / name).is_file():
                return self.root / name
        for folder in (self.root / "audio", self.root):
            for hit in sorted(folder.glob(f"XC{xc_id}.*")):
                if hit.is_file() and hit.suffix.lower() != ".json":
                    return hit
        return self.root / (names[0] if names else f"audio/XC{xc_id}.mp3")

    def search(self, query: str) -> list[dict]:
        """The archive's recordings matching `query`, in page order, `file` set to their local audio."""
        match = archive_query(query)
        name = " ".join(parse_query(query).get("sp", "").lower().split())
        pool = self._by_name.get(name, []) if len(name.split()) == 2 else self.records
        return [{**rec, "file": str(self.audio_path(rec))} for rec in pool if match(rec)]

    def download(self, file: str, dest: Path) -> int:
        """Copy an archive audio file to `dest`; XCFetchError when it is missing or outside the folder."""
        path = Path(file)
        try:
            inside = path.resolve().is_relative_to(self.root.resolve())
        except (OSError, RuntimeError) as err:
            raise XCFetchError(f"{file}: cannot resolve it ({err})") from None
        if not inside:
            raise XCFetchError(f"{file}: resolves outside the archive folder {self.root}")
        if not path.is_file():
            raise XCFetchError(f"{file}: no such file in the archive")
        try:
            shutil.copyfile(path, dest)
        except OSError as err:
            dest.unlink(missing_ok=True)
            raise XCFetchError(f"{file}: cannot copy it ({err.strerror or err})") from None
        return dest.stat().st_size


class RecordingSource(Protocol):
    """Where recordings come from: `XCClient` (the API) or `LocalArchive`."""

    def search(self, query: str) -> list[dict]: ...

    def download(self, url: str, dest: Path) -> int: ...


def open_source(settings: XCSettings, sleep: Callable[[float], None] = time.sleep) -> RecordingSource:
    """The local archive when `xc.source` is set (no API key needed), else the API client (key required)."""
    if settings.source:
        archive = LocalArchive(settings.source)
        if Path(settings.out_dir).resolve() == archive.root.resolve():
            raise ConfigError(f"xc.out_dir: must not be the archive folder itself ({archive.root})")
        return archive
    settings.key()  # fail before any work when there is no key
    return XCClient(settings, sleep=sleep)


# ---------------------------------------------------------------- conversion and table rows


def convert(raw: Path, final: Path, sample_rate_hz: int) -> None:
    """Decode `raw` to mono at the project rate and write `final` atomically; raises AudioDecodeError."""
    audio = load_audio(raw, sample_rate_hz)
    tmp = final.with_name(f".{final.stem}.tmp.ogg")
    try:
        write_audio(tmp, np.clip(audio, -1.0, 1.0), sample_rate_hz)
        load_audio(tmp, sample_rate_hz)  # never publish an Ogg that does not read back
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _https(url: object) -> str:
    text = str(url or "")
    return f"https:{text}" if text.startswith("//") else text


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def train_row(rec: dict, label: str, name_to_label: dict[str, str]) -> dict:
    """A competition-schema train.csv row for one downloaded recording."""
    also = [name_to_label[a.lower()] for a in rec.get("also") or [] if a and a.lower() in name_to_label]
    return {
        "primary_label": label, "secondary_labels": str(sorted(set(also) - {label})),
        "type": str([t.strip() for t in str(rec.get("type") or "").split(",") if t.strip()]),
        "filename": f"{label}/XC{rec['id']}.ogg", "collection": "XC",
        "rating": QUALITY_RATING.get(str(rec.get("q", "")), 0.0), "url": _https(rec.get("url")),
        "latitude": _float(rec.get("lat")), "longitude": _float(rec.get("lon", rec.get("lng"))),
        "scientific_name": f"{rec.get('gen', '')} {rec.get('sp', '')}".strip(),
        "common_name": rec.get("en", ""), "author": rec.get("rec", ""), "license": _https(rec.get("lic")),
    }


def label_lookup(taxonomy: pd.DataFrame, synonyms: dict[str, str]) -> dict[str, str]:
    """Lower-case scientific name (taxonomy's and Xeno-canto's spelling) -> class label."""
    lookup = {str(n).lower(): str(lab) for lab, n in zip(taxonomy["primary_label"], taxonomy["scientific_name"])}
    for ours, theirs in {**DEFAULT_SYNONYMS, **synonyms}.items():
        label = lookup.get(ours.lower(), ours if ours in set(taxonomy["primary_label"].astype(str)) else None)
        if label:
            lookup[theirs.lower()] = label
    return lookup


# ---------------------------------------------------------------- the command


@dataclass
class SpeciesSummary:
    """What happened to one species."""

    label: str
    xc_name: str
    n_train: int
    query: str = ""
    found: int = 0
    selected: int = 0
    downloaded: int = 0
    existing: int = 0
    failed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def species_failed(self) -> bool:
        """No usable query (error), or recordings to fetch and every one of them failed."""
        return self.error is not None or (self.failed > 0 and self.downloaded + self.existing == 0)

    def record(self) -> dict:
        """The summary.json entry."""
        return {**self.__dict__, "status": "failed" if self.species_failed else "ok"}


def failure_line(summaries: list[SpeciesSummary]) -> str | None:
    """One line counting failed species and recordings, or None when nothing failed."""
    failed = [s.label for s in summaries if s.species_failed]
    n_recordings = sum(s.failed for s in summaries)
    if not failed and not n_recordings:
        return None
    names = ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else "")
    species = f"{len(failed)} of {len(summaries)} species failed ({names}), " if failed else ""
    return f"{species}{n_recordings} recording(s) failed; rerun to retry what is missing"


def format_summary(summaries: list[SpeciesSummary]) -> str:
    """A per-species table (found, selected, new, present, failed, error) and a totals line."""
    lines = [f"{'label':<12} {'found':>6} {'selected':>8} {'new':>5} {'present':>7} {'failed':>6}  error"]
    for s in summaries:
        lines.append(f"{s.label:<12} {s.found:>6} {s.selected:>8} {s.downloaded:>5} {s.existing:>7} "
                     f"{s.failed:>6}  {s.error or ''}".rstrip())
    lines.append(f"{len(summaries)} species: {sum(s.downloaded for s in summaries)} downloaded, "
                 f"{sum(s.existing for s in summaries)} already present, {sum(s.failed for s in summaries)} "
                 f"recording(s) failed, {sum(s.species_failed for s in summaries)} species failed")
    return "\n".join(lines)


def _fetch_one(client: RecordingSource, rec: dict, label: str, out_dir: Path, rate_hz: int) -> int:
    """Download and convert one recording; returns bytes fetched. Raises XCFetchError/AudioDecodeError."""
    folder = out_dir / label
    folder.mkdir(parents=True, exist_ok=True)
    suffix = Path(str(rec.get("file-name") or "x.mp3")).suffix.lower() or ".mp3"
    part = folder / f".XC{rec['id']}{suffix}.part"
    raw = folder / f".XC{rec['id']}.raw{suffix}"
    try:
        n_bytes = client.download(str(rec["file"]), part)
        os.replace(part, raw)
        try:
            convert(raw, folder / f"XC{rec['id']}.ogg", rate_hz)
        except AudioDecodeError as err:  # name the source (URL or archive file), not the temporary copy
            raise AudioDecodeError(f"{rec['file']} does not decode ({err})") from None
        return n_bytes
    finally:
        part.unlink(missing_ok=True)
        raw.unlink(missing_ok=True)


def _download_all(client: RecordingSource, jobs: list[tuple[SpeciesSummary, dict]], settings: XCSettings) -> None:
    out_dir = Path(settings.out_dir)
    total_bytes = 0
    bar = tqdm(jobs, desc="xeno-canto", unit="file", disable=not settings.progress)
    for summary, rec in bar:
        try:
            total_bytes += _fetch_one(client, rec, summary.label, out_dir, settings.sample_rate_hz)
            summary.downloaded += 1
        except (XCFetchError, AudioDecodeError) as err:
            log.warning("XC%s (%s) failed: %s", rec.get("id"), summary.label, err)
            summary.failed += 1
        bar.set_postfix(MB=f"{total_bytes / 1e6:.1f}")


def _print_plan(jobs: list[tuple[SpeciesSummary, dict]]) -> None:
    """Print the recordings a real run would download, one per line."""
    print(f"{'label':<12} {'xc_id':<10} {'q':<9} {'length':<8} license")
    for summary, rec in jobs:
        xc_id, quality, length = f"XC{rec['id']}", str(rec.get("q", "")), str(rec.get("length", ""))
        licence = "-".join(sorted(licence_tokens(rec.get("lic"))))
        print(f"{summary.label:<12} {xc_id:<10} {quality:<9} {length:<8} {licence}")
    print(f"{len(jobs)} recording(s) would be downloaded")


def _plan(client: RecordingSource, species: list[SpeciesPlan], known: set[str], settings: XCSettings,
          ) -> Iterator[tuple[SpeciesSummary, list[dict]]]:
    for sp in species:
        summary = SpeciesSummary(sp.label, sp.xc_name, sp.n_train, query=build_query(sp.xc_name, settings))
        if len(sp.xc_name.split()) != 2:
            summary.error = f"no binomial scientific name ({sp.xc_name!r}); add one to xc.synonyms"
            yield summary, []
            continue
        try:
            records = client.search(summary.query)
        except XCFetchError as err:
            log.warning("%s: %s", sp.label, err)
            summary.error = str(err)
            yield summary, []
            continue
        kept, summary.skipped = choose_recordings(records, settings, known)
        summary.found, summary.selected = len(records), len(kept)
        yield summary, kept


def download_xeno_canto(settings: XCSettings, sleep: Callable[[float], None] = time.sleep) -> list[SpeciesSummary]:
    """Select species, query Xeno-canto (or the local archive), fetch/convert audio, write train.csv + summary.json."""
    client = open_source(settings, sleep)  # a missing key or a malformed archive stops before any work
    train, taxonomy = read_tables(settings)
    out_dir = Path(settings.out_dir)
    previous = read_previous_rows(out_dir / "train.csv")  # before any download: an unreadable one stops here
    species = select_species(train, taxonomy, settings)
    log.info("xeno-canto: %d species to extend", len(species))
    planned = list(_plan(client, species, known_xc_ids(train), settings))
    jobs, done = [], []
    for summary, kept in planned:
        for rec in kept:
            if (out_dir / summary.label / f"XC{rec['id']}.ogg").is_file():
                summary.existing += 1
                done.append((summary, rec))
            else:
                jobs.append((summary, rec))
    if settings.dry_run:
        _print_plan(jobs)
        return [s for s, _ in planned]
    _download_all(client, jobs, settings)
    lookup = label_lookup(taxonomy, settings.synonyms or {})
    rows = [train_row(rec, s.label, lookup) for s, rec in done + jobs
            if (out_dir / s.label / f"XC{rec['id']}.ogg").is_file()]
    if merge_train_csv(out_dir / "train.csv", previous, rows):
        log.info("xeno-canto: wrote %s", out_dir / "train.csv")
    else:
        log.info("xeno-canto: no new recordings; %s left as it was", out_dir / "train.csv")
    summaries = [s for s, _ in planned]
    _atomic_write_text(out_dir / "summary.json", json.dumps([s.record() for s in summaries], indent=1))
    return summaries


def read_previous_rows(path: Path) -> pd.DataFrame:
    """The rows of an earlier run's train.csv, as text (so they are written back exactly); none if absent."""
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(TRAIN_COLUMNS))
    try:
        previous = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ConfigError(f"xc.out_dir: cannot read {path} ({err}); move it away to rebuild it") from None
    if "filename" not in previous.columns:
        raise ConfigError(f"xc.out_dir: {path} has no filename column; move it away to rebuild it")
    return previous


def merge_train_csv(path: Path, previous: pd.DataFrame, rows: list[dict]) -> bool:
    """Write `previous` rows plus this run's to `path` (same filename: the new row wins); False = not written.

    Rows of earlier runs stay (e.g. species whose query failed this time or that were not asked for),
    and a file that would gain no new filename is left byte for byte as it was, so a failed run
    never replaces a good table with an empty one.
    """
    new = pd.DataFrame(rows, columns=list(TRAIN_COLUMNS))
    if not set(new["filename"]) - set(previous["filename"]):
        return False
    kept = previous[~previous["filename"].isin(set(new["filename"]))]
    columns = list(TRAIN_COLUMNS) + [c for c in previous.columns if c not in TRAIN_COLUMNS]
    parts = [frame for frame in (kept, new) if len(frame)]  # concat warns about empty frames
    table = pd.concat(parts, ignore_index=True).reindex(columns=columns).sort_values("filename", kind="stable")
    _atomic_write_text(path, table.to_csv(index=False))
    return True
