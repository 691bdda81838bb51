"""Energy of one incremental-decoding step: the cached forward that generation actually runs for a new token (one
token through the model's cache; the prompt's prefill, or a refill after the window slides), counted by the energy
counter (`count_ops`) and priced like the energy report."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .energy import PRESETS, _price, count_ops


@dataclass
class StepEnergy:
    """pj: the whole forward, in pJ; tokens: how many it fed (1 for a cached step); firing: rate per LIF layer."""

    pj: float
    tokens: int
    firing: dict[str, float]


def _count_cached(model: nn.Module, idx: Tensor, cache) -> object:
    """count_ops on model(idx, cache): the counter calls model(idx), so bind the cache for that one call."""
    model.forward = lambda x: type(model).forward(model, x, cache)
    try:
        return count_ops(model, idx)
    finally:
        del model.forward


def step_energy(model: nn.Module, idx: Tensor, cache, preset: str = "fp32", memory: bool = False) -> StepEnergy:
    """Operations of model(idx, cache), priced with an energy preset. The step runs on a copy of the cache and
    with the global RNG restored afterwards, so the caller's cache is not advanced and a rate-coded model then
    draws the same spikes in the real step. Pass the model as deployed (norms folded, see `deployed`)."""
    with torch.random.fork_rng(devices=[]):
        ops = _count_cached(model, idx, copy.deepcopy(cache))
    prices = PRESETS[preset].prices(memory)
    pj = sum(_price(kinds, prices) for kinds in ops.counts.values())
    return StepEnergy(pj, int(idx.numel()), ops.firing_rates())


def deployed(model: nn.Module) -> nn.Module:
    """An eval copy with BatchNorm/PowerNorm folded into their Linear, as the energy report measures models."""
    model = copy.deepcopy(model).eval()
    if hasattr(model, "fold_norms"):
        model.fold_norms()
    return model
