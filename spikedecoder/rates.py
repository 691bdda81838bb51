"""Firing rates of the LIF layers, measured during a forward, and the firing-rate regulariser built on them.

A layer's rate is the mean |s| of its outputs over every step and neuron (graded spikes count their magnitude):
spikes per neuron per step, the figure the energy measure reports (`OpCounts.firing_rates`, spikes / membrane
updates), named alike (the LIF's module path). `FiringRates(model)` hooks every LIF while it is open; training opens
one around each evaluation to log the rates, and, when `train.rate_weight > 0`, one for the whole run whose rates
keep their graph for the loss. With the regulariser off no hook is registered: the training step is unchanged.

The regulariser adds rate_weight * mean over the regularised layers of max(0, rate - target)^2: a squared hinge,
one-sided because the lever is energy. A layer firing above its target pays; one below it pays nothing, so the
regulariser never asks a quiet layer for more spikes (a symmetric (rate - target)^2 would, costing energy and
fighting the task loss for nothing). Squared, the push is smooth at the target and grows with the excess.
Under torchrun the rates are those of the whole global batch: each rank's detached rates are averaged over the
ranks, and each rank's term carries the gradient of its share, so N ranks of batch B take the steps of one process
of batch N * B, as the cross-entropy does.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import ConfigError
from .neurons import LIF


class FiringRates:
    """Spikes and membrane updates per LIF layer of `model` over the forwards run while open. keep_graph: the spike
    sums stay differentiable (for the regulariser); otherwise they are accumulated without a graph."""

    def __init__(self, model: nn.Module, keep_graph: bool = False):
        self.lifs = {name: m for name, m in model.named_modules() if isinstance(m, LIF)}
        self.keep_graph = keep_graph
        self.spikes: dict[str, Tensor] = {}
        self.updates: dict[str, int] = {}
        self.hooks: list = []

    def __enter__(self) -> FiringRates:
        self.hooks = [m.register_forward_hook(self._record(name)) for name, m in self.lifs.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    def _record(self, name: str):
        def hook(module: LIF, args: tuple, out: Tensor) -> None:
            s = out.abs() if module.bipolar else out  # binary and graded spikes are >= 0 already
            if self.keep_graph:
                total = s.sum(dtype=torch.float32)
            else:  # exact: float32 sums of a row's small integer counts, then float64 (a float64 pass is slow)
                total = s.detach().sum(-1).sum(dtype=torch.float64)
            self.spikes[name] = self.spikes[name] + total if name in self.spikes else total
            self.updates[name] = self.updates.get(name, 0) + out.numel()

        return hook

    def take(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        """(spikes, updates) per layer since the last take, and start counting anew."""
        spikes, updates = self.spikes, self.updates
        self.spikes, self.updates = {}, {}
        return spikes, updates


def summarise(spikes: dict[str, float], updates: dict[str, int]) -> dict[str, float]:
    """Per-layer rates and their mean over all neurons (`firing_rate`, as the energy report's mean_firing_rate)."""
    total = sum(updates.values())
    rates = {name: spikes[name] / updates[name] for name in spikes if updates[name]}
    return {"firing_rate": sum(spikes.values()) / total if total else 0.0, **rates}


def layer_targets(names: list[str], target: float | dict[str, float]) -> dict[str, float]:
    """The target of each regularised layer: one number for every LIF layer, or a table of glob patterns over the
    layers' names (`blocks.*.mlp.*`, `head.lif`, `*`), the first pattern that matches a layer giving its target
    (layers that none matches are not regularised)."""
    if not isinstance(target, dict):
        return dict.fromkeys(names, float(target))
    targets: dict[str, float] = {}
    for pattern, value in target.items():
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if names and not matched:
            raise ConfigError(
                f"train.rate_target pattern {pattern!r} matches no LIF layer of this model; its LIF layers are "
                f"{', '.join(names)}: fix the pattern (globs such as 'blocks.*.mlp.*' or '*')"
            )
        for name in matched:
            targets.setdefault(name, float(value))
    return targets


def rate_penalty(
    spikes: dict[str, Tensor], updates: dict[str, int], targets: dict[str, float], world: int = 1
) -> tuple[Tensor, dict[str, float]]:
    """(the regulariser's value before its weight, the global batch's per-layer rates and mean `firing_rate`).
    The value is mean_l max(0, R_l - t_l)^2 with R_l the rates over every rank's share; its gradient on each rank is
    that of its own share (the module docstring)."""
    names = [n for n in targets if n in spikes]
    if not names:  # no regularised layer ran (every rank alike: they run the same model)
        return torch.zeros(()), summarise({n: float(v) for n, v in spikes.items()}, updates)
    local = torch.stack([spikes[n] / updates[n] for n in names])
    sums = torch.stack([spikes[n].detach().double() for n in spikes])
    if world > 1:  # every rank's share is the same size: the global rates are the mean of the ranks'
        dist.all_reduce(sums)
        sums /= world
    summary = summarise(dict(zip(spikes, sums.tolist(), strict=True)), updates)
    rates = torch.tensor([summary[n] for n in names], dtype=local.dtype, device=local.device)
    excess = (rates - torch.tensor([targets[n] for n in names], dtype=local.dtype, device=local.device)).clamp(min=0)
    # value: the global penalty; gradient: 2 max(0, R - t) dr/dtheta of this rank's share r
    penalty = (excess**2 + 2 * excess * (local - local.detach())).mean()
    return penalty, summary
