"""Normalisations: BatchNorm over T*B*S (causal prefix statistics in training), PowerNorm (running quadratic mean,
EMA-corrected backward), the eval-mode affine maps and their fold into the preceding Linear."""

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
def test_batchnorm_position_s_uses_the_statistics_of_positions_up_to_s() -> None:
    """Causal in training: position s is BatchNorm1d over the T*B*(s+1) samples of positions <= s; the last position
    and the running estimate are exactly the ordinary BatchNorm over the whole batch."""
    bn = SeqBatchNorm(C)
    randomise(bn)
    x = activations()
    y = bn(x)
    assert y.shape == x.shape
    for s in range(x.shape[2]):
        ref = nn.BatchNorm1d(C)
        ref.load_state_dict(bn.state_dict() | {"running_mean": torch.zeros(C), "running_var": torch.ones(C)})
        expected = ref(x[:, :, : s + 1].reshape(-1, C)).reshape(*x.shape[:2], s + 1, C)[:, :, s]
        torch.testing.assert_close(y[:, :, s], expected, rtol=1e-5, atol=1e-5)
    ref = nn.BatchNorm1d(C)
    ref(x.reshape(-1, C))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1
    changed = x.clone()
    changed[:, :, -1] = 50.0
    torch.testing.assert_close(bn(changed)[:, :, :-1], y[:, :, :-1], rtol=0, atol=0)


def test_batchnorm_gradient_does_not_flow_backwards_in_position() -> None:
    bn = SeqBatchNorm(C)
    x = activations().requires_grad_()
    bn(x)[:, :, 2].pow(2).sum().backward()
    assert x.grad[:, :, 3:].abs().max() == 0 and x.grad[:, :, :3].abs().max() > 0


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
def test_powernorm_warmup_is_a_causal_cumulative_average() -> None:
    """Warm-up: psi^2 at position s is the average of the earlier batches' second moments and this batch's moment
    over positions <= s; the running estimate becomes the cumulative average over whole batches."""
    pn = PowerNorm(C, warmup=2)
    x1, x2 = activations(1), activations(2)
    y1 = pn(x1)
    full1 = x1.reshape(-1, C).pow(2).mean(0)
    torch.testing.assert_close(pn.running_psi2, full1)
    for s in range(x1.shape[2]):
        psi2 = x1[:, :, : s + 1].reshape(-1, C).pow(2).mean(0)
        torch.testing.assert_close(y1[:, :, s], x1[:, :, s] * torch.rsqrt(psi2 + 1e-5))
    y2 = pn(x2)
    torch.testing.assert_close(pn.running_psi2, (full1 + x2.reshape(-1, C).pow(2).mean(0)) / 2)
    psi2 = (full1 + x2[:, :, :1].reshape(-1, C).pow(2).mean(0)) / 2
    torch.testing.assert_close(y2[:, :, 0], x2[:, :, 0] * torch.rsqrt(psi2 + 1e-5))
    assert int(pn.steps) == 2
    changed = x2.clone()
    changed[:, :, -1] = 50.0
    pn2 = PowerNorm(C, warmup=2)
    pn2(x1)
    torch.testing.assert_close(pn2(changed)[:, :, :-1], y2[:, :, :-1], rtol=0, atol=0)


def test_norms_on_a_2d_batch_use_the_whole_batch() -> None:
    """(N, C) input has no position axis: BatchNorm is BatchNorm1d and PowerNorm's warm-up uses the batch moment."""
    x = activations().reshape(-1, C)
    torch.testing.assert_close(SeqBatchNorm(C)(x), nn.BatchNorm1d(C)(x))
    torch.testing.assert_close(PowerNorm(C)(x), x * torch.rsqrt(x.pow(2).mean(0) + 1e-5))


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


def test_powernorm_backward_follows_the_paper_over_several_steps() -> None:
    """An independent transcription of Shen et al. (2020), Algorithm 1, one sample per row of X (B x C):
    forward  X^ = X / psi_{B-1};  Y = gamma X^ + beta;  psi^2_B = (1-m) psi^2_{B-1} + m mean(X^2)
    backward dL/dX^ = gamma dL/dY;  X~' = dL/dX^ - nu_{B-1} X^;  dL/dX = X~' / psi_{B-1}
             nu_B = nu_{B-1} (1 - m Gamma_B) + m Lambda_B,  Gamma_B = mean(X^ X^),  Lambda_B = mean(dL/dX^ X^).
    nu starts at 0, so the old double decay nu(1 - 2 m Gamma) first shows in nu_2 and in dL/dX of step 3."""
    m, eps = 0.1, 1e-5
    pn = PowerNorm(C, momentum=m, warmup=0)
    randomise(pn)
    gamma_w, beta = pn.weight.detach().clone(), pn.bias.detach().clone()
    psi2, nu = torch.ones(C), torch.zeros(C)
    for step in range(3):
        x = activations(seed=10 + step).requires_grad_()
        dy = activations(seed=20 + step)
        pn.zero_grad()
        y = pn(x)
        (y * dy).sum().backward()
        X, G = x.detach().reshape(-1, C), dy.reshape(-1, C)
        psi = torch.sqrt(psi2 + eps)
        X_hat = X / psi
        torch.testing.assert_close(y.detach().reshape(-1, C), gamma_w * X_hat + beta)
        d_xhat = gamma_w * G
        X_tilde = d_xhat - nu * X_hat
        torch.testing.assert_close(x.grad.reshape(-1, C), X_tilde / psi, msg=f"dL/dX at step {step + 1}")
        torch.testing.assert_close(pn.weight.grad, (G * X_hat).sum(0))
        torch.testing.assert_close(pn.bias.grad, G.sum(0))
        Gamma = (X_hat * X_hat).sum(0) / X.shape[0]
        Lambda = (d_xhat * X_hat).sum(0) / X.shape[0]
        nu = nu * (1 - m * Gamma) + m * Lambda
        psi2 = (1 - m) * psi2 + m * (X * X).sum(0) / X.shape[0]
        torch.testing.assert_close(pn.nu, nu, msg=f"nu after step {step + 1}")
        torch.testing.assert_close(pn.running_psi2, psi2)


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
