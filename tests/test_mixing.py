"""Mixing labeled clips with pseudo-labeled chunks: contract, exact values, reproducibility."""

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from birdrounds.config import compose
from birdrounds.data.audio import AudioDecodeError, DirectAudio
from birdrounds.data.clips import ClipDataset
from birdrounds.mixing import (
    ConcatPseudoDataset,
    MixupMaxDataset,
    PseudoChunkDataset,
    ReplaceDataset,
    make_mixed_dataset,
)

SR = 10
CLASSES = ["a", "b", "c"]


class MemoryAudio:
    """In-memory audio source; a path mapped to None is undecodable."""

    sample_rate_hz = SR

    def __init__(self, waves):
        self.waves = waves

    def load(self, path):
        wave = self.waves[str(path)]
        if wave is None:
            raise AudioDecodeError(f"bad {path}")
        return wave


def _labeled(audio):
    table = pd.DataFrame({"primary_label": ["a", "b", "c", "a"], "secondary_labels": [[], [], [], []],
                          "path": ["l0", "l1", "l2", "l3"], "rating": [5.0] * 4})
    return ClipDataset(table, CLASSES, audio, window_s=5.0, window_mode="center", secondary_weight=0.0)


def _pseudo(audio, window_s=5.0):
    rows = pd.DataFrame({"file": ["s1", "s1", "s2"], "start_s": [0.0, 5.0, 0.0], "end_s": [5.0, 10.0, 5.0]})
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.0], [0.6, 0.0, 0.3]], dtype=np.float32)
    return PseudoChunkDataset(rows, probs, audio, window_s=window_s)


@pytest.fixture
def audio():
    waves = {f"l{i}": np.full(50, 1.0, np.float32) for i in range(4)}
    waves["s1"] = np.concatenate([np.full(50, 0.2), np.full(50, 0.4)]).astype(np.float32)
    waves["s2"] = np.full(50, 0.6, np.float32)
    return MemoryAudio(waves)


def test_pseudo_chunk_items_from_real_files(tmp_path):
    wave = np.arange(150, dtype=np.float32) / 1000
    path = tmp_path / "sc.wav"
    sf.write(path, wave, SR, subtype="FLOAT")
    rows = pd.DataFrame({"file": [str(path), str(path)], "start_s": [5.0, 10.0], "end_s": [10.0, 15.0]})
    probs = np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32)
    data = PseudoChunkDataset(rows, probs, DirectAudio(SR), window_s=10.0)
    item = data[0]  # chunk [5, 10) centred in a 10-s window: [2.5, 12.5) -> samples 25..125
    np.testing.assert_allclose(item["audio"].numpy(), wave[25:125], atol=1e-7)
    np.testing.assert_allclose(item["target"].numpy(), [0.1, 0.2])
    assert float(item["weight"]) == 1.0
    tail = data[1]["audio"].numpy()  # [7.5, 17.5): 75 real samples then zero padding
    np.testing.assert_allclose(tail[:75], wave[75:150], atol=1e-7)
    assert not tail[75:].any()


def test_undecodable_pseudo_file_is_silent_with_zero_weight(audio, caplog):
    audio.waves["s2"] = None
    item = _pseudo(audio)[2]
    assert float(item["weight"]) == 0.0 and not item["audio"].any()
    assert "s2" in caplog.text


def test_mixup_max_exact_values_and_reproducible(audio):
    data = MixupMaxDataset(_labeled(audio), _pseudo(audio), mix_weight=0.5, seed=3)
    pseudo_audio = {0: 0.2, 1: 0.4, 2: 0.6}
    pseudo_probs = _pseudo(audio).probs
    for i in range(len(data)):
        item = data[i]
        level = float(item["audio"][0]) * 2 - 1.0  # 0.5 * 1.0 + 0.5 * v
        chunk = min(pseudo_audio, key=lambda k: abs(pseudo_audio[k] - level))
        assert abs(pseudo_audio[chunk] - level) < 1e-6
        labeled_target = np.eye(3, dtype=np.float32)[[0, 1, 2, 0][i]]
        np.testing.assert_allclose(item["target"].numpy(), np.maximum(labeled_target, pseudo_probs[chunk]))
        assert set(item) == {"audio", "target", "weight"}
        torch.testing.assert_close(data[i]["audio"], item["audio"])
    draws = []
    for epoch in range(6):
        data.set_epoch(epoch)
        draws.append(tuple(round(float(data[i]["audio"][0]), 4) for i in range(len(data))))
    assert len(set(draws)) > 1  # epochs draw different partners


def test_file_weighted_draws_skip_zero_weight_files(audio):
    labeled, pseudo = _labeled(audio), _pseudo(audio)
    data = MixupMaxDataset(labeled, pseudo, mix_weight=0.5, seed=0, pseudo_weights=np.array([0.0, 0.0, 1.0]))
    for epoch in range(5):
        data.set_epoch(epoch)
        assert all(abs(float(data[i]["audio"][0]) - 0.8) < 1e-6 for i in range(len(data)))  # always s2 (0.6)
    weighted = make_mixed_dataset(labeled, pseudo, strategy="mixup_max", seed=0, file_weighted=True, mix_weight=0.5)
    np.testing.assert_allclose(weighted.pseudo_weights, [1.6, 1.6, 0.9], rtol=1e-6)


def test_replace_same_class_and_probability(audio):
    labeled, pseudo = _labeled(audio), _pseudo(audio)
    always = ReplaceDataset(labeled, pseudo, replace_prob=1.0, class_threshold=0.5, seed=0)
    # class a: chunks 0 (0.9) and 2 (0.6); class b: chunk 1 (0.7); class c: none -> labeled kept.
    for i, allowed in [(0, {0.2, 0.6}), (1, {0.4}), (3, {0.2, 0.6})]:
        assert round(float(always[i]["audio"][0]), 4) in allowed
    assert float(always[2]["audio"][0]) == 1.0
    np.testing.assert_allclose(always[2]["target"].numpy(), [0, 0, 1])
    never = ReplaceDataset(labeled, pseudo, replace_prob=0.0, class_threshold=0.5, seed=0)
    assert all(float(never[i]["audio"][0]) == 1.0 for i in range(4))
    some = ReplaceDataset(labeled, pseudo, replace_prob=0.4, class_threshold=0.5, seed=1)
    replaced = 0
    for epoch in range(100):
        some.set_epoch(epoch)
        replaced += float(some[1]["audio"][0]) != 1.0
    assert 25 <= replaced <= 55


def test_concat_lengths_items_and_weights(audio):
    data = ConcatPseudoDataset(_labeled(audio), _pseudo(audio), ratio=0.5, seed=0)
    assert len(data) == 6
    assert float(data[3]["audio"][0]) == 1.0
    assert round(float(data[4]["audio"][0]), 4) in {0.2, 0.4, 0.6}
    w = data.sample_weights(np.array([1.0, 1.0, 2.0, 0.0]))
    np.testing.assert_allclose(w, [1 / 6, 1 / 6, 2 / 6, 0, 1 / 6, 1 / 6])


@pytest.mark.parametrize("name", ["none", "first_2025", "second_2025", "fourth_2025"])
def test_presets_build_and_collate(audio, name):
    cfg = compose([f"pseudo={name}"]).pseudo  # the preset over configs/pseudo/_base.yaml
    data = instantiate(cfg.mixing)(labeled=_labeled(audio), pseudo=_pseudo(audio), seed=0)
    data.set_epoch(1)
    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch["audio"].shape == (4, 50) and batch["target"].shape == (4, 3) and batch["weight"].shape == (4,)


def test_unknown_strategy_rejected(audio):
    with pytest.raises(ValueError, match="strategy"):
        make_mixed_dataset(_labeled(audio), _pseudo(audio), strategy="blend", seed=0, file_weighted=False)
    with pytest.raises(ValueError, match=r"^pseudo\.mixing\.ratio: strategy concat needs it"):
        make_mixed_dataset(_labeled(audio), _pseudo(audio), strategy="concat", seed=0, file_weighted=False,
                           mix_weight=0.5)  # a mixup_max preset with only its strategy overridden


def test_items_independent_of_worker_count_and_epoch_propagates(audio):
    data = make_mixed_dataset(_labeled(audio), _pseudo(audio), strategy="mixup_max", seed=5, file_weighted=False,
                              mix_weight=0.5)
    data.set_epoch(3)
    assert data.labeled.epoch == 3
    single = next(iter(DataLoader(data, batch_size=4, num_workers=0)))
    multi = torch.cat([b["audio"] for b in DataLoader(data, batch_size=2, num_workers=2)])
    torch.testing.assert_close(multi, single["audio"])
