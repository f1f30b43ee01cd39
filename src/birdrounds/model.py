"""One model from raw waveform to logits: mel frontend, timm backbone, clip or SED head; checkpoints.

Training, pseudo-labeling and ONNX export all use `BirdModel`, so preprocessing cannot drift apart.
The frontend is its own submodule (`model.frontend`) and `forward_spec` runs the rest, so an export
can split the graph into frontend and backbone+head.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from birdrounds.artifacts import atomic_open, rebuild_hint
from birdrounds.config import ConfigError, redact_secrets
from birdrounds.melspec import NORM_MODES  # the numpy frontend's twin: one list of modes

CHECKPOINT_FORMAT_VERSION = 1
HEADS = ("sed", "clip")
POOLS = ("avg", "gem")
# Added to denominators so a silent clip (constant spectrogram) normalises to zeros, not NaN.
_NORM_EPS = 1e-6


class MelFrontend(nn.Module):
    """Waveform [B, n_samples] -> normalised log-mel spectrogram [B, 1, n_mels, frames]."""

    def __init__(
        self,
        sample_rate_hz: int,
        n_fft: int,
        hop_length: int,
        n_mels: int,
        f_min_hz: float,
        f_max_hz: float,
        top_db: float | None,
        norm: str,
    ) -> None:
        super().__init__()
        if norm not in NORM_MODES:
            raise ValueError(f"norm must be one of {NORM_MODES}, got {norm!r}")
        if not 0 <= f_min_hz < f_max_hz <= sample_rate_hz / 2:
            raise ValueError(f"need 0 <= f_min_hz < f_max_hz <= {sample_rate_hz / 2}, got {f_min_hz}, {f_max_hz}")
        self.norm = norm
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate_hz,
            n_fft=n_fft,
            hop_length=hop_length,
            n_mels=n_mels,
            f_min=f_min_hz,
            f_max=f_max_hz,
            power=2.0,
        )
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=top_db)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Waveform [B, n_samples] -> spectrogram [B, 1, n_mels, frames] (frames = n_samples // hop + 1)."""
        # The power spectrum reaches ~1e6 and overflows float16, so the frontend always runs in float32.
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            power = self.mel(waveform.float()).unsqueeze(1)
            # 4-D input makes AmplitudeToDB clamp top_db per sample; on 3-D input it uses the batch max.
            spec_db = self.to_db(power)
            return self._normalise(spec_db)

    def _normalise(self, spec: torch.Tensor) -> torch.Tensor:
        """Per-sample normalisation over (channel, mel, frame); tensor ops only, so it exports to ONNX."""
        if self.norm in ("standard", "standard_minmax"):
            mean = spec.mean(dim=(1, 2, 3), keepdim=True)
            std = spec.std(dim=(1, 2, 3), keepdim=True)
            spec = (spec - mean) / (std + _NORM_EPS)
        if self.norm in ("minmax", "standard_minmax"):
            lo = spec.amin(dim=(1, 2, 3), keepdim=True)
            hi = spec.amax(dim=(1, 2, 3), keepdim=True)
            spec = (spec - lo) / (hi - lo + _NORM_EPS)
        return spec


class SpecAugment(nn.Module):
    """Random frequency and time masks on [B, 1, n_mels, frames], in training mode only.

    Each sample independently gets, with probability `p`, `freq_masks` bands of width uniform in
    [0, freq_mask_width] mel bins and `time_masks` bands of width uniform in [0, time_mask_width]
    frames, filled with the sample's mean value (so the mask carries no level information).
    """

    def __init__(
        self,
        freq_masks: int,
        freq_mask_width: int,
        time_masks: int,
        time_mask_width: int,
        p: float,
    ) -> None:
        super().__init__()
        self.freq_masks, self.freq_mask_width = freq_masks, freq_mask_width
        self.time_masks, self.time_mask_width = time_masks, time_mask_width
        self.p = p

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """Masked copy of `spec` in training mode; `spec` itself in eval mode."""
        if not self.training or self.p <= 0:
            return spec
        batch, _, n_mels, n_frames = spec.shape
        masked = self._band_mask(batch, n_mels, self.freq_masks, self.freq_mask_width, spec.device)[:, None, :, None]
        masked = masked | self._band_mask(batch, n_frames, self.time_masks, self.time_mask_width, spec.device)[:, None, None, :]
        applies = torch.rand(batch, device=spec.device) < self.p
        masked = masked & applies[:, None, None, None]
        fill = spec.mean(dim=(1, 2, 3), keepdim=True)
        return torch.where(masked, fill, spec)

    @staticmethod
    def _band_mask(batch: int, size: int, n_masks: int, max_width: int, device: torch.device) -> torch.Tensor:
        """Bool [batch, size], True inside any of `n_masks` random bands per row."""
        mask = torch.zeros(batch, size, dtype=torch.bool, device=device)
        max_width = min(max_width, size)
        if n_masks <= 0 or max_width <= 0:
            return mask
        positions = torch.arange(size, device=device)[None, :]
        for _ in range(n_masks):
            width = torch.randint(0, max_width + 1, (batch, 1), device=device)
            start = (torch.rand(batch, 1, device=device) * (size - width + 1)).floor().long()
            mask |= (positions >= start) & (positions < start + width)
        return mask


class GeM(nn.Module):
    """Generalised-mean pooling over (H, W) with a learnable exponent p: [B, C, H, W] -> [B, C]."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, C]."""
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class ClipHead(nn.Module):
    """Global pooling ("avg" or "gem") + dropout + linear: features [B, C, H, W] -> {"logits": [B, K]}."""

    def __init__(self, in_features: int, num_classes: int, pool: str = "avg", drop_rate: float = 0.2, gem_p: float = 3.0) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool = GeM(gem_p) if pool == "gem" else None
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Clip logits from a backbone feature map."""
        pooled = self.pool(features) if self.pool is not None else features.mean(dim=(2, 3))
        return {"logits": self.fc(self.dropout(pooled))}


class SEDHead(nn.Module):
    """Sound-event-detection head: framewise logits plus attention pooling over time.

    features [B, C, F', T'] -> mean over frequency -> [B, C, T'] -> light smoothing over time
    (max-pool + avg-pool, kernel 3) -> dropout -> two 1x1 convolutions:
      cla = conv_cla(x)                      framewise logits      [B, K, T']
      att = softmax_t(tanh(conv_att(x)))     attention over time   [B, K, T'] (sums to 1 over T')
      logits = sum_t att * cla               clip logits           [B, K]
    The clip logit is the attention-weighted mean of framewise logits (rather than a logit of
    sum_t att * sigmoid(cla)), so it stays a finite logit and plain BCE/CE apply to it.
    """

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.2) -> None:
        super().__init__()
        self.dropout = nn.Dropout(drop_rate)
        self.att = nn.Conv1d(in_features, num_classes, kernel_size=1)
        self.cla = nn.Conv1d(in_features, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Clip logits [B, K] and framewise logits [B, T', K]."""
        x = features.mean(dim=2)
        # Smooth over neighbouring frames so a call straddling two frames is seen by both.
        x = F.max_pool1d(x, 3, stride=1, padding=1) + F.avg_pool1d(x, 3, stride=1, padding=1)
        x = self.dropout(x)
        att = torch.softmax(torch.tanh(self.att(x)), dim=-1)
        cla = self.cla(x)
        return {"logits": (att * cla).sum(dim=-1), "framewise_logits": cla.transpose(1, 2)}


class BirdModel(nn.Module):
    """Raw waveform [B, n_samples] -> {"logits": [B, K], "framewise_logits": [B, T', K] (SED head only)}.

    backbone: a timm CNN name; its `forward_features` map [B, C, F', T'] (NCHW) feeds the head.
    spec_augment: keyword arguments of `SpecAugment`, or None for no masking.
    pool, gem_p: clip head pooling ("avg" | "gem", GeM's initial exponent); the SED head ignores them.
    drop_rate: dropout before the head's classifier; drop_path_rate: the backbone's stochastic depth.
    pretrained_path: local timm weights file for the backbone, or None for random init.
    pretrained: timm's pretrained weights for `backbone` from the Hugging Face hub (its local cache first,
    so offline once fetched; `birdrounds fetch-weights`); `pretrained_path` wins when both are set.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str,
        head: str,
        sample_rate_hz: int,
        n_fft: int,
        hop_length: int,
        n_mels: int,
        f_min_hz: float,
        f_max_hz: float,
        top_db: float | None,
        norm: str,
        spec_augment: dict[str, Any] | None,
        pool: str,
        gem_p: float,
        drop_rate: float,
        drop_path_rate: float,
        pretrained_path: str | None,
        pretrained: bool,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        # Plain copies of the arguments: a checkpoint stores them so `load_checkpoint` can rebuild.
        self.init_kwargs: dict[str, Any] = dict(
            num_classes=num_classes, backbone=backbone, head=head, sample_rate_hz=sample_rate_hz,
            n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, f_min_hz=f_min_hz, f_max_hz=f_max_hz,
            top_db=top_db, norm=norm, spec_augment=dict(spec_augment) if spec_augment else None,
            pool=pool, gem_p=gem_p, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            pretrained_path=pretrained_path, pretrained=bool(pretrained),
        )
        self.num_classes = num_classes
        self.sample_rate_hz = sample_rate_hz
        self.frontend = MelFrontend(sample_rate_hz, n_fft, hop_length, n_mels, f_min_hz, f_max_hz, top_db, norm)
        self.spec_augment = SpecAugment(**spec_augment) if spec_augment else None
        self.backbone = build_backbone(backbone, drop_path_rate, pretrained_path, pretrained)
        in_features = self.backbone.num_features
        if head == "sed":
            self.head: nn.Module = SEDHead(in_features, num_classes, drop_rate)
        else:
            self.head = ClipHead(in_features, num_classes, pool, drop_rate, gem_p)

    def forward(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits from a batch of waveforms [B, n_samples] at `sample_rate_hz`."""
        return self.forward_spec(self.frontend(waveform))

    def forward_spec(self, spec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits from normalised spectrograms [B, 1, n_mels, frames] (SpecAugment applies in training)."""
        if self.spec_augment is not None:
            spec = self.spec_augment(spec)
        return self.head(self.forward_features(spec))

    def forward_features(self, spec: torch.Tensor) -> torch.Tensor:
        """Backbone feature map [B, C, F', T'] from spectrograms [B, 1, n_mels, frames]."""
        return self.backbone.forward_features(spec)


def build_backbone(name: str, drop_path_rate: float = 0.0, pretrained_path: str | None = None,
                   pretrained: bool = False) -> nn.Module:
    """timm backbone by name with one input channel and no classifier or pooling (feature map out).

    Pretrained weights come from a local file (`pretrained_path`), else with `pretrained` from the Hugging
    Face hub through its cache (`hub_weights`); timm adapts the first convolution to one channel and drops
    a classifier of another size. Neither -> random init.
    """
    kwargs: dict[str, Any] = dict(in_chans=1, num_classes=0, global_pool="", drop_path_rate=drop_path_rate)
    if pretrained_path is None:
        return hub_weights(name, **kwargs) if pretrained else timm.create_model(name, pretrained=False, **kwargs)
    if not Path(pretrained_path).is_file():
        # Checked here because a missing file must never fall back to a network download.
        raise FileNotFoundError(f"pretrained weights not found: {pretrained_path}")
    overlay = dict(file=str(pretrained_path))
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def hub_id(name: str) -> str:
    """The Hugging Face repository of timm's default pretrained weights for `name` (ConfigError if none)."""
    cfg = timm.models.get_pretrained_cfg(name)
    repo = cfg.hf_hub_id if cfg is not None else None
    if not repo:
        raise ConfigError(f"model.pretrained: timm has no pretrained weights on the Hugging Face hub for {name!r}")
    return repo


def hub_weights(name: str, **kwargs: Any) -> nn.Module:
    """timm model `name` with its pretrained weights: the Hugging Face cache first, the hub when not there
    (HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE=1 are honoured). Any failure is one ConfigError line."""
    repo = hub_id(name)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # network, cache, HTTP and file errors of several libraries: one line for all
        from huggingface_hub import constants

        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ConfigError(
            f"model.pretrained: timm weights for {name} ({repo}) are not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} and could not be downloaded{offline}: {type(err).__name__}: {reason} "
            f"Fetch them ahead of time where there is network with `birdrounds fetch-weights model.backbone={name}` "
            f"(HF_HOME picks the folder), or set model.pretrained=false") from err


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    classes: list[str],
    config: Any = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Atomically write a self-describing checkpoint: model arguments, weights, classes, audio, config."""
    model = _unwrap(model)
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    extra = _to_plain(extra or {})
    ckpt = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model_kwargs": _to_plain(model.init_kwargs),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},  # any layout in, NCHW out
        "classes": list(classes),
        "audio": {"sample_rate_hz": model.sample_rate_hz, "window_s": extra.get("window_s")},
        "config": redact_secrets(_to_plain(config)),  # no xc.api_key & co. in a shareable file
        "extra": extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(ckpt, f)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read: one line naming the file and what to do (exit 2, like bad input)."""


def read_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` of a checkpoint file (weights only); a truncated or corrupt one raises CheckpointError
    naming it and the `recompute_from` that rebuilds it (the round in its path)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError ... for a damaged file
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt ({type(err).__name__}); "
                              f"{rebuild_hint(path)}") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[BirdModel, dict[str, Any]]:
    """Rebuild the model from the file alone (random init, no pretrained weights, no network); eval mode."""
    ckpt = read_checkpoint_file(path, map_location)
    version = ckpt.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {version}, this code reads {CHECKPOINT_FORMAT_VERSION}")
    kwargs = {**ckpt["model_kwargs"], "pretrained_path": None, "pretrained": False}
    model = BirdModel(**kwargs)
    model.load_state_dict(ckpt["state_dict"])
    model.to(map_location)
    return model.eval(), ckpt


def checkpoint_hash(path: str | os.PathLike) -> str:
    """First 16 hex digits of the sha256 of the file's bytes (of a checkpoint or any other file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def weights_hash(model: nn.Module) -> str:
    """First 16 hex digits of a sha256 over the state dict's names and tensor bytes (the weights, not a file)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        # Raw bytes via uint8, so dtypes numpy lacks (bfloat16) hash too.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _unwrap(model: nn.Module) -> BirdModel:
    """The BirdModel inside DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while not isinstance(model, BirdModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a BirdModel, got {type(model).__name__}")
        model = inner
    return model


def _to_plain(value: Any) -> Any:
    """Python builtins only (dict/list/str/number/bool/None), so `torch.load(weights_only=True)` reads it."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # omegaconf is a dependency; this only keeps the module importable without it
        pass
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint; convert it to plain Python first")
