"""Multi-label losses that return named terms: BCE, soft-target cross-entropy, focal BCE.

Every loss is called as `loss(outputs, target, weight=None) -> dict` where `outputs` is the model's
dict (`"logits"` [B, C], optionally `"framewise_logits"` [B, T, C]), `target` is [B, C] in [0, 1]
(soft or multi-hot) and `weight` is an optional per-sample weight [B]. The dict holds the clip term
under the loss's name (e.g. "bce"), the framewise term under "framewise_<name>" when enabled, and
their weighted sum under "loss".

Reduction, the same for every loss: per-class terms are multiplied by the class weights (mean 1),
reduced to one value per sample (mean over classes for BCE/focal, sum over classes for CE, as each
is usually defined), multiplied by the sample weight, then averaged over the batch
(sum_i w_i l_i / B: a batch of weight-0.5 samples weighs half as much, rather than being re-normalised).

Framewise term (SED head, `framewise_weight > 0`): the clip-level loss again, applied to the max over
time of the framewise logits, so at least one frame must carry each present class and no frame may
carry an absent one. loss = clip_term + framewise_weight * framewise_term.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def class_weights(counts: Sequence[float] | np.ndarray | torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-class weights proportional to count**-temperature, normalised to mean 1 (float32 [C]).

    temperature 0 gives uniform weights, 1 gives inverse-frequency weights; counts below 1 (classes
    without examples) are treated as 1 so their weight stays finite.
    """
    counts_t = torch.as_tensor(np.asarray(counts, dtype=np.float64)).clamp_min(1.0)
    if counts_t.ndim != 1 or counts_t.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {tuple(counts_t.shape)}")
    weights = counts_t.pow(-float(temperature))
    return (weights / weights.mean()).float()


class MultiLabelLoss:
    """Shared plumbing: class and sample weights, the framewise term, named terms. Subclasses set `name`."""

    name = "loss"

    def __init__(
        self,
        class_counts: Sequence[float] | None = None,
        *,
        class_weight_temperature: float,
        framewise_weight: float,
    ) -> None:
        # Uniform weights unless counts are given; the training loop passes counts at runtime.
        self.class_weight = None if class_counts is None else class_weights(class_counts, class_weight_temperature)
        self.framewise_weight = float(framewise_weight)

    def __call__(
        self, outputs: dict[str, torch.Tensor], target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Named loss terms with the total under "loss"."""
        clip_term = self._reduce(outputs["logits"], target, weight)
        terms = {self.name: clip_term}
        total = clip_term
        if self.framewise_weight > 0:
            framewise = outputs.get("framewise_logits")
            if framewise is None:
                raise ValueError("framewise_weight > 0 needs outputs['framewise_logits'] (use the SED head)")
            frame_term = self._reduce(framewise.amax(dim=1), target, weight)
            terms[f"framewise_{self.name}"] = frame_term
            total = total + self.framewise_weight * frame_term
        terms["loss"] = total
        return terms

    def _reduce(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Scalar loss: class weights, then per-sample reduction, then sample weights, then batch mean."""
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
        # Losses in float32 even under autocast: log-sigmoid/softmax of bf16 logits loses precision.
        logits, target = logits.float(), target.float()
        per_class = self.per_class(logits, target)
        if self.class_weight is not None:
            if self.class_weight.numel() != per_class.shape[1]:
                raise ValueError(f"{self.class_weight.numel()} class weights for {per_class.shape[1]} classes")
            per_class = per_class * self.class_weight.to(per_class.device)
        per_sample = self.reduce_classes(per_class)
        if weight is not None:
            per_sample = per_sample * weight.to(per_sample.device, torch.float32).reshape(-1)
        return per_sample.mean()

    def per_class(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unweighted loss per sample and class [B, C]."""
        raise NotImplementedError

    def reduce_classes(self, per_class: torch.Tensor) -> torch.Tensor:
        """[B, C] -> [B]; mean over classes unless the loss is defined as a sum."""
        return per_class.mean(dim=1)


class BCELoss(MultiLabelLoss):
    """Binary cross-entropy with logits, one independent sigmoid per class."""

    name = "bce"

    def per_class(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Elementwise BCE [B, C]."""
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none")


class SoftCrossEntropyLoss(MultiLabelLoss):
    """Cross-entropy with a softmax over classes against a soft target distribution.

    With `normalize_targets` each target row is divided by its sum, so a multi-hot row with k labels
    becomes 1/k each; an all-zero row (no class present) then contributes zero loss.
    """

    name = "soft_ce"

    def __init__(
        self,
        class_counts: Sequence[float] | None = None,
        *,
        class_weight_temperature: float,
        framewise_weight: float,
        normalize_targets: bool,
    ) -> None:
        super().__init__(class_counts, class_weight_temperature=class_weight_temperature,
                         framewise_weight=framewise_weight)
        self.normalize_targets = normalize_targets

    def per_class(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-q_c * log softmax(z)_c per class [B, C]."""
        if self.normalize_targets:
            target = target / target.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return -target * torch.log_softmax(logits, dim=1)

    def reduce_classes(self, per_class: torch.Tensor) -> torch.Tensor:
        """Cross-entropy sums over classes."""
        return per_class.sum(dim=1)


class FocalBCELoss(MultiLabelLoss):
    """Focal binary cross-entropy: BCE * |t - p|**gamma * (alpha*t + (1-alpha)*(1-t)).

    For 0/1 targets |t - p| equals 1 - p_t, the usual focal modulation (Lin et al. 2017); the
    absolute difference extends it to soft targets. alpha None disables the class-balance factor.
    """

    name = "focal"

    def __init__(
        self,
        class_counts: Sequence[float] | None = None,
        *,
        class_weight_temperature: float,
        framewise_weight: float,
        gamma: float,
        alpha: float | None,
    ) -> None:
        super().__init__(class_counts, class_weight_temperature=class_weight_temperature,
                         framewise_weight=framewise_weight)
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else float(alpha)

    def per_class(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Elementwise focal BCE [B, C]."""
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = bce * (target - torch.sigmoid(logits)).abs().pow(self.gamma)
        if self.alpha is not None:
            loss = loss * (self.alpha * target + (1 - self.alpha) * (1 - target))
        return loss
