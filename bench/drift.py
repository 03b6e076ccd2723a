"""``python -m bench drift``: reconstruction error ``|inverse(forward(x)) - x| / |x|`` against
depth, for streams kept in fp32 and in bf16 while F and G compute in bf16 (autocast)."""
import torch
from torch import nn

import revtriton as rt

DEPTHS = (1, 8, 32, 128)


def mlp(d):
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


def drift(depth, stream_dtype, width=16):
    """Reconstruction error of ``depth`` MLP couplings (``width`` features per half) on CPU."""
    torch.manual_seed(0)
    chain = rt.ReversibleSequential(*[rt.ReversibleBlock(mlp(width), mlp(width), dim=-1) for _ in range(depth)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return rt.reconstruction_error(chain, torch.randn(4, 8, 2 * width).to(stream_dtype))


def main():
    print("| depth | fp32 streams | bf16 streams |\n|---:|---:|---:|")
    for depth in DEPTHS:
        print(f"| {depth} | {drift(depth, torch.float32):.1e} | {drift(depth, torch.bfloat16):.1e} |")
