"""A reversible pre-norm transformer (RevViT / Reformer style) on (batch, tokens, width).

The features split into two halves of ``width / 2``; each block is an additive coupling::

    y1 = x1 + Attention(LayerNorm(x2))     F: causal self-attention on the half
    y2 = x2 + MLP(LayerNorm(y1))           G: Linear(w, 4w)-GELU-Linear(4w, w)

``reversible=False`` gives the eager twin: the same F and G as ordinary residual blocks
with plain autograd (identical parameters).
"""
import torch.nn.functional as F
from torch import nn

from ..blocks import ReversibleBlock
from ..sequential import ReversibleSequential


class CausalSelfAttention(nn.Module):
    """``LayerNorm -> causal multi-head attention`` (scaled_dot_product_attention)."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, w))


def mlp(width, ratio=4):
    """``LayerNorm -> Linear(width, ratio * width) -> GELU -> Linear(ratio * width, width)``."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ratio * width), nn.GELU(),
                         nn.Linear(ratio * width, width))


def reversible_transformer(width, depth, heads, reversible=True):
    """``depth`` reversible transformer blocks on (batch, tokens, ``width``); each half has
    ``width / 2`` features and ``heads`` attention heads."""
    if width % 2:
        raise ValueError(f"width={width} must be even: the blocks split the features in two halves")
    half = width // 2
    blocks = [ReversibleBlock(CausalSelfAttention(half, heads), mlp(half), dim=-1) for _ in range(depth)]
    return ReversibleSequential(*blocks, reversible=reversible)
