"""Surrogate gradients: a Heaviside step forward, a smooth derivative backward (SpikingJelly's conventions).

ATan:    g(x) = arctan(pi/2 * alpha * x) / pi + 1/2,  g'(x) = alpha / 2 / (1 + (pi/2 * alpha * x)^2), alpha=2
Sigmoid: g(x) = sigmoid(alpha * x),                    g'(x) = alpha * g(x) * (1 - g(x)),             alpha=4
The step fires at x >= 0, as SpikingJelly's `heaviside`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

DEFAULT_ALPHA = {"atan": 2.0, "sigmoid": 4.0}


def atan_grad(x: Tensor, alpha: float) -> Tensor:
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * x) ** 2)


def sigmoid_grad(x: Tensor, alpha: float) -> Tensor:
    sg = torch.sigmoid(alpha * x)
    return alpha * sg * (1 - sg)


GRADS = {"atan": atan_grad, "sigmoid": sigmoid_grad}


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kind: str, alpha: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.kind, ctx.alpha = kind, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * GRADS[ctx.kind](x, ctx.alpha), None, None


def spike(x: Tensor, kind: str = "atan", alpha: float | None = None) -> Tensor:
    """Heaviside(x) in {0, 1} with the named surrogate derivative."""
    return _Spike.apply(x, kind, DEFAULT_ALPHA[kind] if alpha is None else alpha)


class Surrogate(nn.Module):
    """A spike function as a module (no parameters), so it shows in the model's repr."""

    def __init__(self, kind: str = "atan", alpha: float | None = None):
        super().__init__()
        if kind not in GRADS:
            raise ValueError(f"unknown surrogate {kind!r}; choose one of {', '.join(GRADS)}")
        self.kind = kind
        self.alpha = DEFAULT_ALPHA[kind] if alpha is None else float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return _Spike.apply(x, self.kind, self.alpha)

    def grad(self, x: Tensor) -> Tensor:
        """The surrogate derivative g'(x), used by the fused LIF backward."""
        return GRADS[self.kind](x, self.alpha)

    def extra_repr(self) -> str:
        return f"{self.kind}, alpha={self.alpha}"


def make_surrogate(kind: str = "atan", alpha: float | None = None) -> Surrogate:
    return Surrogate(kind, alpha)
