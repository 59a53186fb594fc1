"""Datasets from local files only (nothing is downloaded): IDX (MNIST / Fashion-MNIST) and
CIFAR-10's python batches.

The default dataset is the full Fashion-MNIST (60k train / 10k test) shipped by Debian's
``dataset-fashion-mnist`` package in ``/usr/share/datasets/fashion-mnist`` (or the directory in
``$LFR_EXT_FASHION_MNIST_DIR``, holding the same four ``.gz`` files). MNIST and CIFAR-10 are
read from a folder the user already has, in torchvision's layouts.
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import NamedTuple

import numpy as np
import torch

FASHION_MNIST_DIR = os.environ.get("LFR_EXT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "sudo apt-get install dataset-fashion-mnist"

# IDX type codes -> numpy dtypes (big-endian), from the format's definition.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic ``0x0000TTDD`` (type TT, DD dims), DD
    big-endian uint32 sizes, then the data. Returns an array of that shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: expected {expected} bytes of data for shape {shape}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(directory: str, stem: str) -> str | None:
    for name in (f"{stem}.gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    return None


def load_idx_split(
    directory: str, split: str, *, dataset: str = "fashion-mnist", install_hint: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64 of the ``train`` or
    ``test`` split from the standard IDX file names in ``directory``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find(directory, stem) for stem in stems]
    missing = [stem for stem, path in zip(stems, paths) if path is None]
    if missing:
        hint = f" Install it with: {install_hint}." if install_hint else ""
        raise FileNotFoundError(
            f"{dataset} {split} split not found in {directory}: "
            f"missing {', '.join(m + '[.gz]' for m in missing)}.{hint}"
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(split: str = "test", directory: str = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from Debian's package (or ``directory``): (N, 1, 28, 28), (N,)."""
    return load_idx_split(directory, split, dataset="Fashion-MNIST", install_hint=FASHION_MNIST_INSTALL)


# --- MNIST and CIFAR-10 from files the user already has (torchvision's layouts) -------------

MNIST_HINT = (
    "put the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, optionally .gz) in DIR or in DIR/MNIST/raw (torchvision's layout)"
)
CIFAR10_HINT = (
    "extract cifar-10-python.tar.gz so that DIR/cifar-10-batches-py/ (or DIR itself) holds "
    "data_batch_1 .. data_batch_5 and test_batch (torchvision's layout)"
)
_CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def load_mnist(split: str, directory: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from ``directory`` or ``directory/MNIST/raw``: (N, 1, 28, 28) in [0, 1], (N,) int64."""
    _check_split(split)
    candidates = [directory, os.path.join(directory, "MNIST", "raw"), os.path.join(directory, "raw")]
    for candidate in candidates:
        if any(_find(candidate, f"{prefix}-labels-idx1-ubyte") is not None for prefix in ("train", "t10k")):
            return load_idx_split(candidate, split, dataset="MNIST", install_hint=MNIST_HINT)
    raise FileNotFoundError(
        f"MNIST not found: none of {', '.join(candidates)} holds the IDX files. To use MNIST, {MNIST_HINT}."
    )


def load_cifar10(split: str, directory: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from the python pickle batches: (N, 3, 32, 32) float32 in [0, 1], (N,) int64."""
    _check_split(split)
    candidates = [os.path.join(directory, "cifar-10-batches-py"), directory]
    folder = next((c for c in candidates if os.path.exists(os.path.join(c, _CIFAR10_FILES["test"][0]))), None)
    if folder is None:
        folder = next((c for c in candidates if os.path.exists(os.path.join(c, "data_batch_1"))), None)
    if folder is None:
        raise FileNotFoundError(f"CIFAR-10 not found in {' or '.join(candidates)}. To use CIFAR-10, {CIFAR10_HINT}.")
    missing = [name for name in _CIFAR10_FILES[split] if not os.path.exists(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 {split} split incomplete in {folder}: missing {', '.join(missing)}. "
            f"To use CIFAR-10, {CIFAR10_HINT}."
        )
    images, labels = [], []
    for name in _CIFAR10_FILES[split]:
        images_part, labels_part = _read_cifar_batch(os.path.join(folder, name))
        images.append(images_part)
        labels.append(labels_part)
    x = torch.from_numpy(np.concatenate(images).astype(np.float32) / 255.0)
    return x, torch.from_numpy(np.concatenate(labels).astype(np.int64))


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch: uint8 (n, 3, 32, 32) images, (n,) labels."""
    import pickle  # the official format; these files come from the user's own download

    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    try:
        data, labels = batch[b"data"], batch[b"labels"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (no b'data' / b'labels')") from exc
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != data.shape[0]:
        raise ValueError(f"{path}: expected (n, 3072) images and n labels, got {data.shape} and {len(labels)}")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


class DatasetInfo(NamedTuple):
    """What a model needs to know about a dataset: (C, H, W) of one image and the classes."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int


DATASETS = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10),
    "mnist": DatasetInfo("mnist", 1, 28, 10),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10),
}


def load_dataset(name: str, split: str, directory: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, H, W) float32 in [0, 1] and labels (N,) int64 of ``name``'s ``split``.

    ``directory`` defaults to Debian's folder for Fashion-MNIST; MNIST and CIFAR-10 need one.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "fashion-mnist":
        return load_fashion_mnist(split, directory or FASHION_MNIST_DIR)
    if directory is None:
        raise ValueError(
            f"--data {name} needs --data-dir DIR (nothing is downloaded): "
            f"{MNIST_HINT if name == 'mnist' else CIFAR10_HINT}"
        )
    return load_mnist(split, directory) if name == "mnist" else load_cifar10(split, directory)
