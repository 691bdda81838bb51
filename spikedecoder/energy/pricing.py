"""Pricing (`energy_report`): Horowitz (ISSCC 2014) 45 nm energies, the numbers the paper uses. A multiply costs
MAC - AC, an add or a comparison one AC; exp, division and square root are charged as a few MACs (an assumption
stated in `EnergyModel`; their counts are in the report to reprice); a shift (a LIF leak with tau = 2^k) one AC.
Memory (`memory=True`) adds one SRAM read per weight a token reads (a Linear's rows of the inputs active at any of
its T steps, once) and per embedding element looked up.

The report sums per place, per sub-block (summed over blocks), per block and per kind; `compare_reports` sets a
model beside its baseline. `step_energy` counts and prices one incremental-decoding step (the reference that
`spikedecoder serve`'s live meter, energy/live.py, equals without tracing the step) and `decode_report` the mean of
such steps over validation windows (the energy report's decoding figure).
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .counter import count_ops

WINDOW_BATCH = 8  # windows counted in one forward: bounds the memory of a measure (see energy_report)
KINDS = ("mac", "ac", "add", "mul", "cmp", "shift", "lif", "exp", "div", "sqrt", "mem")


@dataclass(frozen=True)
class EnergyModel:
    """Energy per operation in pJ. `mac` and `ac` are Horowitz's 45 nm multiply-add and add; `mem` is one read of
    one weight from an 8 KB SRAM (10 pJ per 64 bits). exp, div and sqrt have no 45 nm figure there: they are charged
    as `exp_macs`/`div_macs`/`sqrt_macs` MACs (range reduction + polynomial; Newton-Raphson iterations)."""

    name: str
    mac: float
    ac: float
    mem: float
    exp_macs: float = 8.0
    div_macs: float = 4.0
    sqrt_macs: float = 4.0

    def prices(self, memory: bool = False) -> dict[str, float]:
        """pJ per operation of each kind; `mem` is zero unless the memory term is asked for."""
        return {
            "mac": self.mac,
            "ac": self.ac,
            "add": self.ac,
            "mul": self.mac - self.ac,
            "cmp": self.ac,
            "shift": self.ac,  # no 45 nm figure: an add's price, an upper bound (a float halving is an exponent step)
            "lif": self.mac,
            "exp": self.exp_macs * self.mac,
            "div": self.div_macs * self.mac,
            "sqrt": self.sqrt_macs * self.mac,
            "mem": self.mem if memory else 0.0,
        }


PRESETS: dict[str, EnergyModel] = {
    "fp32": EnergyModel("fp32", mac=4.6, ac=0.9, mem=5.0),
    "fp16": EnergyModel("fp16", mac=1.5, ac=0.4, mem=2.5),
    "int8": EnergyModel("int8", mac=0.23, ac=0.03, mem=1.25),
}


def subblock(place: str) -> str:
    """block3.attention.qkv -> attention.qkv: the place summed over blocks."""
    return re.sub(r"^block\d+\.", "", place)


def _price(kinds: dict[str, int], prices: dict[str, float], fanout: bool = False) -> float:
    total = 0.0
    for kind, price in prices.items():
        n = kinds.get("ac_fanout", 0) if fanout and kind == "ac" else kinds.get(kind, 0)
        total += n * price
    return total


def energy_report(
    model: nn.Module,
    idx: Tensor | Iterable[Tensor],
    preset: str | EnergyModel = "fp32",
    memory: bool = False,
    fold: bool = True,
    batch: int = WINDOW_BATCH,
) -> dict[str, Any]:
    """Energy per token of forwards on the windows `idx` (B, S), JSON-ready. With fold (default), BatchNorm/PowerNorm
    are folded into their Linear first, as at deployment (on a copy; the model is untouched).

    The windows are counted `batch` at a time and the counts added, so memory stays bounded for any number of them;
    `idx` may also be an iterable of (b, S) batches (energy.report.window_batches streams them). A tensor is binary
    (spikes) when all of it is 0 or 1 within its batch, so up to `batch` windows give the counts of one forward.

    Keys: total_pj_per_token (exact counts) and total_pj_per_token_fanout (paper-style AC counts);
    synaptic_pj_per_token[_fanout] (matrix products only); per_place_pj, per_subblock_pj (summed over blocks),
    per_block_pj, per_kind_pj (pJ per token); kind_counts (ops in the forward), ops_per_token, counts[place][kind];
    firing_rates {LIF layer: rate}, mean_firing_rate, input_spike_density {place: ones per Linear input and step};
    tokens, batch, window; energy_preset, prices_pj, memory, folded_norms, config, unpriced_ops."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown energy preset {preset!r}; choose one of {', '.join(PRESETS)}")
    energy = PRESETS[preset] if isinstance(preset, str) else preset
    folded = 0
    if fold and hasattr(model, "fold_norms"):
        model = copy.deepcopy(model).eval()
        folded = model.fold_norms()
    ops, every, rows, width = None, None, 0, 0
    for chunk in idx.split(batch) if isinstance(idx, Tensor) else idx:
        part = count_ops(model, chunk)
        # every step: a count of its own where work ran once for T identical steps, else the same figures; a copy
        # either way, since add() sums in place and `ops` must not take a chunk twice
        steps = copy.deepcopy(part)
        if any(r.get("repeats", 1) > 1 for r in part.products):  # work done once for T identical steps
            steps = count_ops(model, chunk, invariant_once=False)
        ops = part if ops is None else ops.add(part)
        every = steps if every is None else every.add(steps)
        rows, width = rows + int(chunk.shape[0]), int(chunk.shape[1])
    if ops is None:
        raise ValueError("no windows to measure; give at least one window of token ids")
    prices = energy.prices(memory)
    tokens = ops.tokens
    per_place = {p: _price(k, prices) / tokens for p, k in sorted(ops.counts.items())}
    per_subblock: dict[str, float] = defaultdict(float)
    per_block: dict[str, float] = defaultdict(float)
    for place, pj in per_place.items():
        per_subblock[subblock(place)] += pj
        per_block[place.split(".")[0]] += pj
    kinds = ops.by_kind()
    rates = ops.firing_rates()
    # the paper's scope: only the matrix products (synaptic operations), exact and nnz * fan-out
    synaptic = sum(r["charged"] * prices[r["kind"]] for r in ops.products) / tokens
    synaptic_fanout = sum(r["fanout"] * prices[r["kind"]] for r in ops.products) / tokens
    density: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in ops.products:
        if r["weight"] and r["kind"] == "ac":
            density[r["place"]][0] += r["input_nnz"]
            density[r["place"]][1] += r["input_size"]
    spikes = sum(s for s, _ in ops.firing.values())
    updates = sum(u for _, u in ops.firing.values())
    config = getattr(model, "config", None)
    return {
        "config": config.to_dict() if hasattr(config, "to_dict") else type(model).__name__,
        "energy_preset": energy.name,
        "prices_pj": prices,
        "memory": memory,
        "tokens": tokens,
        "batch": rows,
        "window": width,
        "folded_norms": folded,
        "total_pj_per_token": sum(per_place.values()),
        "total_pj_per_token_fanout": sum(_price(k, prices, fanout=True) for k in ops.counts.values()) / tokens,
        "synaptic_pj_per_token": synaptic,
        "synaptic_pj_per_token_fanout": synaptic_fanout,
        # the same forward with work on a time-invariant input charged at every timestep (as a dense executor runs
        # it) instead of once: equal to the figures above unless T > 1 and an input repeats over T
        "total_pj_per_token_every_step": sum(_price(k, prices) for k in every.counts.values()) / tokens,
        "synaptic_pj_per_token_every_step": sum(r["charged"] * prices[r["kind"]] for r in every.products) / tokens,
        "per_kind_pj": {k: kinds.get(k, 0) * prices[k] / tokens for k in KINDS},
        "kind_counts": {k: kinds.get(k, 0) for k in (*KINDS, "ac_fanout")},
        "ops_per_token": {k: kinds.get(k, 0) / tokens for k in (*KINDS, "ac_fanout")},
        "per_block_pj": dict(per_block),
        "per_subblock_pj": dict(per_subblock),
        "per_place_pj": per_place,
        "counts": ops.counts,
        "firing_rates": rates,
        "mean_firing_rate": spikes / updates if updates else None,
        # fraction of ones in the spikes each Linear receives, per time step (the embedding's included)
        "input_spike_density": {p: n / size for p, (n, size) in density.items() if size},
        "unpriced_ops": ops.unpriced,
    }


# ---------------------------------------------------------------------------------------------- incremental decoding
@dataclass
class StepEnergy:
    """One forward step: pj for the whole step, the tokens it fed (1 per row for a cached step), firing rates."""

    pj: float
    tokens: int
    firing: dict[str, float]


def deployed(model: nn.Module) -> nn.Module:
    """An eval copy with BatchNorm/PowerNorm folded into their Linear, as the energy figures measure models."""
    model = copy.deepcopy(model).eval()
    if hasattr(model, "fold_norms"):
        model.fold_norms()
    return model


def step_energy(model: nn.Module, idx: Tensor, cache: Any, preset: str = "fp32", memory: bool = False) -> StepEnergy:
    """The step incremental decoding runs, model(idx, cache), counted and priced. It runs on a copy of the cache
    with the global RNG restored afterwards, so the caller's cache does not advance and a rate-coded model then
    draws the same spikes in the real step. Pass the model as deployed (`deployed`)."""
    with torch.random.fork_rng(devices=[]):
        ops = count_ops(model, idx, cache=copy.deepcopy(cache))
    prices = PRESETS[preset].prices(memory)
    return StepEnergy(sum(_price(k, prices) for k in ops.counts.values()), int(idx.numel()), ops.firing_rates())


def decode_report(
    model: nn.Module,
    idx: Tensor | Iterable[Tensor],
    preset: str = "fp32",
    memory: bool = False,
    fold: bool = True,
    batch: int = WINDOW_BATCH,
) -> dict[str, Any]:
    """Per-token energy of incremental decoding on windows idx (B, S): the first half of each window is prefilled
    into the model's cache, then its other tokens go in one at a time, each cached step counted as it runs (the
    windows side by side, `batch` at a time as in energy_report: a step's energy over B is its figure per token; a
    one-token step's tensor can be all 0/1 in a small batch, so the batch size is part of the measure).
    Softmax attention's steps grow with the K/V cache; spiking attention's running sums keep them flat."""
    model = deployed(model) if fold else model.eval()
    prices = PRESETS[preset].prices(memory)
    totals: list[float] = []
    rows = width = 0
    for chunk in idx.split(batch) if isinstance(idx, Tensor) else idx:
        if chunk.shape[1] < 2:
            raise ValueError("incremental decoding needs windows of at least 2 tokens (a prefill and a cached step)")
        first, width = chunk.shape[1] // 2, chunk.shape[1]
        cache = model.new_cache()
        with torch.no_grad():
            model(chunk[:, :first], cache)
        steps = []
        for j in range(first, width):
            ops = count_ops(model, chunk[:, j : j + 1], cache=cache)  # the counted forward is the step
            steps.append(sum(_price(k, prices) for k in ops.counts.values()))
        totals = [a + b for a, b in zip(totals, steps, strict=True)] if totals else steps
        rows += chunk.shape[0]
    if not rows:
        raise ValueError("no windows to measure; give at least one window of token ids")
    steps = [t / rows for t in totals]
    return {
        "pj_per_token": sum(steps) / len(steps),
        "first_step_pj": steps[0],
        "last_step_pj": steps[-1],
        "positions": [width // 2, width - 1],
        "step_pj": steps,
    }


def compare_reports(snn: dict[str, Any], ann: dict[str, Any]) -> dict[str, Any]:
    """How much less energy per token the first model needs than the baseline, overall and per sub-block."""
    if snn["energy_preset"] != ann["energy_preset"] or snn["memory"] != ann["memory"]:
        raise ValueError("compare reports priced with the same energy preset and memory setting")
    a, s = ann["total_pj_per_token"], snn["total_pj_per_token"]
    a_fan, s_fan = ann["total_pj_per_token_fanout"], snn["total_pj_per_token_fanout"]
    names = [*snn["per_subblock_pj"], *(k for k in ann["per_subblock_pj"] if k not in snn["per_subblock_pj"])]
    return {
        "energy_preset": snn["energy_preset"],
        "memory": snn["memory"],
        "snn_pj_per_token": s,
        "ann_pj_per_token": a,
        "ratio": s / a,
        "saving_percent": 100.0 * (1.0 - s / a),
        "saving_percent_fanout": 100.0 * (1.0 - s_fan / a_fan),
        # the paper's accounting: matrix products only (no norms, neurons, softmax, residuals), nnz * fan-out
        "saving_percent_synaptic": 100.0 * (1.0 - snn["synaptic_pj_per_token"] / ann["synaptic_pj_per_token"]),
        "saving_percent_synaptic_fanout": 100.0
        * (1.0 - snn["synaptic_pj_per_token_fanout"] / ann["synaptic_pj_per_token_fanout"]),
        **(
            {  # time-invariant work charged at every timestep
                "saving_percent_every_step": 100.0 * (1.0 - snn["total_pj_per_token_every_step"] / a),
                "saving_percent_synaptic_every_step": 100.0
                * (1.0 - snn["synaptic_pj_per_token_every_step"] / ann["synaptic_pj_per_token"]),
            }
            if "total_pj_per_token_every_step" in snn
            else {}
        ),
        "snn_window": snn["window"],
        "ann_window": ann["window"],
        "per_subblock_pj": {
            n: {"snn": snn["per_subblock_pj"].get(n, 0.0), "ann": ann["per_subblock_pj"].get(n, 0.0)} for n in names
        },
        **(
            {"decode_saving_percent": 100.0 * (1.0 - snn["decode"]["pj_per_token"] / ann["decode"]["pj_per_token"])}
            if "decode" in snn and "decode" in ann
            else {}
        ),
    }
