"""BirdModel: frontend, heads, SpecAugment, pretrained weights from a local file, checkpoints, configs, ONNX."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from birdrounds.config import compose
from birdrounds.model import BirdModel, MelFrontend, SpecAugment, checkpoint_hash, load_checkpoint, save_checkpoint
from conftest import config_model

SAMPLE_RATE_HZ = 16000
N_SAMPLES = SAMPLE_RATE_HZ  # 1 s keeps every test fast
NUM_CLASSES = 4
# configs/model/tiny.yaml (timm's 0.1M-parameter test network) at 16 kHz with a finer STFT: its hop of
# 2048 would leave a 1-s clip 8 frames, too few for the SED head's framewise output and SpecAugment.
MASKS = dict(freq_masks=2, freq_mask_width=16, time_masks=2, time_mask_width=32)  # SpecAugment's sizes
TINY_OVERRIDES = dict(sample_rate_hz=SAMPLE_RATE_HZ, n_fft=512, hop_length=256)


def tiny_model(**overrides) -> BirdModel:
    torch.manual_seed(0)
    return config_model(NUM_CLASSES, **{**TINY_OVERRIDES, **overrides})


def waves(batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, N_SAMPLES, generator=gen)


@pytest.mark.parametrize("head,pool", [("sed", "avg"), ("clip", "avg"), ("clip", "gem")])
def test_forward_backward_shapes_and_finite_gradients(head, pool):
    model = tiny_model(head=head, pool=pool, spec_augment={**MASKS, "p": 1.0}).train()
    out = model(waves(3))
    assert out["logits"].shape == (3, NUM_CLASSES)
    if head == "sed":
        frames = out["framewise_logits"]
        assert frames.shape[0] == 3 and frames.shape[2] == NUM_CLASSES and frames.shape[1] >= 2
    else:
        assert "framewise_logits" not in out
    out["logits"].sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.head.fc.weight.grad.abs().sum() > 0 if head == "clip" else model.head.cla.weight.grad.abs().sum() > 0
    if pool == "gem":
        assert model.head.pool.p.grad is not None and model.head.pool.p.grad != 0


def test_sed_clip_logits_are_attention_weighted_framewise_logits():
    model = tiny_model(head="sed").eval()
    with torch.no_grad():
        out = model(waves(2))
    frames = out["framewise_logits"]
    # An attention-weighted mean lies between the smallest and largest framewise logit.
    assert (out["logits"] <= frames.amax(dim=1) + 1e-5).all()
    assert (out["logits"] >= frames.amin(dim=1) - 1e-5).all()


def test_eval_is_deterministic_and_spec_augment_acts_only_in_training():
    model = tiny_model(spec_augment=dict(freq_masks=2, freq_mask_width=8, time_masks=2, time_mask_width=10, p=1.0))
    wave = waves(2)
    model.eval()
    with torch.no_grad():
        first, second = model(wave)["logits"], model(wave)["logits"]
    assert torch.equal(first, second)
    spec = model.frontend(wave)
    assert model.spec_augment(spec) is spec
    model.train()
    torch.manual_seed(1)
    masked = model.spec_augment(spec)
    assert not torch.equal(masked, spec)
    changed = (masked != spec).float().mean()
    assert 0 < changed < 0.9


def test_spec_augment_masks_whole_bands_filled_with_sample_mean():
    aug = SpecAugment(freq_masks=1, freq_mask_width=4, time_masks=0, time_mask_width=0, p=1.0).train()
    spec = torch.randn(8, 1, 16, 20)
    torch.manual_seed(0)
    out = aug(spec)
    changed_rows = (out != spec).any(dim=3)  # [B, 1, n_mels]: a frequency mask changes whole mel rows
    assert changed_rows.any()
    mean = spec.mean(dim=(1, 2, 3), keepdim=True).expand_as(spec)
    row_mask = changed_rows[..., None].expand_as(spec)
    assert torch.allclose(out[row_mask], mean[row_mask])
    assert changed_rows.sum(dim=2).max() <= 4
    none_applied = SpecAugment(**MASKS, p=0.0).train()(spec)
    assert torch.equal(none_applied, spec)


def test_frontend_shape_and_per_sample_normalisation():
    wave = waves(2)
    for norm in ("standard", "minmax", "standard_minmax"):
        spec = MelFrontend(SAMPLE_RATE_HZ, 512, 256, 32, 50.0, 8000.0, 80.0, norm)(wave)
        assert spec.shape == (2, 1, 32, N_SAMPLES // 256 + 1)
        per_sample = spec.flatten(1)
        if norm == "standard":
            assert torch.allclose(per_sample.mean(1), torch.zeros(2), atol=1e-4)
            assert torch.allclose(per_sample.std(1), torch.ones(2), atol=1e-3)
        else:
            assert torch.allclose(per_sample.amin(1), torch.zeros(2), atol=1e-5)
            assert torch.allclose(per_sample.amax(1), torch.ones(2), atol=1e-4)


def test_frontend_is_per_sample_whatever_the_batch_holds():
    # top_db clamps relative to each sample's own peak, so a loud neighbour must not change a quiet clip.
    frontend = MelFrontend(SAMPLE_RATE_HZ, 512, 256, 32, 50.0, 8000.0, 80.0, "standard")
    quiet = 1e-3 * waves(1)
    loud = 100.0 * waves(1, seed=1)
    alone = frontend(quiet)
    together = frontend(torch.cat([quiet, loud]))[:1]
    assert torch.allclose(alone, together, atol=1e-5)


def test_frontend_silence_is_finite_and_runs_in_float32_under_autocast():
    frontend = MelFrontend(SAMPLE_RATE_HZ, 512, 256, 32, 50.0, 8000.0, 80.0, "standard_minmax")
    silent = frontend(torch.zeros(1, N_SAMPLES))
    assert torch.isfinite(silent).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spec = frontend(waves(1))
    assert spec.dtype == torch.float32


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="head"):
        tiny_model(head="transformer")
    with pytest.raises(ValueError, match="norm"):
        tiny_model(norm="pcen")
    with pytest.raises(ValueError, match="f_max_hz"):
        tiny_model(f_max_hz=12000.0)  # above Nyquist at 16 kHz
    with pytest.raises(FileNotFoundError):
        tiny_model(pretrained_path="/nonexistent/weights.pth")


def test_pretrained_path_loads_local_weights(tmp_path):
    torch.manual_seed(123)
    source = timm.create_model("test_efficientnet", in_chans=1, num_classes=0, global_pool="")
    weights = tmp_path / "weights.pth"
    torch.save(source.state_dict(), weights)
    model = tiny_model(pretrained_path=str(weights))
    loaded = model.backbone.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    assert not all(torch.equal(tiny_model().backbone.state_dict()[k], v) for k, v in loaded.items())


def test_pretrained_rgb_classifier_weights_are_adapted(tmp_path):
    # ImageNet-style file: 3 input channels and a 1000-class classifier; timm sums the stem over RGB.
    torch.manual_seed(7)
    source = timm.create_model("test_efficientnet", in_chans=3, num_classes=1000).state_dict()
    weights = tmp_path / "rgb.pth"
    torch.save(source, weights)
    loaded = tiny_model(pretrained_path=str(weights)).backbone.state_dict()
    assert torch.allclose(loaded["conv_stem.weight"], source["conv_stem.weight"].sum(dim=1, keepdim=True))
    assert "classifier.weight" not in loaded
    rest = [k for k in loaded if k != "conv_stem.weight"]
    assert rest and all(torch.equal(loaded[k], source[k]) for k in rest)


def test_checkpoint_round_trip_from_file_alone(tmp_path):
    weights = tmp_path / "pretrained.pth"
    torch.save(timm.create_model("test_efficientnet", in_chans=1, num_classes=0).state_dict(), weights)
    model = tiny_model(head="sed", spec_augment={**MASKS, "p": 0.5}, pretrained_path=str(weights))
    with torch.no_grad():  # move BatchNorm statistics away from their initial values
        model.train()(waves(4, seed=3))
    model.eval()
    classes = [f"sp{i}" for i in range(NUM_CLASSES)]
    config = OmegaConf.create({"data": {"sample_rate_hz": SAMPLE_RATE_HZ}, "sr": "${data.sample_rate_hz}"})
    path = tmp_path / "round_0" / "model.pt"
    save_checkpoint(path, model, classes, config=config, extra={"window_s": 5.0, "auc": np.float64(0.75), "dir": tmp_path})
    weights.unlink()  # rebuilding must not need the pretrained file

    rebuilt, ckpt = load_checkpoint(path)
    assert not rebuilt.training
    with torch.no_grad():
        assert torch.equal(model(waves(2))["logits"], rebuilt(waves(2))["logits"])
    assert ckpt["classes"] == classes
    assert ckpt["audio"] == {"sample_rate_hz": SAMPLE_RATE_HZ, "window_s": 5.0}
    assert ckpt["config"] == {"data": {"sample_rate_hz": SAMPLE_RATE_HZ}, "sr": SAMPLE_RATE_HZ}
    assert ckpt["extra"] == {"window_s": 5.0, "auc": 0.75, "dir": str(tmp_path)}
    assert ckpt["model_kwargs"]["pretrained_path"] == str(weights)
    assert rebuilt.init_kwargs["pretrained_path"] is None
    assert ckpt["format_version"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left behind
    assert checkpoint_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_save_checkpoint_rejects_wrong_class_count(tmp_path):
    with pytest.raises(ValueError, match="class names"):
        save_checkpoint(tmp_path / "m.pt", tiny_model(), ["only_one"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["tiny", "demo", "sed_effnet_b0"])
def test_model_configs_build_and_run(name):
    sample_rate_hz = 32000 if name == "sed_effnet_b0" else SAMPLE_RATE_HZ
    cfg = compose([f"model={name}", f"data.sample_rate_hz={sample_rate_hz}"])
    model = instantiate(cfg.model)(num_classes=NUM_CLASSES)
    assert isinstance(model, BirdModel)
    assert model.init_kwargs["sample_rate_hz"] == sample_rate_hz
    assert model.init_kwargs["spec_augment"] is None or type(model.init_kwargs["spec_augment"]) is dict
    with torch.no_grad():
        out = model.eval()(0.1 * torch.randn(2, sample_rate_hz))
    assert out["logits"].shape == (2, NUM_CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["sed", "clip"])
def test_onnx_export_matches_pytorch(tmp_path, head):
    import onnxruntime as ort

    model = tiny_model(head=head, pool="gem", norm="standard_minmax", spec_augment={**MASKS, "p": 1.0}).eval()
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(model, (waves(2),), dynamo=True, dynamic_shapes=({0: batch},))
    onnx_path = tmp_path / "model.onnx"
    program.save(str(onnx_path))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    wave = waves(3, seed=5)  # another batch size than at export
    got = session.run(None, {session.get_inputs()[0].name: wave.numpy()})
    with torch.no_grad():
        want = model(wave)
    assert len(got) == len(want)
    for onnx_out, torch_out in zip(got, want.values()):
        np.testing.assert_allclose(onnx_out, torch_out.numpy(), atol=1e-4, rtol=1e-4)
