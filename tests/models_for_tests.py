"""Small models that exercise what LFR must handle: BatchNorm, Dropout, frozen layers."""

import math

import torch
from torch import nn


class BNNet(nn.Module):
    """conv-BN-ReLU-pool, a residual block with BatchNorm, Dropout, linear head. (B, 1, 8, 8) -> (B, 3)."""

    def __init__(self, drop: float = 0.25):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block_conv = nn.Conv2d(4, 4, 3, padding=1)
        self.block_bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.drop = nn.Dropout(drop)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        t = torch.relu(self.bn(self.conv(x)))
        t = torch.relu(t + self.block_bn(self.block_conv(t)))
        return self.head(self.drop(self.pool(t).flatten(1)))


class SmoothNet(nn.Module):
    """Tiny smooth MLP for gradcheck/gradgradcheck: (B, 6) -> (B, 3)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyResNet(nn.Module):
    """conv-BN-ReLU stem, one residual block (BN, in-place ReLU), max-pool, adaptive avg-pool,
    Dropout, linear head. (B, 3, 10, 10) -> (B, 5)."""

    def __init__(self, drop: float = 0.2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(6, 5)
        with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
            for bn in (self.stem[1], self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        t = self.stem(x)
        out = self.relu(self.bn1(self.conv1(t)))
        out = self.bn2(self.conv2(out))
        out += t
        out = self.pool(self.relu(out))
        return self.fc(self.drop(torch.flatten(self.gap(out), 1)))


class LeakyAvgNet(nn.Module):
    """LeakyReLU, avg-pool, concat of two branches, Dropout, view. (B, 2, 8, 8) -> (B, 4)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.AvgPool2d(2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(5 * 4 * 4, 4)

    def forward(self, x):
        t = torch.cat([self.act(self.a(x)), self.act(self.b(x)) - 0.5 * x.mean(1, keepdim=True)], dim=1)
        t = self.drop(self.pool(t))
        return self.fc(t.view(t.shape[0], -1))


class GeluLayerNormNet(nn.Module):
    """Smooth ops the linearized pass does not cover: LayerNorm and GELU. (B, 6) -> (B, 3)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.norm(self.fc1(x))))


class ReLUNet(nn.Module):
    """Tiny ReLU MLP with BatchNorm1d: (B, 6) -> (B, 3)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 7)
        self.bn = nn.BatchNorm1d(7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class SmoothZooNet(nn.Module):
    """Every smooth activation and GroupNorm the linearized pass covers: conv, GroupNorm, SiLU,
    GELU (tanh), conv, softplus, ELU, pooling, linear, tanh, sigmoid, linear. (B, 2, 6, 6) -> (B, 4)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 3 * 3, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        t = nn.functional.gelu(nn.functional.silu(self.gn(self.conv1(x))), approximate="tanh")
        t = nn.functional.elu(nn.functional.softplus(self.conv2(t), beta=2.0) - 1.0, alpha=0.7)
        t = torch.tanh(self.fc1(nn.functional.avg_pool2d(t, 2).flatten(1)))
        return self.fc2(torch.sigmoid(t) * 2 - 1)


class ConvNeXtBlockNet(nn.Module):
    """A ConvNeXt block (Liu et al. 2022): depthwise 3x3 conv, LayerNorm over channels
    (channels-last), pointwise MLP with GELU, residual; stem and head around it.
    (B, 3, 8, 8) -> (B, 5)."""

    def __init__(self, dim=8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 2 * dim)
        self.pw2 = nn.Linear(2 * dim, dim)
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        t = self.stem(x)
        r = self.dw(t).permute(0, 2, 3, 1)  # (B, H, W, C)
        r = self.pw2(nn.functional.gelu(self.pw1(self.norm(r)))).permute(0, 3, 1, 2)
        t = t + r
        return self.head(self.head_norm(t.mean((2, 3))))


class SineNet(nn.Module):
    """An op the linearized pass has no rule for (a sine over features). (B, 6) -> (B, 3)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.sin(self.fc1(x)))


class WrittenOutAttentionNet(nn.Module):
    """Attention every way a model may spell it: ``F.scaled_dot_product_attention`` (causal, and
    with a boolean mask and grouped-query heads), the product ``softmax(q k^T / sqrt(d)) v``
    written out, a gate of two input-dependent tensors, a division by one, and a log-softmax.
    (B, 24) -> (B, 3)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(6, 18)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        batch = x.shape[0]
        q, k, v = self.qkv(x.view(batch, 4, 6)).view(batch, 4, 3, 2, 3).permute(2, 0, 3, 1, 4).unbind(0)  # (B, 2, 4, 3)
        causal = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        keep = torch.tensor([[True, True, False, True]] * 4)
        grouped = nn.functional.scaled_dot_product_attention(q, k[:, :1], v[:, :1], attn_mask=keep, enable_gqa=True)
        written = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(3), dim=-1) @ v
        mixed = causal * torch.sigmoid(written) + grouped / (1.5 + written * written)
        return self.head(mixed.transpose(1, 2).reshape(batch, 4, 6).log_softmax(-1).mean(1))


class MaskedAttentionWeightsNet(nn.Module):
    """``nn.MultiheadAttention`` (sequence first) with a boolean attention mask, a key padding
    mask and its head-averaged weights used downstream. (B, 24) -> (B, 3)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        tokens = x.view(x.shape[0], 4, 6).transpose(0, 1)  # (L, B, E)
        blocked = torch.tensor([[False, True, False, False]] * 4)
        padding = torch.zeros(x.shape[0], 4, dtype=torch.bool)
        padding[:, 3] = True
        out, weights = self.attn(tokens, tokens, tokens, attn_mask=blocked, key_padding_mask=padding)
        return self.head(torch.cat([out.mean(0), weights.mean(1)], dim=-1))


class TinyViT(nn.Module):
    """Patch embedding, one pre-norm transformer block (LayerNorm, multi-head attention, GELU
    MLP), mean pooling, linear head: (B, 3, 8, 8) -> (B, 5)."""

    def __init__(self, dim=12, heads=2, patch=4, classes=5):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(1))


class LinearToy(nn.Module):
    """Score s = w . (x - 0.5) over 4 pixels with w = 1: logits (s, -s, -10, -10). Classes 2
    and 3 never win (they are there because AutoAttack's targeted DLR loss needs 4 classes).
    For an L-inf attacker of radius eps, a sample is robust iff it is correct and |s| > 4 eps."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))  # torchattacks finds the device through the parameters

    def forward(self, x):
        s = ((x - 0.5).flatten(1) * self.w).sum(1)
        never = torch.full_like(s, -10.0)
        return torch.stack([s, -s, never, never], dim=1)


# Scores and labels: sample 3 is misclassified (s > 0 but label 1).


TOY_SCORES = [0.1, 0.15, 0.3, 0.6, -0.05, -0.15, -0.35, -0.8]
TOY_LABELS = [0, 0, 0, 1, 1, 1, 1, 1]


def toy_data():
    x = torch.tensor(TOY_SCORES).view(-1, 1, 1, 1).expand(-1, 1, 2, 2) / 4 + 0.5
    return x.contiguous(), torch.tensor(TOY_LABELS)
