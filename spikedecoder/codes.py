"""Fixed {0, 1} code tables for tokens and positions (SPEC section 3): one-hot, binary and the binarised sinusoid.

Plain functions of sizes, importing nothing else of the package, so that both the configuration (which needs a
code's width to validate a model) and the embedding (which builds the tables) use them without importing each other.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def code_bits(n: int) -> int:
    """Bits of a binary code for n distinct ids (at least 1)."""
    return max(1, math.ceil(math.log2(n)))


def onehot_code(n: int) -> Tensor:
    return torch.eye(n)


def binary_code(n: int) -> Tensor:
    """LSB-first bits of each id: bit j of row i is (i >> j) & 1, so every id has its own code."""
    ids = torch.arange(n)[:, None]
    return ((ids >> torch.arange(code_bits(n))) & 1).float()


def sinusoidal_code(n: int, dim: int, base: float = 10000.0) -> Tensor:
    """Vaswani sinusoid (sin on even, cos on odd channels of each frequency pair) binarised at zero."""
    if dim % 2:
        raise ValueError(f"a sinusoidal position code needs an even width, got {dim}")
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(n, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return (pe > 1e-9).float()


def count_unique(codes: Tensor) -> int:
    return torch.unique(codes, dim=0).shape[0]


def unique_sinusoid_width(n: int, start: int = 16) -> int:
    """Smallest even width whose binarised sinusoid gives n distinct codes (zero-thresholding loses resolution)."""
    width = start
    while count_unique(sinusoidal_code(n, width)) < n:
        width += 16
    return width
