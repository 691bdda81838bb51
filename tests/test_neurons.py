"""LIF neuron and surrogate gradients: a hand-worked trace, the SpikingJelly 2.x reference, the fused backend."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

from spikedecoder import neurons
from spikedecoder.neurons import LIF
from spikedecoder.surrogate import Surrogate, spike


def atan_grad(u: float, alpha: float = 2.0) -> float:
    """d/du [arctan(pi/2 * alpha * u) / pi + 1/2], written out by hand."""
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * u) ** 2)


def currents(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Input currents centred so that about a quarter to a half of the neurons fire at some step."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 1.5 + 0.8


# ---------------------------------------------------------------------------------------------- surrogates
@pytest.mark.parametrize(
    ("kind", "alpha", "primitive"),
    [
        ("atan", 2.0, lambda x, a: torch.atan(math.pi / 2 * a * x) / math.pi + 0.5),
        ("atan", 3.0, lambda x, a: torch.atan(math.pi / 2 * a * x) / math.pi + 0.5),
        ("sigmoid", 4.0, lambda x, a: torch.sigmoid(a * x)),
        ("sigmoid", 1.5, lambda x, a: torch.sigmoid(a * x)),
    ],
)
def test_surrogate_is_heaviside_forward_and_smooth_derivative_backward(kind, alpha, primitive) -> None:
    x = torch.linspace(-2, 2, 401, dtype=torch.float64).requires_grad_()
    s = spike(x, kind, alpha)
    assert torch.equal(s, (x >= 0).double())  # fires at exactly 0, as SpikingJelly's heaviside
    s.sum().backward()
    smooth = x.detach().clone().requires_grad_()
    primitive(smooth, alpha).sum().backward()
    torch.testing.assert_close(x.grad, smooth.grad, rtol=1e-12, atol=1e-12)


def test_default_alphas_and_bad_surrogate_name() -> None:
    assert Surrogate("atan").alpha == 2.0 and Surrogate("sigmoid").alpha == 4.0
    with pytest.raises(ValueError, match="unknown surrogate 'relu'.*atan, sigmoid"):
        Surrogate("relu")


# ---------------------------------------------------------------------------------------------- hand computation
def test_lif_decay_input_against_a_hand_trace() -> None:
    """tau=2, v_th=1, decay_input: h = v + (x - v)/2, fire at h >= 1, hard reset to 0."""
    x = torch.tensor([2.5, 0.5, 3.0, 0.0, 1.0], requires_grad=True)
    s = LIF()(x[:, None])[:, 0]
    # h: 1.25 (fire, v=0), 0.25, 0.25+(3-0.25)/2 = 1.625 (fire, v=0), 0, 0.5
    h = [1.25, 0.25, 1.625, 0.0, 0.5]
    assert s.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    s.sum().backward()
    # BPTT by hand: dh_t = g(h_t - 1) + dh_{t+1} * (1 - 1/tau) * (1 - s_t) (reset detached); dx_t = dh_t / tau
    g = [atan_grad(v - 1) for v in h]
    dh4 = g[4]
    dh3 = g[3] + dh4 * 0.5
    dh2 = g[2]  # s_2 = 1: the reset cuts the path from later steps
    dh1 = g[1] + dh2 * 0.5
    dh0 = g[0]
    expected = torch.tensor([dh0, dh1, dh2, dh3, dh4]) / 2
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=0)


def test_lif_without_decay_input_and_threshold_gradient_against_a_hand_trace() -> None:
    """decay_input=False: h = v/2 + x; the threshold gradient is -sum_t g(h_t - v_th) * dL/ds_t."""
    lif = LIF(decay_input=False, v_threshold=0.8, learnable_threshold="layer")
    x = torch.tensor([0.5, 0.6, 0.2, 1.0], requires_grad=True)
    s = lif(x[:, None])[:, 0]
    # h: 0.5, 0.25+0.6 = 0.85 (fire, v=0), 0.2, 0.1+1.0 = 1.1 (fire)
    h = [0.5, 0.85, 0.2, 1.1]
    assert s.tolist() == [0.0, 1.0, 0.0, 1.0]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    (s * weights).sum().backward()
    g = [atan_grad(v - 0.8) * w for v, w in zip(h, weights.tolist(), strict=True)]
    dh3 = g[3]
    dh2 = g[2] + dh3 * 0.5
    dh1 = g[1]
    dh0 = g[0] + dh1 * 0.5
    torch.testing.assert_close(x.grad, torch.tensor([dh0, dh1, dh2, dh3]), rtol=1e-6, atol=0)  # gain 1, not 1/tau
    torch.testing.assert_close(lif.v_threshold.grad, torch.tensor(-sum(g)), rtol=1e-6, atol=0)


def test_constant_binary_input_never_fires_with_tau_2() -> None:
    """SPEC section 2 pitfall: v = .5, .75, .875, ... approaches 1 from below, so a LIF on {0,1} input is silent."""
    # v_t = 1 - 2^-t: silent for any practical T (float32 rounds it up to 1 only after 24 steps)
    assert LIF()(torch.ones(16, 3, 5)).sum() == 0
    assert LIF(decay_input=False)(torch.ones(4, 3)).sum() > 0  # without input decay the same input does fire


def test_state_resets_on_every_call_and_neurons_are_independent() -> None:
    lif = LIF()
    x = currents((6, 4, 9))
    first = lif(x)
    assert torch.equal(lif(x), first)  # no state carried between calls (integration over T only)
    perm = torch.randperm(9)
    assert torch.equal(lif(x[..., perm]), first[..., perm])  # each feature on its own
    assert torch.equal(lif(x[:, :1]), first[:, :1])  # each token on its own


def test_per_channel_threshold_broadcasts_over_the_last_axis() -> None:
    lif = LIF(learnable_threshold="channel", channels=3)
    with torch.no_grad():
        lif.v_threshold.copy_(torch.tensor([0.1, 1.0, 100.0]))
    s = lif(torch.full((4, 2, 3), 0.5))
    assert s[..., 0].sum() > 0 and s[..., 2].sum() == 0
    assert "fixed threshold" not in repr(lif) and "fixed threshold" in repr(LIF())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tau=1.0), "tau must be > 1"),
        (dict(backend="cuda"), "backend must be 'loop' or 'fused'"),
        (dict(learnable_threshold="channel"), "per-channel threshold needs the channel count"),
        (dict(learnable_threshold="token"), "learnable_threshold must be none/layer/channel"),
        (dict(surrogate="relu"), "unknown surrogate"),
    ],
)
def test_bad_lif_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LIF(**kwargs)


def test_lif_rejects_inputs_without_timesteps() -> None:
    with pytest.raises(ValueError, match=r"\(T, \.\.\.\) input with T >= 1.*\(0, 3\)"):
        LIF()(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"T >= 1, got shape \(5,\)"):
        LIF()(torch.zeros(5))


# ---------------------------------------------------------------------------------------------- SpikingJelly 2.x
@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("kind", ["atan", "sigmoid"])
def test_matches_spikingjelly_lifnode(decay_input: bool, kind: str) -> None:
    """Same spikes and gradients as LIFNode on random currents. With decay_input our membrane is (v + x) / 2 (the
    priced form, one rounding) where LIFNode computes v + (x - v) / 2 (two): inputs within an ulp of the threshold
    can fire in one and not the other (test_events.py::test_every_lif_path_runs_the_priced_charge builds such
    inputs); none of these currents is that close, and the gradients' math is the same."""
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    reference = neuron.LIFNode(
        tau=2.0,
        decay_input=decay_input,
        v_threshold=1.0,
        v_reset=0.0,
        surrogate_function=surrogate.ATan() if kind == "atan" else surrogate.Sigmoid(),
        detach_reset=True,
        step_mode="m",
    )
    ours = LIF(tau=2.0, decay_input=decay_input, surrogate=kind)
    x_ref = currents((8, 3, 40), seed=1).requires_grad_()
    x_ours = x_ref.detach().clone().requires_grad_()
    upstream = torch.randn(8, 3, 40, generator=torch.Generator().manual_seed(2))
    s_ref, s_ours = reference(x_ref), ours(x_ours)
    assert torch.equal(s_ref, s_ours)
    assert 0.1 < s_ours.mean() < 0.6  # both regimes (firing and silent) are exercised
    (s_ref * upstream).sum().backward()
    (s_ours * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("decay_input", [True, False])
def test_learned_decay_matches_spikingjelly_parametric_lifnode(decay_input: bool) -> None:
    """learnable_tau='layer' is SpikingJelly's ParametricLIFNode (PLIF): same spikes, input and decay gradients."""
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    reference = neuron.ParametricLIFNode(
        init_tau=3.0,
        decay_input=decay_input,
        v_threshold=1.0,
        v_reset=0.0,
        surrogate_function=surrogate.ATan(),
        detach_reset=True,
        step_mode="m",
    )
    ours = LIF(tau=3.0, decay_input=decay_input, learnable_tau="layer")
    torch.testing.assert_close(ours.decay_logit.detach(), reference.w.detach())
    x_ref = currents((8, 3, 40), seed=1).requires_grad_()
    x_ours = x_ref.detach().clone().requires_grad_()
    upstream = torch.randn(8, 3, 40, generator=torch.Generator().manual_seed(2))
    s_ref, s_ours = reference(x_ref), ours(x_ours)
    assert torch.equal(s_ref, s_ours)
    assert 0.1 < s_ours.mean() < 0.6
    (s_ref * upstream).sum().backward()
    (s_ours * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.decay_logit.grad, reference.w.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- fused backend
def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def compare_backends(
    decay_input: bool,
    threshold: str,
    surrogate: str = "atan",
    compiled: bool = True,
    levels: int = 1,
    bipolar: bool = False,
    learnable_tau: str = "none",
) -> None:
    """Same spikes, input, threshold and (learned) decay gradients within 1e-6 relative (one shape for all, to
    compile once)."""
    channels = 16
    kwargs = dict(
        decay_input=decay_input, learnable_threshold=threshold, channels=channels, v_threshold=0.9, surrogate=surrogate
    ) | (dict(levels=levels, bipolar=bipolar) if levels > 1 or bipolar else {})
    kwargs |= dict(learnable_tau=learnable_tau) if learnable_tau != "none" else {}
    loop, fused = LIF(**kwargs), LIF(**kwargs, backend="fused")
    if threshold != "none":
        with torch.no_grad():
            th = torch.linspace(0.6, 1.3, channels) if threshold == "channel" else torch.tensor(1.1)
            loop.v_threshold.copy_(th)
            fused.v_threshold.copy_(th)
    if learnable_tau != "none":  # decays from 0.2 to 0.8 (tau 5 to 1.25), not the shift of tau = 2
        with torch.no_grad():
            w = torch.linspace(-1.4, 1.4, channels) if learnable_tau == "channel" else torch.tensor(0.7)
            loop.decay_logit.copy_(w)
            fused.decay_logit.copy_(w)
    x_loop = currents((4, 5, 7, channels), seed=3).requires_grad_()
    x_fused = x_loop.detach().clone().requires_grad_()
    upstream = torch.randn(x_loop.shape, generator=torch.Generator().manual_seed(4))
    with no_fallback_warning() if compiled else contextlib.nullcontext():
        s_fused = fused(x_fused)
        (s_fused * upstream).sum().backward()
    s_loop = loop(x_loop)
    (s_loop * upstream).sum().backward()
    assert torch.equal(s_fused, s_loop)
    assert 0.05 < s_loop.abs().mean() < 0.7 * levels
    if levels > 1 or bipolar:  # every level (and sign) fires somewhere, or the test is of fewer levels
        assert set(s_loop.unique().tolist()) == set(range(-levels if bipolar else 0, levels + 1))
    assert _relative_error(x_fused.grad, x_loop.grad) <= 1e-6
    if threshold == "none":
        assert fused.v_threshold.grad is None
    else:
        assert fused.v_threshold.grad.shape == loop.v_threshold.grad.shape
        # a bipolar layer threshold's gradient sums terms of both signs over every neuron: rounding order shows
        tol = 1e-5 if bipolar and threshold == "layer" else 1e-6
        assert _relative_error(fused.v_threshold.grad, loop.v_threshold.grad) <= tol
    if learnable_tau != "none":
        assert fused.decay_logit.grad.shape == loop.decay_logit.grad.shape
        assert loop.decay_logit.grad.abs().min() > 0  # every decay learns something, or the test is void
        # summed over every neuron and step, in another order than autograd's
        tol = 1e-5 if learnable_tau == "layer" else 1e-6
        assert _relative_error(fused.decay_logit.grad, loop.decay_logit.grad) <= tol


FUSED_CASES = [(d, th) for d in (True, False) for th in ("none", "layer", "channel")]
COMPILED_BY_DEFAULT = [(True, "channel"), (False, "layer")]  # each compiled variant costs 10-20 s on a cold cache


@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
@pytest.mark.parametrize(("decay_input", "threshold"), FUSED_CASES)
def test_fused_equations_equal_the_loop(monkeypatch, decay_input: bool, threshold: str, surrogate: str) -> None:
    """The fused backend's forward and hand-written BPTT, run eagerly (no compile), for every case."""
    monkeypatch.setattr(neurons, "_kernels", {"forward": neurons.lif_forward, "backward": neurons.lif_backward})
    compare_backends(decay_input, threshold, surrogate, compiled=False)


@pytest.mark.parametrize(("levels", "bipolar"), [(3, False), (1, True), (2, True)])
@pytest.mark.parametrize(("decay_input", "threshold"), [(True, "channel"), (False, "layer"), (True, "none")])
def test_fused_graded_spikes_equal_the_loop(monkeypatch, decay_input, threshold, levels, bipolar) -> None:
    """Graded and bipolar neurons: the fused forward and its hand-written BPTT (each level's surrogate, the
    threshold's k-fold slope) equal the autograd loop."""
    monkeypatch.setattr(neurons, "_kernels", {"forward": neurons.lif_forward, "backward": neurons.lif_backward})
    compare_backends(decay_input, threshold, compiled=False, levels=levels, bipolar=bipolar)


@pytest.mark.parametrize("learnable_tau", ["layer", "channel"])
@pytest.mark.parametrize(("decay_input", "threshold", "levels", "bipolar"), [
    (True, "channel", 1, False), (False, "layer", 1, False), (True, "none", 2, True), (False, "channel", 3, False)
])  # fmt: skip
def test_fused_learned_decay_equals_the_loop(monkeypatch, decay_input, threshold, levels, bipolar, learnable_tau):
    """A learned decay per layer or channel: the fused forward and its hand-written decay gradient equal the
    autograd loop, with fixed or learned thresholds, binary or graded spikes."""
    monkeypatch.setattr(neurons, "_kernels", {"forward": neurons.lif_forward, "backward": neurons.lif_backward})
    compare_backends(
        decay_input, threshold, compiled=False, levels=levels, bipolar=bipolar, learnable_tau=learnable_tau
    )


@pytest.mark.parametrize("decay_input", [True, False])
def test_learned_decay_against_a_hand_trace(decay_input: bool) -> None:
    """d = sigmoid(w): h = v + (x - v) d (or v - v d + x), fire at h >= 1, hard reset; dL/dd by hand-written BPTT:
    dh_t/dd = x_t - v_{t-1} (or -v_{t-1}), dh_t/dv_{t-1} = 1 - d, and dL/dw = dL/dd * d (1 - d)."""
    lif = LIF(learnable_tau="layer", decay_input=decay_input)
    assert float(lif.decay().detach()) == pytest.approx(0.5)  # starts at the config's tau = 2
    with torch.no_grad():
        lif.decay_logit.fill_(math.log(0.25 / 0.75))  # d = 1/4: tau = 4
    d = 0.25
    x = torch.tensor([1.6, 1.2, 0.3, 4.4] if decay_input else [0.4, 0.9, 0.3, 1.2], requires_grad=True)
    s = lif(x[:, None])[:, 0]
    xs = x.tolist()
    h, v, prev = [], 0.0, []
    for xt in xs:
        prev.append(v)
        ht = v + (xt - v) * d if decay_input else v - v * d + xt
        h.append(ht)
        v = 0.0 if ht >= 1 else ht
    assert s.tolist() == [float(ht >= 1) for ht in h] and 0 < sum(s.tolist()) < 4
    weights = [1.0, -0.5, 2.0, 0.7]
    (s * torch.tensor(weights)).sum().backward()
    grad_h, grad_next = [0.0] * 4, 0.0
    for t in range(3, -1, -1):
        grad_h[t] = atan_grad(h[t] - 1) * weights[t] + grad_next * (0.0 if h[t] >= 1 else 1.0)
        grad_next = grad_h[t] * (1 - d)
    gain = d if decay_input else 1.0
    torch.testing.assert_close(x.grad, torch.tensor([g * gain for g in grad_h]), rtol=1e-6, atol=0)
    dd = sum(g * ((xt - v) if decay_input else -v) for g, xt, v in zip(grad_h, xs, prev, strict=True))
    torch.testing.assert_close(lif.decay_logit.grad, torch.tensor(dd * d * (1 - d)), rtol=1e-5, atol=0)


def test_learned_decay_starts_as_the_fixed_tau() -> None:
    """Initialised at 1/tau, a learned decay gives the fixed LIF's spikes (tau = 3: not a shift either way)."""
    x = currents((6, 4, 9))
    fixed = LIF(tau=3.0)(x)
    for mode in ("layer", "channel"):
        lif = LIF(tau=3.0, learnable_tau=mode, channels=9)
        assert lif.decay_logit.shape == (() if mode == "layer" else (9,))
        torch.testing.assert_close(lif.decay(), torch.full_like(lif.decay(), 1 / 3))
        assert (lif(x) != fixed).float().mean() < 1e-3  # x * (1/3) and x / 3 may round apart at the threshold
    with pytest.raises(ValueError, match="per-channel decay needs the channel count"):
        LIF(learnable_tau="channel")
    with pytest.raises(ValueError, match="learnable_tau must be none/layer/channel"):
        LIF(learnable_tau="token")


def test_graded_and_bipolar_spikes_against_a_hand_trace() -> None:
    """levels=3, bipolar, tau=2, v_th=0.5: s = (thresholds 0.5, 1.0, 1.5 crossed) - (-0.5, -1.0, -1.5 crossed),
    reset to 0 wherever s != 0; ds/dh sums every level's surrogate slope, ds/dth = -sum_k k g(h - k th) + ..."""
    lif = LIF(v_threshold=0.5, levels=3, bipolar=True, learnable_threshold="layer")
    x = torch.tensor([2.5, 0.5, -2.8, 0.4, 9.0], requires_grad=True)
    s = lif(x[:, None])[:, 0]
    # h: 1.25 (2 levels, reset), 0.25 (none), 0.25 - 3.05 / 2 = -1.275 (-2, reset), 0.2 (none), 0.2 + 8.8 / 2 = 4.6
    # (3: capped at levels)
    h = [1.25, 0.25, -1.275, 0.2, 4.6]
    assert s.tolist() == [2.0, 0.0, -2.0, 0.0, 3.0]
    s.sum().backward()

    def slope(v: float) -> float:
        return sum(atan_grad(v - 0.5 * k) + atan_grad(-v - 0.5 * k) for k in (1, 2, 3))

    def slope_th(v: float) -> float:
        return sum(-k * atan_grad(v - 0.5 * k) + k * atan_grad(-v - 0.5 * k) for k in (1, 2, 3))

    g = [slope(v) for v in h]
    dh4 = g[4]
    dh3 = g[3] + dh4 * 0.5
    dh2 = g[2]  # fired: the reset cuts the path from later steps
    dh1 = g[1] + dh2 * 0.5
    dh0 = g[0]
    torch.testing.assert_close(x.grad, torch.tensor([dh0, dh1, dh2, dh3, dh4]) / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(lif.v_threshold.grad, torch.tensor(sum(slope_th(v) for v in h)), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("decay_input", "threshold"),
    [pytest.param(*case, marks=() if case in COMPILED_BY_DEFAULT else pytest.mark.slow) for case in FUSED_CASES],
)
def test_compiled_fused_backend_equals_the_loop(decay_input: bool, threshold: str) -> None:
    """The torch.compile'd kernels themselves (two variants by default, all six with -m slow)."""
    compare_backends(decay_input, threshold, compiled=True)
    assert neurons._kernels["forward"] is not neurons.lif_forward, "the forward kernel was not compiled"
    assert neurons._kernels["backward"] is not neurons.lif_backward, "the backward kernel was not compiled"


@pytest.mark.slow
def test_compiled_fused_backend_with_a_learned_decay_equals_the_loop() -> None:
    """The compiled kernels with a learned per-channel decay (its gradient written by hand; 20 s on a cold cache, so
    with -m slow: by default the same equations run eagerly, and a kernel that failed to compile would only fall
    back to them, with a warning)."""
    compare_backends(True, "channel", compiled=True, learnable_tau="channel")
    assert neurons._kernels["forward"] is not neurons.lif_forward, "the forward kernel was not compiled"
    assert neurons._kernels["backward"] is not neurons.lif_backward, "the backward kernel was not compiled"


@contextlib.contextmanager
def no_fallback_warning():
    """Fail if the fused kernel fell back to eager: the compiled path is the one under test."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield
    fallbacks = [str(w.message) for w in records if "LIF" in str(w.message)]
    assert not fallbacks, fallbacks


# ---------------------------------------------------------------------------------------------- compile fallback
def _failing(exc: BaseException):
    def kernel(*args):
        raise exc

    return kernel


@pytest.mark.parametrize(
    "exc", [torch.OutOfMemoryError("CUDA out of memory"), ValueError("shape mismatch"), RuntimeError("bad input")]
)
def test_fused_lif_does_not_hide_errors_the_eager_kernel_would_hit_too(monkeypatch, exc: BaseException) -> None:
    """Out of memory or a genuine bug must surface, and must not switch the process to the slow path."""
    failing = _failing(exc)
    monkeypatch.setattr(neurons, "_kernels", {"forward": failing, "backward": neurons.lif_backward})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(type(exc), match=str(exc)):
            LIF(backend="fused")(currents((4, 2, 3)))
    assert neurons._kernels["forward"] is failing


def test_fused_lif_falls_back_on_compile_errors_and_says_so_once(monkeypatch) -> None:
    from torch._dynamo.exc import Unsupported
    from torch._inductor.exc import CppCompileError

    monkeypatch.setattr(neurons, "_fallback_said", False)
    monkeypatch.setattr(
        neurons,
        "_kernels",
        {"forward": _failing(Unsupported("graph break")), "backward": _failing(CppCompileError(["cc"], "no cc"))},
    )
    x = currents((4, 2, 3)).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        spikes = LIF(backend="fused")(x)
        spikes.sum().backward()
        LIF(backend="fused")(x.detach())
    said = [str(w.message) for w in records if "fused LIF" in str(w.message)]
    assert len(said) == 1 and "Unsupported" in said[0] and "eager" in said[0], said
    assert neurons._kernels == {"forward": neurons.lif_forward, "backward": neurons.lif_backward}
    ref = LIF()(x_ref)
    ref.sum().backward()
    assert torch.equal(spikes, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
