"""Measured energy per token (SPEC section 7): every arithmetic operation of one forward pass, counted from the
tensors actually seen, sorted by kind and by place, then priced with 45 nm energy presets.

How operations are counted (`count_ops`):
- A TorchDispatchMode sees every aten op of the forward; module hooks say which module (place) runs it.
- Spiking operands are recognised from their values: a tensor is binary when it is bool or all of it is 0 or 1.
- Matrix products charge only non-zero operand pairs (weights always count as non-zero): an operand pair with a
  binary member is an AC (an accumulate driven by a spike), two non-binary operands make a MAC. For a Linear on
  spikes that is nnz(input) * out_features; for Q K^T and A V on spikes the exact number of coinciding non-zeros.
  The paper's count, nnz(spike operand) * fan-out, is kept beside it as kind `ac_fanout`.
- A product entry that a causal mask then discards (multiplied by a 0/False mask, set to -inf) is not charged:
  a causal kernel never computes it. The SNN and the ANN get the same rule.
- Ops on parameters and buffers only, or on nothing (arange, ones), are constants that can be precomputed: free.
  So are ops on integer token ids only (bookkeeping) and data movement (views, copies, concatenation).
- A LIF neuron costs, per membrane update, one leaky multiply-accumulate (`lif`), one add for decay_input, and one
  threshold comparison; its internal ops are not counted again. Its output spikes give the firing rate.
- Norms: LayerNorm is charged per row (see `_layer_norm`); BatchNorm/PowerNorm cost one MAC per element until folded
  into their Linear (`model.fold_norms()`), then nothing. Softmax, GELU, embeddings and residual adds have rules too.
- An op that touches activations and has no rule lands in `OpCounts.unpriced` (the tests keep it empty).

Pricing (`energy_report`): Horowitz (ISSCC 2014) 45 nm energies, the numbers the paper uses. A multiply costs
MAC - AC, an add or a comparison one AC; exp, division and square root are charged as a few MACs (an assumption
stated in `EnergyModel`; their counts are in the report to reprice). Memory (`memory=True`) adds one SRAM read per
weight used by a MAC/AC and per embedding element looked up.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .layers import batch_invariant
from .neurons import LIF
from .norms import PowerNorm, SeqBatchNorm

KINDS = ("mac", "ac", "add", "mul", "cmp", "lif", "exp", "div", "sqrt", "mem")
NORM_TYPES = (nn.LayerNorm, nn.BatchNorm1d, SeqBatchNorm, PowerNorm)


# ---------------------------------------------------------------------------------------------- energy model
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


# ---------------------------------------------------------------------------------------------- counts
@dataclass
class OpCounts:
    """Operations of one forward: counts[place][kind], spikes and updates per LIF layer, and the token count."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    firing: dict[str, tuple[int, int]] = field(default_factory=dict)  # LIF name -> (spikes, membrane updates)
    tokens: int = 0
    unpriced: dict[str, int] = field(default_factory=dict)  # ops on activations without a rule -> calls
    products: list[dict[str, Any]] = field(default_factory=list)  # one record per matrix product (see _product)

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
    return bool(((x == 0) | (x == 1)).all())


def _nnz(x: Tensor) -> int:
    return int(torch.count_nonzero(x))


def _ptr(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
        return 0


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

    def __init__(self, model: nn.Module, skip_masked: bool = True):
        super().__init__()
        self.model = model
        self.skip_masked = skip_masked
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.firing: dict[str, tuple[int, int]] = {}
        self.unpriced: Counter = Counter()
        # storages holding constants (parameters, buffers and what is computed from them alone)
        self.constant = {_ptr(t) for t in [*model.parameters(), *model.buffers()]}
        self.pending: dict[int, tuple[dict, Tensor]] = {}  # product output storage -> (its record, pairs per entry)
        self.products: list[dict[str, Any]] = []
        self.stack: list[tuple[str, nn.Module]] = []  # running modules, innermost last
        self.seen: dict[str, int] = {}  # activation x activation products so far, per attention call
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
            self.stack.append((name, module))
            self.seen[name] = 0

        return hook

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, LIF) and not self._in_lif(outer=True):
            self.paused = True
            try:
                updates, spikes = args[0].numel(), int(output.detach().sum(dtype=torch.float64))
            finally:
                self.paused = False
            place = self._place()
            self._add(place, "lif", updates)
            self._add(place, "cmp", updates)
            if module.decay_input:
                self._add(place, "add", updates)  # v + (x - v) / tau: one add besides the multiply-accumulate
            name = self.stack[-1][0]
            old = self.firing.get(name, (0, 0))
            self.firing[name] = (old[0] + spikes, old[1] + updates)
        self.stack.pop()

    def _in_lif(self, outer: bool = False) -> bool:
        """Inside a LIF (outer=True: inside a LIF that is itself inside another LIF)."""
        frames = self.stack[:-1] if outer else self.stack
        return any(isinstance(m, LIF) for _, m in frames)

    def _place(self, product: bool = False) -> str:
        """block{i}.attention.qkv/scores/values/proj/norms/lif, block{i}.mlp.fc1/fc2/act/norms/lif, block{i}.residual,
        embedding, head, head.lif, head.norms; a module's own path for models of another shape."""
        if not self.stack:
            return "model"
        name, module = self.stack[-1]
        parts = name.split(".") if name else []
        leaf = "lif" if isinstance(module, LIF) else "norms" if isinstance(module, NORM_TYPES) else None
        if parts[:1] == ["embed"]:
            return "embedding"
        if parts[:1] == ["head"]:
            return "head" if leaf is None else f"head.{leaf}"
        if len(parts) >= 2 and parts[0] == "blocks":
            block = f"block{parts[1]}"
            if len(parts) == 2 or parts[2] not in ("attn", "mlp"):
                return f"{block}.residual"
            sub = "attention" if parts[2] == "attn" else "mlp"
            if leaf is None and len(parts) > 3:
                leaf = "qkv" if parts[3] in ("q", "k", "v", "qkv") else parts[3]
            elif leaf is None and sub == "attention":
                # Q K^T comes first, A V second: ops in between (mask, softmax) belong to the scores
                seen = self.seen.get(name, 0)
                if product:
                    self.seen[name] = seen + 1
                leaf = "scores" if seen == 0 or (seen == 1 and not product) else "values"
            elif leaf is None:
                leaf = "act"
            return f"{block}.{sub}.{leaf}"
        return name or "model"

    def _add(self, place: str, kind: str, n: int | float) -> None:
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
        if name in _SDPA:
            return self._attention(a)
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
                self._mask(a["self"], a["condition"], keep_where_true=True)
            else:
                self._mask(a["self"], a["mask"], keep_where_true=False)
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
            nnz = _nnz(act)
            n = nnz * fan_out
            computed = fanout = n
            self._add(place, "mem", n)  # one weight read per operation (no reuse between tokens)
        else:
            place = self._place(product=True)
            x_bin, y_bin = is_binary(x), is_binary(y)
            spikes = x_bin or y_bin
            pairs = (x != 0).to(torch.float32) @ (y != 0).to(torch.float32)  # non-zero pairs per output entry
            computed = int(pairs.sum(dtype=torch.float64))
            fanout = (_nnz(x) * y.shape[-1] if x_bin else _nnz(y) * x.shape[-2]) if spikes else computed
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
        self.products.append(record)
        if self.skip_masked and not record["weight"]:
            self.pending[_ptr(out)] = (record, pairs)

    def _mask(self, target: Any, mask: Any, keep_where_true: bool) -> bool:
        """If `target` is a pending product and `mask` a constant mask, take back what the mask discards."""
        if not isinstance(target, Tensor) or not isinstance(mask, Tensor) or _ptr(mask) not in self.constant:
            return False
        entry = self.pending.pop(_ptr(target), None)
        if entry is None:
            return False
        record, pairs = entry
        if pairs.numel() != target.numel():
            return False
        if mask.dtype == torch.bool:
            keep = mask if keep_where_true else ~mask
        elif keep_where_true:
            keep = mask != 0
        else:
            keep = torch.isfinite(mask)
        dropped = int((pairs.reshape(target.shape) * (~keep).to(pairs.dtype)).sum(dtype=torch.float64))
        self.counts[record["place"]][record["kind"]] -= dropped
        record["charged"] -= dropped
        return True

    def _elementwise_add(self, place: str, x: Tensor, other: Any, out: Tensor) -> None:
        """An add per output, but a spike operand only adds where it is 1; adding a mask of -inf is free."""
        if isinstance(other, Tensor) and other.is_floating_point() and _ptr(other) in self.constant:
            if not bool(torch.isfinite(other).all()) and self._mask(x, other, keep_where_true=False):
                return
        spikes = [t for t in (x, other) if self._spikes(t)]
        if len(spikes) == 2:
            n = _nnz(torch.logical_and(spikes[0] != 0, spikes[1] != 0))
        elif spikes:
            n = _nnz(spikes[0]) * (out.numel() // spikes[0].numel())
        else:
            n = out.numel()
        self._add(place, "add", n)

    def _elementwise_mul(self, place: str, x: Tensor, other: Any, out: Tensor) -> None:
        """Multiplying by a binary tensor selects (free): a causal mask or a spike gate. Else a multiply each."""
        for target, mask in ((x, other), (other, x)):
            if self._spikes(mask):
                self._mask(target, mask, keep_where_true=True)
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

    def _attention(self, a: dict) -> None:
        """A fused softmax attention kernel, charged as its math form: scale q and k, Q K^T on the unmasked pairs,
        softmax, A V."""
        q, k, v = a["query"], a["key"], a["value"]
        mask = a.get("attn_mask", a.get("attn_bias"))
        s_q, s_k = q.shape[-2], k.shape[-2]
        keep = torch.ones(s_q, s_k, dtype=torch.bool)
        if a.get("is_causal"):
            keep = keep.tril(s_k - s_q)
        if isinstance(mask, Tensor):
            keep = keep & (mask if mask.dtype == torch.bool else torch.isfinite(mask)).cpu()
        pairs = int(keep.expand(*q.shape[:-2], s_q, s_k).sum(dtype=torch.float64))
        rows = q.numel() // q.shape[-1]
        scores, values = self._place(product=True), self._place(product=True)
        self._add(scores, "mul", q.numel() + k.numel())
        self._add(scores, "mac", pairs * q.shape[-1])
        self._add(scores, "cmp", pairs)
        self._add(scores, "add", 2 * pairs)
        self._add(scores, "exp", pairs)
        self._add(scores, "mul", pairs)
        self._add(scores, "div", rows)
        self._add(values, "mac", pairs * v.shape[-1])
        batch = math.prod(q.shape[:-2])
        for place, width in ((scores, q.shape[-1]), (values, v.shape[-1])):
            n = pairs * width
            self.products.append(
                {"place": place, "op": "sdpa", "kind": "mac", "weight": False, "binary": [False, False],
                 "charged": n, "computed": n, "fanout": n, "dense": batch * s_q * s_k * width}
            )  # fmt: skip


def count_ops(model: nn.Module, idx: Tensor, skip_masked: bool = True) -> OpCounts:
    """Every operation of one inference forward of `model` on token ids `idx` (B, S), by place and kind.

    The model runs in eval mode without gradients (its mode is restored), LIF neurons on their reference loop
    backend (same spikes), Linear layers unchunked. skip_masked=False also charges the products a causal mask
    discards (SpikingJelly's convention; used by the cross-check)."""
    was_training = model.training
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    backends = [m.backend for m in lifs]
    model.eval()
    try:
        for m in lifs:
            m.backend = "loop"
        with torch.no_grad(), batch_invariant(False), _OpCounter(model, skip_masked) as counter:
            model(idx)
    finally:
        for m, backend in zip(lifs, backends, strict=True):
            m.backend = backend
        model.train(was_training)
    counts = {place: dict(kinds) for place, kinds in counter.counts.items() if any(kinds.values())}
    return OpCounts(counts, dict(counter.firing), int(idx.numel()), dict(counter.unpriced), counter.products)


# ---------------------------------------------------------------------------------------------- reports
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
    model: nn.Module, idx: Tensor, preset: str | EnergyModel = "fp32", memory: bool = False, fold: bool = True
) -> dict[str, Any]:
    """Energy per token of one forward on `idx` (B, S), JSON-ready. With fold (default), BatchNorm/PowerNorm are
    folded into their Linear first, as at deployment (on a copy; the model is untouched).

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
    ops = count_ops(model, idx)
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
        "batch": int(idx.shape[0]),
        "window": int(idx.shape[1]),
        "folded_norms": folded,
        "total_pj_per_token": sum(per_place.values()),
        "total_pj_per_token_fanout": sum(_price(k, prices, fanout=True) for k in ops.counts.values()) / tokens,
        "synaptic_pj_per_token": synaptic,
        "synaptic_pj_per_token_fanout": synaptic_fanout,
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
        "snn_window": snn["window"],
        "ann_window": ann["window"],
        "per_subblock_pj": {
            n: {"snn": snn["per_subblock_pj"].get(n, 0.0), "ann": ann["per_subblock_pj"].get(n, 0.0)} for n in names
        },
    }


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run or checkpoint directory of the model to measure")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--baseline", metavar="ANN_CHECKPOINT", help="checkpoint of the ANN to compare with")
    base.add_argument(
        "--baseline-preset",
        metavar="PRESET",
        help="compare with an untrained model of this preset (e.g. ann) and the checkpoint's sizes: "
        "op counts of a dense ANN do not depend on its weights",
    )
    p.add_argument("--preset", default="fp32", choices=sorted(PRESETS), help="energy per operation (default fp32)")
    p.add_argument("--memory", action="store_true", help="add one SRAM read per weight used")
    p.add_argument("--windows", type=int, default=4, help="validation windows to measure (default 4)")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's max_len)")
    p.add_argument("--no-fold", action="store_true", help="keep BatchNorm/PowerNorm unfolded")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart (energy per sub-block) and firing rates")


def validation_windows(ids: Tensor, length: int, count: int) -> Tensor:
    """`count` windows of `length` tokens spread evenly over the split (fewer tokens if the split is short)."""
    if count < 1 or length < 1:
        raise ValueError(f"need at least one window of at least one token, got {count} x {length}")
    length = min(length, len(ids))
    if length < 1:
        raise ValueError("the validation split is empty; train with val_frac > 0")
    starts = torch.linspace(0, len(ids) - length, count).round().long()
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def _baseline_model(config, name: str) -> nn.Module:
    from .config import SpikeDecoderConfig
    from .model import SpikeDecoder

    sizes = {k: getattr(config, k) for k in ("vocab_size", "max_len", "n_layer", "n_head", "n_embd", "mlp_ratio")}
    torch.manual_seed(0)
    return SpikeDecoder(SpikeDecoderConfig.from_preset(name, **sizes)).eval()


def run(args: argparse.Namespace) -> int:
    from .rundir import load_checkpoint, validation_ids

    model, tokenizer, meta = load_checkpoint(args.checkpoint)
    ids = validation_ids(meta, tokenizer)
    length = args.window or model.config.max_len
    if length > model.config.max_len:
        raise ValueError(f"--window {length} exceeds the model's max_len={model.config.max_len}")
    idx = validation_windows(ids, length, args.windows)
    report = energy_report(model, idx, args.preset, args.memory, fold=not args.no_fold)
    report["label"] = model.config.preset
    report["data"] = f"validation split: {idx.shape[0]} windows x {idx.shape[1]} tokens"
    result: dict[str, Any] = {"model": report}
    if args.baseline or args.baseline_preset:
        if args.baseline:
            base_model = load_checkpoint(args.baseline)[0]
        else:
            base_model = _baseline_model(model.config, args.baseline_preset)
        if base_model.config.vocab_size != model.config.vocab_size:
            raise ValueError("the baseline has another vocabulary; compare models trained with the same tokenizer")
        base_idx = idx[:, : base_model.config.max_len]
        base = energy_report(base_model, base_idx, args.preset, args.memory, fold=not args.no_fold)
        base["label"] = base_model.config.preset + ("" if args.baseline else " (untrained)")
        result["baseline"] = base
        result["comparison"] = compare_reports(report, base)
    if args.plot:
        plot_reports(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


# ---------------------------------------------------------------------------------------------- output
_ORDER = [
    "embedding", "attention.qkv", "attention.scores", "attention.values", "attention.proj", "attention.norms",
    "attention.lif", "mlp.fc1", "mlp.act", "mlp.fc2", "mlp.norms", "mlp.lif", "residual", "head.norms", "head.lif",
    "head",
]  # fmt: skip


def _ordered(names) -> list[str]:
    return sorted(names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


def format_table(result: dict[str, Any]) -> str:
    """Terminal tables: pJ per token per sub-block (model beside baseline), ops per token, firing rates."""
    reports = [result["model"], *([result["baseline"]] if "baseline" in result else [])]
    first = reports[0]
    prices = first["prices_pj"]
    lines = [
        f"energy per token, {first['energy_preset']} (MAC {prices['mac']} pJ, AC {prices['ac']} pJ), "
        f"memory {'on' if first['memory'] else 'off'}; {first.get('data', '')}",
        "",
        f"{'sub-block':<18}" + "".join(f"{r.get('label', 'model'):>24}" for r in reports),
    ]
    names = _ordered({n for r in reports for n in r["per_subblock_pj"]})
    for n in names:
        lines.append(f"{n:<18}" + "".join(f"{r['per_subblock_pj'].get(n, 0.0):>21.1f} pJ" for r in reports))
    lines.append(f"{'total':<18}" + "".join(f"{r['total_pj_per_token']:>21.1f} pJ" for r in reports))
    lines.append(f"{'(nnz*fan-out)':<18}" + "".join(f"{r['total_pj_per_token_fanout']:>21.1f} pJ" for r in reports))
    if "comparison" in result:
        c = result["comparison"]
        lines += [
            "",
            f"saving: {c['saving_percent']:.1f} % (exact counts), {c['saving_percent_fanout']:.1f} % "
            f"(paper-style nnz*fan-out counts); {c['snn_pj_per_token']:.1f} vs {c['ann_pj_per_token']:.1f} pJ/token",
            f"matrix products only (the paper's scope): {c['saving_percent_synaptic']:.1f} % exact, "
            f"{c['saving_percent_synaptic_fanout']:.1f} % nnz*fan-out",
        ]
    lines += ["", f"{'ops per token':<18}" + "".join(f"{r.get('label', 'model'):>24}" for r in reports)]
    for kind in (*KINDS, "ac_fanout"):
        lines.append(f"{kind:<18}" + "".join(f"{r['ops_per_token'].get(kind, 0):>24,.0f}" for r in reports))
    for r in reports:
        if r["firing_rates"]:
            lines += ["", f"firing rates ({r.get('label', 'model')}, mean {r['mean_firing_rate']:.3f})"]
            lines += [f"  {name:<34}{rate:>8.3f}" for name, rate in r["firing_rates"].items()]
        if r["input_spike_density"]:
            lines += ["", f"spike density at each Linear's input, per step ({r.get('label', 'model')})"]
            lines += [f"  {name:<34}{d:>8.3f}" for name, d in r["input_spike_density"].items()]
    return "\n".join(lines)


def plot_reports(result: dict[str, Any], path: str | Path) -> None:
    """Left: pJ per token stacked per sub-block, model beside baseline. Right: firing rate per LIF layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [result["model"], *([result["baseline"]] if "baseline" in result else [])]
    names = _ordered({n for r in reports for n in r["per_subblock_pj"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1, 1.2]})
    colors = plt.get_cmap("tab20")
    labels = [r.get("label", "model") for r in reports]
    bottoms = [0.0] * len(reports)
    for i, n in enumerate(names):
        values = [r["per_subblock_pj"].get(n, 0.0) for r in reports]
        left.bar(labels, values, bottom=bottoms, label=n, color=colors(i % 20), width=0.6)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for x, total in enumerate(bottoms):
        left.text(x, total, f"{total:,.0f} pJ", ha="center", va="bottom")
    title = f"energy per token ({reports[0]['energy_preset']})"
    if "comparison" in result:
        title += f": saving {result['comparison']['saving_percent']:.1f} %"
    left.set_title(title)
    left.set_ylabel("pJ per token")
    left.set_ylim(0, 1.08 * max(*bottoms, 1e-9))
    handles, texts = left.get_legend_handles_labels()  # top of the stack first
    left.legend(handles[::-1], texts[::-1], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    rates = reports[0]["firing_rates"]
    if rates:
        right.barh(list(rates), list(rates.values()), color="tab:orange")
        right.invert_yaxis()
        right.set_xlabel("firing rate (spikes per neuron per step)")
        right.tick_params(axis="y", labelsize=7)
    else:
        right.text(0.5, 0.5, "no LIF layers", ha="center", va="center")
    right.set_title(f"firing rate per LIF layer ({labels[0]}, validation text)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
