"""Audio decoding (mono, resampled) and the on-disk cache of decoded audio.

There is one decoder: `birdrounds.audio_io.decode_audio` (soundfile, mean of channels, scipy's polyphase
resampler), which `birdrounds predict` and an export package's standalone infer.py use too, so a 44.1 or
48 kHz recording (every Xeno-canto download) gives the model the same samples in training and in serving.
Training and serving detect a cut-off file by the same rule; training then refuses it (below), serving
keeps the audio before the cut and predicts the rest as silence (every row of a submission must exist).

Two "audio sources" share one duck-typed interface: an attribute `sample_rate_hz: int` and a method
`load(path) -> np.ndarray` (1-D, float32 or float16, possibly a read-only memmap) that raises
`AudioDecodeError`. `DirectAudio` decodes every call; `AudioCache` decodes once and serves memmaps.

Failure policy: a file that cannot be decoded completely raises `AudioDecodeError` naming the file.
That covers unreadable and unrecognised files, empty ones (0 bytes, or a valid header with 0 frames),
non-finite samples, and truncation (we raise rather than keep the partial audio, because a cut file is
corrupt and its labels may describe the missing part):
- a truncated Ogg file decodes "successfully" up to the cut with libsndfile 1.2.2 (no error at all),
  so it is caught by its missing end-of-stream page;
- formats whose header declares a frame count (FLAC, MP3, and WAV's data chunk, which libsndfile itself
  clamps to the bytes present) raise when decoding yields clearly fewer frames than declared, and a
  decoder error part-way through (e.g. FLAC losing sync) raises too.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from birdrounds.artifacts import atomic_open
from birdrounds.config import ConfigError
# The one decoder and its rule for a cut-off file (Ogg end page, declared-length shortfall), shared with predict.
from birdrounds.audio_io import AudioReadError, decode_audio
from birdrounds.procs import spawn_pool

logger = logging.getLogger(__name__)

# Bump when the decoded content of an entry would change (decoder policy, resampler quality,
# file layout), so old entries are never served. 2: scipy's resample_poly (audio_io.decode_audio) replaced soxr.
CACHE_FORMAT_VERSION = 2
CACHE_DTYPES = ("float16", "float32")
_FLOAT16_SAFE_PEAK = 65_000.0
_FLOAT16_MAX = float(np.finfo(np.float16).max)

# (source path, cache key, entry path, sample_rate_hz, dtype): plain values, cheap to pickle to workers.
_BuildJob = tuple[str, str, str, int, str]


class AudioDecodeError(Exception):
    """Raised for corrupt, empty, truncated or unreadable audio files."""


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate_hz: int, format: str = "OGG",
                subtype: str = "VORBIS", compression_level: float | None = None) -> None:
    """Encode mono audio in ~1-s blocks: libsndfile 1.2.2 has crashed writing a long OGG array in one call."""
    extra = {} if compression_level is None else {"compression_level": compression_level}
    with sf.SoundFile(str(path), "w", samplerate=sample_rate_hz, channels=1, format=format, subtype=subtype,
                      **extra) as f:
        for start in range(0, len(audio), sample_rate_hz):
            f.write(np.asarray(audio[start:start + sample_rate_hz], dtype=np.float32))


def audio_info(path: str | os.PathLike) -> tuple[float, int, int]:
    """Read the header only: (duration_s, sample_rate_hz, channels); raises on unreadable or empty files."""
    _check_not_empty_file(path)
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise AudioDecodeError(f"cannot read audio header of {path}: {exc}") from exc
    if info.frames <= 0:
        raise AudioDecodeError(f"no audio frames in {path}")
    return info.frames / info.samplerate, int(info.samplerate), int(info.channels)


def load_audio(path: str | os.PathLike, sample_rate_hz: int) -> np.ndarray:
    """Decode a whole file to float32 1-D mono at `sample_rate_hz` with `audio_io.decode_audio`; a cut-off file
    is an error here (see the module doc)."""
    _check_not_empty_file(path)
    try:
        audio = decode_audio(path, sample_rate_hz)
    except AudioReadError as exc:
        raise AudioDecodeError(f"cannot decode {path}: {exc}") from exc
    if audio.truncated is not None:
        raise AudioDecodeError(f"truncated file {path}: {audio.truncated}")
    return audio.wave


def _check_not_empty_file(path: str | os.PathLike) -> None:
    try:
        n_bytes = os.path.getsize(path)
    except OSError as exc:
        raise AudioDecodeError(f"cannot read {path}: {exc}") from exc
    if n_bytes == 0:
        raise AudioDecodeError(f"empty file (0 bytes): {path}")


class DirectAudio:
    """Audio source that decodes the file on every `load` call."""

    def __init__(self, sample_rate_hz: int) -> None:
        self.sample_rate_hz = int(sample_rate_hz)

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """Decode `path` to float32 1-D mono at `sample_rate_hz`."""
        return load_audio(path, self.sample_rate_hz)


@dataclass
class CacheBuildSummary:
    """What `AudioCache.build` did; `seconds_of_audio` totals every entry present after the build."""

    n_files: int
    n_cached_before: int
    n_decoded: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds_of_audio: float = 0.0

    def __str__(self) -> str:
        """One line for logs: counts and hours of audio."""
        return (
            f"{self.n_files} files: {self.n_cached_before} already cached, {self.n_decoded} decoded, "
            f"{len(self.skipped)} skipped; {self.seconds_of_audio / 3600:.2f} h of audio"
        )


class AudioCache:
    """Audio source serving decoded audio as read-only memmapped `.npy` files, decoding on a miss.

    An entry's key hashes (absolute path, size, mtime_ns, sample rate, dtype, format version), so a
    rewritten source file or another sample rate never hits a stale entry. Entries are written
    atomically (temp file + rename), so concurrent writers (DataLoader workers, parallel builds) are
    safe: the last rename wins and every version is complete and identical.
    """

    def __init__(self, cache_dir: str | os.PathLike, sample_rate_hz: int, dtype: str = "float16") -> None:
        # int16 is not offered: consumers convert slices with .astype(float32) and would have to
        # know to rescale, which the shared audio-source contract does not ask of them.
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
        self.cache_dir = Path(cache_dir)
        self.sample_rate_hz = int(sample_rate_hz)
        self.dtype = dtype
        # Cache key -> reason, so known-bad files fail fast instead of being decoded again.
        self._failed: dict[str, str] = {}

    def entry_path(self, path: str | os.PathLike) -> Path:
        """Where the entry for `path` at this sample rate and dtype lives (stats the source file)."""
        return self._entry_path(self._key(path))

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """Return the decoded audio of `path` as a read-only 1-D memmap, decoding and storing on a miss."""
        key = self._key(path)
        if key in self._failed:
            raise AudioDecodeError(self._failed[key])
        entry = self._entry_path(key)
        cached = _open_entry(entry)
        if cached is not None:
            return cached
        try:
            _decode_to_entry(path, entry, self.sample_rate_hz, self.dtype)
        except AudioDecodeError as exc:
            self._failed[key] = str(exc)
            raise
        return np.load(entry, mmap_mode="r")

    def build(
        self, paths: Iterable[str | os.PathLike], num_workers: int = 2, progress: bool = True
    ) -> CacheBuildSummary:
        """Decode every missing entry in a process pool; corrupt files are skipped, warned and counted."""
        paths = [str(p) for p in paths]
        summary = CacheBuildSummary(n_files=len(paths), n_cached_before=0, n_decoded=0)
        jobs = self._plan_build(paths, summary)
        if jobs:
            self._check_writable(len(jobs))
        n_done = len(paths) - len(jobs)
        bar = tqdm(total=len(paths), initial=n_done, desc="audio cache", unit="file", disable=not progress)
        with bar:
            try:
                for (path, key, *_), (n_samples, error) in zip(jobs, _run_jobs(jobs, num_workers)):
                    bar.update(1)
                    if error is not None:
                        self._failed[key] = error
                        self._skip(summary, path, error)
                        continue
                    summary.n_decoded += 1
                    summary.seconds_of_audio += n_samples / self.sample_rate_hz
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                # A full disk is not bad audio: stop, keep every entry written (a rerun resumes).
                raise ConfigError(
                    f"data.cache_dir: no space left on the disk of {self.cache_dir} after {summary.n_decoded} of "
                    f"{len(jobs)} new entries (float16 at {self.sample_rate_hz} Hz takes "
                    f"{2 * self.sample_rate_hz:,} B per second of audio); free space or point data.cache_dir "
                    f"elsewhere, and rerun: cached entries are kept") from None
        logger.info("audio cache %s: %s", self.cache_dir, summary)
        return summary

    def _check_writable(self, n_missing: int) -> None:
        """Refuse in one line, before decoding anything, when entries are missing and the folder takes no files."""
        folder = self.cache_dir / str(self.sample_rate_hz)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_check_"):
                pass
        except OSError as err:
            raise ConfigError(f"data.cache_dir: cannot write to {self.cache_dir} ({err.strerror or err}); "
                              f"{n_missing} file(s) are not cached yet: make it writable or point "
                              f"data.cache_dir elsewhere") from None

    def _plan_build(self, paths: list[str], summary: CacheBuildSummary) -> list[_BuildJob]:
        """Count readable entries and known failures into `summary`; return jobs for the rest."""
        jobs = []
        for path in paths:
            try:
                key = self._key(path)
            except AudioDecodeError as exc:
                self._skip(summary, path, str(exc))
                continue
            entry = self._entry_path(key)
            cached = _open_entry(entry)
            if cached is not None:
                summary.n_cached_before += 1
                summary.seconds_of_audio += cached.shape[0] / self.sample_rate_hz
            elif key in self._failed:
                self._skip(summary, path, self._failed[key])
            else:
                jobs.append((path, key, str(entry), self.sample_rate_hz, self.dtype))
        return jobs

    def __len__(self) -> int:
        """Number of entries stored for this sample rate (any dtype)."""
        return sum(1 for _ in (self.cache_dir / str(self.sample_rate_hz)).glob("*/*.npy"))

    def _key(self, path: str | os.PathLike) -> str:
        absolute = os.path.abspath(path)
        try:
            st = os.stat(absolute)
        except OSError as exc:
            raise AudioDecodeError(f"cannot read {path}: {exc}") from exc
        fields = (absolute, st.st_size, st.st_mtime_ns, self.sample_rate_hz, self.dtype, CACHE_FORMAT_VERSION)
        return hashlib.blake2b("\0".join(map(str, fields)).encode(), digest_size=16).hexdigest()

    def _entry_path(self, key: str) -> Path:
        return self.cache_dir / str(self.sample_rate_hz) / key[:2] / f"{key}.npy"

    @staticmethod
    def _skip(summary: CacheBuildSummary, path: str, reason: str) -> None:
        logger.warning("skipping audio file %s: %s", path, reason)
        summary.skipped.append((path, reason))


def _open_entry(entry: Path) -> np.ndarray | None:
    """Memmap an existing entry; None when it is missing or unreadable (then it gets rebuilt)."""
    try:
        return np.load(entry, mmap_mode="r")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as exc:
        logger.warning("rebuilding unreadable cache entry %s: %s", entry, exc)
        return None


def _decode_to_entry(path: str | os.PathLike, entry: Path, sample_rate_hz: int, dtype: str) -> int:
    """Decode `path`, store it at `entry` atomically in `dtype`, and return the number of samples."""
    audio = load_audio(path, sample_rate_hz)
    if dtype == "float16":
        peak = float(np.abs(audio).max())
        if peak > _FLOAT16_SAFE_PEAK:
            # Beyond float16's range values would become inf; such a file is broken anyway.
            logger.warning("peak %.0f in %s exceeds float16 range; clipping", peak, path)
            audio = np.clip(audio, -_FLOAT16_MAX, _FLOAT16_MAX)
    _save_npy_atomic(entry, audio.astype(dtype, copy=False))
    return audio.shape[0]


def _save_npy_atomic(entry: Path, array: np.ndarray) -> None:
    """Write `array` to `entry` via a temp file in the same folder and a rename."""
    # No fsync: a cache entry lost or cut by a power failure is detected and rebuilt on read.
    with atomic_open(entry, "wb", fsync=False) as f:
        np.save(f, array)


def _build_job(job: _BuildJob) -> tuple[int, str | None]:
    """Worker: (n_samples, None) after storing an entry, or (0, reason) for a file that fails to decode."""
    path, _key, entry, sample_rate_hz, dtype = job
    try:
        return _decode_to_entry(path, Path(entry), sample_rate_hz, dtype), None
    except AudioDecodeError as exc:
        return 0, str(exc)


def _run_jobs(jobs: list[_BuildJob], num_workers: int) -> Iterator[tuple[int, str | None]]:
    """Run `_build_job` over `jobs` in order, in a spawn-based process pool when it pays off."""
    if num_workers <= 1 or len(jobs) <= 1:
        yield from map(_build_job, jobs)
        return
    n_procs = min(num_workers, len(jobs))
    # Chunks amortise inter-process traffic yet stay small enough to balance long and short files.
    chunksize = max(1, min(16, len(jobs) // (n_procs * 8)))
    with spawn_pool(n_procs) as pool:
        yield from pool.map(_build_job, jobs, chunksize=chunksize)
