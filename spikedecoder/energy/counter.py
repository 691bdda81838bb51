"""The counting engine of the energy measure (SPEC section 7): every arithmetic operation of one forward pass,
counted from the tensors actually seen, sorted by kind and by place (pricing.py turns counts into pJ).

How operations are counted (`count_ops`):
- A TorchDispatchMode sees every aten op of the forward; module hooks say which modules run it, and the place is
  what they declare (`energy_group`, `energy_place`, `energy_scope`; energy_places.py says how a new op declares
  one).
- Spiking operands are recognised from their values: a tensor is binary when it is bool or all of it is 0 or 1.
- Matrix products charge only non-zero operand pairs (weights always count as non-zero): an operand pair with a
  binary member is an AC (an accumulate driven by a spike), two non-binary operands make a MAC. For a Linear on
  spikes that is nnz(input) * out_features; for Q K^T and A V on spikes the exact number of coinciding non-zeros.
  The paper's count, nnz(spike operand) * fan-out, is kept beside it as kind `ac_fanout` (and per product).
- A product entry that a causal mask then discards (multiplied by a 0/False mask, set to -inf) is not charged:
  a causal kernel never computes it. The SNN and the ANN get the same rule, and so does the fan-out count: a spike
  fans out only to the entries the mask keeps (a key to the queries that see it, a value likewise).
- Softmax attention (scaled_dot_product_attention) is charged by rule from its arguments, as a K/V-cache decoder
  runs it: the query scaled (never the cached keys), Q K^T, softmax and A V on the unmasked pairs.
- Ops on parameters and buffers only, or on nothing (arange, ones), are constants that can be precomputed: free.
  So are ops on integer token ids only (bookkeeping) and data movement (views, copies, concatenation).
- Graded spikes (small signed integer counts, `LIF(levels=L)` / bipolar) drive a Linear as |count| accumulates of
  the active input's row: sum(|x|) * out_features AC, the same as that many binary spikes (a thermometer code's
  planes); the neuron pays one comparison per threshold (L, or 2L when bipolar). A product of two graded operands
  (graded Q, K, V) charges |a| |b| accumulates per pair, the coincidences of their planes.
- A LIF neuron is priced as the arithmetic its update runs (`neurons.charge`, counted by `neurons.charge_ops`), plus
  one threshold comparison; the hard reset is a select (free). With tau = 2^k the leak is a shift: tau = 2 with
  decay_input, h = (v + x) / 2, is one add and one shift; other 2^k: two adds and two shifts (v - v >> k + x >> k),
  without decay_input two adds and one shift. Any other tau needs a multiply: one multiply-accumulate (`lif`), plus
  an add with decay_input; so does a learned decay (`learnable_tau`, `neurons.learned_charge`), whatever it has
  learnt. Its internal ops are not counted again. Its output spikes give the firing rate.
- Work the event engine does once is charged once: a Linear (or Linear + Norm) whose input is the same at every
  timestep (a T axis of stride 0, as direct encoding expands the embedding) is charged for one step.
- Weight reads (`mem`): a Linear reads, per token, the weight rows of the inputs that are non-zero at any of its T
  steps (the union over T of a (T, B, S, E) input), each once, as the event engine gathers them.
- Norms: LayerNorm is charged per row (see `_layer_norm`); BatchNorm/PowerNorm cost one MAC per element until folded
  into their Linear (`model.fold_norms()`), then nothing. Softmax, GELU, embeddings and residual adds have rules too.
- An op that touches activations and has no rule lands in `OpCounts.unpriced` (the tests keep it empty).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..energy_places import open_scopes, resolve
from ..layers import LinearNorm, batch_invariant
from ..neurons import LIF, charge_ops, is_graded
from .counts import OpCounts, _nnz, _ptr, add_count, attention_counts, is_binary

# ---------------------------------------------------------------------------------------------- the counter
_FREE = {
    # data movement, dtype casts, constructors and selections: no arithmetic
    "view", "_unsafe_view", "reshape", "expand", "expand_as", "t", "transpose", "permute", "unsqueeze", "squeeze",
    "select", "slice", "split", "split_with_sizes", "chunk", "unbind", "cat", "stack", "clone", "contiguous",
    "_to_copy", "to", "detach", "alias", "copy_", "copy", "lift_fresh", "flatten", "as_strided", "repeat",
    "zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full",
    "fill", "zero", "scalar_tensor", "arange", "ones", "zeros", "empty", "full", "tril", "triu",
    "_local_scalar_dense", "neg", "dropout", "native_dropout", "constant_pad_nd", "index_select",
}  # fmt: skip
_COMPARE = {"ge", "gt", "le", "lt", "eq", "ne", "relu", "maximum", "minimum", "clamp", "clamp_min", "clamp_max"}
_TRANSCENDENTAL = {"exp", "erf", "tanh", "sigmoid", "log", "expm1", "log1p"}
_SDPA = {
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
}


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops of a forward pass; see the module docstring for the rules."""

    def __init__(self, model: nn.Module, skip_masked: bool = True, invariant_once: bool = True):
        super().__init__()
        self.model = model
        self.skip_masked = skip_masked
        self.invariant_once = invariant_once
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.firing: dict[str, tuple[int, int]] = {}
        self.unpriced: Counter = Counter()
        # storages holding constants (parameters, buffers and what is computed from them alone)
        self.constant = {_ptr(t) for t in [*model.parameters(), *model.buffers()]}
        # product output storage -> (its record, pairs per entry, nnz * fan-out per entry)
        self.pending: dict[int, tuple[dict, Tensor, Tensor]] = {}
        self.support: dict[int, Tensor] = {}  # masked product output storage -> the entries its mask kept
        self.products: list[dict[str, Any]] = []
        self.stack: list[tuple[str, nn.Module, int]] = []  # running modules (path, module, open scopes), innermost last
        self.steps: list[int] = []  # per running module: T if it is a per-step map on a time-invariant input, else 1
        self.linear_inputs: list[Tensor] = []  # inputs of the running Linear modules, innermost last
        self.paused = False
        self.hooks: list = []

    # -- module tracking
    def __enter__(self) -> _OpCounter:
        for name, module in self.model.named_modules():
            self.hooks.append(module.register_forward_pre_hook(self._enter_module(name)))
            self.hooks.append(module.register_forward_hook(self._leave_module))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        super().__exit__(*exc)

    def _enter_module(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            self.stack.append((name, module, open_scopes()))
            x = args[0] if args and isinstance(args[0], Tensor) else None
            once = self.invariant_once and isinstance(module, nn.Linear | LinearNorm) and x is not None
            once = once and _time_invariant(x)
            self.steps.append(x.shape[0] if once else 1)
            if isinstance(module, nn.Linear):
                self.linear_inputs.append(x)

        return hook

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, LIF) and not self._in_lif(outer=True):
            self.paused = True
            try:
                updates, spikes = args[0].numel(), int(output.detach().abs().sum(dtype=torch.float64))
            finally:
                self.paused = False
            place = self._place()
            for kind, n in charge_ops(module.tau, module.decay_input, module.learnable_tau != "none").items():
                self._add(place, kind, n * updates)
            self._add(place, "cmp", updates * module.levels * (2 if module.bipolar else 1))  # one per threshold
            name = self.stack[-1][0]
            old = self.firing.get(name, (0, 0))
            self.firing[name] = (old[0] + spikes, old[1] + updates)
        self.stack.pop()
        self.steps.pop()
        if isinstance(module, nn.Linear):
            self.linear_inputs.pop()

    def _in_lif(self, outer: bool = False) -> bool:
        """Inside a LIF (outer=True: inside a LIF that is itself inside another LIF)."""
        frames = self.stack[:-1] if outer else self.stack
        return any(isinstance(m, LIF) for _, m, _ in frames)

    def _place(self, leaf: str | None = None) -> str:
        """The place the running modules and scopes declare (energy_places.py), e.g. block0.attention.qkv."""
        return resolve(self.stack, leaf)

    def _add(self, place: str, kind: str, n: int | float) -> None:
        """Charge n ops; inside a per-step map on a time-invariant input, one step of them (weight reads are
        counted once per token already)."""
        if kind != "mem":
            n = int(n) // max(self.steps, default=1)  # a Linear inside a LinearNorm shares its input: once
        if n:
            self.counts[place][kind] += int(n)

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        in_ptrs = {_ptr(t) for t in ins}
        constant = not self.paused and all(p in self.constant for p in in_ptrs)
        alias = bool(outs) and all(_ptr(o) in in_ptrs for o in outs)
        for o in outs:
            p = _ptr(o)
            if constant:
                self.constant.add(p)
            else:
                self.constant.discard(p)
            if not alias:
                self.pending.pop(p, None)  # a new tensor where a product output used to live
                self.support.pop(p, None)
        if constant or self.paused or self._in_lif():
            return out
        name = func.overloadpacket.__name__
        floats = any(t.is_floating_point() for t in ins)
        if floats or name in ("embedding", "index"):
            self._count(name if name.startswith("_") else name.rstrip("_"), func, args, kwargs, out)  # add_ -> add
        if not alias:
            for p in in_ptrs:
                self.pending.pop(p, None)  # a product output consumed by something other than a mask
        return out

    def _count(self, name: str, func, args: tuple, kwargs: dict, out: Any) -> None:
        a = {arg.name: value for arg, value in zip(func._schema.arguments, args, strict=False)} | kwargs
        first = args[0] if args and isinstance(args[0], Tensor) else None
        res = out[0] if isinstance(out, tuple | list) else out
        if name in _FREE:
            return
        if name in ("mm", "bmm"):
            return self._product(name, a["self"], a["mat2"], res)
        if name == "addmm":
            self._product(name, a["mat1"], a["mat2"], res)
            return self._add(self._place(), "add", res.numel())  # the bias add per output
        if name == "baddbmm":
            self._product(name, a["batch1"], a["batch2"], res)
            return self._add(self._place(), "add", res.numel())
        if name in _SDPA:  # the kernel called directly (through F.scaled_dot_product_attention, see _FusedKernels)
            mask = a.get("attn_mask", a.get("attn_bias"))
            return self.attention(a["query"], a["key"], a["value"], mask, bool(a.get("is_causal")))
        place = self._place()
        if name in ("add", "sub", "rsub"):
            return self._elementwise_add(place, a["self"], a.get("other"), res)
        if name == "mul":
            return self._elementwise_mul(place, a["self"], a["other"], res)
        if name == "div":
            other = a["other"]
            scalar = not isinstance(other, Tensor) or other.numel() == 1
            return self._add(place, "mul" if scalar else "div", res.numel())  # by a constant: times its reciprocal
        if name in ("where", "masked_fill"):  # selections; a causal mask on a product takes back what it drops
            if name == "where":
                self._mask(a["self"], a["condition"], res, keep_where_true=True)
            else:
                self._mask(a["self"], a["mask"], res, keep_where_true=False)
            return
        if name in _COMPARE or name == "bernoulli":  # a rate code compares a random draw with p (RNG unpriced)
            return self._add(place, "cmp", res.numel())
        if name in _TRANSCENDENTAL:
            return self._add(place, "exp", res.numel())
        if name in ("sqrt", "rsqrt"):
            self._add(place, "sqrt", res.numel())
            return self._add(place, "div", res.numel() if name == "rsqrt" else 0)
        if name == "pow" and isinstance(a.get("exponent"), int) and a["exponent"] >= 1:
            return self._add(place, "mul", res.numel() * (a["exponent"] - 1))
        if name == "gelu":
            return self._gelu(place, first, a.get("approximate", "none"))
        if name in ("_softmax", "_safe_softmax"):
            return self._softmax(place, first, a["dim"])
        if name == "native_layer_norm":
            return self._layer_norm(place, first, a["normalized_shape"], a["weight"], a["bias"])
        if name in ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training"):
            return self._add(place, "mac", first.numel())  # eval: x * a + c with per-channel a, c precomputed
        if name in ("mean", "sum", "amax", "amin", "max", "min") and first is not None and first.is_floating_point():
            reduced = first.numel() - res.numel()
            self._add(place, "cmp" if name in ("amax", "amin", "max", "min") else "add", reduced)
            return self._add(place, "mul", res.numel() if name == "mean" and reduced else 0)
        if name == "cumsum" and first is not None:  # a running count: one add per element after the first of a row
            binary = self._spikes(first)
            per_row = first.shape[a["dim"]] if first.dim() else 1
            adds = int(first.count_nonzero()) if binary else first.numel() - first.numel() // max(per_row, 1)
            return self._add(place, "add", adds)  # on spikes the count only moves where a spike arrives
        if name in ("embedding", "index"):
            return self._add(place, "mem", res.numel())  # a table lookup: reads, no arithmetic
        self.unpriced[str(func)] += 1

    # -- rules
    def _spikes(self, t: Any) -> bool:
        """A binary activation, or a boolean constant (a mask). Constants are never spikes: a zero-initialised bias
        or a unit scale is still a number to add or multiply."""
        if not isinstance(t, Tensor) or t.numel() <= 1:
            return False
        return t.dtype == torch.bool if _ptr(t) in self.constant else is_binary(t)

    def _product(self, op: str, x: Tensor, y: Tensor, out: Tensor) -> None:
        """(..., m, k) @ (..., k, n): non-zero operand pairs, AC when an operand is binary, MAC otherwise. Each
        product is also logged with its dense size m*k*n and its nnz * fan-out count (for cross-checks)."""
        x_weight, y_weight = _ptr(x) in self.constant, _ptr(y) in self.constant
        dense = out.numel() * x.shape[-1]
        if x_weight or y_weight:  # a Linear: every weight counts; the activation's zeros are skipped
            act, fan_out = (y, x.shape[-2]) if x_weight else (x, y.shape[-1])
            place = self._place()
            spikes = is_binary(act)
            graded = not spikes and is_graded(act)  # counts: each active row added |count| times
            nnz = int(act.abs().sum(dtype=torch.float64)) if graded else _nnz(act)
            spikes = spikes or graded
            n = nnz * fan_out
            computed = fanout = n
            self._add(place, "mem", self._rows_read(act) * fan_out)  # weight rows read, once per token
        else:
            place = self._place()
            x_bin, y_bin = is_binary(x), is_binary(y)
            counts = not (x_bin or y_bin) and is_graded(x) and is_graded(y)  # two graded operands (graded Q, K, V)
            spikes = x_bin or y_bin or counts
            if counts:  # |a| |b| accumulates per pair: the coincidences of their binary planes
                pairs = x.abs().to(torch.float32) @ y.abs().to(torch.float32)
            else:  # non-zero pairs per output entry
                pairs = (x != 0).to(torch.float32) @ (y != 0).to(torch.float32)
            computed = int(pairs.sum(dtype=torch.float64))
            # nnz * fan-out per output entry: the spike operand's non-zeros that reach it. Each spike fans out to the
            # entries the other operand has (all of them, unless a mask zeroed some: a masked score map's kept ones)
            if x_bin:
                fan = (x != 0).to(torch.float32) @ self._support(y)
            elif y_bin:
                fan = self._support(x) @ (y != 0).to(torch.float32)
            else:
                fan = pairs
            fanout = int(fan.sum(dtype=torch.float64))
        kind = "ac" if spikes else "mac"
        self._add(place, kind, computed)
        if spikes:
            self._add(place, "ac_fanout", fanout)
        record = {
            "place": place,
            "op": op,
            "kind": kind,
            "weight": x_weight or y_weight,
            "binary": [is_binary(x), is_binary(y)],
            "charged": computed,
            "computed": computed,
            "fanout": fanout,
            "dense": dense,
        }
        if record["weight"]:
            record["input_nnz"], record["input_size"] = nnz, act.numel()  # density of what drives the weights
        once = max(self.steps, default=1)  # a time-invariant input: one step of it (see _add)
        for key in ("charged", "computed", "fanout", "dense", "input_nnz", "input_size"):
            if key in record:
                record[key] //= once
        record["repeats"] = once  # identical steps it stands for (a dense executor, SpikingJelly's count, runs all)
        self.products.append(record)
        if self.skip_masked and not record["weight"]:
            self.pending[_ptr(out)] = (record, pairs, fan)

    def _support(self, t: Tensor) -> Tensor:
        """1.0 where t can be non-zero: everywhere, except where a mask zeroed a product (`_mask` keeps its pattern)."""
        keep = self.support.get(_ptr(t))
        if keep is None or keep.numel() != t.numel():
            return torch.ones_like(t, dtype=torch.float32)
        return keep.reshape(t.shape).to(torch.float32)

    def _rows_read(self, act: Tensor) -> int:
        """Weight rows a Linear reads: per token, the inputs non-zero at any of its T steps (a (T, B, S, E) input's
        union over T); the rows of the matrix the product sees when the Linear's own input is not at hand."""
        x = self.linear_inputs[-1] if self.linear_inputs else None
        if x is None or x.dim() != 4 or x.shape[-1] != act.shape[-1]:
            return _nnz(act)
        return _nnz((x != 0).any(0))

    def _mask(self, target: Any, mask: Any, out: Tensor, keep_where_true: bool) -> bool:
        """If `target` is a pending product and `mask` a constant mask, take back what the mask discards, in the
        exact count and in the nnz * fan-out count alike, and remember which entries of `out` it kept."""
        if not isinstance(target, Tensor) or not isinstance(mask, Tensor) or _ptr(mask) not in self.constant:
            return False
        entry = self.pending.pop(_ptr(target), None)
        if entry is None:
            return False
        record, pairs, fan = entry
        if pairs.numel() != target.numel():
            return False
        if mask.dtype == torch.bool:
            keep = mask if keep_where_true else ~mask
        elif keep_where_true:
            keep = mask != 0
        else:
            keep = torch.isfinite(mask)
        dropped = ~keep.expand(target.shape)
        lost = int((pairs.reshape(target.shape) * dropped).sum(dtype=torch.float64))
        lost_fan = int((fan.reshape(target.shape) * dropped).sum(dtype=torch.float64))
        self.counts[record["place"]][record["kind"]] -= lost
        if record["kind"] == "ac":
            self.counts[record["place"]]["ac_fanout"] -= lost_fan
        record["charged"] -= lost
        record["fanout"] -= lost_fan
        if out.numel() == target.numel():
            self.support[_ptr(out)] = ~dropped
        return True

    def _elementwise_add(self, place: str, x: Tensor, other: Any, out: Tensor) -> None:
        """An add per output, but a spike operand only adds where it is 1; adding a mask of -inf is free."""
        if isinstance(other, Tensor) and other.is_floating_point() and _ptr(other) in self.constant:
            if not bool(torch.isfinite(other).all()) and self._mask(x, other, out, keep_where_true=False):
                return
        self._add(place, "add", add_count([t for t in (x, other) if self._spikes(t)], out.numel()))

    def _elementwise_mul(self, place: str, x: Tensor, other: Any, out: Tensor) -> None:
        """Multiplying by a binary tensor selects (free): a causal mask or a spike gate. Else a multiply each. A
        product is zero wherever a factor is a masked product's dropped entry: the mask's pattern carries over."""
        for t in (x, other):
            if isinstance(t, Tensor) and _ptr(t) in self.support and t.numel() == out.numel():
                self.support[_ptr(out)] = self.support[_ptr(t)]
        for target, mask in ((x, other), (other, x)):
            if self._spikes(mask):
                self._mask(target, mask, out, keep_where_true=True)
                return
        self._add(place, "mul", out.numel())

    def _gelu(self, place: str, x: Tensor, approximate: str) -> None:
        """0.5 x (1 + erf(x / sqrt 2)): one transcendental, three multiplies, one add (tanh form: 5 and 2)."""
        n = x.numel()
        self._add(place, "exp", n)
        self._add(place, "mul", n * (5 if approximate == "tanh" else 3))
        self._add(place, "add", n * (2 if approximate == "tanh" else 1))

    def _softmax(self, place: str, x: Tensor, dim: int) -> None:
        """Over the n unmasked (finite) entries of a row: n comparisons (max), n subtractions, n exp, n adds (sum),
        one reciprocal and n multiplies."""
        n = _nnz(torch.isfinite(x))
        rows = x.numel() // max(x.shape[dim], 1)
        self._add(place, "cmp", n)
        self._add(place, "add", 2 * n)
        self._add(place, "exp", n)
        self._add(place, "mul", n)
        self._add(place, "div", rows)

    def _layer_norm(self, place: str, x: Tensor, shape: list[int], weight: Any, bias: Any) -> None:
        """Per row of C: mean (C-1 adds, 1 mul), centre (C adds), variance (C MACs, 1 mul), + eps (1 add),
        1 sqrt and 1 reciprocal, normalise (C muls), affine x * w + b (C MACs; C muls or adds with one of them)."""
        c = math.prod(shape)
        rows = x.numel() // c
        self._add(place, "add", rows * (2 * c))
        self._add(place, "mac", rows * c)
        self._add(place, "mul", rows * (c + 2))
        self._add(place, "sqrt", rows)
        self._add(place, "div", rows)
        affine = "mac" if weight is not None and bias is not None else "mul" if weight is not None else "add"
        if weight is not None or bias is not None:
            self._add(place, affine, rows * c)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Any, is_causal: bool) -> None:
        """A fused softmax attention kernel, charged as a KV-cache decoder computes it, whatever torch runs: scale
        the query (the keys are used as they are), Q K^T on the unmasked pairs, softmax on them, A V."""
        s_q, s_k = q.shape[-2], k.shape[-2]
        keep = torch.ones(s_q, s_k, dtype=torch.bool)
        if is_causal:
            keep = keep.tril(s_k - s_q)
        if isinstance(mask, Tensor):
            keep = keep & (mask if mask.dtype == torch.bool else torch.isfinite(mask)).cpu()
        pairs = int(keep.expand(*q.shape[:-2], s_q, s_k).sum(dtype=torch.float64))
        scores, values = self._place("scores"), self._place("values")
        charges = attention_counts(q.numel(), q.numel() // q.shape[-1], pairs, q.shape[-1], v.shape[-1])
        for place, kinds in zip((scores, values), charges, strict=True):
            for kind, n in kinds.items():
                self._add(place, kind, n)
        batch = math.prod(q.shape[:-2])
        for place, width in ((scores, q.shape[-1]), (values, v.shape[-1])):
            n = pairs * width
            self.products.append(
                {"place": place, "op": "sdpa", "kind": "mac", "weight": False, "binary": [False, False],
                 "charged": n, "computed": n, "fanout": n, "dense": batch * s_q * s_k * width, "repeats": 1}
            )  # fmt: skip


def _time_invariant(x: Tensor) -> bool:
    """Every step along the T axis (dim 0) is the same memory: an expanded tensor, one value for all steps."""
    return x.dim() >= 2 and x.shape[0] > 1 and x.stride(0) == 0


class _FusedKernels(TorchFunctionMode):
    """scaled_dot_product_attention is one kernel that holds two places (`scores` and `values`): it is charged by
    its rule (`_OpCounter.attention`) from its arguments, and the aten ops torch runs it as (one fused op, or its
    math form, which rescales every cached key) are not counted again."""

    def __init__(self, counter: _OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.counter.paused:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        a = dict(zip(names, args, strict=False)) | kwargs
        self.counter.attention(a["query"], a["key"], a["value"], a.get("attn_mask"), bool(a.get("is_causal")))
        self.counter.paused = True
        try:
            return func(*args, **kwargs)
        finally:
            self.counter.paused = False


def count_ops(
    model: nn.Module, idx: Tensor, skip_masked: bool = True, cache: Any = None, invariant_once: bool = True
) -> OpCounts:
    """Every operation of one inference forward of `model` on token ids `idx` (B, S), by place and kind.

    The model runs in eval mode without gradients (its mode is restored), LIF neurons on their reference loop
    backend (same spikes), Linear layers unchunked. skip_masked=False also charges the products a causal mask
    discards (SpikingJelly's convention; used by the cross-check). With a decoding `cache` (model.new_cache()),
    the forward is the incremental step model(idx, cache): idx holds only the new tokens, and the cache advances.
    invariant_once=False charges work on a time-invariant input at every timestep (what a dense executor runs)."""
    was_training = model.training
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    backends = [m.backend for m in lifs]
    model.eval()
    try:
        for m in lifs:
            m.backend = "loop"
        counter = _OpCounter(model, skip_masked, invariant_once)
        with torch.no_grad(), batch_invariant(False), counter, _FusedKernels(counter):
            model(idx) if cache is None else model(idx, cache)
    finally:
        for m, backend in zip(lifs, backends, strict=True):
            m.backend = backend
        model.train(was_training)
    counts = {place: dict(kinds) for place, kinds in counter.counts.items() if any(kinds.values())}
    return OpCounts(counts, dict(counter.firing), int(idx.numel()), dict(counter.unpriced), counter.products)
