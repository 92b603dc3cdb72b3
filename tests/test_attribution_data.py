"""Image data sets of the attribution workload: built-ins, ImageFolder, MNIST IDX."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.images import dataset_labels, image_dataset, read_idx, write_idx

torch.set_num_threads(1)


def _check_item(item, channels: int, size: int) -> None:
    x, y = item
    assert x.shape == (channels, size, size)
    assert x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert isinstance(y, int)


def test_digits_split_and_shape():
    train = image_dataset("digits", 16, 1, train=True, seed=0)
    test = image_dataset("digits", 16, 1, train=False, seed=0)
    assert len(train) + len(test) == 1797  # scikit-learn's digits, split 80/20
    assert abs(len(train) / 1797 - 0.8) < 0.01
    _check_item(train[0], 1, 16)
    _check_item(image_dataset("digits", 32, 3, train=True, seed=0)[3], 3, 32)
    assert float(train[0][0].max()) > 0.5  # strokes are bright, not an all-black image
    assert dataset_labels(train) == 10
    # Train and test are disjoint: no test image also appears in the training set.
    tr = torch.stack([train[i][0] for i in range(len(train))]).flatten(1)
    te = torch.stack([test[i][0] for i in range(len(test))]).flatten(1)
    assert torch.cdist(te[:50], tr).min() > 0


def test_digits_split_depends_on_seed():
    a = image_dataset("digits", 16, 1, train=False, seed=0)
    b = image_dataset("digits", 16, 1, train=False, seed=1)
    assert not torch.equal(a[0][0], b[0][0]) or not torch.equal(a[1][0], b[1][0])


def test_shapes_deterministic_by_seed():
    a = image_dataset("shapes", 16, 3, train=True, seed=3)
    b = image_dataset("shapes", 16, 3, train=True, seed=3)
    c = image_dataset("shapes", 16, 3, train=True, seed=4)
    for i in (0, 7, 100):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(5))
    test = image_dataset("shapes", 16, 3, train=False, seed=3)
    assert not torch.equal(a[0][0], test[0][0])  # the test split is a different stream
    _check_item(a[5], 3, 16)
    _check_item(image_dataset("shapes", 16, 1, train=True, seed=3)[5], 1, 16)
    assert {a[i][1] for i in range(60)} == {0, 1, 2}
    assert float(a[0][0].std()) > 0.05  # something is drawn


def _make_folder(root, classes=("cat", "dog"), n=5, size=(20, 12)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_image_folder_seeded_split(tmp_path):
    _make_folder(tmp_path / "imgs")
    train = image_dataset(tmp_path / "imgs", 8, 3, train=True, seed=0)
    test = image_dataset(tmp_path / "imgs", 8, 1, train=False, seed=0)
    assert len(train) == 8 and len(test) == 2
    _check_item(train[0], 3, 8)
    _check_item(test[1], 1, 8)
    assert dataset_labels(train) == 2
    assert sorted({train[i][1] for i in range(len(train))}) == [0, 1]


def test_image_folder_with_own_split(tmp_path):
    _make_folder(tmp_path / "d" / "train", n=3)
    _make_folder(tmp_path / "d" / "test", n=2)
    assert len(image_dataset(tmp_path / "d", 8, 3, train=True, seed=0)) == 6
    assert len(image_dataset(tmp_path / "d", 8, 3, train=False, seed=0)) == 4


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_and_mnist_folder(tmp_path, gz):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 12).astype(np.uint8)
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", imgs)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", labels)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", imgs[:4])
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", labels[:4])
    # The bytes are MNIST's: magic 0x00000803, then big-endian dimensions.
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes() if not gz else None
    if raw is not None:
        assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 12, 0, 0, 0, 28, 0, 0, 0, 28])
    np.testing.assert_array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{sfx}"), imgs)
    train = image_dataset(tmp_path, 28, 1, train=True, seed=0)
    test = image_dataset(tmp_path, 16, 1, train=False, seed=0)
    assert len(train) == 12 and len(test) == 4
    x, y = train[5]
    np.testing.assert_allclose(x[0].numpy(), imgs[5] / 255.0, atol=1e-6)
    assert y == int(labels[5])
    _check_item(test[0], 1, 16)


def test_idx_single_file_and_other_dtypes(tmp_path):
    arr = np.arange(10 * 4 * 4, dtype=np.float32).reshape(10, 4, 4) / 160.0
    write_idx(tmp_path / "x.idx3", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx3"), arr)
    train = image_dataset(tmp_path / "x.idx3", 8, 1, train=True, seed=0)
    test = image_dataset(tmp_path / "x.idx3", 8, 1, train=False, seed=0)
    assert len(train) == 8 and len(test) == 2
    _check_item(train[0], 1, 8)


def test_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="expected"):
        read_idx(tmp_path / "short")


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown data set"):
        image_dataset("no-such-data-set", 16, 1)
    with pytest.raises(ValueError, match="channels"):
        image_dataset("digits", 16, 2)
