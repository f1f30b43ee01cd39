"""Data preparation refuses, in one line, a train.csv that leaves nothing to train on."""

import pandas as pd
import pytest

from birdrounds import cli
from birdrounds.config import ConfigError, compose
from birdrounds.data.prepare import prepare_data


def test_a_train_csv_without_usable_rows_is_one_line(home):
    assert cli.main(["synth", "experiment=smoke"]) == 0
    root = home / "data" / "synthetic_smoke"
    train = pd.read_csv(root / "train.csv")
    train["filename"] = [f"{label}/gone_{i}.ogg" for i, label in enumerate(train["primary_label"])]
    train.to_csv(root / "train.csv", index=False)  # every listed file is missing
    cfg = compose(["experiment=smoke"])
    with pytest.raises(ConfigError, match=rf"^data\.train_csv: no usable rows in .*train\.csv \({len(train)} listed files missing"):
        prepare_data(cfg.data, progress=False)
