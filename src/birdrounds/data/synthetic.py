"""A seeded synthetic mini-BirdCLEF: focal clips, soundscapes and an Xeno-canto-like archive, in the 2025 layout.

The generator exists so the whole pipeline runs (and is tested) without the competition data. It keeps the
properties the method depends on: long-tailed focal classes, near-duplicate recordings across collections,
a real focal -> soundscape domain gap (noise, distance, reverb, overlap, another species prior) and a
minority-species archive that a downloader can serve.

Output (under `out_dir`):
    train.csv, taxonomy.csv, sample_submission.csv, val_solution.csv,
    train_audio/<label>/<stem>.ogg, train_soundscapes/*.ogg, val_soundscapes/*.ogg,
    xc_archive/recordings.json + xc_archive/audio/XC<id>.mp3,
    truth/ (species parameters, soundscape call events, train-soundscape chunk labels; not part of BirdCLEF),
    DONE.json (written last; the spec and generator version).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
from scipy import signal
from tqdm.auto import tqdm

from birdrounds.data.audio import write_audio
# The scored 5-s chunk the labels are given for, and the row ids of the solution (infer.py defines both).
from birdrounds.contract import SCORED_CHUNK_S as CHUNK_S
from birdrounds.contract import row_ids
from birdrounds.procs import spawn_pool

log = logging.getLogger(__name__)

# Bump when the same spec would produce different files, so old folders are not silently reused.
GENERATOR_VERSION = 1
# A call counts for a chunk when this much of it lies inside (or half the call, when it is shorter).
MIN_CHUNK_OVERLAP_S = 0.5

# Seed streams, so adding files of one kind never shifts the random numbers of another.
_STREAM_PLAN, _STREAM_FOCAL, _STREAM_ARCHIVE, _STREAM_TRAIN_SC, _STREAM_VAL_SC, _STREAM_DIALECT = range(6)


@dataclass(frozen=True, kw_only=True)
class SynthSpec:
    """Sizes and seed of a synthetic dataset. configs/data/synthetic*.yaml hold the values (`data.synth`);
    `birdrounds.config.shipped("data.synth", "data=synthetic")` is the demo's dataset."""

    n_species: int
    n_train_soundscapes: int
    n_val_soundscapes: int
    soundscape_s: float
    sample_rate_hz: int
    min_files_per_class: int
    max_files_per_class: int
    n_archive_per_minority: int  # archive recordings for each minority class
    minority_max_files: int  # classes with <= this many focal files get archive recordings
    focal_min_s: float
    focal_max_s: float
    # Regional dialect of the soundscape site: each species' call there is shifted in pitch and tempo by a
    # factor between 1 + d/2 and 1 + d (up or down) against its focal recordings (0 = no shift). No YAML
    # sets it (an experiment adds it: +data.synth.soundscape_dialect=0.2), so its default lives here.
    soundscape_dialect: float = 0.0
    seed: int

    def __post_init__(self) -> None:
        problems = []
        if self.n_species < 2:
            problems.append("n_species must be >= 2")
        if not 1 <= self.min_files_per_class <= self.max_files_per_class:
            problems.append("need 1 <= min_files_per_class <= max_files_per_class")
        if self.soundscape_s < CHUNK_S or (self.soundscape_s / CHUNK_S) % 1:
            problems.append(f"soundscape_s must be a positive multiple of {CHUNK_S} s")
        if self.sample_rate_hz < 16000:
            problems.append("sample_rate_hz must be >= 16000")
        if not 1.0 <= self.focal_min_s <= self.focal_max_s:
            problems.append("need 1 <= focal_min_s <= focal_max_s")
        if min(self.n_train_soundscapes, self.n_val_soundscapes, self.n_archive_per_minority) < 0:
            problems.append("counts must be >= 0")
        if not 0.0 <= self.soundscape_dialect < 0.5:
            problems.append("soundscape_dialect must be in [0, 0.5)")
        if problems:
            raise ValueError(f"invalid SynthSpec {self}: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------
# Species: names, labels and call parameters
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Species:
    """One synthetic class: its names and the parameters of its call."""

    label: str
    scientific_name: str
    common_name: str
    class_name: str  # Aves / Amphibia / Insecta
    inat_taxon_id: int
    family: str  # sweep / trill / harmonic / insect / frog
    f0_hz: float  # base frequency
    bandwidth_hz: float  # sweep span, vibrato depth, noise band or pitch drop, by family
    note_s: float  # one note / pulse / croak
    rate_hz: float  # notes (pulses, croaks) per second inside a bout
    mod_rate_hz: float  # vibrato (harmonic) or amplitude-pulse (frog) rate inside a note
    n_harmonics: int
    bout_s: float  # typical bout length
    upward: bool  # sweep direction
    home_lat: float
    home_lon: float


# Families cycle so any n_species >= 6 has birds, an insect and a frog; 3 of 8 classes are non-birds.
_FAMILY_CYCLE = ("sweep", "trill", "harmonic", "insect", "sweep", "frog", "trill", "harmonic")
_CLASS_NAME = {"sweep": "Aves", "trill": "Aves", "harmonic": "Aves", "insect": "Insecta", "frog": "Amphibia"}
# (low, high) per parameter, drawn log-uniformly.
_RANGES = {
    "sweep": dict(f0_hz=(1800, 5000), bandwidth_hz=(800, 3000), note_s=(0.08, 0.25), rate_hz=(2.5, 5.0),
                  mod_rate_hz=(1, 1), n_harmonics=(1, 2), bout_s=(0.8, 2.2)),
    "trill": dict(f0_hz=(2500, 7000), bandwidth_hz=(300, 1500), note_s=(0.02, 0.05), rate_hz=(9, 22),
                  mod_rate_hz=(1, 1), n_harmonics=(1, 1), bout_s=(0.8, 2.2)),
    "harmonic": dict(f0_hz=(500, 1800), bandwidth_hz=(30, 250), note_s=(0.2, 0.5), rate_hz=(1.2, 2.5),
                     mod_rate_hz=(4, 12), n_harmonics=(3, 6), bout_s=(1.0, 2.5)),
    "insect": dict(f0_hz=(5000, 11000), bandwidth_hz=(200, 1000), note_s=(0.004, 0.012), rate_hz=(20, 80),
                   mod_rate_hz=(1, 1), n_harmonics=(1, 1), bout_s=(1.5, 3.5)),
    "frog": dict(f0_hz=(250, 900), bandwidth_hz=(20, 150), note_s=(0.12, 0.35), rate_hz=(1.2, 3.0),
                 mod_rate_hz=(12, 40), n_harmonics=(2, 4), bout_s=(0.8, 2.2)),
}
_ADJECTIVES = ("Rufous", "Olive", "Slaty", "Spotted", "Streaked", "Golden", "Dusky", "Pale", "Crested",
               "Banded", "Scaly", "Ochre", "Sooty", "Lesser", "Greater", "Buff", "Chestnut", "Ashy")
_NOUNS = {"sweep": ("Tanager", "Flycatcher", "Warbler", "Vireo"), "trill": ("Wren", "Antwren", "Spinetail"),
          "harmonic": ("Dove", "Tinamou", "Thrush", "Pigeon"), "insect": ("Katydid", "Cricket", "Cicada"),
          "frog": ("Treefrog", "Rainfrog", "Toad")}
_SYLLABLES = ("ka", "lo", "mi", "ru", "te", "vo", "sa", "ne", "pi", "da", "go", "li", "ta", "ze", "ri", "mo")
_FIRST = ("Ana", "Luis", "Marta", "Jorge", "Lucia", "Pedro", "Sofia", "Diego", "Elena", "Tomas", "Ines", "Raul")
_LAST = ("Rojas", "Vargas", "Mendez", "Castro", "Lopez", "Herrera", "Silva", "Ortiz", "Pardo", "Ramos")


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _call_params(family: str, rng: np.random.Generator) -> dict:
    """Draw one species' call parameters for a family."""
    ranges = _RANGES[family]
    params = {k: _log_uniform(rng, *ranges[k]) for k in ranges if k != "n_harmonics"}
    params["n_harmonics"] = int(rng.integers(ranges["n_harmonics"][0], ranges["n_harmonics"][1] + 1))
    params["upward"] = bool(rng.random() < 0.5)
    return params


def _latin_word(rng: np.random.Generator, n_syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES, size=n_syllables))


def _names(family: str, rng: np.random.Generator, taken: set[str]) -> tuple[str, str]:
    """A unique made-up common name and scientific name for a species."""
    for attempt in range(50):
        common = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS[family])}"
        if attempt >= 20:  # many species: the name pool runs out, so number the names
            common = f"{common} {attempt}"
        if common not in taken:
            break
    genus = _latin_word(rng, 2).capitalize() + str(rng.choice(("us", "a", "is", "ops", "ax")))
    return common, f"{genus} {_latin_word(rng, 3)}"


def _ebird_code(common_name: str, taken: set[str]) -> str:
    """An eBird-style code (first three letters of the first and last word + a digit), unique in `taken`."""
    words = common_name.lower().split()
    stem = words[0][:3] + words[1][:3]
    digit = 1
    while f"{stem}{digit}" in taken:
        digit += 1
    return f"{stem}{digit}"


def _make_similar(base: dict, rng: np.random.Generator) -> dict:
    """Call parameters close to `base`: same shape, a few percent apart (a deliberately confusable pair)."""
    near = dict(base)
    near["f0_hz"] = base["f0_hz"] * float(rng.choice((0.92, 1.08)))
    for key in ("bandwidth_hz", "note_s", "rate_hz", "mod_rate_hz", "bout_s"):
        near[key] = base[key] * float(np.exp(rng.normal(0.0, 0.05)))
    return near


def make_species(n_species: int, seed: int, stream: int = 0) -> tuple[list[Species], list[tuple[str, str]]]:
    """The class list (sorted by label) and the deliberately similar pairs, both from the seed."""
    rng = np.random.default_rng([seed, _STREAM_PLAN, 100 + stream])
    families = [_FAMILY_CYCLE[i % len(_FAMILY_CYCLE)] for i in range(n_species)]
    params = [_call_params(f, rng) for f in families]
    pairs = _similar_pairs(families, rng)
    for a, b in pairs:
        params[b] = _make_similar(params[a], rng)
    species, names, labels = [], set(), set()
    for family, p in zip(families, params):
        common, scientific = _names(family, rng, names)
        names.add(common)
        taxon_id = int(rng.integers(10_000, 1_600_000))
        # BirdCLEF 2025 labels non-birds by their iNaturalist taxon id, birds by eBird code.
        label = _ebird_code(common, labels) if _CLASS_NAME[family] == "Aves" else str(taxon_id)
        while label in labels:  # a repeated taxon id: draw again
            taxon_id = int(rng.integers(10_000, 1_600_000))
            label = str(taxon_id)
        labels.add(label)
        species.append(Species(label=label, scientific_name=scientific, common_name=common,
                               class_name=_CLASS_NAME[family], inat_taxon_id=taxon_id, family=family,
                               home_lat=float(rng.uniform(-4, 11)), home_lon=float(rng.uniform(-79, -67)), **p))
    pair_labels = [(species[a].label, species[b].label) for a, b in pairs]
    return sorted(species, key=lambda s: s.label), pair_labels


def _similar_pairs(families: list[str], rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pick up to three same-family index pairs (one per six classes, one per family) to make confusable."""
    wanted = min(3, len(families) // 6)
    pairs: list[tuple[int, int]] = []
    for family in rng.permutation(sorted(set(families))):  # at most one pair per family
        members = [i for i, f in enumerate(families) if f == family]
        if len(members) >= 2 and len(pairs) < wanted:
            pairs.append((members[0], members[1]))
    return pairs


# ----------------------------------------------------------------------------------------------------
# Call synthesis: one bout = several notes of one species
# ----------------------------------------------------------------------------------------------------

def _osc(freq_hz: np.ndarray, sample_rate_hz: int, n_harmonics: int, decay: float) -> np.ndarray:
    """Sum of harmonics following an instantaneous frequency track; harmonics above 0.45*sr are dropped."""
    freq_hz = np.minimum(freq_hz, 0.45 * sample_rate_hz)  # keep the fundamental below Nyquist at any rate
    phase = 2 * np.pi * np.cumsum(freq_hz) / sample_rate_hz
    out = np.zeros_like(freq_hz)
    for k in range(1, n_harmonics + 1):
        if k == 1 or k * float(freq_hz.max()) < 0.45 * sample_rate_hz:
            out += decay ** (k - 1) * np.sin(k * phase)
    return out


def _note(sp: Species, rng: np.random.Generator, sr: int, pitch: float) -> np.ndarray:
    """One note of a sweep, trill, harmonic or frog call (Hann/Tukey envelope, family-shaped pitch track)."""
    dur_s = sp.note_s * float(np.exp(rng.normal(0.0, 0.05)))
    t = np.arange(max(int(dur_s * sr), 16)) / sr
    frac = t / dur_s
    f0 = min(sp.f0_hz * pitch, 0.4 * sr)
    if sp.family in ("sweep", "trill"):
        span = sp.bandwidth_hz * pitch * (1 if (sp.upward and sp.family == "sweep") else -1)
        start = f0 if span > 0 else f0 - span
        wave = _osc(start + span * frac, sr, sp.n_harmonics, 0.3)
        return wave * np.sin(np.pi * frac) ** 2
    if sp.family == "harmonic":
        track = f0 + sp.bandwidth_hz * np.sin(2 * np.pi * sp.mod_rate_hz * t)
        return _osc(track, sr, sp.n_harmonics, 0.6) * signal.windows.tukey(len(t), 0.3)
    # frog: a low croak, pitch falling slightly, chopped into pulses
    track = f0 - sp.bandwidth_hz * frac
    pulses = (0.5 * (1 + np.cos(2 * np.pi * sp.mod_rate_hz * t))) ** 2
    return _osc(track, sr, sp.n_harmonics, 0.7) * pulses * signal.windows.tukey(len(t), 0.2)


def _insect_bout(sp: Species, rng: np.random.Generator, sr: int, pitch: float, dur_s: float) -> np.ndarray:
    """A buzz: a high carrier plus band noise, gated by a pulse train at the species' pulse rate."""
    n = int(dur_s * sr)
    t = np.arange(n) / sr
    f0 = min(sp.f0_hz * pitch, 0.4 * sr)
    carrier = np.sin(2 * np.pi * np.cumsum(f0 * (1 + 0.01 * np.sin(2 * np.pi * 3 * t))) / sr)
    low, high = f0 - sp.bandwidth_hz / 2, min(f0 + sp.bandwidth_hz / 2, 0.45 * sr)
    band = signal.sosfilt(signal.butter(2, (low, high), "bandpass", fs=sr, output="sos"), rng.normal(size=n))
    band /= np.std(band) + 1e-12
    duty = min(0.8, sp.note_s * sp.rate_hz * 2)
    gate = ((t * sp.rate_hz) % 1.0) < duty
    gate = np.convolve(gate.astype(float), np.hanning(max(int(0.002 * sr), 3)), mode="same")
    return (carrier + 0.4 * band) * gate * signal.windows.tukey(n, 0.1)


def render_bout(sp: Species, rng: np.random.Generator, sample_rate_hz: int, pitch: float = 1.0) -> np.ndarray:
    """One bout of a species' call, peak 1, with natural jitter in pitch, timing and note amplitude."""
    pitch = pitch * float(np.exp(rng.normal(0.0, 0.02)))
    dur_s = sp.bout_s * float(np.exp(rng.normal(0.0, 0.15)))
    if sp.family == "insect":
        bout = _insect_bout(sp, rng, sample_rate_hz, pitch, dur_s)
    else:
        period_s = 1.0 / sp.rate_hz
        n_notes = max(2, int(round(dur_s * sp.rate_hz)))
        bout = np.zeros(int((n_notes * period_s + 2 * sp.note_s) * sample_rate_hz) + 1)
        for k in range(n_notes):
            note = _note(sp, rng, sample_rate_hz, pitch * float(np.exp(rng.normal(0.0, 0.01))))
            start = int(max(0.0, k * period_s + rng.normal(0.0, 0.04 * period_s)) * sample_rate_hz)
            stop = min(start + len(note), len(bout))
            bout[start:stop] += rng.uniform(0.7, 1.0) * note[: stop - start]
        bout = np.trim_zeros(bout, "b")
    return bout / (np.abs(bout).max() + 1e-12)


# ----------------------------------------------------------------------------------------------------
# Scenes: focal recordings and soundscapes
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    """One bout inside a rendered file: who, when (s) and how loud against the background (dB)."""

    label: str
    start_s: float
    end_s: float
    snr_db: float


def _rms(x: np.ndarray) -> float:
    # einsum, not np.dot: BLAS threads in every pool worker oversubscribe the cores.
    return float(np.sqrt(np.einsum("i,i->", x, x) / max(len(x), 1) + 1e-20))


# Paul Kellet's economy pink-noise filter (-3 dB/octave).
_PINK_B = (0.049922035, -0.095993537, 0.050612699, -0.004408786)
_PINK_A = (1.0, -2.494956002, 2.017265875, -0.522189400)


def _colored_noise(n: int, rng: np.random.Generator, tilt: float) -> np.ndarray:
    """Unit-rms noise from white (tilt 0) through pink (1) to red (2), by filtering (cheaper than an FFT)."""
    white = rng.standard_normal(n, dtype=np.float32).astype(np.float64)
    pink = signal.lfilter(_PINK_B, _PINK_A, white)
    other = white if tilt <= 1 else signal.lfilter([1.0], [1.0, -0.97], white)
    weight = abs(1.0 - tilt)
    noise = (1 - weight) * pink / _rms(pink) + weight * other / _rms(other)
    return noise / _rms(noise)


def _add(target: np.ndarray, clip: np.ndarray, start: int) -> None:
    """Add `clip` into `target` at `start`, cut at the end."""
    stop = min(start + len(clip), len(target))
    if stop > start:
        target[start:stop] += clip[: stop - start]


@dataclass(frozen=True)
class FocalJob:
    """A focal recording to render: one loud primary species, maybe quieter secondaries, little noise."""

    path: str
    entropy: tuple[int, ...]  # RNG seed; near-duplicates share it
    duration_s: float
    sample_rate_hz: int
    primary: Species
    secondaries: tuple[Species, ...]
    snr_db: float
    noise_tilt: float  # recording-session background colour
    pitch: float  # this individual's pitch offset
    gain: float = 1.0
    compression_level: float | None = None

    def render(self) -> tuple[np.ndarray, list[Event]]:
        """The waveform (peak < 1) and the primary's bouts."""
        rng = np.random.default_rng(list(self.entropy))
        sr, n = self.sample_rate_hz, int(self.duration_s * self.sample_rate_hz)
        calls, events, energy, active = np.zeros(n), [], 0.0, 0
        t_s = rng.uniform(0.0, 1.0)
        while t_s < self.duration_s - 0.3 or not events:
            bout = render_bout(self.primary, rng, sr, self.pitch) * rng.uniform(0.7, 1.0)
            start = int(min(t_s, max(self.duration_s - 0.5, 0.0)) * sr)
            _add(calls, bout, start)
            energy, active = energy + float(np.sum(bout ** 2)), active + len(bout)
            events.append(Event(self.primary.label, start / sr, (start + len(bout)) / sr, self.snr_db))
            t_s = start / sr + len(bout) / sr + rng.uniform(0.4, 2.5)
        call_rms = float(np.sqrt(energy / active))
        for other in self.secondaries:  # quieter background species: 1-2 bouts, 10-16 dB down
            for _ in range(int(rng.integers(1, 3))):
                bout = render_bout(other, rng, sr)
                bout *= call_rms * 10 ** (-rng.uniform(10, 16) / 20) / _rms(bout)
                _add(calls, bout, int(rng.uniform(0, self.duration_s - 0.5) * sr))
        noise = _colored_noise(n, rng, self.noise_tilt) * call_rms * 10 ** (-self.snr_db / 20)
        mix = calls + noise
        return mix / np.abs(mix).max() * rng.uniform(0.3, 0.8) * self.gain, events


def _slow_envelopes(n: int, rng: np.random.Generator, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """Wind gusts (mean ~1, up to 0.3 Hz) and rain showers (0/1 bursts of several seconds, 0.25-s ramps).

    Both change slowly, so they are drawn on a 100-Hz grid and interpolated, which is far cheaper.
    """
    grid_hz = 100
    t = np.arange(n // (sr // grid_hz) + 2) / grid_hz
    gusts, showers = np.ones_like(t), np.ones_like(t)
    for _ in range(3):
        gusts += 0.3 * np.sin(2 * np.pi * rng.uniform(0.02, 0.3) * t + rng.uniform(0, 2 * np.pi))
        showers += 0.3 * np.sin(2 * np.pi * rng.uniform(0.02, 0.05) * t + rng.uniform(0, 2 * np.pi))
    showers = np.convolve((showers > 1.0).astype(float), np.ones(grid_hz // 4) / (grid_hz // 4), mode="same")
    fine_t = np.arange(n) / sr
    return np.interp(fine_t, t, np.clip(gusts, 0.1, None)), np.interp(fine_t, t, showers)


def _white(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n, dtype=np.float32).astype(np.float64)


def _background(n: int, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Unit-rms soundscape background: pink bed + wind + rain (sometimes) + a constant insect chorus."""
    gusts, showers = _slow_envelopes(n, rng, sr)
    bed = _colored_noise(n, rng, 1.0)
    wind = signal.sosfilt(signal.butter(2, rng.uniform(150, 500), fs=sr, output="sos"), _white(n, rng))
    drops = signal.lfilter([1.0], [1.0, -0.9], (rng.random(n) < 150 / sr) * _white(n, rng))
    rain = (_white(n, rng) * 0.5 + drops / (_rms(drops) + 1e-12)) * showers
    center = rng.uniform(3000, min(7000, 0.35 * sr))
    band = signal.butter(2, (center * 0.85, center * 1.15), "bandpass", fs=sr, output="sos")
    chorus = signal.sosfilt(band, _white(n, rng))
    chorus *= 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(25, 60) * np.arange(n) / sr)
    weights = (1.0, rng.uniform(0.3, 2.0), rng.uniform(0.5, 1.5) * (rng.random() < 0.5), rng.uniform(0.3, 1.0))
    parts = (bed, wind * gusts / _rms(wind), rain, chorus)
    mix = sum(w * part / _rms(part) for w, part in zip(weights, parts) if w > 0)
    return mix / _rms(mix)


def _far_away(bout: np.ndarray, rng: np.random.Generator, sr: int, distance: float) -> np.ndarray:
    """Distance (0 near .. 1 far): low-pass the call, then add reverb (decaying-noise impulse response)."""
    cutoff_hz = min(14000.0 * np.exp(-1.6 * distance), 0.45 * sr)
    dry = signal.sosfilt(signal.butter(4, cutoff_hz, fs=sr, output="sos"), bout)
    rt60_s = rng.uniform(0.2, 0.8)
    t = np.arange(int(rt60_s * sr)) / sr
    impulse = rng.normal(size=len(t)) * np.exp(-6.9 * t / rt60_s)
    wet = signal.fftconvolve(dry, impulse / np.sqrt(np.sum(impulse ** 2)))
    mix_wet = 0.3 + 0.5 * distance
    out = mix_wet * wet
    out[: len(dry)] += (1 - mix_wet) * dry
    return out


@dataclass(frozen=True)
class SoundscapeJob:
    """A soundscape to render: a noisy background with distant, reverberant, overlapping calls."""

    path: str
    entropy: tuple[int, ...]
    duration_s: float
    sample_rate_hz: int
    species: tuple[Species, ...]
    compression_level: float | None = None

    def render(self) -> tuple[np.ndarray, list[Event]]:
        """The waveform (peak < 1) and every call placed in it."""
        rng = np.random.default_rng(list(self.entropy))
        sr, n = self.sample_rate_hz, int(self.duration_s * self.sample_rate_hz)
        level = rng.uniform(0.02, 0.05)  # background rms
        mix, events = _background(n, rng, sr) * level, []
        for sp in self.species:
            n_bouts = int(rng.integers(2, 3 + int(self.duration_s / 8)))
            for start_s in np.sort(rng.uniform(0.0, self.duration_s - 0.5, size=n_bouts)):
                dry = render_bout(sp, rng, sr)
                distance = rng.uniform(0.0, 1.0)
                # Near calls are loud (+10 dB), far ones at or below the noise (-5 dB).
                snr_db = float(np.clip(10 - 15 * distance + rng.normal(0, 1.5), -6, 11))
                wet = _far_away(dry, rng, sr, distance)
                wet *= level * 10 ** (snr_db / 20) / _rms(wet[: len(dry)])
                _add(mix, wet, int(start_s * sr))
                end_s = min(start_s + len(dry) / sr, self.duration_s)
                events.append(Event(sp.label, float(start_s), float(end_s), snr_db))
        return mix / np.abs(mix).max() * rng.uniform(0.3, 0.8), events


def labeled_chunks(start_s: float, end_s: float, n_chunks: int) -> list[int]:
    """The 5-s chunks (of the first `n_chunks`) that a call from `start_s` to `end_s` labels: those it
    overlaps by min(MIN_CHUNK_OVERLAP_S, half the call)."""
    need_s = min(MIN_CHUNK_OVERLAP_S, 0.5 * (end_s - start_s))
    return [k for k in range(n_chunks) if min(end_s, (k + 1) * CHUNK_S) - max(start_s, k * CHUNK_S) >= need_s]


def chunk_labels(events: Iterable[Event], duration_s: float, classes: list[str]) -> np.ndarray:
    """0/1 matrix [n_chunks, n_classes]: a class is present where enough of one of its calls overlaps the chunk."""
    n_chunks = int(round(duration_s / CHUNK_S))
    labels = np.zeros((n_chunks, len(classes)), dtype=np.int64)
    column = {c: i for i, c in enumerate(classes)}
    for ev in events:
        if ev.label not in column:  # an unlisted species: heard, never labeled
            continue
        labels[labeled_chunks(ev.start_s, ev.end_s, n_chunks), column[ev.label]] = 1
    return labels


def _render_and_write(job: FocalJob | SoundscapeJob) -> list[Event]:
    """Worker: render one file and encode it (OGG Vorbis, or MP3 for .mp3 paths)."""
    audio, events = job.render()
    path = Path(job.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt, subtype = ("MP3", "MPEG_LAYER_III") if path.suffix == ".mp3" else ("OGG", "VORBIS")
    write_audio(path, audio, job.sample_rate_hz, fmt, subtype, job.compression_level)
    return events


# ----------------------------------------------------------------------------------------------------
# Planning: who is recorded where, by whom, in which collection (all decided in the main process)
# ----------------------------------------------------------------------------------------------------

_COLLECTION_ODDS = {"Aves": (0.6, 0.3, 0.1), "Amphibia": (0.3, 0.6, 0.1), "Insecta": (0.3, 0.6, 0.1)}
_COLLECTIONS = ("XC", "iNat", "CSA")
_LICENSES = ("cc-by-nc-sa 4.0", "cc-by 4.0", "cc-by-nc 4.0", "cc-by-sa 4.0")
_BIRD_TYPES = ("['song']", "['call']", "['call', 'song']", "['flight call']", "['alarm call']")
_OTHER_TYPES = ("['song']", "['call']")


def class_counts(spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    """Long-tailed focal file counts: geometric from max to min files, shuffled over the classes."""
    steps = np.linspace(np.log(spec.max_files_per_class), np.log(spec.min_files_per_class), spec.n_species)
    return rng.permutation(np.round(np.exp(steps)).astype(int))


def _authors(rng: np.random.Generator, n: int) -> list[str]:
    return sorted({f"{rng.choice(_FIRST)} {rng.choice(_LAST)}" for _ in range(n)})


def _focal_duration_s(spec: SynthSpec, rng: np.random.Generator) -> float:
    """Mostly short clips (the first 10 s of the range); a fifth drawn from the whole range."""
    middle = min(spec.focal_min_s + 10.0, spec.focal_max_s)
    high = spec.focal_max_s if rng.random() < 0.2 else middle
    return round(float(rng.uniform(spec.focal_min_s, high)), 2)


def _sessions(sp: Species, count: int, rng: np.random.Generator, authors: list[str]) -> Iterator[dict]:
    """Rows for one class, grouped into recording sessions (same author, place, background, individual)."""
    remaining = count
    while remaining > 0:
        size = min(remaining, int(rng.integers(1, 4)))
        remaining -= size
        odds = _COLLECTION_ODDS[sp.class_name]
        session = dict(author=str(rng.choice(authors)), collection=str(rng.choice(_COLLECTIONS, p=odds)),
                       latitude=round(sp.home_lat + rng.normal(0, 1.0), 4),
                       longitude=round(sp.home_lon + rng.normal(0, 1.0), 4),
                       license=str(rng.choice(_LICENSES)), noise_tilt=float(rng.uniform(0.5, 1.5)),
                       pitch=float(np.exp(rng.normal(0, 0.02))))
        for _ in range(size):
            yield dict(session, primary=sp)


def _plan_focal(spec: SynthSpec, species: list[Species], counts: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """One dict per focal recording, with labels, metadata and render parameters (ids come later)."""
    authors = _authors(rng, max(8, spec.n_species))
    rows = []
    for sp, count in zip(species, counts):
        for row in _sessions(sp, int(count), rng, authors):
            others = [s for s in species if s.label != sp.label]
            n_sec = int(rng.random() < 0.15) + int(rng.random() < 0.03)
            picks = rng.choice(len(others), size=min(n_sec, len(others)), replace=False)
            row["secondaries"] = tuple(others[i] for i in sorted(picks))
            xc = row["collection"] == "XC"
            row["rating"] = float(rng.choice(np.arange(2.5, 5.5, 0.5))) if xc else 0.0
            # Xeno-canto ratings follow quality: 5 -> ~30 dB SNR, 2.5 -> ~24 dB; others 20-30 dB.
            row["snr_db"] = 18 + 2.4 * row["rating"] + rng.normal(0, 1) if xc else rng.uniform(20, 30)
            row["duration_s"] = _focal_duration_s(spec, rng)
            row["type"] = str(rng.choice(_BIRD_TYPES if sp.class_name == "Aves" else _OTHER_TYPES))
            rows.append(row)
    return rows


def _near_duplicates(rows: list[dict], spec: SynthSpec, rng: np.random.Generator) -> list[dict]:
    """Copies of some XC recordings re-uploaded to iNat by the same author (same audio, new gain/encoding)."""
    big = [i for i, r in enumerate(rows) if r["collection"] == "XC"
           and sum(q["primary"] is r["primary"] for q in rows) > spec.minority_max_files]
    pool = big or [i for i, r in enumerate(rows) if r["collection"] == "XC"]
    n_dups = min(len(pool), max(1, len(rows) // 35))
    dups = []
    for i in sorted(rng.choice(pool, size=n_dups, replace=False)):
        dups.append(dict(rows[i], collection="iNat", rating=0.0, duplicate_of=int(i), gain=0.8,
                         compression_level=0.8))
    return dups


def _unique_ids(rng: np.random.Generator, low: int, high: int, n: int) -> list[int]:
    return [int(x) + low for x in rng.choice(high - low, size=n, replace=False)]


def _assign_ids(rows: list[dict], archive: list[dict], rng: np.random.Generator) -> None:
    """Give every recording a collection-specific id; XC ids are unique across train.csv and the archive."""
    n_xc = sum(r["collection"] == "XC" for r in rows) + len(archive)
    pools = {"XC": iter(_unique_ids(rng, 100_000, 999_999, n_xc)),
             "iNat": iter(_unique_ids(rng, 10_000, 999_999, sum(r["collection"] == "iNat" for r in rows))),
             "CSA": iter(_unique_ids(rng, 1_000, 9_999, sum(r["collection"] == "CSA" for r in rows)))}
    for row in rows:
        row["id"] = next(pools[row["collection"]])
    for rec in archive:
        rec["id"] = next(pools["XC"])


_URLS = {"XC": "https://xeno-canto.org/{id}", "iNat": "https://static.inaturalist.org/sounds/{id}.wav",
         "CSA": "http://colecciones.humboldt.org.co/rec/sonidos/IAvH-CSA-{id}.wav"}


def _train_row(row: dict) -> dict:
    """A train.csv row in the BirdCLEF 2025 schema."""
    sp: Species = row["primary"]
    stem = f"{row['collection']}{row['id']}"
    return dict(primary_label=sp.label, secondary_labels=str([s.label for s in row["secondaries"]]),
                type=row["type"], filename=f"{sp.label}/{stem}.ogg", collection=row["collection"],
                rating=row["rating"], url=_URLS[row["collection"]].format(id=row["id"]),
                latitude=row["latitude"], longitude=row["longitude"], scientific_name=sp.scientific_name,
                common_name=sp.common_name, author=row["author"], license=row["license"])


def _plan_archive(spec: SynthSpec, species: list[Species], counts: np.ndarray, rng: np.random.Generator,
                  authors: list[str]) -> list[dict]:
    """Extra Xeno-canto-like recordings for every minority class (few focal files)."""
    records = []
    for sp, count in zip(species, counts):
        if count > spec.minority_max_files:
            continue
        for _ in range(spec.n_archive_per_minority):
            quality = str(rng.choice(list("ABCDE"), p=(0.35, 0.3, 0.2, 0.1, 0.05)))
            others = [s for s in species if s.label != sp.label]
            records.append(dict(
                primary=sp, quality=quality, snr_db={"A": 27, "B": 23, "C": 18, "D": 13, "E": 9}[quality],
                duration_s=_focal_duration_s(spec, rng), author=str(rng.choice(authors)),
                sample_rate_hz=int(rng.choice((32000, 44100, 48000))),
                secondaries=tuple(others[i] for i in rng.choice(len(others), int(rng.random() < 0.2), replace=False)),
                latitude=sp.home_lat + rng.normal(0, 1.0), longitude=sp.home_lon + rng.normal(0, 1.0),
                noise_tilt=float(rng.uniform(0.5, 1.5)), date=f"20{rng.integers(10, 25)}-{rng.integers(1, 13):02d}"
                f"-{rng.integers(1, 29):02d}", time=f"{rng.integers(4, 19):02d}:{rng.integers(0, 60):02d}",
                type=str(rng.choice(("song", "call", "call, song")))))
    return records


_XC_GROUP = {"Aves": "birds", "Amphibia": "frogs", "Insecta": "grasshoppers"}


def _xc_record(rec: dict) -> dict:
    """An archive recording as a Xeno-canto API v3 record; `file` is relative to recordings.json's folder."""
    sp: Species = rec["primary"]
    genus, epithet = sp.scientific_name.split()
    xc_id, length_s = rec["id"], int(round(rec["duration_s"]))
    return {
        "id": str(xc_id), "gen": genus, "sp": epithet, "ssp": "", "grp": _XC_GROUP[sp.class_name],
        "en": sp.common_name, "rec": rec["author"], "cnt": "Colombia", "loc": "Synthetic Reserve, Colombia",
        "lat": f"{rec['latitude']:.4f}", "lon": f"{rec['longitude']:.4f}", "alt": "300", "type": rec["type"],
        "sex": "", "stage": "", "method": "field recording", "url": f"https://xeno-canto.org/{xc_id}",
        "file": f"audio/XC{xc_id}.mp3", "file-name": f"XC{xc_id}-{genus}-{epithet}.mp3",
        "sono": {"small": None, "med": None, "large": None, "full": None},
        "osci": {"small": None, "med": None, "large": None},
        "lic": "//creativecommons.org/licenses/by-nc-sa/4.0/", "q": rec["quality"],
        "length": f"{length_s // 60}:{length_s % 60:02d}", "time": rec["time"], "date": rec["date"],
        "uploaded": rec["date"], "also": [s.scientific_name for s in rec["secondaries"]], "rmk": "",
        "animal-seen": "unknown", "playback-used": "no", "temp": "", "regnr": "", "auto": "no",
        "dvc": "", "mic": "", "smp": str(rec["sample_rate_hz"]),
    }


UNLISTED_PREFIX = "unlisted-"


def make_unlisted_species(n_species: int, seed: int) -> list[Species]:
    """Species outside the class list that call in soundscapes only (as real non-target species do)."""
    if n_species == 0:
        return []
    others, _ = make_species(n_species, seed, stream=1)
    return [dataclasses.replace(s, label=UNLISTED_PREFIX + s.label) for s in others]


def regional_dialect(species: list[Species], dialect: float, seed: int) -> list[Species]:
    """The species as they call at the soundscape site: pitch and tempo shifted per species (`SynthSpec.soundscape_dialect`).

    Focal recordings come from across a species' range, soundscapes from one site, whose population
    sings its own dialect: a model trained on focal clips alone hears it a little off.
    """
    if dialect == 0:
        return species
    rng = np.random.default_rng([seed, _STREAM_DIALECT])
    regional = []
    for sp in species:
        pitch, tempo = (1 + rng.choice((-1, 1)) * rng.uniform(dialect / 2, dialect) for _ in range(2))
        regional.append(dataclasses.replace(sp, f0_hz=sp.f0_hz * pitch, bandwidth_hz=sp.bandwidth_hz * pitch,
                                            rate_hz=sp.rate_hz * tempo, bout_s=sp.bout_s / tempo))
    return regional


def soundscape_prior(species: list[Species], counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Species prior in soundscapes: unlike the focal one, rare focal classes tend to be common here."""
    weights = (counts.min() / counts) ** 0.7 * np.exp(rng.normal(0.0, 0.6, size=len(species)))
    return weights / weights.sum()


def _plan_soundscapes(spec: SynthSpec, species: list[Species], prior: np.ndarray, rng: np.random.Generator,
                      unlisted: list[Species], n: int, sites: tuple[str, ...]) -> list[tuple[str, tuple[Species, ...]]]:
    """(stem, species present, listed then unlisted) per soundscape; stems like BirdCLEF's `H02_20230420_074000`."""
    plans, stems = [], set()
    while len(plans) < n:
        stem = (f"{rng.choice(sites)}_2024{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
                f"_{rng.integers(0, 24):02d}{rng.choice((0, 10, 20, 30, 40, 50)):02d}00")
        if stem in stems:
            continue
        stems.add(stem)
        k = min(int(rng.integers(2, 6)), len(species))
        present = [species[i] for i in sorted(rng.choice(len(species), size=k, replace=False, p=prior))]
        n_unlisted = min(int(rng.integers(1, 4)), len(unlisted))
        present += [unlisted[i] for i in sorted(rng.choice(len(unlisted), size=n_unlisted, replace=False))]
        plans.append((stem, tuple(present)))
    return plans


# ----------------------------------------------------------------------------------------------------
# Writing the folder
# ----------------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """Everything decided before any audio is rendered."""

    species: list[Species]
    unlisted: list[Species]  # call in soundscapes, never labeled
    similar_pairs: list[tuple[str, str]]
    train: pd.DataFrame
    archive: list[dict]
    train_soundscapes: list[SoundscapeJob]
    val_soundscapes: list[SoundscapeJob]
    jobs: list[FocalJob | SoundscapeJob]


def _focal_jobs(root: Path, rows: list[dict], spec: SynthSpec) -> list[FocalJob]:
    jobs = []
    for k, row in enumerate(rows):
        # A near-duplicate renders from its original's seed, so the audio is the same recording.
        source = row.get("duplicate_of", k)
        jobs.append(FocalJob(
            path=str(root / "train_audio" / _train_row(row)["filename"]), entropy=(spec.seed, _STREAM_FOCAL, source),
            duration_s=row["duration_s"], sample_rate_hz=spec.sample_rate_hz, primary=row["primary"],
            secondaries=row["secondaries"], snr_db=float(row["snr_db"]), noise_tilt=row["noise_tilt"],
            pitch=row["pitch"], gain=row.get("gain", 1.0), compression_level=row.get("compression_level")))
    return jobs


def _archive_jobs(root: Path, archive: list[dict], spec: SynthSpec) -> list[FocalJob]:
    return [FocalJob(path=str(root / "xc_archive" / "audio" / f"XC{rec['id']}.mp3"),
                     entropy=(spec.seed, _STREAM_ARCHIVE, k), duration_s=rec["duration_s"],
                     sample_rate_hz=rec["sample_rate_hz"], primary=rec["primary"], secondaries=rec["secondaries"],
                     snr_db=float(rec["snr_db"]), noise_tilt=rec["noise_tilt"], pitch=1.0)
            for k, rec in enumerate(archive)]


def _soundscape_jobs(root: Path, folder: str, plans: list, spec: SynthSpec, stream: int) -> list[SoundscapeJob]:
    return [SoundscapeJob(path=str(root / folder / f"{stem}.ogg"), entropy=(spec.seed, stream, k),
                          duration_s=spec.soundscape_s, sample_rate_hz=spec.sample_rate_hz, species=present)
            for k, (stem, present) in enumerate(plans)]


def make_plan(root: Path, spec: SynthSpec) -> _Plan:
    """Decide every table row and render job from the seed (no audio yet)."""
    species, pairs = make_species(spec.n_species, spec.seed)
    rng = np.random.default_rng([spec.seed, _STREAM_PLAN, 1])
    counts = class_counts(spec, rng)
    rows = _plan_focal(spec, species, counts, rng)
    rows += _near_duplicates(rows, spec, rng)
    archive = _plan_archive(spec, species, counts, rng, _authors(rng, 12) + sorted({r["author"] for r in rows}))
    _assign_ids(rows, archive, rng)
    prior = soundscape_prior(species, counts, rng)
    unlisted = make_unlisted_species(max(2, spec.n_species // 3), spec.seed)
    # Train and validation soundscapes come from the same region: the same species mix, noise and dialect.
    regional = regional_dialect(species, spec.soundscape_dialect, spec.seed)
    train_sc = _soundscape_jobs(root, "train_soundscapes", _plan_soundscapes(
        spec, regional, prior, rng, unlisted, spec.n_train_soundscapes, ("H01", "H02", "H03", "H04")),
        spec, _STREAM_TRAIN_SC)
    val_sc = _soundscape_jobs(root, "val_soundscapes", _plan_soundscapes(
        spec, regional, prior, rng, unlisted, spec.n_val_soundscapes, ("V01", "V02")), spec, _STREAM_VAL_SC)
    train = pd.DataFrame([_train_row(r) for r in rows])
    order = train.sort_values(["primary_label", "filename"]).index
    jobs = [*train_sc, *val_sc, *_focal_jobs(root, rows, spec), *_archive_jobs(root, archive, spec)]
    return _Plan(species=species, unlisted=unlisted, similar_pairs=pairs, train=train.loc[order].reset_index(drop=True),
                 archive=archive, train_soundscapes=train_sc, val_soundscapes=val_sc, jobs=jobs)


def _run_jobs(jobs: list, num_workers: int, progress: bool) -> list[list[Event]]:
    """Render and encode every job, in a process pool when num_workers > 1; results keep job order."""
    bar = tqdm(total=len(jobs), desc="synthesizing audio", unit="file", disable=not progress)
    if num_workers <= 1:
        results = [_tick(bar, _render_and_write(job)) for job in jobs]
    else:
        with spawn_pool(num_workers) as pool:
            results = [_tick(bar, events) for events in pool.map(_render_and_write, jobs, chunksize=2)]
    bar.close()
    return results


def _tick(bar: tqdm, value: list[Event]) -> list[Event]:
    bar.update(1)
    return value


def _stem(job: SoundscapeJob) -> str:
    return Path(job.path).stem


def _solution(jobs: list[SoundscapeJob], events: list[list[Event]], classes: list[str]) -> pd.DataFrame:
    """Kaggle-format chunk labels: row_id `<stem>_<end_s>` + one 0/1 column per class."""
    frames = []
    for job, file_events in zip(jobs, events):
        labels = chunk_labels(file_events, job.duration_s, classes)
        frame = pd.DataFrame(labels, columns=classes)
        frame.insert(0, "row_id", row_ids(_stem(job), len(labels), CHUNK_S))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["row_id", *classes])


def _taxonomy(species: list[Species]) -> pd.DataFrame:
    return pd.DataFrame([dict(primary_label=s.label, inat_taxon_id=s.inat_taxon_id, scientific_name=s.scientific_name,
                              common_name=s.common_name, class_name=s.class_name) for s in species])


def _write_tables(root: Path, plan: _Plan, events: dict[str, list[Event]]) -> None:
    """train.csv, taxonomy.csv, sample_submission.csv, val_solution.csv, the archive index and truth/."""
    classes = [s.label for s in plan.species]
    plan.train.to_csv(root / "train.csv", index=False)
    _taxonomy(plan.species).to_csv(root / "taxonomy.csv", index=False)
    val_events = [events[job.path] for job in plan.val_soundscapes]
    solution = _solution(plan.val_soundscapes, val_events, classes)
    solution.to_csv(root / "val_solution.csv", index=False)
    submission = solution.copy()
    submission[classes] = 0.0
    submission.to_csv(root / "sample_submission.csv", index=False)
    (root / "xc_archive").mkdir(exist_ok=True)
    with open(root / "xc_archive" / "recordings.json", "w") as f:
        json.dump([_xc_record(r) for r in plan.archive], f, indent=1)
    truth = root / "truth"
    truth.mkdir()
    train_events = [events[job.path] for job in plan.train_soundscapes]
    _solution(plan.train_soundscapes, train_events, classes).to_csv(truth / "train_soundscape_labels.csv", index=False)
    _events_table(plan, events).to_csv(truth / "soundscape_events.csv", index=False)
    with open(truth / "species.json", "w") as f:
        json.dump({"species": [dataclasses.asdict(s) for s in plan.species],
                   "unlisted_species": [dataclasses.asdict(s) for s in plan.unlisted],
                   "similar_pairs": plan.similar_pairs}, f, indent=1)


def _events_table(plan: _Plan, events: dict[str, list[Event]]) -> pd.DataFrame:
    rows = [dict(split=split, filename=Path(job.path).name, **dataclasses.asdict(ev))
            for split, jobs in (("train", plan.train_soundscapes), ("val", plan.val_soundscapes))
            for job in jobs for ev in events[job.path]]
    return pd.DataFrame(rows, columns=["split", "filename", "label", "start_s", "end_s", "snr_db"])


# ----------------------------------------------------------------------------------------------------
# Entry point: idempotent, atomic generation
# ----------------------------------------------------------------------------------------------------

def _spec_record(spec: SynthSpec) -> dict:
    """The spec as DONE.json records it; a dialect of 0 is left out, so folders made before it existed still match."""
    record = dataclasses.asdict(spec)
    if record["soundscape_dialect"] == 0.0:
        del record["soundscape_dialect"]
    return record


def _done_record(spec: SynthSpec) -> dict:
    return {"version": GENERATOR_VERSION, "spec": _spec_record(spec)}


def _read_done(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "DONE.json").read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: Path, spec: SynthSpec) -> bool:
    done = _read_done(out_dir)
    return done is not None and {k: done.get(k) for k in ("version", "spec")} == _done_record(spec)


class TargetTaken(ValueError):
    """`out_dir` holds something `generate` may not replace: another spec's dataset, or not a dataset."""

    def __init__(self, reason: str, remedy: str, ours: bool):
        super().__init__(f"{reason}; {remedy}")
        self.reason = reason  # what is there, without the API-level remedy
        self.ours = ours  # a dataset this generator made (safe to delete), not someone's folder


def _check_target(out_dir: Path, spec: SynthSpec, overwrite: bool) -> None:
    """Raise unless `out_dir` is absent, empty, or a synthetic dataset we may replace."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    done = _read_done(out_dir)
    if done is None:
        raise TargetTaken(f"{out_dir} exists and is not a synthetic dataset (no readable DONE.json)",
                          "refusing to replace it; choose another out_dir or remove it", ours=False)
    if not overwrite:
        old = done.get("spec", {})
        diff = {k: (old.get(k), v) for k, v in _spec_record(spec).items() if old.get(k) != v}
        version = "" if done.get("version") == GENERATOR_VERSION else f" (generator version {done.get('version')})"
        raise TargetTaken(f"{out_dir} holds a synthetic dataset made with a different spec{version} "
                          f"(field: (existing, requested) = {diff})", "pass overwrite=True or choose another out_dir",
                          ours=True)


def _remove_stale_temps(out_dir: Path) -> None:
    """Delete temp and replaced folders left by generator processes that no longer exist."""
    leftovers = [*out_dir.parent.glob(f".{out_dir.name}.tmp-*"), *out_dir.parent.glob(f".{out_dir.name}.old-*")]
    for tmp in leftovers:
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's process
            pass


def _publish(tmp: Path, out_dir: Path, spec: SynthSpec) -> None:
    """Move the finished folder into place; an older dataset there is replaced only after the new one is whole."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists() and any(out_dir.iterdir()):
        os.replace(out_dir, old)
    elif out_dir.exists():
        out_dir.rmdir()
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if not _is_complete(out_dir, spec):  # not a concurrent twin finishing first: a real failure
            if old.exists() and not out_dir.exists():
                os.replace(old, out_dir)
            raise
    shutil.rmtree(old, ignore_errors=True)


def _build(root: Path, spec: SynthSpec, num_workers: int, progress: bool) -> dict:
    """Generate every file of the dataset into `root`; return DONE.json's content."""
    started = time.perf_counter()
    plan = make_plan(root, spec)
    results = _run_jobs(plan.jobs, num_workers, progress)
    events = {job.path: ev for job, ev in zip(plan.jobs, results)}
    _write_tables(root, plan, events)
    audio_s = sum(job.duration_s for job in plan.jobs)
    return {**_done_record(spec), "n_train_files": len(plan.train), "n_archive_files": len(plan.archive),
            "audio_s": round(audio_s, 1), "seconds": round(time.perf_counter() - started, 1)}


def generate(out_dir: str | Path, spec: SynthSpec | Mapping[str, Any] | None = None, num_workers: int = 2,
             progress: bool = True, overwrite: bool = False) -> Path:
    """Write the synthetic dataset to `out_dir` (atomically); return at once if the same spec is already there.
    `spec` None: the demo's (the shipped `data.synth` of `data=synthetic`)."""
    out_dir = Path(out_dir).absolute()
    if spec is None:
        from birdrounds.config import shipped

        spec = shipped("data.synth", "data=synthetic")
    if not isinstance(spec, SynthSpec):  # a plain mapping, e.g. a Hydra node without _target_
        spec = SynthSpec(**spec)
    if _is_complete(out_dir, spec):
        return out_dir
    _check_target(out_dir, spec, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        done = _build(tmp, spec, num_workers, progress)
        (tmp / "DONE.json").write_text(json.dumps(done, indent=1))  # last: marks the folder whole
        _publish(tmp, out_dir, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("synthetic dataset at %s: %d train files, %.0f s of audio in %.1f s",
             out_dir, done["n_train_files"], done["audio_s"], done["seconds"])
    return out_dir
