"""What the counter returns (OpCounts) and how it reads tensors: spikes are recognised from their values."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

_SUMMED = ("charged", "computed", "fanout", "dense", "input_nnz", "input_size")  # additive fields of a product


@dataclass
class OpCounts:
    """Operations of one forward: counts[place][kind], spikes and updates per LIF layer, and the token count."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    firing: dict[str, tuple[int, int]] = field(default_factory=dict)  # LIF name -> (spikes, membrane updates)
    tokens: int = 0
    unpriced: dict[str, int] = field(default_factory=dict)  # ops on activations without a rule -> calls
    products: list[dict[str, Any]] = field(default_factory=list)  # one record per matrix product (see _product)

    def add(self, other: OpCounts) -> OpCounts:
        """Add the counts of another forward of the same model (a further batch of windows), in place: measuring
        windows batch by batch keeps memory bounded however many there are. The product records are then summed
        per (place, op, kind, weight, binary operands, repeats)."""
        for place, kinds in other.counts.items():
            mine = self.counts.setdefault(place, {})
            for kind, n in kinds.items():
                mine[kind] = mine.get(kind, 0) + n
        for name, (spikes, updates) in other.firing.items():
            s, u = self.firing.get(name, (0, 0))
            self.firing[name] = (s + spikes, u + updates)
        self.tokens += other.tokens
        for op, n in other.unpriced.items():
            self.unpriced[op] = self.unpriced.get(op, 0) + n
        summed: dict[tuple, dict[str, Any]] = {}
        for record in [*self.products, *other.products]:
            key = (record["place"], record["op"], record["kind"], record["weight"], tuple(record["binary"]))
            key += (record.get("repeats", 1),)  # steps a record stands for: part of what it is, not summed
            if key not in summed:
                summed[key] = dict(record)
            else:
                for field_name in _SUMMED:
                    if field_name in record:
                        summed[key][field_name] += record[field_name]
        self.products = list(summed.values())
        return self

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
    if x[(0,) * x.dim()].item() not in (0, 1):  # most float activations fail at their first value: no full pass
        return False
    return bool(((x == 0) | (x == 1)).all())


def add_count(spikes: list[Tensor], out_numel: int) -> int:
    """Adds of an elementwise sum whose spike operands are `spikes` (zero, one or two of them): one per output, but
    a spike operand adds only where it is 1 (both spikes: where both are)."""
    if len(spikes) == 2:
        return _nnz(torch.logical_and(spikes[0] != 0, spikes[1] != 0))
    if spikes:
        return _nnz(spikes[0]) * (out_numel // spikes[0].numel())
    return out_numel


def attention_counts(q_numel: int, rows: int, pairs: int, d_k: int, d_v: int) -> tuple[dict, dict]:
    """Softmax attention's operations (`scores`, `values`) for `rows` queries of width d_k over `pairs` unmasked
    (query, key) pairs, as a K/V-cache decoder computes it: the query scaled (never the cached keys), Q K^T,
    softmax (max, subtract, exp, sum, a reciprocal per row and a multiply per entry), A V."""
    scores = {"mul": q_numel + pairs, "mac": pairs * d_k, "cmp": pairs, "add": 2 * pairs, "exp": pairs, "div": rows}
    return scores, {"mac": pairs * d_v}


def _nnz(x: Tensor) -> int:
    return int(torch.count_nonzero(x))


def _ptr(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
        return 0
