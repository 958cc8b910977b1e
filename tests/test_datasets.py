import gzip
import hashlib

import numpy as np
import pytest
import torch

from pyro_vae import DataError, IDXError, load_dataset, read_idx, write_idx
from pyro_vae.core.data import EMBEDDED_DIR


def test_embedded_data_is_shipped_intact():
    digest = hashlib.sha256((EMBEDDED_DIR / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    assert digest == "92844db5e7e28e7ac93429ac2dd6e8d22ec59066bbf2251eff103e4a123109f1"
    assert (EMBEDDED_DIR / "README.md").exists()


def test_embedded_splits_are_disjoint_shuffled_and_offline():
    train = load_dataset("mnist-5k", "train", need_labels=True)
    val = load_dataset("mnist-5k", "val", need_labels=True)
    assert train.images.shape == (4500, 784) and val.images.shape == (500, 784)
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    # shuffled: every class appears in the validation split, in proportion
    counts = torch.bincount(val.labels, minlength=10)
    assert counts.min() > 25
    rows = {tuple(r.tolist()) for r in (train.images[:, ::7] * 255).round().int()}
    assert not any(tuple(r.tolist()) in rows for r in (val.images[:, ::7] * 255).round().int())
    assert load_dataset("mnist-5k", "val").images.equal(val.images)  # fixed by split_seed


def test_mnist5k_has_no_test_split():
    with pytest.raises(DataError, match="no test split"):
        load_dataset("mnist-5k", "test")


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    array = (np.arange(2 * 3 * 5) % 7).reshape(2, 3, 5).astype(dtype)
    path = tmp_path / f"a{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, array)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "bad magic"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x12\x34\x08\x03" + b"\x00" * 20, "bad magic"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "truncated or corrupt"),
        (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02\x03\x04\x05")[:-6], "cannot read"),
    ],
)
def test_bad_idx_gives_clear_error(tmp_path, content, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(IDXError, match=message):
        read_idx(path)


def _write_split(folder, prefix, n, labels=True):
    rng = np.random.default_rng(0)
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    if labels:
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))


def test_folder_with_only_t10k_serves_test_split(tmp_path):
    _write_split(tmp_path, "t10k", 30, labels=False)
    test = load_dataset(data_dir=tmp_path, split="test")
    assert test.images.shape == (30, 784) and test.labels is None
    with pytest.raises(DataError, match="train-images"):
        load_dataset(data_dir=tmp_path, split="train")


def test_data_dir_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_dataset(data_dir=tmp_path / "missing")
    with pytest.raises(DataError, match="no files"):
        load_dataset(data_dir=tmp_path)
    _write_split(tmp_path, "train", 20)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8))
    with pytest.raises(IDXError, match="19 labels for 20 images"):
        load_dataset(data_dir=tmp_path, val_size=5)


def test_static_binarization_is_fixed():
    a = load_dataset("mnist-5k", "val", binarize="static")
    b = load_dataset("mnist-5k", "val", binarize="static")
    assert a.images.equal(b.images) and set(a.images.unique().tolist()) == {0.0, 1.0}
