"""What the counter returns (OpCounts) and how it reads tensors: spikes are recognised from their values."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class OpCounts:
    """Operations of one forward: counts[place][kind], spikes and updates per LIF layer, and the token count."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    firing: dict[str, tuple[int, int]] = field(default_factory=dict)  # LIF name -> (spikes, membrane updates)
    tokens: int = 0
    unpriced: dict[str, int] = field(default_factory=dict)  # ops on activations without a rule -> calls
    products: list[dict[str, Any]] = field(default_factory=list)  # one record per matrix product (see _product)

    def total(self, kind: str) -> int:
        return sum(kinds.get(kind, 0) for kinds in self.counts.values())

    def by_kind(self) -> dict[str, int]:
        totals: Counter = Counter()
        for kinds in self.counts.values():
            totals.update(kinds)
        return dict(totals)

    def place(self, name: str) -> dict[str, int]:
        return dict(self.counts.get(name, {}))

    def firing_rates(self) -> dict[str, float]:
        """Fraction of membrane updates that emitted a spike, per LIF layer."""
        return {name: s / u if u else 0.0 for name, (s, u) in self.firing.items()}


def is_binary(x: Tensor) -> bool:
    """A spike tensor: bool, or every value 0 or 1 (decided from the data, never from the module)."""
    if x.dtype == torch.bool:
        return True
    if x.numel() == 0:
        return False
    return bool(((x == 0) | (x == 1)).all())


def _nnz(x: Tensor) -> int:
    return int(torch.count_nonzero(x))


def _ptr(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
        return 0
