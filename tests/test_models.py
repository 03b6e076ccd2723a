"""Reference models: parameter counts derived by hand, training steps, eager twins."""
import copy

import pytest
import torch

from helpers import rel_err
from revtriton import models


def conv3(a, b):
    return 9 * a * b


def bn(c):
    return 2 * c


def basic(a, b):  # BN(a) conv3x3(a, b) BN(b) conv3x3(b, b)
    return bn(a) + conv3(a, b) + bn(b) + conv3(b, b)


def bottleneck(a, b):  # BN(a) conv1x1(a, b/4) BN conv3x3(b/4, b/4) BN conv1x1(b/4, b)
    m = b // 4
    return bn(a) + a * m + bn(m) + conv3(m, m) + bn(m) + m * b


def head(c):  # final BN + linear to 10 classes
    return bn(c) + 10 * c + 10


def resnet(n, widths, branch):
    """stem + per stage: a unit widening from the previous width, then n - 1 units."""
    total, c_in = conv3(3, widths[0]), widths[0]
    for c in widths[1:]:
        total += branch(c_in, c) + (n - 1) * branch(c, c)
        c_in = c
    return total + head(c_in)


def revnet(n, widths, branch):
    """stem + per stage: n units of F and G on half the width; a stage that changes width
    starts with a downsampling coupling F(c_in/2 -> c/2), G(c/2 -> c/2)."""
    total, c_in = conv3(3, widths[0]), widths[0]
    for c in widths[1:]:
        units = n
        if c != c_in:
            total += branch(c_in // 2, c // 2) + branch(c // 2, c // 2)
            units -= 1
        total += units * 2 * branch(c // 2, c // 2)
        c_in = c
    return total + head(c_in)


COUNTS = {
    "resnet32": resnet(5, (16, 16, 32, 64), basic),
    "resnet110": resnet(18, (16, 16, 32, 64), basic),
    "resnet164": resnet(18, (16, 64, 128, 256), bottleneck),
    "revnet38": revnet(3, (32, 32, 64, 112), basic),
    "revnet110": revnet(9, (32, 32, 64, 128), basic),
    "revnet164": revnet(9, (32, 128, 256, 512), bottleneck),
}


@pytest.mark.parametrize("name", COUNTS)
def test_parameter_count_matches_hand_count_and_docstring(name):
    build = getattr(models, name)
    count = sum(p.numel() for p in build().parameters())
    assert count == COUNTS[name]
    assert f"{count:,} parameters" in build.__doc__


def test_hand_counts_match_the_paper():
    """Table 1 of Gomez et al. 2017: 0.46M for ResNet-32/RevNet-38, 1.73M for the 110s."""
    assert round(COUNTS["resnet32"] / 1e6, 2) == round(COUNTS["revnet38"] / 1e6, 2) == 0.46
    assert round(COUNTS["resnet110"] / 1e6, 2) == round(COUNTS["revnet110"] / 1e6, 2) == 1.73


@pytest.mark.parametrize("name", COUNTS)
def test_each_model_trains_a_step(name):
    model = getattr(models, name)()
    x = torch.randn(2, 3, 8, 8)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 7])).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("make,shape", [
    (lambda **kw: models.revnet38(**kw), (2, 3, 8, 8)),
    (lambda **kw: models.reversible_transformer(16, 3, 2, **kw), (2, 5, 16)),
], ids=["revnet38", "transformer"])
def test_reversible_models_equal_their_eager_twins(make, shape):
    torch.manual_seed(0)
    model = make()
    torch.manual_seed(0)
    twin = make(reversible=False)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(shape)
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-4, name


def test_transformer_is_causal_when_asked_and_validates_its_width():
    model = models.reversible_transformer(16, 2, 2).eval()
    x = torch.randn(1, 6, 16)
    x_later = x.clone()
    x_later[:, 4:] = torch.randn(1, 2, 16)  # not a constant shift, which LayerNorm would hide
    with torch.no_grad():
        torch.testing.assert_close(model(x, causal=True)[:, :4], model(x_later, causal=True)[:, :4])
        assert not torch.allclose(model(x)[:, :4], model(x_later)[:, :4])
    with pytest.raises(ValueError, match="width=15 must be even"):
        models.reversible_transformer(15, 2, 3)
    with pytest.raises(ValueError, match="width=8 is not divisible by heads=3"):
        models.reversible_transformer(16, 2, 3)
