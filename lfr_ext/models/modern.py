"""Small ConvNeXt- and ViT-style classifiers for CIFAR-sized inputs: the families the
robustness literature moved to (Singh et al. 2023 train ConvNeXt and ViT adversarially on
ImageNet), at a size a CPU can train.

* :class:`ConvNeXtCifar`: a 2x2 patchify stem, stages of ConvNeXt blocks (depthwise 7x7 conv,
  LayerNorm over channels, pointwise MLP with GELU, layer scale, residual; Liu et al. 2022) with
  LayerNorm + 2x2 stride-2 convolutions between them. Every op is covered by the linearized engine.
* :class:`ViTCifar`: 4x4 patch embedding, learned position embedding, pre-norm transformer blocks
  (LayerNorm, multi-head self-attention, GELU MLP), mean pooling. Attention is not covered by the
  linearized engine: ``hvp="auto"`` runs double backprop with attention on its math backend.

Inputs in [0, 1], not normalised inside (see :class:`lfr_ext.PixelClassifier`); (B, C, H, W) ->
(B, classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x):
        t = self.norm(self.dw(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        t = self.fc2(F.gelu(self.fc1(t))) * self.gamma
        return x + t.permute(0, 3, 1, 2)


class ConvNeXtCifar(nn.Module):
    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, dims=(32, 64, 128), depths=(2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 2, stride=2), _ChannelLayerNorm(dims[0]))
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i > 0:
                stages += [_ChannelLayerNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
            stages += [ConvNeXtBlock(dim) for _ in range(depth)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        return self.head(self.norm(self.stages(self.stem(x)).mean((2, 3))))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, t):
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        return t + self.mlp(self.norm2(t))


class ViTCifar(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        if t.shape[1] != self.position.shape[1]:
            raise ValueError(f"ViTCifar was built for {self.position.shape[1]} patches, got {t.shape[1]}")
        return self.head(self.norm(self.blocks(t + self.position)).mean(1))


__all__ = ["ConvNeXtBlock", "ConvNeXtCifar", "TransformerBlock", "ViTCifar"]
