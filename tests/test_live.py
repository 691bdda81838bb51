"""The live meter (spikedecoder.energy.live): each decoding step priced from the step's own tensors equals the energy
counter's count of the same step (count_ops on the deployed model with a copy of the cache), for spiking models of
every attention kind and for the ANN, at every position of a window, across a slide and for prefills."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from spikedecoder.energy import PRESETS, count_ops, deployed
from spikedecoder.energy.live import StepMeter, unsupported
from spikedecoder.events import to_events
from spikedecoder.generate import _Window
from spikedecoder.layers import batch_invariant

VARIANTS = {
    "preset (dual path, squared coincidences, normaliser, key convolution)": ("spikedecoder", {}),
    "make run (window 2, key convolution, A V norm)": (
        "spikedecoder",
        dict(attn_window=2, attn_norm="none", attn_power=1, combine="concat", v_threshold=1.0),
    ),
    "whole context, plain counts": ("spikedecoder", dict(attn_window=None, attn_norm="none", attn_power=1)),
    "whole context, normalised": ("spikedecoder", dict(attn_window=None, attn_power=1, attn_key_conv=False)),
    "windows per head, batch norm": ("spikedecoder", dict(attn_window=[1, 3], norm="batch", attn_power=1)),
    "spiking residual": ("spikedecoder", dict(residual=1, first_attn_lif=True)),
    "no decay input, tau 4": ("spikedecoder", dict(decay_input=False, tau=4.0, v_threshold=0.5)),
    "token and MLP convolutions": ("spikedecoder", dict(token_conv=3, mlp_conv=2, attn_key_conv=False)),
    "graded bipolar spikes": ("spikedecoder", dict(spike_levels=3, bipolar=True, attn_window=2, attn_power=1)),
    "a float stage (ReLU hidden layer)": ("spikedecoder", dict(float_stages=["mlp_hidden"])),
    "learned decay per channel": ("spikedecoder", dict(learnable_tau="channel", attn_window=2, attn_power=1)),
    "spiking attention only": ("spiking-attention", {}),
    "ann": ("ann", {}),
    "ann, windows per head, token convolution": ("ann", dict(attn_window=[3, 0], token_conv=2, mlp_conv=2)),
}


def priced(model, idx: torch.Tensor, cache) -> float:
    """The reference: count_ops of the step (on a copy of the cache), priced."""
    ops = count_ops(model, idx, cache=copy.deepcopy(cache))
    prices = PRESETS["fp32"].prices()
    return sum(n * prices.get(kind, 0.0) for kind, n in ops.by_kind().items())


def decode(meter: StepMeter, counted, ids: list[int], prompt: int, keep: int) -> list[tuple[float, float]]:
    """Run a window over ids as generation does (a prefill, one token per step, a refill when it slides) through
    the meter, and count each step the counted model runs on its own cache: (meter, count_ops) per step."""
    steps = []
    window = _Window(meter, keep, incremental=True)
    reference = _Window(counted, keep, incremental=True)
    seq = torch.tensor([ids])
    for n in range(prompt, len(ids) + 1):
        fed, start, cache = reference.fed, reference.start, reference.cache
        if n - start > counted.config.max_len or cache is None:  # the reference window (re)starts: a prefill
            start = n - keep if cache is not None else 0
            cache, fed = counted.new_cache(), start
        expected = priced(counted, seq[:, fed:n], cache)
        with torch.no_grad(), batch_invariant():
            window.next_logits(seq[:, :n])
            reference.next_logits(seq[:, :n])
        steps.append((meter.last.pj, expected))
    return steps


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_step_is_the_counters_count_of_that_step(name: str) -> None:
    preset, overrides = VARIANTS[name]
    model = tiny_model(preset, warm_norms=True, **overrides)
    counted = deployed(model)
    meter = StepMeter(counted, counted)
    assert meter.fast, meter.why_slow
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=g).tolist()  # 40 tokens: two slides of 16
    steps = decode(meter, counted, ids, prompt=5, keep=8)
    assert len(steps) == 36
    for i, (fast, reference) in enumerate(steps):
        assert fast == pytest.approx(reference, rel=1e-12, abs=1e-6), f"step {i}"
    assert len({round(ref, 3) for _, ref in steps}) > 3  # the steps differ: the test sees what varies


@pytest.mark.parametrize("name", [n for n in VARIANTS if not n.startswith("ann")])
def test_the_event_engine_step_gives_the_same_figure(name: str) -> None:
    """The page runs the event-driven copy: its spikes are the dense model's (up to float summation order at the
    threshold, which these models do not meet), so each step's figure is the counter's."""
    preset, overrides = VARIANTS[name]
    model = tiny_model(preset, warm_norms=True, **overrides)
    counted = deployed(model)
    meter = StepMeter(to_events(model), counted)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (30,), generator=g).tolist()
    for i, (fast, reference) in enumerate(decode(meter, counted, ids, prompt=3, keep=8)):
        assert fast == pytest.approx(reference, rel=1e-12, abs=1e-6), f"step {i}"


def test_the_fixed_part_is_measured_once_per_step_shape(monkeypatch) -> None:
    import spikedecoder.energy.live as live

    calls = []
    monkeypatch.setattr(live, "count_ops", lambda *a, **k: calls.append(1) or count_ops(*a, **k))
    counted = deployed(tiny_model("spikedecoder", timesteps=4, spike_levels=1, qkv_levels=1))  # binary, T = 4
    meter = StepMeter(counted, counted)
    cache = meter.new_cache()
    meter(torch.tensor([[1, 2, 3]]), cache)
    for t in range(6):
        meter(torch.tensor([[t]]), cache)
    assert len(calls) == 4  # a 3-token prefill, then every 1-token step: each shape measured on two steps, once
    assert meter.last.tokens == 1 and set(meter.last.firing) and set(meter.spikes)
    assert all(s.dtype == torch.bool and s.dim() == 2 for s in meter.spikes.values())


def test_models_it_cannot_price_are_counted_every_step() -> None:
    model = tiny_model("spikedecoder", residual=2)
    counted = deployed(model)
    meter = StepMeter(counted, counted)
    assert not meter.fast and "binary score maps" in meter.why_slow
    assert unsupported(tiny_model("spikedecoder", attn_offset=True))
    cache = meter.new_cache()
    meter(torch.tensor([[1, 2]]), cache)
    expected = priced(counted, torch.tensor([[3]]), cache)
    meter(torch.tensor([[3]]), cache)
    assert meter.last.pj == pytest.approx(expected, rel=1e-12)


def test_a_cost_the_meter_does_not_record_is_caught_and_counted_every_step(monkeypatch) -> None:
    """The shape's fixed part is measured on two different steps: were some value-dependent cost left out of the
    step's own part (here, attention's), the two would differ, and the meter counts every step instead."""
    import spikedecoder.energy.live as live

    monkeypatch.setattr(live, "spiking_attention_counts", lambda *args, **kwargs: None)
    counted = deployed(tiny_model("spikedecoder"))
    meter = StepMeter(counted, counted)
    cache = meter.new_cache()
    meter(torch.tensor([[1, 2, 3]]), cache)
    assert not meter.fast and "does not record" in meter.why_slow
    expected = priced(counted, torch.tensor([[4]]), cache)
    meter(torch.tensor([[4]]), cache)
    assert meter.last.pj == pytest.approx(expected, rel=1e-12)
