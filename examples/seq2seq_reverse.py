"""Learn to reverse token sequences with a reversible encoder-decoder: ``python examples/seq2seq_reverse.py``.

A source is a random string of 1 to ``tokens`` symbols, padded with PAD to ``tokens``; its
target is the same string reversed. Tokens are embedded (plus learned positions) and run
through ``revtriton.models.EncoderDecoder``: a reversible encoder over the source and a
reversible, causal decoder over the target shifted right behind BOS (teacher forcing),
attending to the encoder's output. Both stacks are additive couplings of the two halves of
the features (y1 = x1 + F(x2), y2 = x2 + G(y1)), so only each chain's output is kept for
backward. The padding masks and the encoder's output are side inputs of the chains'
calls: no query attends to a PAD token, and the encoder gets its gradient through the
decoder chain. The loss is the cross-entropy of the next target token, PAD targets ignored.
"""
import torch
import torch.nn.functional as F
from torch import nn

from revtriton import models

from step_memory import against_eager, print_memory  # examples/step_memory.py

PAD, BOS, SYMBOLS = 0, 1, 10  # symbols are the tokens 2 .. 2 + SYMBOLS - 1
VOCAB = 2 + SYMBOLS


def batch(n, tokens):
    """``(src, tgt_in, tgt)``: sources of random lengths 1..``tokens`` (PAD after them), the
    reversed sources behind BOS (the decoder's input) and the reversed sources (its target)."""
    lengths = torch.randint(1, tokens + 1, (n, 1))
    position = torch.arange(tokens)
    src = torch.randint(2, VOCAB, (n, tokens)).masked_fill(position >= lengths, PAD)
    reversed_index = (lengths - 1 - position).clamp(min=0)  # position i of the target reads lengths - 1 - i
    tgt = src.gather(1, reversed_index).masked_fill(position >= lengths, PAD)
    tgt_in = torch.cat([torch.full((n, 1), BOS), tgt[:, :-1]], dim=1)
    return src, tgt_in, tgt


class Reverser(nn.Module):
    """Token and position embeddings, ``models.EncoderDecoder`` and a linear head over the vocabulary."""

    def __init__(self, width, depth, heads, tokens, reversible=True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Embedding(tokens, width)
        self.core = models.EncoderDecoder(width, depth, heads, reversible=reversible)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, VOCAB))

    def embedded(self, tokens):
        return self.embed(tokens) + self.position.weight[: tokens.shape[1]]

    def forward(self, src, tgt_in):
        """Logits (batch, target tokens, VOCAB) of each next target token."""
        out = self.core(self.embedded(src), self.embedded(tgt_in), src_padding_mask=src == PAD,
                        tgt_padding_mask=tgt_in == PAD)
        return self.head(out)


def loss_of(model, src, tgt_in, tgt):
    return F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt.flatten(), ignore_index=PAD)


def accuracy(model, src, tgt_in, tgt):
    """The fraction of non-PAD target tokens predicted right (teacher forcing)."""
    with torch.no_grad():
        predicted = model(src, tgt_in).argmax(-1)
    real = tgt != PAD
    return (predicted == tgt)[real].float().mean().item()


def fit(steps=300, batch_size=64, tokens=12, width=64, depth=4, heads=4, every=100, lr=3e-3, memory_batch=256):
    """Train a reversible reverser; return it, the loss per step, its token accuracy on fresh
    sequences and ``{"reversible": (peak, saved), "eager": (peak, saved)}``: the bytes of one
    forward and backward on ``memory_batch`` sequences of the model and of its eager twin."""
    torch.manual_seed(0)
    model = Reverser(width, depth, heads, tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    for step in range(steps):
        loss = loss_of(model, *batch(batch_size, tokens))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        if step % every == 0 or step == steps - 1:
            print(f"step {step:4d}   cross-entropy {loss.item():.3f}")
    eager = Reverser(width, depth, heads, tokens, reversible=False)
    eager.load_state_dict(model.state_dict())
    memory = against_eager(loss_of, model, eager, *batch(memory_batch, tokens))
    return model, history, accuracy(model.eval(), *batch(1000, tokens)), memory


if __name__ == "__main__":
    _, _, acc, memory = fit()
    print(f"token accuracy on 1000 fresh sequences: {acc:.3f}")
    print_memory(memory, "256 sequences")
