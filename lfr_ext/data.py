"""Datasets from local files only (nothing is downloaded): IDX (MNIST / Fashion-MNIST).

The default dataset is the full Fashion-MNIST (60k train / 10k test) shipped by Debian's
``dataset-fashion-mnist`` package in ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
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


def load_idx_split(directory: str, split: str, *, dataset: str = "fashion-mnist", install_hint: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64 of the ``train`` or
    ``test`` split from the standard IDX file names in ``directory``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find(directory, stem) for stem in stems]
    missing = [stem for stem, path in zip(stems, paths) if path is None]
    if missing:
        hint = f" Install it with: {install_hint}." if install_hint else ""
        raise FileNotFoundError(
            f"{dataset} {split} split not found in {directory}: missing {', '.join(m + '[.gz]' for m in missing)}.{hint}"
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(split: str = "test", directory: str = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from Debian's package (or ``directory``): (N, 1, 28, 28), (N,)."""
    return load_idx_split(directory, split, dataset="Fashion-MNIST", install_hint=FASHION_MNIST_INSTALL)
