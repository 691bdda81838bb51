"""Multi-step LIF neuron (SPEC section 2): input (T, ...) current -> (T, ...) spikes in {0, 1}.

Charge:  h = v + (x - v) / tau            (decay_input=True, SpikingJelly's default)
         h = v - v / tau + x              (decay_input=False)
         computed in the form the energy measure prices (`charge`, `charge_ops`): with tau = 2 and decay_input,
         h = (v + x) * 0.5, an add and a shift; other powers of two (v - v * 2^-k) + x * 2^-k (decay_input) or
         (v - v * 2^-k) + x; any other tau as written above. The same value in exact arithmetic; in float32 the
         priced form rounds once where v + (x - v) / 2 rounds twice, so a membrane within an ulp of the threshold
         can fire in one form and not in the other (SpikingJelly runs the form above).
Fire:    s = H(h - v_th)                  (surrogate gradient backward)
Reset:   v = h * (1 - s), s detached      (hard reset to 0, detach_reset=True)

Graded spikes (levels L > 1): s = sum_{k=1..L} H(h - k v_th), the number of thresholds v_th, 2 v_th, ..., L v_th the
membrane crosses: L binary neurons sharing one membrane (a thermometer code), so a Linear reading s still only
accumulates (its row added s times). Bipolar neurons also fire negative spikes, - sum_k H(-h - k v_th), where the
membrane falls below -v_th (the row is subtracted). Either way the reset is to 0 wherever s != 0, and each level's
step gets its own surrogate derivative.

Learnable membrane decay (PLIF, Fang et al. 2021): the leak 1/tau becomes a trained parameter d = sigmoid(w), one per
layer or per channel, w initialised at -log(tau - 1) (so d starts at 1/tau): h = v + (x - v) * d (decay_input) or
h = v - v * d + x. The sigmoid keeps d in (0, 1) whatever the optimiser does.

The state starts at 0 on every call: neurons integrate over T only, never across tokens.

Two backends compute the same spikes: `loop` lets autograd record every step; `fused` is one custom autograd
function whose forward and backward each run the whole T loop in a single compiled kernel (torch.compile, eager
fallback), with the backward written by hand from the equations above.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .surrogate import GRADS, make_surrogate


class LIF(nn.Module):
    """Leaky integrate-and-fire over the leading T axis, with an optional learnable threshold."""

    energy_place = "lif"  # the energy counter's leaf for its membrane updates (energy_places.py)

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        decay_input: bool = True,
        surrogate: str = "atan",
        alpha: float | None = None,
        learnable_threshold: str = "none",
        channels: int | None = None,
        backend: str = "loop",
        levels: int = 1,
        bipolar: bool = False,
        learnable_tau: str = "none",
    ):
        super().__init__()
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be an integer >= 1 (1: binary spikes), got {levels!r}")
        self.levels, self.bipolar = levels, bipolar
        if tau <= 1.0:
            raise ValueError(f"tau must be > 1, got {tau}")
        if backend not in ("loop", "fused"):
            raise ValueError(f"backend must be 'loop' or 'fused', got {backend!r}")
        self.tau, self.decay_input, self.backend = float(tau), decay_input, backend
        self.surrogate = make_surrogate(surrogate, alpha)
        if learnable_threshold == "none":
            self.register_buffer("v_threshold", torch.tensor(float(v_threshold)), persistent=False)
        elif learnable_threshold == "layer":
            self.v_threshold = nn.Parameter(torch.tensor(float(v_threshold)))
        elif learnable_threshold == "channel":
            if channels is None:
                raise ValueError("a per-channel threshold needs the channel count")
            self.v_threshold = nn.Parameter(torch.full((channels,), float(v_threshold)))
        else:
            raise ValueError(f"learnable_threshold must be none/layer/channel, got {learnable_threshold!r}")
        self.learnable_tau = learnable_tau
        logit = -math.log(self.tau - 1.0)  # sigmoid(logit) = 1/tau
        if learnable_tau == "layer":
            self.decay_logit = nn.Parameter(torch.tensor(logit))
        elif learnable_tau == "channel":
            if channels is None:
                raise ValueError("a per-channel decay needs the channel count")
            self.decay_logit = nn.Parameter(torch.full((channels,), logit))
        elif learnable_tau != "none":
            raise ValueError(f"learnable_tau must be none/layer/channel, got {learnable_tau!r}")

    def decay(self) -> Tensor | None:
        """The learned leak d = 1/tau in (0, 1) (a scalar or one per channel), None where tau is fixed."""
        return torch.sigmoid(self.decay_logit) if self.learnable_tau != "none" else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"LIF expects (T, ...) input with T >= 1, got shape {tuple(x.shape)}")
        decay = self.decay()
        decay = decay.to(x.dtype) if decay is not None else None  # the membranes keep the input's dtype
        if self.backend == "fused" and not torch.is_grad_enabled():
            # inference (sampling, evaluation): the eager forward, same arithmetic; the compiled kernel pays off
            # in training, and every new sampling shape would compile it again
            th = self.v_threshold.detach()
            return lif_forward(x, th, self.tau, self.decay_input, self.levels, self.bipolar, decay)[0]
        if self.backend == "fused":
            return _FusedLIF.apply(
                x,
                self.v_threshold,
                decay,
                self.tau,
                self.decay_input,
                self.surrogate.kind,
                self.surrogate.alpha,
                self.levels,
                self.bipolar,
            )
        return self._loop(x, decay)

    def _loop(self, x: Tensor, decay: Tensor | None = None) -> Tensor:
        v, th, out = torch.zeros_like(x[0]), self.v_threshold, []
        for xt in x:
            if decay is not None:
                h = learned_charge(v, xt, decay, self.decay_input)
            else:
                h = charge(v, xt, self.tau, self.decay_input)
            s = self.surrogate(h - th)
            for k in range(2, self.levels + 1):
                s = s + self.surrogate(h - th * k)
            for k in range(1, self.levels + 1) if self.bipolar else ():
                s = s - self.surrogate(-h - th * k)
            v = h * (1 - (s.detach() != 0).to(h.dtype))
            out.append(s)
        return torch.stack(out)

    def extra_repr(self) -> str:
        learn = "" if isinstance(self.v_threshold, nn.Parameter) else ", fixed threshold"
        graded = f", levels={self.levels}" if self.levels > 1 else ""
        graded += ", bipolar" if self.bipolar else ""
        graded += f", learned decay per {self.learnable_tau}" if self.learnable_tau != "none" else ""
        return f"tau={self.tau}, decay_input={self.decay_input}, backend={self.backend}{learn}{graded}"


# ---------------------------------------------------------------------------------------------- the charge
def leak_shift(tau: float) -> float | None:
    """2^-k when tau = 2^k (the leak is then a shift by k bits), else None."""
    mantissa, exponent = math.frexp(tau)
    return 2.0 ** (1 - exponent) if mantissa == 0.5 else None


def charge(v: Tensor, x: Tensor, tau: float, decay_input: bool) -> Tensor:
    """The membrane before firing, h, from the membrane v after the last step and the input x: the arithmetic that
    `charge_ops` counts, the only place it is written for torch (the loop, the fused kernels and the event engine's
    fallback all call it; kernels/events.cpp has the same cases)."""
    shift = leak_shift(tau)
    if shift is None:
        return v + (x - v) / tau if decay_input else v - v / tau + x
    if decay_input:
        return (v + x) * 0.5 if tau == 2 else (v - v * shift) + x * shift
    return (v - v * shift) + x


def learned_charge(v: Tensor, x: Tensor, decay: Tensor, decay_input: bool) -> Tensor:
    """The membrane before firing with a learned leak d (1/tau): v + (x - v) * d, or v - v * d + x. Every engine
    (loop, fused, events) computes it in this order, so they round alike."""
    return v + (x - v) * decay if decay_input else v - v * decay + x


def charge_ops(tau: float, decay_input: bool, learned: bool = False) -> dict[str, int]:
    """Operations of one `charge` by kind (the energy measure adds one threshold comparison; the hard reset is a
    select): a shift for each multiply by 2^-k, an add for each add or subtract; with any other tau, or a learned
    decay (`learned_charge`, whatever value it has learnt), the multiply by 1/tau and its add are one
    multiply-accumulate (`lif`)."""
    if leak_shift(tau) is not None and not learned:
        if decay_input:
            return {"add": 1, "shift": 1} if tau == 2 else {"add": 2, "shift": 2}
        return {"add": 2, "shift": 1}
    return {"lif": 1, "add": 1} if decay_input else {"lif": 1}


# ---------------------------------------------------------------------------------------------- fused backend


def fire(h: Tensor, th: Tensor, levels: int = 1, bipolar: bool = False) -> Tensor:
    """The spikes of membranes h (no gradient): H(h - th), or for graded/bipolar neurons the signed count of the
    thresholds k th crossed. One comparison per level (and sign), as the energy counter prices it."""
    s = (h - th >= 0).to(h.dtype)
    for k in range(2, levels + 1):
        s = s + (h - th * k >= 0).to(h.dtype)
    for k in range(1, levels + 1) if bipolar else ():
        s = s - (-h - th * k >= 0).to(h.dtype)
    return s


MAX_LEVEL = 255  # the largest count a tensor may hold to be read as graded spikes


def is_graded(x: Tensor) -> bool:
    """Whether x holds graded spikes: signed integer counts of at most MAX_LEVEL, not all 0/1 (decided from the
    data, as the energy counter and the event engine decide binary spikes)."""
    if x.dtype == torch.bool or not x.is_floating_point() or x.numel() == 0:
        return False
    return bool((x == x.round()).all()) and float(x.abs().max()) <= MAX_LEVEL and not bool(((x == 0) | (x == 1)).all())


def lif_forward(
    x: Tensor,
    th: Tensor,
    tau: float,
    decay_input: bool,
    levels: int = 1,
    bipolar: bool = False,
    decay: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Spikes and pre-reset membranes (T, ...) for the whole sequence of steps (`decay`: a learned 1/tau)."""
    v, spikes, membranes = torch.zeros_like(x[0]), [], []
    for t in range(x.shape[0]):
        h = charge(v, x[t], tau, decay_input) if decay is None else learned_charge(v, x[t], decay, decay_input)
        s = fire(h, th, levels, bipolar)
        v = h * (1 - (s != 0).to(x.dtype))
        spikes.append(s)
        membranes.append(h)
    return torch.stack(spikes), torch.stack(membranes)


def lif_backward(
    grad_s: Tensor,
    h: Tensor,
    th: Tensor,
    tau: float,
    decay_input: bool,
    kind: str,
    alpha: float,
    want_th: bool,
    levels: int = 1,
    bipolar: bool = False,
    decay: Tensor | None = None,
    x: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients w.r.t. the input current, (unreduced, only if want_th) the threshold and (summed over T, only with
    a learned `decay`, which needs the input x) the decay, by hand-written BPTT. A fixed threshold needs no gradient,
    and skipping it saves writing a tensor the size of the input. Level k's step H(h - k th) contributes
    g'(h - k th) to ds/dh and -k g'(h - k th) to ds/dth; a negative level's step -H(-h - k th) contributes
    g'(-h - k th) and +k g'(-h - k th). With a learned decay d, dh_t/dd = x_t - v_{t-1} (decay_input) or -v_{t-1},
    and dh_t/dv_{t-1} = 1 - d."""
    if decay is None:
        gain, keep = (1.0 / tau if decay_input else 1.0), 1 - 1 / tau
    else:
        gain, keep = (decay if decay_input else 1.0), 1 - decay
    grad_v = torch.zeros_like(h[0])
    grad_decay = torch.zeros_like(h[0]) if decay is not None else None
    grad_x, grad_th = [], []
    surrogate = GRADS[kind]
    for t in range(h.shape[0] - 1, -1, -1):
        u = h[t] - th
        slope = surrogate(u, alpha)
        slope_th = -slope
        for k in range(2, levels + 1):
            g = surrogate(h[t] - th * k, alpha)
            slope, slope_th = slope + g, slope_th - k * g
        for k in range(1, levels + 1) if bipolar else ():
            g = surrogate(-h[t] - th * k, alpha)
            slope, slope_th = slope + g, slope_th + k * g
        through_spike = grad_s[t] * slope
        fired = fire(h[t], th, levels, bipolar) != 0
        grad_h = through_spike + grad_v * (1 - fired.to(h.dtype))
        grad_x.append(grad_h * gain)
        if want_th:
            grad_th.append(grad_s[t] * slope_th)
        if grad_decay is not None:
            v = h[t - 1] * (fire(h[t - 1], th, levels, bipolar) == 0).to(h.dtype) if t > 0 else torch.zeros_like(h[0])
            grad_decay = grad_decay + grad_h * (x[t] - v if x is not None else -v)
        grad_v = grad_h * keep
    return torch.stack(grad_x[::-1]), torch.stack(grad_th[::-1]) if want_th else None, grad_decay


_kernels: dict[str, object] = {}
_EAGER = {"forward": lif_forward, "backward": lif_backward}
_fallback_said = False


def _fall_back(name: str, reason: str) -> None:
    """Use the eager kernel for `name` from now on, and say so once per process."""
    global _fallback_said
    _kernels[name] = _EAGER[name]
    if not _fallback_said:
        _fallback_said = True
        warnings.warn(f"fused LIF: {reason}; running the eager kernels (same results, slower)", stacklevel=3)


def is_compile_error(exc: BaseException) -> bool:
    """Whether exc says torch.compile cannot build or run the kernel here (tracing, backend, C++ compiler) as opposed
    to an error the eager kernel would hit too (out of memory, bad input), which must surface."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    chain, cause = [], exc
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(e, torch.OutOfMemoryError | MemoryError) for e in chain):
        return False
    return isinstance(exc, TorchDynamoException | CppCompileError | InvalidCxxCompiler)


def _kernel(name: str):
    """The compiled version of lif_forward/lif_backward, or the eager one where torch.compile is unavailable."""
    if name not in _kernels:
        try:
            _kernels[name] = torch.compile(_EAGER[name], dynamic=True)
        except RuntimeError as exc:  # torch.compile refuses this Python or platform outright
            _fall_back(name, f"torch.compile unavailable ({exc})")
    return _kernels[name]


def _run(name: str, *args):
    try:
        return _kernel(name)(*args)
    except Exception as exc:
        if not is_compile_error(exc):
            raise
        _fall_back(name, f"compiling the {name} kernel failed ({type(exc).__name__}: {str(exc)[:200]})")
        return _kernels[name](*args)


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """A gradient broadcast over the leading axes, summed back to the shape of the parameter it belongs to."""
    return grad.sum(tuple(range(grad.dim() - like.dim()))).reshape(like.shape)


class _FusedLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, th, decay, tau, decay_input, kind, alpha, levels, bipolar):  # type: ignore[override]
        learned = None if decay is None else decay.detach()
        spikes, h = _run("forward", x, th.detach(), tau, decay_input, levels, bipolar, learned)
        ctx.learned = decay is not None
        if ctx.learned:  # dh/dd needs the input (x - v with decay_input)
            ctx.save_for_backward(h, th, decay, x if decay_input else None)
        else:
            ctx.save_for_backward(h, th)
        ctx.args = (tau, decay_input, kind, alpha)
        ctx.graded = (levels, bipolar)
        return spikes

    @staticmethod
    def backward(ctx, grad_s):  # type: ignore[override]
        h, th, *learned = ctx.saved_tensors
        decay, x = (learned[0].detach(), learned[1]) if ctx.learned else (None, None)
        want_th = ctx.needs_input_grad[1]
        grad_x, grad_th, grad_decay = _run(
            "backward", grad_s.contiguous(), h, th.detach(), *ctx.args, want_th, *ctx.graded, decay, x
        )
        if want_th:
            grad_th = _reduce_to(grad_th, th)
        if grad_decay is not None:
            grad_decay = _reduce_to(grad_decay, decay) if ctx.needs_input_grad[2] else None
        return grad_x, grad_th, grad_decay, None, None, None, None, None, None
