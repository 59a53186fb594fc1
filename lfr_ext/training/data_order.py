"""Deterministic data splits, epoch orders and augmentation.

Everything random about *which* images a step sees is a pure function of (seed, epoch), drawn
from private generators, never from the global RNG. A run resumed at epoch e therefore sees the
same batches as an uninterrupted run without having to save any data-loader state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Split(NamedTuple):
    """Indices into the training split: images to train on and the held-out validation set."""

    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64


def generator_for(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator seeded by (seed, *stream) (e.g. (seed, epoch)); distinct tuples give
    independent streams."""
    mixed = seed
    for value in stream:
        # A multiplicative hash keeps (seed, epoch) pairs from colliding (seed 1 epoch 0 vs seed 0 epoch 1).
        mixed = (mixed * 1_000_003 + value + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def split_train_val(n: int, *, val_size: int, train_subset: int, seed: int) -> Split:
    """Hold out ``val_size`` images of the ``n`` training images, chosen by ``seed``; train on
    the rest, or on the first ``train_subset`` of the rest (0: all)."""
    if val_size >= n:
        raise ValueError(f"val_size={val_size} leaves no training images out of {n}")
    order = torch.randperm(n, generator=generator_for(seed, 0x5EED))
    val, train = order[:val_size], order[val_size:]
    if train_subset:
        if train_subset > len(train):
            raise ValueError(
                f"train_subset={train_subset} but only {len(train)} training images remain "
                f"after holding out val_size={val_size}"
            )
        train = train[:train_subset]
    return Split(train=train, val=val)


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int) -> list[torch.Tensor]:
    """The order of epoch ``epoch`` as a list of index batches (last one possibly short)."""
    order = torch.randperm(n, generator=generator_for(seed, epoch))
    return list(order.split(batch_size))


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation: zero-pad by ``pad``, crop back to (H, W) at a random
    offset, flip horizontally with probability 1/2. (B, C, H, W) -> (B, C, H, W)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b)[:, None, None]
    # Advanced indexing picks padded[b, :, rows[b, i], cols[b, j]] -> (B, H, W, C).
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
