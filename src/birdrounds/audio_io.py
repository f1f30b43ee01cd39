"""Reading audio files: decode to mono float32 at a given rate, and tell a truncated file from a complete one.

Shared by inference (`infer.py`) and training (`birdrounds.data.audio` decodes its cache entries with it).
The export copies this file beside infer.py, where it runs without birdrounds installed: it imports only
the standard library, numpy and soundfile (scipy to resample, when a file's rate differs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

AUDIO_EXTENSIONS = (".ogg", ".wav", ".flac", ".mp3")
# Truncation checks, shared with birdrounds.data.audio (training imports them): a header's frame
# count may overstate a complete file by this fraction (MP3 headers without a Xing frame estimate it);
# an Ogg page is at most 27 + 255 + 255 * 255 bytes, so a file's last this-many bytes hold its last page.
TRUNCATION_TOLERANCE = 0.02
_OGG_TAIL_BYTES = 65_307 + 1024
_OGG_EOS_FLAG = 0x04
_WAV_HEADER_BYTES = 1 << 16


class AudioReadError(Exception):
    """A file that cannot be decoded (corrupt, empty, unsupported, or needs resampling without scipy)."""


@dataclass
class DecodedAudio:
    """A decoded file: its samples and, when it is cut short, why and how long it should be."""

    wave: np.ndarray                  # float32 mono at the requested rate: what could be decoded
    truncated: str | None = None      # why the file is incomplete; None when it decoded completely
    declared_s: float | None = None   # the full duration its header declares, when known and longer


def list_audio_files(folder: str | os.PathLike, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> list[Path]:
    """Audio files directly in `folder`, sorted by name (hidden files skipped); an empty folder is fine."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder not found: {folder}")
    wanted = {e.lower() for e in extensions}
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in wanted)


def read_audio(path: str | os.PathLike, sample_rate_hz: int) -> np.ndarray:
    """Whole file as float32 1-D mono (mean of channels) at `sample_rate_hz` (a truncated file: up to
    its cut); raises AudioReadError."""
    return decode_audio(path, sample_rate_hz).wave


def decode_audio(path: str | os.PathLike, sample_rate_hz: int) -> DecodedAudio:
    """Decode a whole file, mono at `sample_rate_hz`, and check it is complete; raises AudioReadError.

    A file cut short keeps the audio before the cut and says why it is incomplete: decoding failed
    part-way (e.g. FLAC losing sync), it decoded clearly fewer frames than its header declares
    (FLAC, MP3, WAV), or its Ogg stream lacks the end-of-stream page (a cut Ogg decodes without error
    and its header declares no length). Nothing decoded, non-finite samples: AudioReadError.
    """
    path = str(path)
    failure: Exception | None = None
    try:
        with sf.SoundFile(path) as f:
            declared, file_rate_hz, container = f.frames, int(f.samplerate), f.format
            try:
                frames = f.read(dtype="float32", always_2d=True)
            except Exception as err:  # libsndfile raises several types mid-stream
                failure = err
        if failure is not None:
            frames, failure = _read_until_failure(path, file_rate_hz)
    except Exception as err:  # libsndfile raises several types for corrupt input
        raise AudioReadError(f"{type(err).__name__}: {err}") from err
    n_frames = frames.shape[0]
    if n_frames == 0:
        raise AudioReadError("no audio frames" if failure is None else f"{type(failure).__name__}: {failure}")
    mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
    if not np.isfinite(mono).all():
        raise AudioReadError("non-finite samples (NaN/inf)")
    if container == "WAV":  # libsndfile clamps a cut WAV's frame count to the bytes present
        declared = max(declared, _wav_declared_frames(path) or 0)
    truncated = None
    if failure is not None:
        truncated = f"decoding failed after {n_frames / file_rate_hz:.1f} s: {type(failure).__name__}: {failure}"
    elif declared > 0 and n_frames < (1.0 - TRUNCATION_TOLERANCE) * declared:
        truncated = (f"decoded {n_frames / file_rate_hz:.1f} s of the {declared / file_rate_hz:.1f} s "
                     "its header declares")
    elif container == "OGG" and not ogg_ends_with_eos_page(path):
        truncated = "its Ogg stream ends without the end-of-stream page"
    if file_rate_hz != sample_rate_hz:
        mono = resample(mono, file_rate_hz, sample_rate_hz)
    declared_s = declared / file_rate_hz if truncated is not None and declared > n_frames else None
    return DecodedAudio(np.ascontiguousarray(mono, dtype=np.float32), truncated, declared_s)


def _read_until_failure(path: str, block_frames: int) -> tuple[np.ndarray, Exception | None]:
    """Frames [n, channels] read block by block up to the first decode error, and that error (None if none)."""
    blocks: list[np.ndarray] = []
    failure: Exception | None = None
    with sf.SoundFile(path) as f:
        channels = f.channels
        try:
            while len(block := f.read(block_frames, dtype="float32", always_2d=True)):
                blocks.append(block)
        except Exception as err:  # the first decode error ends the file
            failure = err
    frames = np.concatenate(blocks) if blocks else np.zeros((0, channels), dtype=np.float32)
    return frames, failure


def _wav_declared_frames(path: str) -> int | None:
    """Frames the data chunk of a RIFF/WAVE header declares (None when the header does not say)."""
    with open(path, "rb") as f:
        head = f.read(_WAV_HEADER_BYTES)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align = 12, 0
    while pos + 8 <= len(head):
        chunk_id, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk_id == b"fmt " and pos + 22 <= len(head):
            block_align = int.from_bytes(head[pos + 20 : pos + 22], "little")  # 12 bytes into the fmt data
        elif chunk_id == b"data":
            return size // block_align if block_align and size != 0xFFFFFFFF else None  # 0xFFFFFFFF: streamed
        pos += 8 + size + (size & 1)
    return None


def ogg_ends_with_eos_page(path: str | os.PathLike) -> bool:
    """Whether the file's last Ogg page is complete and carries the end-of-stream flag."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - _OGG_TAIL_BYTES))
        tail = f.read()
    start = tail.rfind(b"OggS")
    if start < 0 or len(tail) - start < 27:
        return False
    n_segments = tail[start + 26]
    lacing = tail[start + 27 : start + 27 + n_segments]
    complete = len(lacing) == n_segments and len(tail) - start >= 27 + n_segments + sum(lacing)
    return complete and bool(tail[start + 5] & _OGG_EOS_FLAG)


def resample(wave: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Polyphase resampling with scipy (the decoder's, and the external models' in birdrounds.external);
    without scipy the file cannot be used."""
    try:
        from scipy.signal import resample_poly
    except ImportError as err:
        raise AudioReadError(f"sample rate {from_hz} Hz needs resampling to {to_hz} Hz, which needs scipy") from err
    g = math.gcd(from_hz, to_hz)
    return resample_poly(wave, to_hz // g, from_hz // g).astype(np.float32)
