"""MNIST-1D generation settings (data.mnist1d.*): passed to the package, cached apart, validated."""

from __future__ import annotations

import pytest
import torch

from esper.tolaria.config import ConfigError, load_config
from esper.tolaria.data import MNIST1D_CACHE, load_dataset, mnist1d_cache_name

SMALL = ["data.name=mnist1d", "data.mnist1d.num_samples=400"]


def _load(tmp_path, *overrides):
    cfg = load_config(None, [*SMALL, f"data.data_dir={tmp_path}", *overrides])
    return cfg, load_dataset(cfg.data, 0)


def test_shuffle_seq_permutes_positions_of_the_same_samples(tmp_path):
    _, plain = _load(tmp_path)
    _, shuffled = _load(tmp_path, "data.mnist1d.shuffle_seq=true")
    assert torch.equal(plain.test.y, shuffled.test.y)
    assert not torch.allclose(plain.test.x, shuffled.test.x)
    # Every sample holds the same values, only at other positions (one fixed permutation).
    assert torch.allclose(plain.test.x.sort(dim=-1).values, shuffled.test.x.sort(dim=-1).values, atol=1e-5)
    perm = [int((shuffled.test.x[0, 0] - plain.test.x[0, 0, j]).abs().argmin()) for j in range(40)]
    assert torch.allclose(shuffled.test.x[:, 0, perm], plain.test.x[:, 0, :], atol=1e-5)


def test_settings_reach_the_generator_and_get_their_own_cache(tmp_path):
    cfg, ds = _load(tmp_path, "data.mnist1d.final_seq_length=24", "data.mnist1d.train_split=0.5")
    assert ds.input_shape == (1, 24) and len(ds.test) == 200
    name = mnist1d_cache_name(cfg.data.mnist1d)
    assert name != MNIST1D_CACHE and (tmp_path / name).is_file()
    assert mnist1d_cache_name(load_config(None, ["data.name=mnist1d"]).data.mnist1d) == MNIST1D_CACHE


@pytest.mark.parametrize("override, key", [
    ("data.mnist1d.train_split=1.5", "data.mnist1d.train_split"),
    ("data.mnist1d.padding=[5]", "data.mnist1d.padding"),
    ("data.mnist1d.final_seq_length=0", "data.mnist1d.final_seq_length"),
    ("data.mnist1d.shuffle=true", "data.mnist1d.shuffle"),
])
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["data.name=mnist1d", override])
