"""`model.pretrained=true`: timm's weights through the Hugging Face cache, fetched from a local server posing as
the hub (no network in tests), then offline; `birdrounds fetch-weights`; one line when they cannot be had."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save

from fake_hub import FakeHub
from conftest import run_entry

BACKBONE, REPO_ID = "test_efficientnet", "timm/test_efficientnet.r160_in1k"  # model=tiny's backbone
WEIGHTS_URL = f"/{REPO_ID}/resolve/main/model.safetensors"
PROBE_KEY = "blocks.1.0.conv_pwl.weight"  # a tensor timm loads unchanged into a 1-channel model
LOAD = ("import sys, torch; from birdrounds.model import build_backbone; "
        f"b = build_backbone('{BACKBONE}', pretrained=True); torch.save(b.state_dict()['{PROBE_KEY}'], sys.argv[1])")


@pytest.fixture(scope="module")
def served_weights() -> dict[str, torch.Tensor]:
    """ImageNet-shaped weights for the backbone, seeded to differ from any random init."""
    import timm

    torch.manual_seed(123)
    model = timm.create_model(BACKBONE, pretrained=False)
    return {k: (torch.randn_like(v) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}


def hf_env(hub_url: str, hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub_url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def test_fetch_then_load_offline(served_weights, tmp_path):
    hf_home = tmp_path / "hf"
    with FakeHub({WEIGHTS_URL: save(served_weights)}) as hub:
        fetched = subprocess.run([sys.executable, "-m", "birdrounds.cli", "fetch-weights", "experiment=smoke"],
                                 capture_output=True, text=True, env=hf_env(hub.url, hf_home), timeout=300)
        assert fetched.returncode == 0, fetched.stderr[-3000:]
        assert hub.downloads() == [WEIGHTS_URL]
    assert f"{BACKBONE}: {REPO_ID} is in {hf_home / 'hub'}" in fetched.stdout
    assert list((hf_home / "hub").rglob("model.safetensors"))
    # The hub is gone and the machine offline: the weights come from the cache, exactly as served.
    out = tmp_path / "probe.pt"
    loaded = subprocess.run([sys.executable, "-c", LOAD, str(out)], capture_output=True, text=True, timeout=300,
                            env=hf_env("http://127.0.0.1:9", hf_home, HF_HUB_OFFLINE="1"))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert torch.equal(torch.load(out), served_weights[PROBE_KEY])


def test_checkpoints_rebuild_without_the_hub(served_weights, tmp_path, monkeypatch):
    # A model trained from pretrained weights is saved with model.pretrained=true; loading it never asks the hub.
    from birdrounds.model import BirdModel, load_checkpoint, save_checkpoint

    monkeypatch.setattr("birdrounds.model.hub_weights", lambda *a, **k: pytest.fail("the hub was asked"))
    from birdrounds.config import shipped_config

    model_kwargs = OmegaConf.to_container(shipped_config("model", "model=tiny", "data.root=x"), resolve=True)
    model = BirdModel(num_classes=2, **{**{k: v for k, v in model_kwargs.items() if not k.startswith("_")},
                                        "backbone": BACKBONE})
    model.init_kwargs["pretrained"] = True
    save_checkpoint(tmp_path / "model.pt", model, ["a", "b"])
    rebuilt, ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["model_kwargs"]["pretrained"] is True
    assert torch.equal(rebuilt.state_dict()[f"backbone.{PROBE_KEY}"], model.state_dict()[f"backbone.{PROBE_KEY}"])


@pytest.mark.slow
def test_offline_without_the_weights_is_one_line(smoke_data, tmp_path):
    env = hf_env("http://127.0.0.1:9", tmp_path / "empty_hf", HF_HUB_OFFLINE="1")
    proc = run_entry(smoke_data, "logger=none", "model.pretrained=true", f"run_dir={tmp_path / 'run'}",
                     **{k: v for k, v in env.items() if k.startswith("HF_")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(errors) == 1, errors
    assert f"model.pretrained: timm weights for {BACKBONE} ({REPO_ID})" in errors[0]
    assert "HF_HUB_OFFLINE is set" in errors[0] and "birdrounds fetch-weights" in errors[0]
