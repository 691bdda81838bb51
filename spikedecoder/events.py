"""Event-driven inference: the same model, computed the way its spikes allow (SPEC section 7).

`to_events(model)` returns an inference-only copy whose answers equal the dense path's up to float summation order.
It replaces only the modules that receive spikes and leaves every other module (attention, its decoding state, the
cache, the head's combine) as it is, switching the whole-context heads to their own sparse step, so a change to the
attention mechanism keeps working:

- Linear and Linear+Norm on spikes become `EventLinear` / `EventLinearNorm`: the weight is stored transposed, (in,
  out), so each input's row is contiguous, and the output is the sum of the rows of the active inputs (accumulate
  only; graded spikes, small integer counts, add a row |count| times, subtract it for a negative count). The sum
  runs in a small C++ kernel (kernels/events.cpp, compiled on first use by kernel_build.py, cached per CPU feature
  set), one call per Linear: per token it reads the union of the active rows over the T steps once, four rows at a
  time, and adds each into the steps at which its input is active. On float input the same call checks that every
  value is a count (else the Linear takes the dense product), so the counts cost no tensor op of their own. Where
  it cannot be built (no compiler or ninja: one warning), or with SPIKEDECODER_EVENT_KERNEL=0,
  `embedding_bag(mode="sum")` does the sums, one bag per step and token, as it does for bool spikes over more than
  64 timesteps (one warning): the same floats on 0/1 spikes; graded counts go as binary planes (`graded_linear`),
  summed in another order. On 2026-12-03, with the graded make run checkpoint (T = 1, 4 levels) and another job
  busy on the second core, `python benchmarks/decode.py --widths 128 1024 --tokens 64 --rounds 2 --check-tokens 50`
  took 16.1-17.0 ms per token at width 1,024 with the kernels, 1.66x the ANN's tokens/s in both runs (the ANN
  26.7-28.2 ms), against 31.3-36.5 ms and 0.71-0.72x before the count kernel (the planes through the bool kernel,
  tensor-op LIFs) and 41.2 ms on the fallback.
- Work whose input is identical at every timestep is done once: a tensor whose T axis (dim 0) has stride 0 holds one
  value for every step (direct encoding expands the embedding that way), so a Linear(+Norm) on it runs on step 0
  and its output is expanded again (still stride 0, so the next such module skips too).
- Whole-context attention heads take their sparse decoding step (`SpikingSelfAttention.sparse_state`): the state
  rows of the active query and key features only, exact because the sums are of small integers.
- LIF neurons run a small C++ kernel (the same arithmetic in the same order; graded and bipolar neurons with the
  comparisons of `neurons.fire`, so the same counts); neurons with a learned decay (one float per layer or channel)
  run the same steps as tensor ops.
- Window heads decode a token whose every kept key lies in its window without building their mask (all ones), and
  learned embedding codes keep their spikes in their tables (`SpikeEmbedding.bake_spikes`).
- LIF neurons whose spikes only ever reach event Linears emit bool spikes; the others (e.g. Q, K, V, read by the
  attention's matmuls) keep emitting float 0/1. Which is which is found by tracing one probe forward
  (`_SpikeUseTracer`): a LIF output may be reshaped or indexed on its way, anything else needs floats.

A Linear is made event-driven when the probe sees it receive spikes (every input value 0 or 1), graded spikes or a
time-invariant input; at run time it checks again and falls back to the dense product on an input that is neither.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .attention import SpikingSelfAttention
from .encoding import SpikeEmbedding
from .kernel_build import load_kernel
from .layers import Linear, LinearNorm
from .neurons import LIF, charge, fire, is_graded, learned_charge


# ---------------------------------------------------------------------------------------------- kernels
def time_invariant(x: Tensor) -> bool:
    """True when every step along dim 0 is the same memory (an expanded tensor), so one step stands for all."""
    return x.dim() >= 2 and x.shape[0] > 1 and x.stride(0) == 0


def as_spikes(x: Tensor) -> Tensor | None:
    """x as bool spikes, or None if x is not binary (then it needs the dense product)."""
    if x.dtype == torch.bool:
        return x
    spikes = x != 0
    if bool((x[spikes] == 1).all()):
        return spikes
    return None


_ARANGE: dict[torch.device, Tensor] = {}


def _arange(n: int, device: torch.device) -> Tensor:
    values = _ARANGE.get(device)  # read once: another thread may replace the entry meanwhile
    if values is None or values.numel() < n:
        values = _ARANGE[device] = torch.arange(max(n, 64), device=device)
    return values[:n]


class _Bags:
    """The bags of one spike tensor: each (step, token)'s active inputs, bag after bag, and each bag's offset.
    The last input's bags are kept, per thread, so Linears reading the same spikes (Q, K and V) find them once and
    threads running models at once never see each other's."""

    _local = threading.local()

    @classmethod
    def of(cls, x: Tensor) -> tuple[Tensor, Tensor] | None:
        last = getattr(cls._local, "last", None)
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        spikes = as_spikes(x)
        bags = None
        if spikes is not None:
            flat = spikes.reshape(-1, spikes.shape[-1])
            bag, active = flat.nonzero(as_tuple=True)  # row-major: bag after bag
            bags = active, torch.searchsorted(bag, _arange(flat.shape[0], bag.device))  # each bag's first spike
        cls._local.last = (x, x._version, bags)
        return bags


MAX_KERNEL_STEPS = 64  # the kernel packs a token's steps into one 64-bit word
_kernel_guard = threading.Lock()


_resolved: list = []  # [the kernels or None] once the first call has decided


def event_kernel():
    """The compiled kernels, or None (SPIKEDECODER_EVENT_KERNEL=0, or they could not be built: then one warning
    saying why, kernel_build.py). Decided once per process, whichever thread asks first: every event Linear and
    LIF asks on every call, so the answer is kept rather than read from the environment again."""
    if _resolved:
        return _resolved[0]
    with _kernel_guard:
        if not _resolved:
            switched_off = os.environ.get("SPIKEDECODER_EVENT_KERNEL", "1") == "0"
            source = Path(__file__).parent / "kernels" / "events.cpp"
            _resolved.append(
                None if switched_off else load_kernel("spikedecoder_events", source, ["-O3", "-ffp-contract=off"])
            )
        return _resolved[0]


def spike_linear(spikes: Tensor, rows: Tensor, bias: Tensor | None) -> Tensor:
    """sum_i spikes[..., i] * rows[i] + bias without a multiply, the rows of the active inputs summed per step and
    token. rows: (in, out) contiguous float32; spikes: (T, ..., in) bool. More than MAX_KERNEL_STEPS steps go to
    embedding_bag (to_events warns once)."""
    kernel = event_kernel() if spikes.dim() >= 2 and spikes.shape[0] <= MAX_KERNEL_STEPS else None
    if kernel is not None and spikes.device.type == "cpu" and rows.dtype == torch.float32:
        flat = spikes.reshape(spikes.shape[0], -1, spikes.shape[-1])
        return kernel.spike_linear(flat, rows, bias).reshape(*spikes.shape[:-1], rows.shape[1])
    out = _rows_sum(_Bags.of(spikes), rows, bias)
    return out.reshape(*spikes.shape[:-1], rows.shape[1])


def graded_linear(counts: Tensor, rows: Tensor, bias: Tensor | None) -> Tensor:
    """sum_i counts[..., i] * rows[i] + bias for graded spikes, without a multiply: the counts as their binary planes
    (plane k holds the inputs whose count reaches k, a thermometer code; negative counts their own planes), each
    plane's rows summed like spikes at an extra step, the planes then added (negative ones subtracted): each active
    row is taken |count| times, as the energy counter charges it."""
    top = int(counts.abs().max())
    planes = torch.stack([counts >= k for k in range(1, top + 1)] + [counts <= -k for k in range(1, top + 1)])
    sums = spike_linear(planes.flatten(0, 1), rows, None).unflatten(0, (2, top, counts.shape[0]))
    out = sums[0].sum(0) - sums[1].sum(0)
    return out + bias if bias is not None else out


def _rows_sum(bags: tuple[Tensor, Tensor], rows: Tensor, bias: Tensor | None) -> Tensor:
    out = F.embedding_bag(bags[0], rows, bags[1], mode="sum")
    if bias is not None:
        out += bias
    return out


# ---------------------------------------------------------------------------------------------- modules
class EventLinear(nn.Module):
    """A Linear computed as a sum of weight rows on spikes (graded spikes: each row taken as many times as its
    input's count), once for a time-invariant input, densely otherwise."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("rows", linear.weight.detach().t().contiguous())  # (in, out): rows contiguous
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if time_invariant(x):
            return self(x[:1]).expand(x.shape[0], *x.shape[1:-1], self.out_features)
        if x.dtype == torch.float32 and x.dim() >= 2 and x.is_cpu:
            kernel = event_kernel()
            rows = self.rows
            if kernel is not None and rows.dtype == torch.float32:
                out = kernel.count_linear(x, rows, self.bias)  # None: a value is not a count
                return F.linear(x, rows.t(), self.bias) if out is None else out
        spikes = as_spikes(x)
        if spikes is not None:
            return spike_linear(spikes, self.rows, self.bias)
        if is_graded(x):
            return graded_linear(x, self.rows, self.bias)
        return F.linear(x, self.rows.t(), self.bias)  # not spikes after all: the dense product (x @ rows = x W^T)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight rows (in, out)"


class EventLinearNorm(nn.Module):
    """LinearNorm (norms folded) with an EventLinear; a time-invariant input runs Linear and Norm once."""

    def __init__(self, linear_norm: LinearNorm):
        super().__init__()
        self.linear = EventLinear(linear_norm.linear)
        self.norm = linear_norm.norm

    def forward(self, x: Tensor) -> Tensor:
        if time_invariant(x):
            y = self.norm(self.linear(x[:1]))
            return y.expand(x.shape[0], *y.shape[1:])
        y = self.linear(x)
        norm = self.norm
        return y if type(norm) is nn.Identity else norm(y)  # a folded norm: no call


class EventLIF(nn.Module):
    """Inference LIF with the dense LIF's arithmetic in the same order (same rounding, same spikes), in place and
    without the surrogate. Emits bool spikes where every consumer takes them (`emit_bool`), float 0/1 otherwise."""

    energy_place = LIF.energy_place

    def __init__(self, lif: LIF):
        super().__init__()
        self.tau, self.decay_input = lif.tau, lif.decay_input
        self.levels, self.bipolar = lif.levels, lif.bipolar
        self.graded = lif.levels > 1 or lif.bipolar  # float counts out
        self.register_buffer("v_threshold", lif.v_threshold.detach().clone())
        decay = lif.decay()  # a learned leak: a float per layer or channel, run by the tensor-op steps
        self.register_buffer("decay", None if decay is None else decay.detach().clone())
        self.learned = decay is not None
        self.emit_bool = False

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"LIF expects (T, ...) input with T >= 1, got shape {tuple(x.shape)}")
        x = x.float() if x.dtype == torch.bool else x
        kernel = event_kernel()
        th = self.v_threshold
        cpu_float = x.dtype == torch.float32 and x.is_cpu
        if kernel is not None and cpu_float and not self.learned and th.numel() in (1, x.shape[-1]):
            spikes = kernel.lif(x, th, self.tau, self.decay_input, self.levels, self.bipolar)
        else:
            spikes = self.steps(x)
        return spikes if self.emit_bool or spikes.dtype == x.dtype else spikes.to(x.dtype)

    def steps(self, x: Tensor) -> Tensor:
        """The same LIF as tensor ops, step by step (where the kernel is not built): bool spikes, or float counts
        for graded spikes."""
        spikes = torch.empty(x.shape, dtype=x.dtype if self.graded else torch.bool, device=x.device)
        v = torch.zeros_like(x[0])
        for xt, st in zip(x.unbind(0), spikes.unbind(0), strict=True):
            if self.decay is not None:  # a learned leak, as the dense LIF computes it
                h = learned_charge(v, xt, self.decay, self.decay_input)
            else:  # the dense LIF's arithmetic, the priced form
                h = charge(v, xt, self.tau, self.decay_input)
            if self.graded:
                st.copy_(fire(h, self.v_threshold, self.levels, self.bipolar))
                v = h.masked_fill_(st != 0, 0.0)
                continue
            torch.ge(h, self.v_threshold, out=st)  # h - th >= 0 exactly when h >= th
            v = h.masked_fill_(st, 0.0)  # hard reset
        return spikes

    def extra_repr(self) -> str:
        graded = f", levels={self.levels}, bipolar={self.bipolar}" if self.graded else ""
        graded += ", learned decay" if self.decay is not None else ""
        return f"tau={self.tau}, decay_input={self.decay_input}, emit_bool={self.emit_bool}{graded}"


# ---------------------------------------------------------------------------------------------- conversion
_PASS_THROUGH = {
    Tensor.reshape, Tensor.view, Tensor.flatten, Tensor.permute, Tensor.transpose, Tensor.__getitem__,
    Tensor.contiguous, Tensor.unsqueeze, Tensor.squeeze, Tensor.expand, torch.flatten, torch.reshape,
    torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze, torch.cat, Tensor.new_zeros,
}  # fmt: skip
# torch.cat of bool spikes is bool (the key convolution's [x_i, x_{i-1}]); new_zeros reads no values, only the dtype


class _SpikeUseTracer(TorchFunctionMode):
    """Follows each LIF's output through a forward: a LIF may emit bool if its output (or a reshaped / indexed
    view of it) only reaches event Linears. Any other torch function that takes it marks the LIF as float."""

    def __init__(self):
        super().__init__()
        self.owner: dict[int, tuple[EventLIF, Tensor]] = {}  # id(tensor) -> (LIF, tensor kept alive)
        self.needs_float: set[int] = set()
        self.depth = 0  # > 0 while inside an event Linear, which takes bool

    def track(self, lif: EventLIF, out: Tensor) -> None:
        self.owner[id(out)] = (lif, out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:
            return out
        flat = [b for a in (*args, *kwargs.values()) for b in (a if isinstance(a, list | tuple) else (a,))]
        users = [self.owner[id(a)][0] for a in flat if isinstance(a, Tensor) and id(a) in self.owner]
        for lif in users:
            if func in _PASS_THROUGH and isinstance(out, Tensor):
                self.track(lif, out)
            elif isinstance(out, Tensor) or (isinstance(out, tuple | list) and any(isinstance(o, Tensor) for o in out)):
                self.needs_float.add(id(lif))
        return out


def _swap(model: nn.Module, make: dict[type, type]) -> None:
    """Replace, in place, every child module whose exact type is a key of `make` by make[type](child)."""
    for name, child in list(model.named_children()):
        kind = type(child)
        if kind in make:
            setattr(model, name, make[kind](child))
        else:
            _swap(child, make)


@torch.no_grad()
def _probe(model: nn.Module) -> tuple[set[int], set[int]]:
    """One forward on a few tokens: ids of the Linear/LinearNorm modules that receive spikes or a time-invariant
    input."""
    seen: set[int] = set()

    def record(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        if time_invariant(x) or as_spikes(x) is not None or is_graded(x):
            seen.add(id(module))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, Linear | LinearNorm)]
    try:
        with torch.random.fork_rng(devices=[]):
            model(_probe_ids(model))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _probe_ids(model: nn.Module) -> Tensor:
    cfg = model.config
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (2, min(cfg.max_len, 8)), generator=g).to(device)


@torch.no_grad()
def to_events(model: nn.Module) -> nn.Module:
    """An event-driven, inference-only copy of a trained model (norms folded, eval mode); the original is
    untouched. Raises ValueError when the model has no spikes or time-invariant work to exploit (the ANN)."""
    model = copy.deepcopy(model).eval()
    model.fold_norms()
    if isinstance(getattr(model, "embed", None), SpikeEmbedding):
        model.embed.bake_spikes()  # learned codes: their spikes looked up, not binarised per token
    steps = model.config.timesteps
    if steps > MAX_KERNEL_STEPS and event_kernel() is not None:
        warnings.warn(
            f"timesteps={steps} > {MAX_KERNEL_STEPS}: the event kernel packs a token's steps into 64 bits, so the "
            "Linears on bool spikes use embedding_bag (the same floats, slower)",
            stacklevel=2,
        )
    events = _probe(model)
    if not events:
        raise ValueError(
            f"model (preset {model.config.preset!r}) has no Linear that receives spikes or a time-invariant input: "
            "nothing for the event engine to exploit; use the dense engine (--engine dense)"
        )

    def convert(module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if id(child) in events:
                new = EventLinearNorm(child) if isinstance(child, LinearNorm) else EventLinear(child)
            elif isinstance(child, LIF):
                new = EventLIF(child)
            else:
                convert(child)
                continue
            for key, value in vars(child).items():  # the energy place an instance declared (energy_places.py)
                if key.startswith("energy_"):
                    setattr(new, key, value)
            setattr(module, name, new)

    convert(model)
    for module in model.modules():  # whole-context heads decode touching only the active state rows
        if isinstance(module, SpikingSelfAttention):
            module.sparse_state = True
    _choose_bool_spikes(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _choose_bool_spikes(model: nn.Module) -> None:
    """Trace one probe forward and let each LIF emit bool if its spikes only reach event Linears."""
    tracer = _SpikeUseTracer()
    lifs = [m for m in model.modules() if isinstance(m, EventLIF)]
    event_linears = [m for m in model.modules() if isinstance(m, EventLinear | EventLinearNorm)]

    def enter(module: nn.Module, inputs: tuple) -> None:
        tracer.depth += 1

    def leave(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        tracer.depth -= 1

    def produced(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        tracer.track(module, output)

    hooks = [m.register_forward_hook(produced) for m in lifs]
    for m in event_linears:
        hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with torch.random.fork_rng(devices=[]), tracer:
            model(_probe_ids(model))
    finally:
        for h in hooks:
            h.remove()
    for lif in lifs:
        lif.emit_bool = id(lif) not in tracer.needs_float and not lif.graded


@torch.no_grad()
def record_spikes(model: nn.Module, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """(logits, {LIF name: bool spikes}) of one forward: dense and event models name their LIFs alike, so two
    records compare spike by spike."""
    spikes: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda m, i, out, name=name: spikes.__setitem__(name, out.bool()))
        for name, m in model.named_modules()
        if isinstance(m, LIF | EventLIF)
    ]
    try:
        logits = model(idx)
    finally:
        for h in hooks:
            h.remove()
    return logits, spikes


def count_mismatches(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[int, int]:
    """(spikes that differ, spikes in a) over every LIF of two records."""
    if a.keys() != b.keys():
        raise ValueError(f"the records name different LIFs: {sorted(a.keys() ^ b.keys())[:4]}")
    return sum(int((a[k] != b[k]).sum()) for k in a), sum(int(a[k].sum()) for k in a)
