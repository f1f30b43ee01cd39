"""The ONNX contract and the submission format, defined here only.

The graph metadata `birdrounds.export` writes and `infer.py` reads (infer.py's docstring says what each key
holds), the scored chunk length and the BirdCLEF row id. The package imports them from here (export, submit,
rounds, pseudo, the soundscape and synthetic data). The export copies this file beside infer.py, where it
runs without birdrounds installed: it imports nothing.
"""

FORMAT_VERSION = "1"
META = "birdrounds."
META_FORMAT_VERSION = META + "format_version"
META_CLASSES = META + "classes"
META_SAMPLE_RATE_HZ = META + "sample_rate_hz"
META_WINDOW_S = META + "window_s"
META_INPUT = META + "input"
META_FRONTEND = META + "frontend"
META_MEMBERS = META + "members"
META_MEMBER_FRONTENDS = META + "member_frontends"   # waveform ensembles whose members' frontends differ
META_PREDICT_SETTINGS = META + "predict_settings"   # optional: RECORDED_SETTINGS of the export's config
META_QUANTIZATION = META + "quantization"           # INT8 graphs: how they were quantized
INPUT_KINDS = {"spectrogram": "spec", "waveform": "waveform"}   # graph kind -> name of its input
OUTPUT_PROBS = "probs"                   # [batch, n_classes]
OUTPUT_FRAMEWISE = "framewise_probs"     # [batch, T', n_classes], SED heads only
# MelFrontend's arguments: the keys of birdrounds.frontend (and of a checkpoint's model_kwargs).
FRONTEND_KEYS = ("sample_rate_hz", "n_fft", "hop_length", "n_mels", "f_min_hz", "f_max_hz", "top_db", "norm")
SCORED_CHUNK_S = 5.0                     # BirdCLEF scores soundscapes per 5-s chunk
# The InferenceSettings an export records under META_PREDICT_SETTINGS: those, besides speed knobs,
# that change the CSV and that `birdrounds predict` takes from its config.
RECORDED_SETTINGS = ("smoothing", "file_scale_alpha", "window_stride_s", "tta_shift_s", "expected_duration_s")


class ModelFormatError(ValueError):
    """An ONNX file that does not follow the birdrounds contract, or models that cannot be ensembled."""


def row_id(stem: str, end_s: float) -> str:
    """The BirdCLEF row id of a chunk (or window) ending at `end_s`: '<file stem>_<end in whole seconds>'."""
    return f"{stem}_{int(round(end_s))}"


def row_ids(stem: str, n_chunks: int, chunk_s: float = SCORED_CHUNK_S) -> list[str]:
    """The row ids of chunks 1..n_chunks of a file (`row_id` of each chunk's end)."""
    return [row_id(stem, (i + 1) * chunk_s) for i in range(n_chunks)]
