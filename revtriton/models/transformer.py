"""A reversible pre-norm transformer (RevViT / Reformer style) and a reversible encoder-decoder,
on embedded sequences (batch, tokens, width).

The features split into two halves of ``width / 2``; each block is an additive coupling::

    y1 = x1 + Attention(LayerNorm(x2))     F: multi-head self-attention on the half
    y2 = x2 + MLP(LayerNorm(y1))           G: Linear(w, 4w)-GELU-Linear(4w, w)

The masks are side inputs of each call: ``model(x, key_padding_mask=m, causal=True)``, where
``m`` (batch, tokens) is True at padding tokens, which no query attends to (the convention of
``nn.MultiheadAttention``), and ``causal`` keeps each query from attending to later tokens.
In the encoder-decoder, the decoder's F also attends to the encoder's output.
``reversible=False`` gives the eager twin: the same F and G as ordinary residual blocks with
plain autograd (identical parameters).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import ReversibleBlock
from ..sequential import ReversibleSequential


def attend(q, k, v, key_padding_mask=None, causal=False, dropout=0.0):
    """Scaled dot-product attention of ``q`` (batch, heads, queries, d) on ``k, v`` (batch,
    heads, keys, d), skipping keys where ``key_padding_mask`` (batch, keys) is True and, if
    ``causal``, keys after the query; returns (batch, queries, heads * d)."""
    mask = None
    if key_padding_mask is not None:
        mask = ~key_padding_mask[:, None, None, :]
        if causal:
            mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None)
    return y.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """``LayerNorm -> multi-head self-attention`` (scaled_dot_product_attention), with
    attention dropout ``dropout`` in training."""

    def __init__(self, width, heads, dropout=0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, key_padding_mask=None, causal=False):
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(attend(q, k, v, key_padding_mask, causal, self.dropout if self.training else 0.0))


class CrossAttention(nn.Module):
    """``LayerNorm -> multi-head attention`` of the tokens to ``memory`` (batch, memory tokens,
    ``memory_width``), skipping memory tokens where ``memory_padding_mask`` is True."""

    def __init__(self, width, memory_width, heads, dropout=0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(memory_width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, memory, memory_padding_mask=None):
        (b, t, w), s = x.shape, memory.shape[1]
        q = self.q(self.norm(x)).view(b, t, self.heads, w // self.heads).transpose(1, 2)
        k, v = self.kv(memory).view(b, s, 2, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(attend(q, k, v, memory_padding_mask, False, self.dropout if self.training else 0.0))


class DecoderAttention(nn.Module):
    """The decoder's F: causal self-attention, then attention to the encoder's output::

        a = SelfAttention(x);   F(x) = a + CrossAttention(x + a, memory)
    """

    def __init__(self, width, memory_width, heads, dropout=0.0):
        super().__init__()
        self.self_attention = SelfAttention(width, heads, dropout)
        self.cross_attention = CrossAttention(width, memory_width, heads, dropout)

    def forward(self, x, memory, key_padding_mask=None, memory_padding_mask=None, causal=True):
        a = self.self_attention(x, key_padding_mask, causal)
        return a + self.cross_attention(x + a, memory, memory_padding_mask)


def mlp(width, ratio=4):
    """``LayerNorm -> Linear(width, ratio * width) -> GELU -> Linear(ratio * width, width)``."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ratio * width), nn.GELU(),
                         nn.Linear(ratio * width, width))


def _half(width):
    if width % 2:
        raise ValueError(f"width={width} must be even: the blocks split the features in two halves")
    return width // 2


def reversible_transformer(width, depth, heads, reversible=True, dropout=0.0):
    """``depth`` reversible transformer blocks on (batch, tokens, ``width``); each half has
    ``width / 2`` features and ``heads`` attention heads. Call it as ``model(x,
    key_padding_mask=None, causal=False)``."""
    half = _half(width)
    blocks = [ReversibleBlock(SelfAttention(half, heads, dropout), mlp(half), dim=-1) for _ in range(depth)]
    return ReversibleSequential(*blocks, reversible=reversible)


class EncoderDecoder(nn.Module):
    """A reversible encoder-decoder (sequence to sequence) on embedded sequences: an encoder of
    ``depth`` transformer blocks over the source, then a decoder of ``depth`` blocks whose F is
    :class:`DecoderAttention` over the target, attending to the encoder's output (normalised),
    a side input of the decoder chain through which the encoder gets its gradients.

    ``forward(src, tgt, src_padding_mask=None, tgt_padding_mask=None)`` maps source (batch,
    source tokens, ``width``) and target (batch, target tokens, ``width``) embeddings to the
    decoder's output, shaped like ``tgt``; the decoder's self-attention is causal.
    """

    def __init__(self, width, depth, heads, reversible=True, dropout=0.0):
        super().__init__()
        half = _half(width)
        self.encoder = reversible_transformer(width, depth, heads, reversible, dropout)
        self.memory_norm = nn.LayerNorm(width)
        self.decoder = ReversibleSequential(*[ReversibleBlock(DecoderAttention(half, width, heads, dropout), mlp(half),
                                                              dim=-1) for _ in range(depth)], reversible=reversible)

    def forward(self, src, tgt, src_padding_mask=None, tgt_padding_mask=None):
        memory = self.memory_norm(self.encoder(src, key_padding_mask=src_padding_mask))
        return self.decoder(tgt, memory=memory, key_padding_mask=tgt_padding_mask,
                            memory_padding_mask=src_padding_mask)
