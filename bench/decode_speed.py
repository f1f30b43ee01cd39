"""Does the one decoder's resampler slow the pipeline? Seconds to decode one minute of audio, by source rate.

Every file reaches the model through `birdrounds.audio_io.decode_audio` (soundfile, mean of channels, scipy's
polyphase `resample_poly`): training decodes each file once into the audio cache, `birdrounds predict` and
the standalone infer.py decode in threads beside the model. Here, for a 60-s stereo file at 32, 44.1 and
48 kHz in each container, the median time of `decode_audio` against the same decode followed by soxr's HQ
resampler (what training used before the decoders were merged), and the real-time factor. The goal in force,
at 44.1 and 48 kHz: resampling costs less than decoding itself (the cache build stays decode-bound), and the
whole decode is at most 25% slower than with soxr. Kaggle's soundscapes are 32 kHz: `predict` on them never
resamples, whatever the resampler.

    python bench/decode_speed.py [--repeats 5] [--record]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from birdrounds.audio_io import decode_audio
from records import write_record

TARGET_HZ = 32_000
DURATION_S = 60.0
SOURCES_HZ = (32_000, 44_100, 48_000)
MAX_SLOWDOWN = 1.25  # decode_audio against decode + soxr, at a resampled rate
CONTAINERS = {"ogg": ("OGG", "VORBIS"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III")}


def write_source(folder: Path, suffix: str, rate_hz: int) -> Path:
    """A minute of stereo bird-like chirps in noise, written in blocks (libsndfile dislikes long OGG writes)."""
    rng = np.random.default_rng(rate_hz)
    t = np.arange(int(DURATION_S * rate_hz)) / rate_hz
    chirp = 0.3 * np.sin(2 * np.pi * (2000 + 1500 * np.sin(2 * np.pi * 3 * t)) * t) * (np.sin(2 * np.pi * 0.5 * t) > 0)
    stereo = np.stack([chirp + 0.02 * rng.standard_normal(t.size), 0.5 * chirp], axis=1).astype(np.float32)
    path = folder / f"minute_{rate_hz}.{suffix}"
    fmt, subtype = CONTAINERS[suffix]
    with sf.SoundFile(str(path), "w", samplerate=rate_hz, channels=2, format=fmt, subtype=subtype) as f:
        for start in range(0, len(stereo), rate_hz):
            f.write(stereo[start:start + rate_hz])
    return path


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_then_soxr(path: Path) -> np.ndarray:
    """The reference: decode at the file's rate, then soxr HQ to the target rate."""
    import soxr

    info = sf.info(str(path))
    wave = decode_audio(path, info.samplerate).wave
    return soxr.resample(wave, info.samplerate, TARGET_HZ, quality="HQ") if info.samplerate != TARGET_HZ else wave


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--record", action="store_true", help="also write a record under results/")
    args = parser.parse_args()
    rows, met = [], True
    print(f"seconds per {DURATION_S:.0f} s of stereo audio decoded to {TARGET_HZ} Hz mono (median of {args.repeats})")
    print("| container | source rate | decode_audio (resample_poly) | decode + soxr HQ | decode alone | real-time factor |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in CONTAINERS:
            for rate_hz in SOURCES_HZ:
                path = write_source(Path(tmp), suffix, rate_hz)
                ours = median_s(lambda: decode_audio(path, TARGET_HZ), args.repeats)
                soxr_s = median_s(lambda: decode_then_soxr(path), args.repeats)
                alone = median_s(lambda: decode_audio(path, rate_hz), args.repeats)
                rows.append({"container": suffix, "source_hz": rate_hz, "decode_audio_s": round(ours, 4),
                             "decode_soxr_s": round(soxr_s, 4), "decode_alone_s": round(alone, 4),
                             "realtime_factor": round(DURATION_S / ours, 1)})
                print(f"| {suffix} | {rate_hz} | {ours:.3f} | {soxr_s:.3f} | {alone:.3f} | {DURATION_S / ours:.0f}x |",
                      flush=True)
                if rate_hz != TARGET_HZ:
                    met &= (ours - alone) < alone and ours <= MAX_SLOWDOWN * soxr_s
    print(f"goal at 44.1/48 kHz (resampling costs less than decoding; at most {MAX_SLOWDOWN - 1:.0%} slower than "
          f"soxr): {'met' if met else 'NOT MET'}")
    if args.record:
        path = write_record("decode_speed", "decode-speed", {"rows": rows, "goal_met": met})
        print(f"record: {path}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
