"""The event-driven engine gives the dense path's answers: spikes compared one by one at every LIF (mismatches from
float summation order at the threshold counted, at most 1e-5 of all spikes), logits, greedy generation with the
cache, the CLI; and it really exploits the spikes (rows summed without a multiply, time-invariant work once, bool
spikes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_generate import TOKENIZER, make_model, prompt

from spikedecoder import cli, neurons
from spikedecoder.events import (
    EventLIF,
    EventLinear,
    EventLinearNorm,
    _Bags,
    _rows_sum,
    count_mismatches,
    event_kernel,
    record_spikes,
    spike_linear,
    to_events,
)
from spikedecoder.generate import generate_ids
from spikedecoder.layers import Linear, LinearNorm
from spikedecoder.neurons import LIF, charge
from spikedecoder.rundir import save_checkpoint

MODES = {
    "residual0-layer": ("spikedecoder", {}),
    "residual1": ("spikedecoder", dict(residual=1)),
    "residual2": ("spikedecoder", dict(residual=2)),
    "batchnorm-folded": ("spikedecoder", dict(norm="batch")),
    "powernorm-folded": ("spikedecoder", dict(norm="power")),
    "no-norm": ("spikedecoder", dict(norm="none", v_threshold=0.1)),
    "spiking-attention": ("spiking-attention", {}),
    "spiking-attention-mlp": ("spiking-attention-mlp", {}),
    "window": ("spikedecoder", dict(attn_window=3)),
    "window-per-head": ("spikedecoder", dict(attn_window=[2, 5], combine="concat", av_norm=True)),
    "head-concat": ("spikedecoder", dict(head_combine="concat")),
    "head-last-channel-threshold": ("spikedecoder", dict(head_combine="last", learnable_threshold="channel")),
    "binary-codes-no-decay-input": (
        "spikedecoder",
        dict(token_code="binary", position_code="binary", combine="concat", decay_input=False),
    ),
    "residual1-batchnorm-fused-lif": ("spikedecoder", dict(residual=1, norm="batch", lif_backend="fused")),
    "token-conv": ("spikedecoder", dict(token_conv=4, mlp_conv=2)),
    "token-conv-residual2-batchnorm": ("spikedecoder", dict(token_conv=3, mlp_conv=3, residual=2, norm="batch")),
    "token-conv-residual1-key-conv": ("spikedecoder", dict(token_conv=2, residual=1, attn_key_conv=True)),
    "token-conv-spiking-attention": ("spiking-attention", dict(token_conv=4, mlp_conv=2)),
    "graded-T1-token-conv": ("spikedecoder", dict(spike_levels=4, timesteps=1, token_conv=3, mlp_conv=2)),
    "graded-T1-channel-conv": (
        "spikedecoder",
        dict(spike_levels=4, qkv_levels=4, timesteps=1, token_conv=3, mlp_conv=2, conv_mode="channel", norm="batch"),
    ),
    "channel-conv-residual1": ("spikedecoder", dict(token_conv=2, mlp_conv=3, residual=1, conv_mode="channel")),
    "graded-bipolar-batchnorm": ("spikedecoder", dict(spike_levels=2, bipolar=True, norm="batch")),
    "graded-qkv-dual-path": (
        "spikedecoder",
        dict(spike_levels=3, qkv_levels=3, timesteps=1, attn_window=[2, 0], attn_norm="coincidence", attn_power=2),
    ),
    "graded-spiking-attention-mlp": ("spiking-attention-mlp", dict(spike_levels=3, bipolar=True)),
    "learned-decay-channel": ("spikedecoder", dict(learnable_tau="channel")),
    "learned-decay-layer-residual2-fused": (
        "spikedecoder",
        dict(learnable_tau="layer", residual=2, decay_input=False, lif_backend="fused"),
    ),
    "learned-decay-graded-channel-threshold": (
        "spikedecoder",
        dict(learnable_tau="channel", spike_levels=2, learnable_threshold="channel"),
    ),
    "key-conv-dual-path": (
        "spikedecoder",
        dict(attn_window=[2, 0], attn_norm="coincidence", attn_key_conv=True, av_norm=True, combine="concat"),
    ),
}


@pytest.mark.parametrize("mode", MODES)
def test_same_spikes_and_logits_as_the_dense_path(mode: str) -> None:
    preset, overrides = MODES[mode]
    dense = make_model(preset, max_len=64, **overrides)
    events = dense.to_events()
    idx = prompt(40, batch=3)
    logits_d, spikes_d = record_spikes(dense, idx)
    logits_e, spikes_e = record_spikes(events, idx)
    mismatches, total = count_mismatches(spikes_d, spikes_e)
    neurons = sum(s.numel() for s in spikes_d.values())
    assert total > 0.02 * neurons, f"{mode}: the model barely fires ({total} of {neurons}); the test would be void"
    assert mismatches <= 1e-5 * total, f"{mode}: {mismatches} of {total} spikes differ"
    torch.testing.assert_close(logits_e, logits_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mode",
    [
        "residual0-layer",
        "residual2",
        "window-per-head",
        "spiking-attention",
        "token-conv-residual2-batchnorm",
        "graded-T1-token-conv",
        "graded-qkv-dual-path",
    ],
)
def test_cached_greedy_generation_gives_the_dense_tokens(mode: str) -> None:
    preset, overrides = MODES[mode]
    dense = make_model(preset, max_len=32, **overrides)
    events = to_events(dense)
    idx = prompt(6, batch=2)
    expected = generate_ids(dense, idx, 40, greedy=True)  # slides past max_len=32 on the way
    got = generate_ids(events, idx, 40, greedy=True)
    assert torch.equal(got, expected)
    # the cache path of the event model is exact against its own full recompute
    assert torch.equal(generate_ids(events, idx, 40, greedy=True, incremental=False), got)


def test_linear_on_spikes_is_a_sum_of_weight_rows() -> None:
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(24, 7)
    spikes = torch.rand(4, 3, 24, generator=g) < 0.3
    spikes[1, 2] = False  # an empty bag: bias only
    rows = linear.weight.detach().t().contiguous()
    got = spike_linear(spikes, rows, linear.bias.detach())
    torch.testing.assert_close(got, linear(spikes.float()).detach(), rtol=1e-6, atol=1e-6)
    by_hand = rows[spikes[0, 0]].sum(0) + linear.bias.detach()
    torch.testing.assert_close(got[0, 0], by_hand)
    torch.testing.assert_close(got[1, 2], linear.bias.detach())
    # a non-binary input is not spikes: the dense product
    event = EventLinear(linear)
    x = torch.randn(4, 3, 24, generator=g)
    torch.testing.assert_close(event(x), linear(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("rate", "width", "steps", "threads"),
    [(0.05, 70, 4, 1), (0.5, 70, 4, 1), (0.3, 1100, 7, 2), (0.004, 33, 1, 1)],
)
def test_compiled_kernel_gives_the_embedding_bag_floats(rate: float, width: int, steps: int, threads: int) -> None:
    """The C++ kernel (each token's active rows read once, in blocks, added into every step at which they spike)
    sums in embedding_bag's order: the same floats, bit for bit, with and without a bias, for widths that are not a
    multiple of the 16-column chunk, with threads splitting the columns, and for blocks cut short (a few active rows);
    a spikeless token gets the bias."""
    if os.environ.get("SPIKEDECODER_EVENT_KERNEL") == "0":
        pytest.skip("the event kernel is switched off (SPIKEDECODER_EVENT_KERNEL=0)")
    kernel = event_kernel()
    assert kernel is not None, "the event kernel did not build (see the warning above)"
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(300, width, generator=g)
    bias = torch.randn(width, generator=g)
    spikes = torch.rand(steps, 5, 300, generator=g) < rate
    spikes[:, 3] = False
    bags = _Bags.of(spikes)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b in (None, bias):
            expected = _rows_sum(bags, rows, None if b is None else b.clone()).reshape(steps, 5, width)
            assert torch.equal(kernel.spike_linear(spikes, rows, b), expected)
        torch.testing.assert_close(kernel.spike_linear(spikes, rows, bias)[:, 3], bias.expand(steps, width))
    finally:
        torch.set_num_threads(before)


def added_count_times(counts: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The count kernel's sums by hand: per (step, token), each input's row added |count| times (subtracted for a
    negative count), inputs in increasing order, then the bias."""
    sums = []
    for token in counts.reshape(-1, counts.shape[-1]):
        acc = torch.zeros(rows.shape[1])
        for i, c in enumerate(token.tolist()):
            for _ in range(abs(int(c))):
                acc = acc + rows[i] if c > 0 else acc - rows[i]
        sums.append(acc + bias if bias is not None else acc)
    return torch.stack(sums).reshape(*counts.shape[:-1], rows.shape[1])


@pytest.mark.parametrize(
    ("width", "shape", "top", "threads"), [(70, (1, 4), 4, 1), (33, (3, 2, 2), 4, 1), (1100, (2, 3), 255, 2)]
)
def test_count_kernel_adds_each_row_count_times(width: int, shape: tuple, top: int, threads: int) -> None:
    """Graded spikes (signed integer counts, zero rows among them): the kernel's sums are the rows added |count|
    times in input order, bit for bit, for widths that are not a multiple of the 16-column chunk, T > 1, any leading
    shape and threads splitting the columns; 0/1 counts give the bool kernel's floats."""
    if os.environ.get("SPIKEDECODER_EVENT_KERNEL") == "0":
        pytest.skip("the event kernel is switched off (SPIKEDECODER_EVENT_KERNEL=0)")
    kernel = event_kernel()
    assert kernel is not None, "the event kernel did not build (see the warning above)"
    g = torch.Generator().manual_seed(3)
    inputs = 40
    rows = torch.randn(inputs, width, generator=g)
    bias = torch.randn(width, generator=g)
    counts = torch.randint(-top, top + 1, (*shape, inputs), generator=g).float()
    counts *= torch.rand(counts.shape, generator=g) < 0.4
    counts[..., 5] = 0  # an input silent at every step and token
    counts[0, ..., 0, :] = 0  # a token (step 0) with no active input: the bias only
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b in (None, bias):
            got = kernel.count_linear(counts, rows, b)
            assert got.shape == (*shape, width)
            assert torch.equal(got, added_count_times(counts, rows, b))
        torch.testing.assert_close(got, counts @ rows + bias, rtol=1e-5, atol=1e-4 * top)
        spikes = counts > 0
        flat = spikes.reshape(shape[0], -1, inputs)
        assert torch.equal(
            kernel.count_linear(spikes.float(), rows, bias).reshape(flat.shape[:2] + (width,)),
            kernel.spike_linear(flat, rows, bias),
        )
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", [0.5, -2.25, float("nan"), float("inf"), 256.0])
def test_a_value_that_is_no_count_takes_the_dense_product(value: float) -> None:
    """The count kernel declines an input holding a non-integer, non-finite or too large value (None), and the
    event Linear then computes the dense product: the same floats as F.linear."""
    g = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(20, 9)
    x = torch.randint(0, 4, (2, 3, 20), generator=g).float()
    x[1, 2, 7] = value
    if event_kernel() is not None:
        assert event_kernel().count_linear(x, linear.weight.detach().t().contiguous(), None) is None
    event = EventLinear(linear)
    expected = torch.nn.functional.linear(x, event.rows.t(), event.bias)
    torch.testing.assert_close(event(x), expected, rtol=0, atol=0, equal_nan=True)
    x[1, 2, 7] = 3.0  # counts again: the kernel's sums, close to the dense product
    torch.testing.assert_close(event(x), linear(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
@pytest.mark.parametrize("bipolar", [False, True])
@pytest.mark.parametrize(
    ("tau", "decay_input", "per_channel"), [(2.0, True, True), (4.0, False, False), (3.0, True, True)]
)
def test_compiled_graded_lif_gives_the_tensor_ops_counts(
    levels: int, bipolar: bool, tau: float, decay_input: bool, per_channel: bool
) -> None:
    """Graded and bipolar neurons in the C++ LIF: the counts of neurons.fire bit for bit (EventLIF's tensor-op
    steps and the dense lif_forward), near every level's threshold too (inputs and thresholds on a grid of eighths,
    so membranes land exactly on k * threshold), with one threshold per channel or per layer."""
    if os.environ.get("SPIKEDECODER_EVENT_KERNEL") == "0":
        pytest.skip("the event kernel is switched off (SPIKEDECODER_EVENT_KERNEL=0)")
    channels = 40
    lif = LIF(
        tau=tau,
        decay_input=decay_input,
        channels=channels if per_channel else None,
        learnable_threshold="channel" if per_channel else "none",
        levels=levels,
        bipolar=bipolar,
    )
    if per_channel:
        lif.v_threshold.data.copy_(torch.arange(1, channels + 1) / 8)
    event = EventLIF(lif)
    g = torch.Generator().manual_seed(9)
    x = torch.cat(
        [
            torch.randn(3, 2, 30, channels, generator=g) * 3,
            torch.randint(-24, 25, (3, 2, 30, channels), generator=g) / 8,
        ],
        1,
    )
    expected = event.steps(x)
    got = event_kernel().lif(x, event.v_threshold, tau, decay_input, levels, bipolar)
    assert got.dtype == (torch.bool if levels == 1 and not bipolar else torch.float32)
    assert torch.equal(got, expected)
    dense = neurons.lif_forward(x, lif.v_threshold.detach(), tau, decay_input, levels, bipolar)[0]
    assert torch.equal(got.float(), dense)
    assert torch.equal(event(x), dense)  # the module takes the kernel
    assert bool((dense.abs() == levels).any()) and bool((dense.abs() == 1).any())
    assert bool((dense < 0).any()) == bipolar


@pytest.mark.parametrize(
    "tau, decay_input, per_channel",
    [
        (2.0, True, False),
        (2.0, False, False),
        (4.0, True, True),
        (4.0, False, False),
        (3.0, True, True),
        (3.0, False, True),
    ],
)
def test_compiled_lif_gives_the_tensor_ops_spikes(tau: float, decay_input: bool, per_channel: bool) -> None:
    """The C++ LIF does EventLIF's float operations in the same order: the same spikes, bit for bit, near threshold
    too (inputs on a grid that lands exactly on it)."""
    if os.environ.get("SPIKEDECODER_EVENT_KERNEL") == "0":
        pytest.skip("the event kernel is switched off (SPIKEDECODER_EVENT_KERNEL=0)")
    channels = 48
    lif = EventLIF(
        LIF(
            tau=tau,
            decay_input=decay_input,
            channels=channels if per_channel else None,
            learnable_threshold="channel" if per_channel else "none",
        )
    )
    if per_channel:
        lif.v_threshold.copy_(torch.linspace(0.3, 1.7, channels))
    g = torch.Generator().manual_seed(7)
    x = torch.cat(
        [torch.randn(4, 50, channels, generator=g) * 2, torch.randint(0, 9, (4, 50, channels), generator=g) / 4]
    )
    expected = lif.steps(x)
    assert torch.equal(event_kernel().lif(x, lif.v_threshold.reshape(-1), tau, decay_input), expected)
    assert 0.05 < expected.float().mean() < 0.95


def charge_flips(tau: float, n: int = 32) -> torch.Tensor:
    """(2, n) inputs whose second step fires (threshold 1) under the priced charge, `neurons.charge`, and stays
    silent under v + (x - v) / tau, which rounds twice: a search a few ulps around the exact solution."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.rand(20000, generator=g) * 0.9 * tau
    v1 = charge(torch.zeros_like(x1), x1, tau, True)  # the first step from v = 0 (x1 / tau: no flip yet)
    exact = (1 - v1 * (1 - 1 / tau)) * tau
    for ulps in range(-4, 5):
        x2 = exact * (1 + ulps * torch.finfo(torch.float32).eps)
        pick = (charge(v1, x2, tau, True) >= 1) & (v1 + (x2 - v1) / tau < 1)
        if pick.sum() >= n:
            chosen = pick.nonzero()[:n, 0]
            return torch.stack([x1[chosen], x2[chosen]])
    raise AssertionError("no input separates the two forms")


@pytest.mark.parametrize("tau", [2.0, 4.0])
def test_every_lif_path_runs_the_priced_charge(monkeypatch, tau: float) -> None:
    """The loop, the fused backend's kernel, the event engine's tensor ops and its C++ kernel compute the membrane
    in the form the energy measure prices ((v + x) / 2 at tau = 2): on inputs where that form and the textbook
    v + (x - v) / tau round to different sides of the threshold, every path fires as the priced form does."""
    x = charge_flips(tau)[:, None, :]  # (T = 2, 1, n)
    priced = torch.tensor([[False], [True]]).expand(2, x.shape[-1])[:, None, :]
    assert torch.equal(LIF(tau=tau)(x).bool(), priced)
    fused = LIF(tau=tau, backend="fused")
    monkeypatch.setattr(neurons, "_kernels", {"forward": neurons.lif_forward, "backward": neurons.lif_backward})
    assert torch.equal(fused(x).bool(), priced)
    event = EventLIF(LIF(tau=tau))
    assert torch.equal(event.steps(x), priced)
    if os.environ.get("SPIKEDECODER_EVENT_KERNEL") != "0":
        assert torch.equal(event_kernel().lif(x, event.v_threshold.reshape(-1), tau, True), priced)


def test_spikes_are_bool_and_time_invariant_work_runs_once() -> None:
    binary = dict(timesteps=4, spike_levels=1, qkv_levels=1)  # binary spikes over T = 4 (graded ones stay float)
    dense = make_model("spikedecoder", max_len=16, **binary)
    events = to_events(dense)
    assert not any(isinstance(m, Linear | LinearNorm | LIF) for m in events.modules())  # every one replaced
    blocks = events.blocks
    # LIFs read only by event Linears emit bool; Q, K, V feed the attention's matmuls and stay float
    assert blocks[0].attn.attn_lif.emit_bool and blocks[0].mlp.hidden_lif.emit_bool and events.head.lif.emit_bool
    assert not blocks[0].attn.q_lif.emit_bool
    steps_seen: dict[str, int] = {}

    def seen(name: str):
        return lambda m, inputs: steps_seen.__setitem__(name, inputs[0].shape[0])

    for name, m in events.named_modules():
        if isinstance(m, EventLinear):
            m.register_forward_pre_hook(seen(name))
    _, spikes = record_spikes(events, prompt(8))
    t = events.config.timesteps
    # direct encoding: the embedding spikes are the same at every step, so the first block's Q, K, V run once
    assert steps_seen["blocks.0.attn.q.linear"] == steps_seen["blocks.0.attn.v.linear"] == 1
    assert steps_seen["blocks.0.attn.proj.linear"] == steps_seen["blocks.1.attn.q.linear"] == t
    hidden = events.blocks[0].mlp.hidden_lif(torch.randn(t, 1, 8, 128))
    assert hidden.dtype == torch.bool
    assert isinstance(events.blocks[0].attn.q, EventLinearNorm) and isinstance(events.head.lif, EventLIF)
    # the key convolution concatenates [x_i, x_{i-1}]: the block's input LIF still emits bool for Q, K and V
    keyed = to_events(make_model("spikedecoder", max_len=16, attn_key_conv=True, attn_window=2, **binary))
    assert keyed.blocks[1].attn.in_lif.emit_bool
    torch.testing.assert_close(
        keyed(prompt(8)),
        make_model("spikedecoder", max_len=16, attn_key_conv=True, attn_window=2, **binary)(prompt(8)),
        rtol=1e-5,
        atol=1e-5,
    )
    # the energy places the replaced modules declared stay (energy_places.py)
    assert events.blocks[0].attn.q.energy_place == "qkv" and events.blocks[0].mlp.fc2.energy_place == "fc2"


def test_original_is_untouched_and_the_ann_is_refused() -> None:
    dense = make_model("spikedecoder", max_len=16, norm="batch")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    to_events(dense)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    with pytest.raises(ValueError, match="nothing for the event engine to exploit.*--engine dense"):
        to_events(make_model("ann", max_len=16))


def test_cli_generate_and_evaluate_with_the_event_engine(tmp_path, capsys) -> None:
    text = "abcdefghij klmnop\n:!" * 200
    data = tmp_path / "text.txt"
    data.write_text(text)
    model = make_model("spikedecoder", max_len=32)
    save_checkpoint(tmp_path / "run", model, TOKENIZER, {"train": {"data": str(data)}})
    outputs = {}
    for engine in ("dense", "events"):
        capsys.readouterr()
        argv = ["generate", str(tmp_path / "run"), "--prompt", "ab", "--tokens", "50", "--greedy"]
        assert cli.main(argv + ["--engine", engine]) == 0
        generated = capsys.readouterr().out
        assert cli.main(["evaluate", str(tmp_path / "run"), "--json", "--engine", engine]) == 0
        outputs[engine] = generated, json.loads(capsys.readouterr().out)
    assert outputs["events"][0] == outputs["dense"][0] and len(outputs["dense"][0]) > 50
    metrics = outputs["dense"][1]
    assert metrics["loss"] > 0 and metrics.keys() == outputs["events"][1].keys()
    for key, value in metrics.items():
        assert outputs["events"][1][key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value)
    ann = make_model("ann", max_len=32)
    save_checkpoint(tmp_path / "ann", ann, TOKENIZER, {})
    assert cli.main(["generate", str(tmp_path / "ann"), "--engine", "events"]) == 2
    assert "nothing for the event engine to exploit" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- robustness
def test_more_than_64_timesteps_fall_back_with_one_warning(recwarn) -> None:
    """The kernel packs a token's steps into 64 bits; a model with T = 65 converts and runs on embedding_bag."""
    dense = make_model("spikedecoder", max_len=16, timesteps=65)
    events = to_events(dense)
    said = [w for w in recwarn if "timesteps=65 > 64" in str(w.message)]
    assert len(said) == (0 if event_kernel() is None else 1)
    idx = prompt(8, batch=2)
    torch.testing.assert_close(events(idx), dense(idx), rtol=1e-5, atol=1e-5)
    assert torch.equal(generate_ids(events, idx, 6, greedy=True), generate_ids(dense, idx, 6, greedy=True))


def test_the_embedding_bag_fallback_is_thread_safe(monkeypatch) -> None:
    """Threads running event models at once, on the fallback path, each get their own single-thread answers."""
    import sys
    import threading

    import spikedecoder.events as events_module

    monkeypatch.setattr(events_module, "event_kernel", lambda: None)
    models = [to_events(make_model("spikedecoder", max_len=16, seed=s)) for s in range(2)]
    inputs = [prompt(6 + i, batch=1 + i % 3) for i in range(6)]
    expected = [models[i % 2](x) for i, x in enumerate(inputs)]
    failures: list[str] = []

    def work(i: int) -> None:
        try:
            for _ in range(15):
                if not torch.equal(models[i % 2](inputs[i]), expected[i]):
                    failures.append(f"thread {i}: other logits")
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            failures.append(f"thread {i}: {type(error).__name__}: {error}")

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so that a race shows
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert failures == []


def test_the_cached_build_is_keyed_by_the_cpu_features(monkeypatch, tmp_path) -> None:
    """A machine without AVX-512 that shares the cache (a home directory) gets its own build folder, never the
    AVX-512 build; where -march=native is missing the build is portable (no -march) and keyed `generic`."""
    import spikedecoder.kernel_build as kb

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with_avx512 = ["#define __AVX2__ 1", "#define __AVX512F__ 1", "#define __AVX__ 1"]
    without = ["#define __AVX2__ 1", "#define __AVX__ 1"]
    assert kb.build_directory("k", with_avx512) != kb.build_directory("k", without)
    assert kb.build_directory("k", without) == kb.build_directory("k", list(without))  # stable
    seen: dict = {}

    def fake_load(name, sources, extra_cflags, build_directory):
        seen.update(flags=extra_cflags, folder=build_directory)
        return "module"

    monkeypatch.setattr("torch.utils.cpp_extension.load", fake_load)
    source = tmp_path / "k.cpp"
    for features in (without, None):
        monkeypatch.setattr(kb, "native_features", lambda features=features: features)
        assert kb.load_kernel("k", source, ["-O3"]) == "module"
        assert seen["folder"] == str(kb.build_directory("k", features))
        assert ("-march=native" in seen["flags"]) == (features is not None)
    assert seen["folder"].endswith("k-generic")
    written = (kb.build_directory("k", without) / "cpu-features.txt").read_text()
    assert "#define __AVX2__ 1" in written and "AVX512" not in written
    # the real key is what -march=native adds on this machine: its build folder says so
    real = kb.native_features()
    if real is not None:
        assert all(line.startswith("#define ") for line in real)
        assert "#define __SSE2__ 1" not in real  # in the defaults already, so not part of the key


def test_a_missing_ninja_falls_back_with_one_warning(monkeypatch, tmp_path) -> None:
    import shutil
    import sys
    import warnings

    import spikedecoder.kernel_build as kb

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "ninja" else real_which(name, *a, **k))
    monkeypatch.setitem(sys.modules, "ninja", None)  # `import ninja` fails
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kb.load_kernel("k", tmp_path / "k.cpp", ["-O3"]) is None
    assert [str(w.message) for w in caught] == [
        "event kernel: ninja, which builds it, is missing; `pip install ninja` (a dependency of spikedecoder); "
        "using embedding_bag (the same floats, slower)"
    ]
    # the ninja package's own copy is used when PATH has none
    monkeypatch.delitem(sys.modules, "ninja")
    ninja = pytest.importorskip("ninja")
    paths: list[str] = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *a, **k: paths.append(os.environ["PATH"]) or "m")
    before = os.environ["PATH"]
    assert kb.load_kernel("k", tmp_path / "k.cpp", ["-O3"]) == "m"
    assert paths[0] == ninja.BIN_DIR + os.pathsep + before and os.environ["PATH"] == before  # for the build only


STALE_LOCK_CHILD = """
import warnings
warnings.simplefilter("always")
from spikedecoder.events import event_kernel
print(event_kernel() is not None)
"""


def test_a_build_lock_left_by_a_killed_build_is_broken(tmp_path) -> None:
    """torch's build lock is a plain file that a killed build leaves behind; torch then waits for it forever. The
    next build finds no live builder (our OS lock is free), removes it with a warning and builds."""
    import subprocess
    import sys

    from spikedecoder.kernel_build import build_directory, native_features

    if os.environ.get("SPIKEDECODER_EVENT_KERNEL") == "0" or event_kernel() is None:
        pytest.skip("the event kernel is switched off or cannot be built here")
    folder = build_directory("spikedecoder_events", native_features())
    (folder / "lock").write_text("")  # what a build killed midway leaves
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(
        [sys.executable, "-c", STALE_LOCK_CHILD], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.stdout.strip() == "True", done.stderr[-2000:]
    assert "removing the stale build lock" in done.stderr and not (folder / "lock").exists()


def test_a_build_held_by_another_process_is_not_waited_for_forever(tmp_path, monkeypatch) -> None:
    import subprocess
    import sys
    import warnings

    import spikedecoder.kernel_build as kb

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(kb, "native_features", lambda: None)
    folder = kb.build_directory("k", None)
    folder.mkdir(parents=True)
    hold = "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    hold += "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(folder / "build.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert kb.load_kernel("k", tmp_path / "k.cpp", ["-O3"], wait=0.3) is None
    finally:
        holder.kill()
        holder.wait()
    assert len(caught) == 1 and "another process has been building it" in str(caught[0].message)
