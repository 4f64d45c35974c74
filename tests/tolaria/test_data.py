"""Datasets: bundled digits, MNIST-1D generation + cache, CIFAR python batches, teacher-student."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from esper.tolaria.config import DataConfig
from esper.tolaria.data import DataError, epoch_order, load_dataset, train_batches


def test_digits_splits_are_disjoint_and_seeded():
    a = load_dataset(DataConfig(name="digits"), seed=0)
    b = load_dataset(DataConfig(name="digits"), seed=0)
    c = load_dataset(DataConfig(name="digits"), seed=1)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert torch.equal(a.train.x, b.train.x)  # same seed, same split
    assert not torch.equal(a.train.x, c.train.x)  # paired seeds differ by seed index
    rows = {tuple(r.tolist()) for r in a.train.x.flatten(1)}
    overlap = sum(tuple(r.tolist()) in rows for r in a.test.x.flatten(1))
    assert overlap < 0.05 * len(a.test)  # digits has a few duplicate images; no index is shared


def test_epoch_order_is_a_pure_function():
    assert torch.equal(epoch_order(100, 3, 5), epoch_order(100, 3, 5))
    assert not torch.equal(epoch_order(100, 3, 5), epoch_order(100, 3, 6))
    ds = load_dataset(DataConfig(name="digits"), seed=0)
    full = [b for b, _, _ in train_batches(ds, 64, 0, 2)]
    tail = list(train_batches(ds, 64, 0, 2, start=3))
    assert full[3:] == [b for b, _, _ in tail]
    ref = list(train_batches(ds, 64, 0, 2))[3]
    assert torch.equal(ref[1], tail[0][1])  # a mid-epoch resume sees the same batch


def test_teacher_student_is_learnable_and_fixed():
    cfg = DataConfig(name="teacher_student", synthetic_samples=500, synthetic_features=8, synthetic_classes=3)
    a = load_dataset(cfg, seed=0)
    assert a.input_shape == (8,) and a.num_classes == 3
    counts = torch.bincount(torch.cat([a.train.y, a.val.y, a.test.y]), minlength=3)
    assert int(counts.min()) > 0  # every class appears


def test_mnist1d_generated_with_published_settings_and_cached(tmp_path):
    cfg = DataConfig(name="mnist1d", data_dir=str(tmp_path))
    ds = load_dataset(cfg, seed=0)
    cache = tmp_path / "mnist1d" / "mnist1d_default.npz"
    assert cache.is_file()
    # Published defaults: 5000 samples, 80/20 train/test split, sequences of length 40.
    assert len(ds.train) + len(ds.val) == 4000 and len(ds.test) == 1000
    assert ds.input_shape == (1, 40)
    again = load_dataset(cfg, seed=0)  # from the cache
    assert torch.equal(ds.test.x, again.test.x)


def _write_cifar(root: Path, num_classes: int, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    key = b"labels" if num_classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if num_classes == 10 else ["train", "test"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key: [int(v) for v in rng.integers(0, num_classes, n)]}
        with (folder / name).open("wb") as fh:
            pickle.dump(batch, fh)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_python_batches(tmp_path, num_classes):
    _write_cifar(tmp_path, num_classes)
    ds = load_dataset(DataConfig(name=f"cifar{num_classes}", data_dir=str(tmp_path), val_fraction=0.2), seed=0)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == num_classes
    assert ds.train.x.dtype == torch.uint8
    _, x, _ = next(iter(train_batches(ds, 2, 0, 0, augment=True)))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32)


def test_cifar_missing_file_is_named(tmp_path):
    _write_cifar(tmp_path, 10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing file '.*data_batch_3'; expected the python batch format"):
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path)), seed=0)
    with pytest.raises(DataError, match="missing file"):
        load_dataset(DataConfig(name="cifar100", data_dir=str(tmp_path / "nowhere")), seed=0)


def test_cifar_batch_with_code_is_refused(tmp_path):
    _write_cifar(tmp_path, 100)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with (tmp_path / "cifar-100-python" / "train").open("wb") as fh:
        pickle.dump({b"data": Evil()}, fh)
    with pytest.raises(DataError, match="unreadable"):
        load_dataset(DataConfig(name="cifar100", data_dir=str(tmp_path)), seed=0)
