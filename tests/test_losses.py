"""Losses against values worked out by hand with explicit formulas on tiny tensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from birdrounds.losses import BCELoss, FocalBCELoss, SoftCrossEntropyLoss, class_weights

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
LOGITS = [[0.0, 2.0, -1.0], [-1.0, 0.5, 3.0]]
TARGET = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


# The losses with neutral settings (no class weighting, the clip term only), given explicitly: the classes
# take every setting from configs/loss/*.yaml and hold no defaults of their own.
NEUTRAL = {"class_weight_temperature": 0.0, "framewise_weight": 0.0}


def BCE(**kwargs) -> BCELoss:  # noqa: N802 (named like the class it builds)
    return BCELoss(**{**NEUTRAL, **kwargs})


def SoftCE(**kwargs) -> SoftCrossEntropyLoss:  # noqa: N802
    return SoftCrossEntropyLoss(**{**NEUTRAL, "normalize_targets": True, **kwargs})


def Focal(**kwargs) -> FocalBCELoss:  # noqa: N802
    return FocalBCELoss(**{**NEUTRAL, **kwargs})


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def bce(z: float, t: float) -> float:
    p = sigmoid(z)
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def outputs(logits=LOGITS) -> dict[str, torch.Tensor]:
    return {"logits": torch.tensor(logits)}


def test_bce_matches_hand_computation():
    expected = sum(bce(z, t) for zr, tr in zip(LOGITS, TARGET) for z, t in zip(zr, tr)) / 6
    terms = BCE()(outputs(), torch.tensor(TARGET))
    assert set(terms) == {"loss", "bce"}
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert terms["bce"].item() == pytest.approx(expected, rel=1e-6)


def test_bce_with_sample_and_class_weights():
    counts, sample_weight = [1, 4, 16], [1.0, 0.25]
    raw = [c ** -0.5 for c in counts]  # temperature 0.5
    cw = [r / (sum(raw) / 3) for r in raw]
    expected = sum(
        sample_weight[i] * sum(cw[c] * bce(LOGITS[i][c], TARGET[i][c]) for c in range(3)) / 3 for i in range(2)
    ) / 2
    loss = BCE(class_counts=counts, class_weight_temperature=0.5)
    got = loss(outputs(), torch.tensor(TARGET), torch.tensor(sample_weight))["loss"]
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_soft_ce_normalises_multi_hot_rows():
    def row_ce(z, t):
        log_norm = math.log(sum(math.exp(v) for v in z))
        q = [v / sum(t) for v in t]
        return -sum(qc * (zc - log_norm) for qc, zc in zip(q, z))

    expected = (row_ce(LOGITS[0], TARGET[0]) + row_ce(LOGITS[1], TARGET[1])) / 2
    terms = SoftCE()(outputs(), torch.tensor(TARGET))
    assert set(terms) == {"loss", "soft_ce"}
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_soft_ce_empty_row_contributes_nothing_and_unnormalised_option():
    target = torch.tensor([[0.0, 0.0, 0.0], TARGET[1]])
    both = SoftCE()(outputs(), target)["loss"]
    second_only = SoftCE()(outputs([LOGITS[1]]), target[1:])["loss"]
    assert both.item() == pytest.approx(second_only.item() / 2, rel=1e-6)
    raw = SoftCE(normalize_targets=False)(outputs([LOGITS[0]]), torch.tensor([TARGET[0]]))["loss"]
    log_norm = math.log(sum(math.exp(v) for v in LOGITS[0]))
    assert raw.item() == pytest.approx(-(LOGITS[0][0] - log_norm) - (LOGITS[0][2] - log_norm), rel=1e-6)


def test_focal_matches_hand_computation():
    gamma, alpha = 2.0, 0.25

    def focal(z, t):
        p = sigmoid(z)
        p_t = p if t == 1 else 1 - p
        alpha_t = alpha if t == 1 else 1 - alpha
        return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)

    expected = sum(focal(z, t) for zr, tr in zip(LOGITS, TARGET) for z, t in zip(zr, tr)) / 6
    terms = Focal(gamma=gamma, alpha=alpha)(outputs(), torch.tensor(TARGET))
    assert set(terms) == {"loss", "focal"}
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-6)
    # gamma 0 and no alpha is plain BCE.
    plain = Focal(gamma=0.0, alpha=None)(outputs(), torch.tensor(TARGET))["loss"]
    assert plain.item() == pytest.approx(BCE()(outputs(), torch.tensor(TARGET))["loss"].item(), rel=1e-6)


def test_framewise_term_uses_max_over_time():
    framewise = torch.tensor([[[0.0, -2.0, 1.0], [1.0, 3.0, -1.0]]])  # [B=1, T=2, C=3]
    target = torch.tensor([[1.0, 0.0, 0.0]])
    out = {"logits": torch.tensor([[0.5, 0.0, -0.5]]), "framewise_logits": framewise}
    clip = (bce(0.5, 1) + bce(0.0, 0) + bce(-0.5, 0)) / 3
    frame = (bce(1.0, 1) + bce(3.0, 0) + bce(1.0, 0)) / 3
    terms = BCE(framewise_weight=0.5)(out, target)
    assert terms["bce"].item() == pytest.approx(clip, rel=1e-6)
    assert terms["framewise_bce"].item() == pytest.approx(frame, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(clip + 0.5 * frame, rel=1e-6)
    with pytest.raises(ValueError, match="framewise_logits"):
        BCE(framewise_weight=0.5)(outputs(), torch.tensor(TARGET))


def test_class_weights_temperature_extremes():
    counts = [1, 10, 100, 0]
    assert torch.equal(class_weights(counts, 0.0), torch.ones(4))
    inverse = class_weights(counts, 1.0)
    assert inverse.mean().item() == pytest.approx(1.0, rel=1e-6)
    # inverse frequency: weight * count is constant (a zero count counts as one)
    products = inverse * torch.tensor([1.0, 10.0, 100.0, 1.0])
    assert torch.allclose(products, products[0].expand(4))
    mid = class_weights(counts, 0.5)
    assert mid[0] / mid[2] == pytest.approx(10.0, rel=1e-5)


def test_loss_errors_and_gradients():
    with pytest.raises(ValueError, match="shape"):
        BCE()(outputs(), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="class weights"):
        BCE(class_counts=[1, 2])(outputs(), torch.tensor(TARGET))
    logits = torch.tensor(LOGITS, requires_grad=True)
    SoftCE()({"logits": logits}, torch.tensor(TARGET))["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name,cls", [("bce", BCELoss), ("soft_ce", SoftCrossEntropyLoss), ("focal", FocalBCELoss)])
def test_loss_configs_build(name, cls):
    loss = instantiate(OmegaConf.load(CONFIG_DIR / "loss" / f"{name}.yaml"))(class_counts=[5, 50, 500])
    assert isinstance(loss, cls)
    terms = loss(outputs(), torch.tensor(TARGET), torch.ones(2))
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
    assert name in terms
