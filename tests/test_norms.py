"""Normalisations: BatchNorm over T*B*S, PowerNorm (running quadratic mean, EMA-corrected backward), the eval-mode
affine maps and their fold into the preceding Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spikedecoder.layers import Linear, LinearNorm
from spikedecoder.norms import LayerNorm, PowerNorm, SeqBatchNorm, foldable, make_norm

C = 6


def activations(seed: int = 0, shape: tuple[int, ...] = (3, 4, 5, C)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.linspace(0.5, 3.0, shape[-1]) + torch.linspace(-1, 1, shape[-1])


def randomise(norm: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(C, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(C, generator=g))


# ---------------------------------------------------------------------------------------------- BatchNorm
def test_batchnorm_normalises_over_every_leading_axis() -> None:
    bn, ref = SeqBatchNorm(C), nn.BatchNorm1d(C)
    x = activations()
    y = bn(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref(x.reshape(-1, C)).reshape(x.shape))
    flat = y.reshape(-1, C)
    torch.testing.assert_close(flat.mean(0), torch.zeros(C), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.var(0, unbiased=False), torch.ones(C), atol=1e-3, rtol=0)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)


def test_batchnorm_eval_is_its_affine_map() -> None:
    bn = SeqBatchNorm(C)
    randomise(bn)
    for seed in range(3):
        bn(activations(seed))
    bn.eval()
    x = activations(7)
    a, c = bn.affine_map()
    torch.testing.assert_close(bn(x), x * a + c, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- PowerNorm
def test_powernorm_first_warmup_step_uses_the_batch_second_moment() -> None:
    pn = PowerNorm(C)
    x = activations()
    y = pn(x)
    psi2 = x.reshape(-1, C).pow(2).mean(0)
    torch.testing.assert_close(pn.running_psi2, psi2)
    torch.testing.assert_close(y, x * torch.rsqrt(psi2 + 1e-5))
    assert int(pn.steps) == 1


def test_powernorm_after_warmup_normalises_with_the_previous_estimate_only() -> None:
    """No batch statistic enters its own output: samples of a batch cannot see each other (causal in training)."""
    pn = PowerNorm(C, momentum=0.2, warmup=0)
    randomise(pn)
    before = torch.linspace(0.5, 2.0, C)
    pn.running_psi2.copy_(before)
    x = activations()
    y = pn(x)
    torch.testing.assert_close(y, x * torch.rsqrt(before + 1e-5) * pn.weight + pn.bias)
    expected = 0.8 * before + 0.2 * x.reshape(-1, C).pow(2).mean(0)
    torch.testing.assert_close(pn.running_psi2, expected)
    # the same call with other tokens changed gives the same output for the untouched tokens
    pn.running_psi2.copy_(before)
    changed = x.clone()
    changed[:, :, 3:] = 50.0
    torch.testing.assert_close(pn(changed)[:, :, :3], y[:, :, :3], rtol=0, atol=0)


def test_powernorm_backward_is_the_ema_corrected_gradient() -> None:
    """grad_x = (g*w - nu*xhat) / psi; nu <- nu*(1 - m*mean(xhat^2)) + m*mean((g*w - nu*xhat)*xhat)."""
    m = 0.1
    pn = PowerNorm(C, momentum=m, warmup=0)
    randomise(pn)
    psi2 = torch.linspace(0.5, 2.0, C)
    nu = torch.linspace(-0.3, 0.3, C)
    pn.running_psi2.copy_(psi2)
    pn.nu.copy_(nu)
    x = activations().requires_grad_()
    g = activations(seed=9)
    (pn(x) * g).sum().backward()
    scale = torch.rsqrt(psi2 + 1e-5)
    xhat = (x.detach() * scale).reshape(-1, C)
    g2 = g.reshape(-1, C)
    corrected = g2 * pn.weight.detach() - nu * xhat
    torch.testing.assert_close(x.grad, (corrected * scale).reshape(x.shape))
    torch.testing.assert_close(pn.weight.grad, (g2 * xhat).sum(0))
    torch.testing.assert_close(pn.bias.grad, g2.sum(0))
    expected_nu = nu * (1 - m * xhat.pow(2).mean(0)) + m * (corrected * xhat).mean(0)
    torch.testing.assert_close(pn.nu, expected_nu)


def test_powernorm_eval_is_its_affine_map_and_does_not_update() -> None:
    pn = PowerNorm(C)
    randomise(pn)
    for seed in range(3):
        pn(activations(seed))
    pn.eval()
    state = {k: v.clone() for k, v in pn.state_dict().items()}
    x = activations(5)
    a, c = pn.affine_map()
    torch.testing.assert_close(pn(x), x * a + c)
    assert all(torch.equal(v, pn.state_dict()[k]) for k, v in state.items())


# ---------------------------------------------------------------------------------------------- fold
@pytest.mark.parametrize("kind", ["batch", "power"])
def test_linear_norm_fold_is_exact_up_to_rounding(kind: str) -> None:
    torch.manual_seed(0)
    layer = LinearNorm(8, C, kind, bias=False)
    assert layer.linear.bias is not None  # the fold needs a bias to absorb the shift
    randomise(layer.norm)
    for seed in range(4):
        layer(activations(seed, shape=(3, 4, 5, 8)))
    layer.eval()
    x = activations(11, shape=(2, 3, 7, 8))
    with torch.no_grad():
        before = layer(x)
        assert layer.fold() is True
        after = layer(x)
    assert isinstance(layer.norm, nn.Identity)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert layer.fold() is False


def test_layernorm_and_none_do_not_fold() -> None:
    assert LinearNorm(4, C, "layer").fold() is False
    assert LinearNorm(4, C, "none").fold() is False
    assert isinstance(LinearNorm(4, C, "none").norm, nn.Identity)


def test_layernorm_is_per_token() -> None:
    ln = LayerNorm(C)
    x = activations()
    y = ln(x)
    changed = x.clone()
    changed[0, 0, 0] = 100.0
    torch.testing.assert_close(ln(changed)[0, 0, 1:], y[0, 0, 1:], rtol=0, atol=0)


def test_make_norm_kinds_and_error() -> None:
    assert isinstance(make_norm("layer", C), LayerNorm)
    assert isinstance(make_norm("batch", C), SeqBatchNorm) and foldable(make_norm("batch", C))
    assert isinstance(make_norm("power", C), PowerNorm) and foldable(make_norm("power", C))
    assert isinstance(make_norm("none", C), nn.Identity) and not foldable(make_norm("layer", C))
    with pytest.raises(ValueError, match="unknown norm 'group'; choose layer, batch, power or none"):
        make_norm("group", C)
    assert isinstance(LinearNorm(3, 4, "batch").linear, Linear)
