"""The dataset readers: IDX against Debian's Fashion-MNIST files, MNIST and CIFAR-10 in
torchvision's layouts (written here in miniature), and the errors for missing data."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from lfr_ext.data import (
    FASHION_MNIST_DIR,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_mnist,
    read_idx,
)
from tests.utils import needs_fashion_mnist


def _write_idx(path, array: np.ndarray, type_code: int = 0x08):
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


@needs_fashion_mnist
def test_idx_reader_on_the_package_files():
    """Header fields read by hand from the gz bytes agree with read_idx, and the known facts of
    Fashion-MNIST hold: 10k/60k images of 28x28, exactly 1000/6000 of each of the 10 classes."""
    path = os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")
    with gzip.open(path, "rb") as f:
        magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
        first_image = np.frombuffer(f.read(28 * 28), dtype=np.uint8)
    assert magic == 0x00000803  # unsigned byte, 3 dimensions
    images = read_idx(path)
    assert images.shape == (n, rows, cols) == (10000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0].reshape(-1), first_image)
    for split, count in (("test", 1000), ("train", 6000)):
        labels = read_idx(
            os.path.join(FASHION_MNIST_DIR, f"{'t10k' if split == 'test' else 'train'}-labels-idx1-ubyte.gz")
        )
        assert np.bincount(labels).tolist() == [count] * 10


@needs_fashion_mnist
def test_load_fashion_mnist_scales_to_unit_interval():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    raw = read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
    torch.testing.assert_close(x[5, 0], torch.from_numpy(raw[5].astype(np.float32) / 255))


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_layouts(tmp_path, layout, gz):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(str(folder / f"t10k-images-idx3-ubyte{suffix}"), images)
    _write_idx(str(folder / f"t10k-labels-idx1-ubyte{suffix}"), labels)
    x, y = load_mnist("test", str(tmp_path))
    assert x.shape == (5, 1, 28, 28) and y.tolist() == [3, 1, 4, 1, 5]
    torch.testing.assert_close(x[2, 0], torch.from_numpy(images[2].astype(np.float32) / 255))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist("train", str(tmp_path))  # the train files are missing, and the error names them


def test_idx_reader_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(bad_magic))
    truncated = tmp_path / "short"
    truncated.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="expected 10 bytes"):
        read_idx(str(truncated))


def _write_cifar_batch(path, images: np.ndarray, labels: list[int]):
    with open(path, "wb") as f:
        pickle.dump({b"data": images.reshape(len(images), -1), b"labels": labels, b"batch_label": b"x"}, f)


def test_load_cifar10_torchvision_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8) for _ in range(6)]
    for i in range(5):
        _write_cifar_batch(folder / f"data_batch_{i + 1}", batches[i], [i, 9 - i])
    _write_cifar_batch(folder / "test_batch", batches[5], [7, 8])
    x, y = load_cifar10("train", str(tmp_path))
    assert x.shape == (10, 3, 32, 32) and y.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    # channel-major rows of 3072 bytes: pixel (c, h, w) of image 3 is batch 2's image 1
    assert x[3, 2, 5, 7].item() == pytest.approx(batches[1][1, 2, 5, 7] / 255)
    x_test, y_test = load_dataset("cifar10", "test", str(tmp_path))
    assert x_test.shape == (2, 3, 32, 32) and y_test.tolist() == [7, 8]
    os.remove(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        load_cifar10("train", str(tmp_path))


def test_clear_errors_for_missing_data(tmp_path):
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("cifar10", "test")
    with pytest.raises(FileNotFoundError, match="MNIST not found.*t10k-images-idx3-ubyte"):
        load_dataset("mnist", "test", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found.*data_batch_1"):
        load_dataset("cifar10", "test", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", "test")
