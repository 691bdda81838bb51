"""Normalisations over the channel (last) dimension of (T, B, S, C) tensors.

LayerNorm normalises each token (it costs operations at inference). BatchNorm and PowerNorm normalise with statistics
over T*B*S and, at inference, are a per-channel affine map that folds into the preceding Linear for free.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SeqBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over every leading dimension (T*B*S samples of C channels)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)

    def affine_map(self) -> tuple[Tensor, Tensor]:
        """Eval-mode map y = a * x + c."""
        a = self.weight / torch.sqrt(self.running_var + self.eps)
        return a, self.bias - a * self.running_mean


class _PowerNormFn(torch.autograd.Function):
    """PowerNorm (Shen et al. 2020, Algorithm 1): divide by the running quadratic mean psi_{t-1}; the backward
    replaces the batch-dependent term by its exponential moving average nu (approximate backpropagation)."""

    @staticmethod
    def forward(ctx, x, weight, bias, psi2, nu, momentum):  # noqa: D401 - autograd signature
        x2 = x.reshape(-1, x.shape[-1])
        scale = torch.rsqrt(psi2 + 1e-5)
        xhat = x2 * scale
        batch_psi2 = (x2 * x2).mean(0)
        psi2.mul_(1 - momentum).add_(momentum * batch_psi2)  # running estimate for the next step
        ctx.save_for_backward(xhat, scale, weight, nu)
        ctx.momentum = momentum
        return (xhat * weight + bias).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, scale, weight, nu = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gxhat = g * weight
        corrected = gxhat - nu * xhat
        grad_x = (corrected * scale).reshape(grad_out.shape)
        m = ctx.momentum
        gamma = (xhat * xhat).mean(0)
        lam = (corrected * xhat).mean(0)
        nu.mul_(1 - m * gamma).add_(m * lam)
        return grad_x, (g * xhat).sum(0), g.sum(0), None, None, None


class PowerNorm(nn.Module):
    """Second-moment normalisation with a running estimate used in training too, so a batch's statistics never
    leak between its samples; the first `warmup` steps use the batch's own second moment to settle psi."""

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
        if int(self.steps) < self.warmup:
            # cumulative average of batch second moments: a sound psi before the EMA takes over
            with torch.no_grad():
                n = int(self.steps) + 1
                batch = x.detach().reshape(-1, x.shape[-1]).pow(2).mean(0)
                self.running_psi2.mul_((n - 1) / n).add_(batch / n)
        self.steps += 1
        return _PowerNormFn.apply(x, self.weight, self.bias, self.running_psi2, self.nu, self.momentum)

    def affine_map(self) -> tuple[Tensor, Tensor]:
        return self.weight * torch.rsqrt(self.running_psi2 + 1e-5), self.bias


class LayerNorm(nn.LayerNorm):
    """Per-token LayerNorm (kept as a class of ours so the energy counter can name it)."""


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
