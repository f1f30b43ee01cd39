"""Secrets given as overrides (xc.api_key=...) reach no record: config.yaml, manifest.json, model.pt, wandb."""

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from birdrounds.config import REDACTED, compose, is_secret_name, redact_argv, redact_secrets, redacted_argv
from birdrounds.model import load_checkpoint, save_checkpoint
from conftest import SECRET, config_model


def test_secret_names():
    for name in ("api_key", "key", "KEY", "xc.api_key", "access_token", "token", "db_password", "client_secret",
                 "credentials", "api-key"):
        assert is_secret_name(name), name
    for name in ("monkey", "keys", "keyword", "api_url", "tokenizer", "secretary", "run_name"):
        assert not is_secret_name(name), name


def test_redact_secrets_copies_and_keeps_the_live_value():
    cfg = compose([f"xc.api_key={SECRET}"])
    record = redact_secrets(cfg)
    assert record["xc"]["api_key"] == REDACTED and SECRET not in json.dumps(record)
    assert cfg.xc.api_key == SECRET  # the downloader still gets the real key
    assert record["xc"]["api_url"] == cfg.xc.api_url and record["data"]["root"] == cfg.data.root  # resolved
    assert redact_secrets(compose([]))["xc"]["api_key"] is None  # unset stays visible as unset
    nested = redact_secrets({"a": [{"token": "t0k"}, {"name": "x"}], "password": "", "b": ("p", {"secret": 1})})
    assert nested == {"a": [{"token": REDACTED}, {"name": "x"}], "password": "", "b": ["p", {"secret": REDACTED}]}


def test_redact_argv_and_context():
    argv = ["run.py", "experiment=smoke", f"xc.api_key={SECRET}", f"+wandb.token={SECRET}", "xc.api_key=", "key"]
    assert redact_argv(argv) == ["run.py", "experiment=smoke", f"xc.api_key={REDACTED}", f"+wandb.token={REDACTED}",
                                 "xc.api_key=", "key"]
    saved = sys.argv
    sys.argv = argv
    try:
        with redacted_argv():
            assert SECRET not in " ".join(sys.argv)
        assert sys.argv is argv
    finally:
        sys.argv = saved


def test_checkpoint_stores_redacted_config(tmp_path):
    model = config_model(2)  # model=tiny
    cfg = compose([f"xc.api_key={SECRET}"])
    save_checkpoint(tmp_path / "model.pt", model, ["a", "b"], cfg)
    assert SECRET.encode() not in (tmp_path / "model.pt").read_bytes()
    assert load_checkpoint(tmp_path / "model.pt")[1]["config"]["xc"]["api_key"] == REDACTED


def files_holding(folder: Path, needle: bytes) -> list[str]:
    """Every file under `folder` whose raw bytes contain `needle`."""
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes())


@pytest.mark.slow
def test_smoke_run_records_hold_no_secret(smoke_run):
    """A real run logged to offline wandb with the key on the command line: the shared smoke run is `make demo`
    with `ARGS=... logger=wandb xc.api_key=<key>` (conftest.smoke_run), so the key went to xc-download, every
    round and control of rounds/run.py, export and predict. It is in no file any of them or Hydra wrote."""
    home = smoke_run.home
    assert SECRET in " ".join(smoke_run.demo.args)  # it really was on the command line
    round_dir = smoke_run.run_dir / "round_0"
    (wandb_log,) = (round_dir / "wandb").glob("offline-run-*/run-*.wandb")
    # run folder, wandb runs (and wandb's own folders under home), Hydra's output, data, imports, export, cwd
    assert files_holding(home, SECRET.encode()) == []
    # The records are there and say the key was redacted, rather than the key being dropped silently.
    assert REDACTED.encode() in wandb_log.read_bytes()  # config and command line as wandb recorded them
    assert b"experiment=smoke" in wandb_log.read_bytes()  # the command line is still recorded
    assert OmegaConf.load(round_dir / "config.yaml").xc.api_key == REDACTED
    assert json.loads((round_dir / "manifest.json").read_text())["config"]["xc"]["api_key"] == REDACTED
    ckpt = torch.load(round_dir / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["xc"]["api_key"] == REDACTED and SECRET not in json.dumps(ckpt["config"])
    assert not list(home.rglob(".hydra"))  # configs/config.yaml: hydra.output_subdir null
