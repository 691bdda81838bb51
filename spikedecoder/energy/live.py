"""The energy of each decoding step at the speed of decoding (what `spikedecoder serve` shows per token): a step's
operations priced from what the step itself did, without tracing it again.

`count_ops` traces every aten op of a forward, a hundred times a decoding step's own time. A step's counts split in
two parts, and the meter gets each where it is cheap:
- the part fixed by the step's shape (how many tokens it feeds, into a fresh cache or not): LIF updates, norms,
  bias adds, GELU, the embedding, the head's combine... is counted once per shape by count_ops on the deployed model
  (`StepMeter.calibrate`: count_ops of a step, minus the second part of the same step);
- the part that depends on what the step computes is counted from the step's own tensors, by the counter's rules
  (counts.add_count, counts.attention_counts): every Linear's non-zero inputs (nnz x out_features, the event
  engine's active rows), residual adds driven by a spike operand, and attention: the coincidences of Q K^T and A V
  and the decoding state's products and updates on spikes, softmax attention's pairs over its position.
The sum is count_ops' figure for the same step (tests/test_live.py compares them at many positions). A model with a
part whose step-dependent cost the meter does not compute (rate-coded input, binary score maps, score offsets) is
counted by count_ops at every step instead: exact, slower (`StepMeter.fast` is False).

The meter runs the step (dense or event-driven) itself, with forward hooks that record only while it does, and keeps
each LIF layer's spikes of the step's last token for the page's raster.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import SoftmaxAttention, SpikingSelfAttention, causal_mask, merge_heads, split_heads
from ..events import EventLIF, EventLinear, time_invariant
from ..model import Block
from ..neurons import LIF, is_graded
from .counter import count_ops
from .counts import _nnz, add_count, attention_counts, is_binary
from .pricing import PRESETS, StepEnergy, step_energy


def unsupported(model: nn.Module) -> str | None:
    """Why the meter cannot price this model's steps from the step's tensors, or None."""
    if getattr(getattr(model, "config", None), "encoding", "direct") == "rate":
        return "rate-coded input (its Bernoulli draws are counted inside the embedding)"
    for m in model.modules():
        if isinstance(m, SpikingSelfAttention) and m.binary_scores:
            return "binary score maps (spiking residual degree 2)"
        if isinstance(m, SpikingSelfAttention) and m.offset is not None:
            return "learned score offsets (attn_offset)"
    return None


# ---------------------------------------------------------------------------------------------- the step's part
class Counts(Counter):
    """Operation counts by kind, and `binary(t)`: is_binary, decided once per tensor (and version) in a step."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, tuple[Tensor, int, bool]] = {}

    def binary(self, t: Tensor) -> bool:
        known = self.seen.get(id(t))
        if known is None or known[0] is not t or known[1] != t._version:
            known = (t, t._version, is_binary(t))
            self.seen[id(t)] = known
        return known[2]


def _float(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def _pairs(x: Tensor, y: Tensor) -> Tensor:
    """Non-zero operand pairs per entry of x @ y."""
    return _float(x != 0) @ _float(y != 0)


def _sum_pairs(t: Tensor) -> int:
    return int(t.sum(dtype=torch.float64))


def _mul_unless_binary(t: Tensor, c: Counts) -> None:
    """t times a scalar (or t * t): free when t is a spike tensor (a select), a multiply per entry otherwise."""
    if not (t.numel() > 1 and c.binary(t)):
        c["mul"] += t.numel()


def _scores(attn: SpikingSelfAttention, q: Tensor, k: Tensor, mask: Tensor, c: Counts) -> tuple[Tensor, Tensor]:
    """(q @ k^T) * mask [squared]: the kept coincidences, nnz(q) fanned out to the kept keys; the scores and the
    entries a later product can reach (its support)."""
    pairs = _pairs(q, k.transpose(-1, -2))
    scores = q @ k.transpose(-1, -2)
    if mask.numel() > 1:  # a mask selects (free) and takes back the pairs it drops
        keep = mask.expand(pairs.shape)
        c["ac"] += _sum_pairs(pairs * keep)
        c["ac_fanout"] += _sum_pairs(_float(q != 0).sum(-1, keepdim=True) * keep)
    else:  # one entry: nothing dropped, and a one-element tensor is no mask, so the product is multiplied
        keep = torch.ones_like(pairs, dtype=torch.bool)
        c["ac"] += _sum_pairs(pairs)
        c["ac_fanout"] += _nnz(q) * k.shape[-2]
        _mul_unless_binary(scores, c)
    scores = scores * mask
    if attn.power == 2:
        _mul_unless_binary(scores, c)
        scores = scores * scores
    return scores, keep


def _values(scores: Tensor, keep: Tensor, v: Tensor, c: Counts) -> Tensor:
    """scores @ v on spike values: the non-zero pairs; each spike of the binary operand fans out."""
    c["ac"] += _sum_pairs(_pairs(scores, v))
    if c.binary(scores):
        c["ac_fanout"] += _nnz(scores) * v.shape[-1]
    else:
        c["ac_fanout"] += _sum_pairs(_float(keep) @ _float(v != 0))
    return scores @ v


def _state_product(x: Tensor, state: Tensor, c: Counts) -> Tensor:
    """Binary features x (..., n, F) times a state of counts (..., F, w) (q kv, q z): the non-zero pairs, nnz(x)
    fanned out to the state's w columns; the product's values."""
    c["ac"] += _sum_pairs(_pairs(x, state))
    c["ac_fanout"] += _nnz(x) * state.shape[-1]
    return x @ state


def _rows(state: Tensor, feature: Tensor) -> Tensor:
    """The state rows (group, feature) of a (..., F, w) state, one per active (group, feature) pair."""
    f, w = state.shape[-2], state.shape[-1]
    return state.reshape(-1, w).index_select(0, feature[0] * f + feature[1])


def _state_read(x: Tensor, rows: Tensor, active: tuple[Tensor, Tensor], c: Counts) -> Tensor:
    """_state_product for one token from the rows of its active features (the event engine's reads): the same
    counts, and the same values (sums of small integers)."""
    c["ac"] += _nnz(rows)
    c["ac_fanout"] += rows.numel()
    groups = x.shape[:-2].numel()
    out = torch.zeros(groups, rows.shape[-1], dtype=rows.dtype, device=rows.device).index_add_(0, active[0], rows)
    return out.view(*x.shape[:-1], rows.shape[-1])


def _add(x: Tensor, other: Any, c: Counts, result: bool = True) -> Tensor | None:
    spikes = [t for t in (x, other) if isinstance(t, Tensor) and t.numel() > 1 and c.binary(t)]
    c["add"] += add_count(spikes, max(x.numel(), other.numel() if isinstance(other, Tensor) else 1))
    return x + other if result else None


def _sum(x: Tensor, dim: int, c: Counts) -> Tensor:
    out = x.sum(dim, keepdim=True)
    c["add"] += x.numel() - out.numel()
    return out


def _finish(y: Tensor, den: Tensor | None, c: Counts) -> Tensor:
    if den is None:
        return y
    c["cmp"] += den.numel()  # the clamp
    c["mul" if den.numel() == 1 else "div"] += y.numel()
    return y / den.clamp(min=1)


def _window(attn: SpikingSelfAttention, q: Tensor, k: Tensor, v: Tensor, old: dict, c: Counts) -> Tensor:
    if old.get("k") is not None:
        k, v = torch.cat([old["k"], k], dim=-2), torch.cat([old["v"], v], dim=-2)
    mask = causal_mask(q.shape[-2], k.shape[-2] - q.shape[-2], q.device, attn.local_window)
    scores, keep = _scores(attn, q, k, mask, c)
    y = _values(scores, keep, v, c)
    return _finish(y, _sum(scores, -1, c) if attn.coincidence_norm else None, c)


def _running_sum(attn: SpikingSelfAttention, q: Tensor, k: Tensor, v: Tensor, old: dict, c: Counts) -> Tensor:
    """The dense path's decoding step (the one count_ops traces), from the state before the step."""
    n = q.shape[-2]
    scores, keep = _scores(attn, q, k, causal_mask(n, 0, q.device), c)
    qf, kf = attn._features(q), attn._features(k)
    y = _values(scores, keep, v, c)
    if old.get("kv") is not None and n == 1:
        return _running_step(attn, scores, y, qf, kf, v, old, c)
    if old.get("kv") is not None:
        y = _add(y, _state_product(qf, old["kv"], c), c)
    _add(_state_product(kf.transpose(-1, -2), v, c), old["kv"] if old.get("kv") is not None else 0, c, False)
    den = None
    if attn.coincidence_norm:
        den = _sum(scores, -1, c)
        if old.get("z") is not None:
            den = _add(den, _state_product(qf, old["z"], c), c)
    _add(_sum(kf, -2, c).transpose(-1, -2), old["z"] if old.get("z") is not None else 0, c, False)
    _add(_sum(v, -2, c), old["vsum"] if old.get("vsum") is not None else 0, c, False)
    return _finish(y, den, c)


def _running_step(
    attn: SpikingSelfAttention, scores: Tensor, y: Tensor, qf: Tensor, kf: Tensor, v: Tensor, old: dict, c: Counts
) -> Tensor:
    """_running_sum's counts for one token after the prefill, from the state rows of the token's active features
    (the dense state has F x d entries per head, F = d^2 with squared coincidences): the same counts."""
    z, d = old["z"], v.shape[-1]
    groups, features = qf.shape[:-2].numel(), qf.shape[-1]
    read = qf.reshape(groups, features).nonzero(as_tuple=True)
    y = _add(y, _state_read(qf, old["kv_rows"](read), read, c), c)
    # the state update k^T v + kv: a binary k^T v (one token), each of its ones an accumulate and an add
    written = kf.reshape(groups, features).nonzero(as_tuple=True)
    v_active = (v.reshape(groups, d) != 0).index_select(0, written[0])  # (written rows, d)
    part = int(v_active.sum())
    c["ac"] += part
    c["ac_fanout"] += written[0].numel() * d
    if old["kv_binary"]:  # both operands spikes: an add where both are 1
        c["add"] += _nnz(old["kv_rows"](written).ne(0) & v_active)
    else:
        c["add"] += part
    den = None
    if attn.coincidence_norm:
        den = _add(_sum(scores, -1, c), _state_product(qf, z, c), c)
    _add(_sum(kf, -2, c).transpose(-1, -2), z, c, False)
    _add(_sum(v, -2, c), old["vsum"], c, False)
    return _finish(y, den, c)


def spiking_attention_counts(
    attn: SpikingSelfAttention, q: Tensor, k: Tensor, v: Tensor, old: dict, counts: Counts | None = None
) -> Counts:
    """The step-dependent operations of one SpikingSelfAttention step, from its Q, K, V spikes (T, B, S, E) and
    its decoding state before the step (`old`), as the counter charges the dense path's ops."""
    c = Counts() if counts is None else counts
    q, k, v = (split_heads(_float(t), attn.n_head) for t in (q, k, v))
    if not attn.local:
        y = _running_sum(attn, q, k, v, old, c)
    elif not attn.long:
        y = _window(attn, q, k, v, old, c)
    else:
        pick = [torch.tensor(h, device=q.device) for h in (attn.long, attn.local)]
        long = _running_sum(attn, *(t.index_select(2, pick[0]) for t in (q, k, v)), old, c)
        local = _window(attn, *(t.index_select(2, pick[1]) for t in (q, k, v)), old, c)
        y = torch.cat([long, local], dim=2).index_select(2, attn.inverse)
    _mul_unless_binary(merge_heads(y), c)  # times the attention scale
    return c


def softmax_attention_counts(attn: SoftmaxAttention, x: Tensor, state: dict | None) -> Counter:
    """A K/V-cache softmax attention step on x (..., n, E): a closed form of the position (its past keys, and
    the window each head sees)."""
    past = state["k"].shape[-2] if state is not None and "k" in state else 0  # the keys it kept (a window's)
    n, e = x.shape[-2], x.shape[-1]
    batch = x.numel() // (n * e)
    heads, d = attn.n_head, e // attn.n_head
    mask = causal_mask(n, past, x.device, attn.window)  # (n, past + n), or (heads, n, past + n) per head
    pairs = batch * int(mask.sum()) * (heads if mask.dim() == 2 else 1)
    c: Counter = Counter()
    for kinds in attention_counts(batch * n * e, batch * heads * n, pairs, d, d):
        c.update(kinds)
    return c


class _Recorder:
    """Forward hooks on one model (dense or event-driven) that collect, while `recording`, the step-dependent
    operations, each LIF layer's firing and the spikes of the step's last token."""

    def __init__(self, model: nn.Module, counts: bool = True, memory: bool = False):
        self.on, self.memory = False, memory
        self.counts = Counts()
        self.firing: dict[str, float] = {}
        self.spikes: dict[str, Tensor] = {}
        self.hooks: list = []
        self.attention: dict[int, dict] = {}  # id(attention) -> its step's q, k, v and state before the step
        qkv = {}
        for m in model.modules():
            if isinstance(m, SpikingSelfAttention):
                qkv.update({id(m.q_lif): (m, "q"), id(m.k_lif): (m, "k"), id(m.v_lif): (m, "v")})
        for name, m in model.named_modules():
            if isinstance(m, LIF | EventLIF):
                self._hook(m.register_forward_hook(self._lif(name, qkv.get(id(m)))))
            if not counts:
                continue
            if isinstance(m, nn.Linear | EventLinear):
                self._hook(m.register_forward_pre_hook(self._linear))
            elif isinstance(m, SpikingSelfAttention):
                self._hook(m.register_forward_pre_hook(self._attention_state))
                self._hook(m.register_forward_hook(self._spiking_attention))
            elif isinstance(m, SoftmaxAttention):
                self._hook(m.register_forward_pre_hook(self._softmax_attention))
            elif isinstance(m, Block):
                self._residuals(m)

    def _hook(self, handle: Any) -> None:
        self.hooks.append(handle)

    @contextlib.contextmanager
    def recording(self) -> Iterator[_Recorder]:
        self.counts, self.firing, self.spikes, self.attention = Counts(), {}, {}, {}
        self.on = True
        try:
            yield self
        finally:
            self.on = False

    # -- hooks
    def _linear(self, module: nn.Module, args: tuple) -> None:
        if not self.on:
            return
        x = args[0]
        if time_invariant(x):
            if isinstance(module, EventLinear):
                return  # it runs itself again on step 0, and is counted then
            x = x[:1]
        out = module.out_features
        binary = self.counts.binary(x)
        graded = not binary and is_graded(x)  # small integer counts: each active row added |count| times
        n = (int(x.abs().sum(dtype=torch.float64)) if graded else _nnz(x)) * out
        if binary or graded:
            self.counts["ac"] += n
            self.counts["ac_fanout"] += n
        else:
            self.counts["mac"] += n
        if self.memory:  # the weight rows read, once per token
            self.counts["mem"] += _nnz((x != 0).any(0) if x.dim() == 4 else x) * out

    def _lif(self, name: str, role: tuple | None):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if not self.on:
                return
            if role is not None:
                self.attention.setdefault(id(role[0]), {})[role[1]] = out
            spikes = out if out.dtype == torch.bool else out != 0
            self.firing[name] = float(spikes.sum()) / max(spikes.numel(), 1)
            if out.dim() == 4:
                self.spikes[name] = spikes[:, 0, -1]  # (T, C): the first sequence's last token

        return hook

    def _attention_state(self, module: SpikingSelfAttention, args: tuple) -> None:
        if not self.on:
            return
        state = args[1] if len(args) > 1 else None
        if state is None:
            raise ValueError("the live meter prices decoding steps: run the model with a cache")
        old = {key: state.get(key) for key in ("k", "v", "kv", "z", "vsum")}
        kv = old["kv"]
        if kv is not None:
            old["z"] = old["z"].clone()  # the event engine's step adds into kv and z in place
            old["kv_binary"] = bool(kv.amax() <= 1)  # counts: spikes while none exceeds 1
            old["kv_rows"] = self._old_rows(module, state, kv)
        self.attention.setdefault(id(module), {})["old"] = old

    def _old_rows(self, module: SpikingSelfAttention, state: dict, kv: Tensor):
        """Rows of kv as they were before the step: read from kv itself, unless the step added into it in place
        (the event engine's sparse step), then less what the step added (exact: sums of small integers)."""
        seen = self.attention.setdefault(id(module), {})

        def rows(active: tuple[Tensor, Tensor]) -> Tensor:
            now = _rows(state["kv"], active)
            if state["kv"] is not kv:
                return _rows(kv, active)
            k, v = (split_heads(_float(seen[key]), module.n_head) for key in ("k", "v"))
            if module.long and module.local:
                pick = torch.tensor(module.long, device=k.device)
                k, v = k.index_select(2, pick), v.index_select(2, pick)
            kf = module._features(k)
            groups, features = kf.shape[:-2].numel(), kf.shape[-1]
            added = kf.reshape(-1)[active[0] * features + active[1]]
            return now - added[:, None] * v.reshape(groups, -1).index_select(0, active[0])

        return rows

    def _spiking_attention(self, module: SpikingSelfAttention, args: tuple, out: Tensor) -> None:
        if not self.on:
            return
        seen = self.attention.pop(id(module))
        spiking_attention_counts(module, seen["q"], seen["k"], seen["v"], seen["old"], self.counts)

    def _softmax_attention(self, module: SoftmaxAttention, args: tuple) -> None:
        if self.on:
            self.counts.update(softmax_attention_counts(module, args[0], args[1] if len(args) > 1 else None))

    def _residuals(self, block: Block) -> None:
        """x + attn(x) and x + mlp(x): an add per entry, or per spike where an operand is binary."""
        inputs: dict[str, Tensor] = {}

        def enter(key: str):
            def hook(module: nn.Module, args: tuple) -> None:
                if self.on:
                    inputs[key] = args[0]

            return hook

        def leave(key: str):
            def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
                if self.on:
                    _add(inputs.pop(key), out, self.counts)

            return hook

        self._hook(block.attn.register_forward_pre_hook(enter("attn")))
        self._hook(block.attn.register_forward_hook(leave("attn")))
        self._hook(block.mlp.register_forward_pre_hook(enter("mlp")))
        self._hook(block.mlp.register_forward_hook(leave("mlp")))


# ---------------------------------------------------------------------------------------------- the meter
class StepMeter:
    """Runs decoding steps of `model` (dense or its event-driven copy) and prices each (`last`, a StepEnergy).

    `counted` is the model as the energy figures measure it (`deployed`: norms folded, dense); its steps are the
    reference: the meter's figure for a step equals count_ops(counted, idx, cache=...) priced. Stands in for a
    model in generate's window (config, new_cache, call)."""

    def __init__(self, model: nn.Module, counted: nn.Module, preset: str = "fp32", memory: bool = False):
        self.model, self.counted, self.preset, self.memory = model, counted, preset, memory
        self.config = model.config
        self.prices = PRESETS[preset].prices(memory)
        self.why_slow = unsupported(counted)
        self.fast = self.why_slow is None
        if counted is not model:  # the reference runs only to be counted: on the LIF's loop backend, as count_ops
            for m in counted.modules():  # does (the same spikes, and no kernel compiled for it)
                if isinstance(m, LIF):
                    m.backend = "loop"
        self.recorder = _Recorder(model, counts=self.fast, memory=memory)
        self.reference = _Recorder(counted, memory=memory) if self.fast and counted is not model else self.recorder
        self.fixed: dict[tuple[int, int, bool], Counter] = {}
        self.last: StepEnergy | None = None

    def new_cache(self):
        return self.model.new_cache()

    @property
    def spikes(self) -> dict[str, Tensor]:
        """{LIF layer: (T, C) bool spikes of the last step's last token}."""
        return self.recorder.spikes

    def __call__(self, idx: Tensor, cache: Any) -> Tensor:
        fixed = self.calibrate(idx.shape[0], idx.shape[1], cache.length == 0) if self.fast else None
        if fixed is None:  # every step counted by count_ops on the deployed model (a copy of the cache)
            self.last = step_energy(self.counted, idx, cache, self.preset, self.memory)
            with self.recorder.recording() as rec, torch.no_grad():
                logits = self.model(idx, cache)
            self.last.firing = dict(rec.firing)
            return logits
        with self.recorder.recording() as rec, torch.no_grad():
            logits = self.model(idx, cache)
        counts = fixed + rec.counts  # Counter addition keeps positive counts: every kind is >= 0 here
        pj = sum(counts.get(kind, 0) * price for kind, price in self.prices.items())
        self.last = StepEnergy(pj, int(idx.numel()), dict(rec.firing))
        return logits

    def calibrate(self, batch: int, tokens: int, fresh: bool) -> Counter | None:
        """The counts of a step of this shape that do not depend on what it computes: count_ops of such a step of
        the deployed model minus the step's own part. Measured on two different steps (other tokens, and after one
        or after three tokens of context): if they differ, some cost of this model depends on its values in a way
        the meter does not record, and from then on every step is counted (None; `why_slow` says so)."""
        key = (batch, tokens, fresh)
        if key not in self.fixed:
            room = self.counted.config.max_len - tokens
            contexts = [0] if fresh else [1, min(3, room)]
            g = torch.Generator().manual_seed(0)
            pasts = (contexts * 2)[:2]
            found = [self._fixed(batch, tokens, past, g if i else None) for i, past in enumerate(pasts)]
            if found[0] != found[1] or any(n < 0 for n in found[0].values()):
                self.fast = False
                self.why_slow = "a cost of this model depends on its values in a way the live meter does not record"
                return None
            self.fixed[key] = found[0]
        return self.fixed[key]

    def _fixed(self, batch: int, tokens: int, past: int, g: torch.Generator | None) -> Counter:
        """count_ops of one step of `tokens` tokens after `past` (token 0, or drawn from g) less its own part."""
        device = next(self.counted.parameters()).device
        vocab = self.counted.config.vocab_size
        ids = torch.zeros(batch, past + tokens, dtype=torch.long) if g is None else torch.randint(
            0, vocab, (batch, past + tokens), generator=g
        )  # fmt: skip
        ids = ids.to(device)
        cache = self.counted.new_cache()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            if past:
                self.counted(ids[:, :past], cache)
            total = Counter(count_ops(self.counted, ids[:, past:], cache=copy.deepcopy(cache)).by_kind())
            with self.reference.recording() as rec:
                self.counted(ids[:, past:], copy.deepcopy(cache))
        total.subtract(rec.counts)
        if not self.memory:
            total.pop("mem", None)  # unpriced: the weight reads are not recorded
        return +total if all(n >= 0 for n in total.values()) else total

    def close(self) -> None:
        for recorder in {id(r): r for r in (self.recorder, self.reference)}.values():
            for hook in recorder.hooks:
                hook.remove()
