"""Normalisations over the channel (last) dimension of (T, B, S, C) tensors.

LayerNorm normalises each token (it costs operations at inference). BatchNorm and PowerNorm collect statistics over
T*B*S and, at inference, are a per-channel affine map that folds into the preceding Linear for free.

Causality in training: a batch statistic over every position would let a later token change an earlier position's
output (a side channel the model can learn to use). So whenever a batch statistic normalises the current batch,
position s uses only the statistics of positions <= s (prefix moments over T*B*(s+1) samples); the last position
sees the whole batch, which is also what updates the running estimate used at inference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def prefix_moments(x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and second moment of (x - shift) over every leading axis and positions <= s: two (S, C) tensors for x of
    shape (..., S, C). Subtracting a constant shift near the mean keeps E[d^2] - E[d]^2 accurate."""
    d = (x - shift).reshape(-1, x.shape[-2], x.shape[-1])
    count = torch.arange(1, d.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None] * d.shape[0]
    return d.sum(0).cumsum(0) / count, (d * d).sum(0).cumsum(0) / count


class SeqBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over every leading dimension of (..., S, C), causal in training: position s is normalised with the
    mean and variance of positions <= s; the running estimate is updated with the whole batch's (the last prefix)."""

    energy_place = "norms"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.dim() < 3:
            return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        shift = x.detach()[..., 0, :].reshape(-1, x.shape[-1]).mean(0)  # position 0's mean: seen by every prefix
        d_mean, d_sq = prefix_moments(x, shift)
        var = (d_sq - d_mean * d_mean).clamp_min(0)
        y = (x - shift - d_mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                n = x.numel() // x.shape[-1]
                self.running_mean.mul_(1 - m).add_(m * (shift + d_mean[-1]))
                self.running_var.mul_(1 - m).add_(m * var[-1] * n / max(n - 1, 1))
        return y

    def affine_map(self) -> tuple[Tensor, Tensor]:
        """Eval-mode map y = a * x + c."""
        a = self.weight / torch.sqrt(self.running_var + self.eps)
        return a, self.bias - a * self.running_mean


class _PowerNormFn(torch.autograd.Function):
    """PowerNorm's normalisation and approximate backward (Shen et al. 2020, Algorithm 1), given 1/psi_{B-1}:

        forward:  xhat = x / psi_{B-1},  y = w * xhat + b
        backward: dxhat = w * dy;  dx = (dxhat - nu_{B-1} * xhat) / psi_{B-1}
                  nu_B = nu_{B-1} * (1 - m * Gamma_B) + m * Lambda_B,
                  Gamma_B = mean(xhat^2), Lambda_B = mean(dxhat * xhat)   (means over the batch, per channel)

    Lambda uses the incoming gradient dxhat, not the corrected one: the decay of nu is applied once."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, nu, momentum):  # noqa: D401 - autograd signature
        xhat = x * scale
        ctx.save_for_backward(xhat, scale, weight, nu)
        ctx.momentum = momentum
        return xhat * weight + bias

    @staticmethod
    def backward(ctx, grad_out):
        xhat, scale, weight, nu = ctx.saved_tensors
        dims = tuple(range(grad_out.dim() - 1))
        dxhat = grad_out * weight
        grad_x = (dxhat - nu * xhat) * scale
        m = ctx.momentum
        gamma = (xhat * xhat).mean(dims)
        lam = (dxhat * xhat).mean(dims)
        nu.mul_(1 - m * gamma).add_(m * lam)
        return grad_x, (grad_out * xhat).sum(dims), grad_out.sum(dims), None, None, None


class PowerNorm(nn.Module):
    """Second-moment normalisation by the running estimate psi_{B-1}, used in training too, so a batch's statistics
    never leak between its samples. The first `warmup` steps settle psi with the cumulative average of the batch
    second moments, this batch's included through its causal prefix moments (position s sees positions <= s)."""

    energy_place = "norms"

    def __init__(self, channels: int, momentum: float = 0.1, warmup: int = 100):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_psi2", torch.ones(channels))
        self.register_buffer("nu", torch.zeros(channels))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.momentum = momentum
        self.warmup = warmup

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            a, c = self.affine_map()
            return x * a + c
        with torch.no_grad():
            if int(self.steps) < self.warmup:
                n = int(self.steps) + 1
                positions = x.detach() if x.dim() >= 3 else x.detach()[:, None]  # a 2-D batch is one position
                _, moments = prefix_moments(positions, x.new_zeros(()))
                psi2 = self.running_psi2 * ((n - 1) / n) + moments / n  # (S, C): causal cumulative average
                self.running_psi2.copy_(psi2[-1])
            else:
                psi2 = self.running_psi2.clone()  # psi_{B-1}
                batch = x.detach().reshape(-1, x.shape[-1]).pow(2).mean(0)
                self.running_psi2.mul_(1 - self.momentum).add_(self.momentum * batch)
            self.steps += 1
        return _PowerNormFn.apply(x, self.weight, self.bias, torch.rsqrt(psi2 + 1e-5), self.nu, self.momentum)

    def affine_map(self) -> tuple[Tensor, Tensor]:
        return self.weight * torch.rsqrt(self.running_psi2 + 1e-5), self.bias


class LayerNorm(nn.LayerNorm):
    """Per-token LayerNorm (a class of ours so that it declares its energy place)."""

    energy_place = "norms"


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "layer":
        return LayerNorm(channels)
    if kind == "batch":
        return SeqBatchNorm(channels)
    if kind == "power":
        return PowerNorm(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose layer, batch, power or none")


def foldable(norm: nn.Module) -> bool:
    return isinstance(norm, SeqBatchNorm | PowerNorm)
