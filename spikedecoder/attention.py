"""Causal self-attention: spiking (Spikformer SSA made causal, no softmax) and the ANN's softmax attention.

Both take (T, B, S, E) and an optional per-layer decoding `state` (a dict owned by the caller's cache): with it,
x holds only the new tokens, and the layer reads and extends what it kept from the earlier ones.

Spiking attention has no softmax, so its causal output is a running sum (SPEC section 6):
    y_i = sum_{j<=i} (q_i . k_j) v_j = q_i S_i,   S_i = S_{i-1} + k_i^T v_i   (d_h x d_h spike counts).
Counts are small integers, exact in float32, so the incremental result equals the full one bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SpikeDecoderConfig
from .energy_places import energy_scope
from .layers import ChannelConv, Linear, LinearNorm, TokenShift, make_lif, token_convs
from .norms import LayerNorm, make_norm


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(..., S, E) -> (..., H, S, d_h)"""
    *lead, s, e = x.shape
    return x.reshape(*lead, s, n_head, e // n_head).transpose(-3, -2)


def merge_heads(x: Tensor) -> Tensor:
    """(..., H, S, d_h) -> (..., S, E)"""
    *lead, h, s, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, s, h * d)


def causal_mask(s: int, past: int, device: torch.device, window: int | tuple[int | None, ...] | None = None) -> Tensor:
    """(S, past+S) boolean: query i (at absolute position past+i) sees keys 0..past+i, or only the last `window`;
    a window per head gives (H, S, past+S), None in it meaning the whole context."""
    mask = torch.ones(s, past + s, dtype=torch.bool, device=device).tril(past)
    if window is None:
        return mask
    if isinstance(window, int):
        return mask.triu(past - window + 1)
    return torch.stack([mask if w is None else mask.triu(past - w + 1) for w in window])


def extend_kv(state: dict | None, k: Tensor, v: Tensor, keep: int | None = None) -> tuple[Tensor, Tensor]:
    """Prepend the cached keys/values to the new ones (decoding) and cache the last `keep` (all if None) for the
    next call; without a state, k and v pass through."""
    if state is None:
        return k, v
    if "k" in state:
        k, v = torch.cat([state["k"], k], dim=-2), torch.cat([state["v"], v], dim=-2)
    n = k.shape[-2] if keep is None else keep
    state["k"], state["v"] = k[..., k.shape[-2] - n :, :], v[..., v.shape[-2] - n :, :]
    return k, v


def _conv(conv: ChannelConv | None, z: Tensor, state: dict | None) -> Tensor:
    """z mixed over the last tokens by its per-channel convolution (conv_mode 'channel'), or z as it is."""
    return z if conv is None else conv(z, state)


def _first(xs: Tensor, layer: LinearNorm) -> Tensor:
    """The leading columns of a token shift's output that `layer` reads (its own width of the convolution)."""
    width = layer.linear.in_features
    return xs if xs.shape[-1] == width else xs[..., :width]


class SpikingSelfAttention(nn.Module):
    """x -> LIF (unless x is already spikes) -> Q, K, V = LIF(Norm(Linear(x))) -> scale * causal(Q K^T) V
    -> LIF -> Linear -> Norm.

    Each head sees either the whole context (a running sum, decoded from a fixed d_h x d_h state) or a sliding
    window of its last W tokens (decoded from the last W-1 keys and values). Per head, A V can be corrected by a
    learned score offset b_h (y = sum_j (q.k_j - b_h) v_j = q S - b_h sum_j v_j, so chance coincidences cancel)
    and normalised by the head's coincidence total q.z, z = sum_j k_j (attn_norm='coincidence': a weighted mean of
    the values, whatever the context length). Every sum is of small integers, exact in float32, and the offset and
    division are the same float ops on the same integers in the full forward and in decoding: both agree bit for bit.
    With `binary_scores` (spiking residual degree 2) the score map is itself passed through a LIF, so A V multiplies
    two binary operands; decoding then keeps K and V instead of the running sum.

    Energy places (energy_places.py): Q K^T and its mask are `scores`, A V and the scaling `values`; the
    normaliser's and the offset's sums, products and divisions `state`."""

    energy_group = "attention"

    def __init__(self, cfg: SpikeDecoderConfig, input_spikes: bool, output_lif: bool = False):
        super().__init__()
        e = cfg.n_embd
        self.n_head = cfg.n_head
        self.scale = cfg.scale
        self.in_lif = None if input_spikes else make_lif(cfg, e, "attn_in")
        key_width = max(cfg.token_conv, 2 if cfg.attn_key_conv else 1)  # the key convolution reads 2 tokens
        reads, self.q_conv = token_convs(cfg, cfg.token_conv, e, "q_conv", "qkv")
        key_reads, self.k_conv = token_convs(cfg, key_width, e, "k_conv", "qkv")
        self.v_conv = token_convs(cfg, cfg.token_conv, e, "v_conv", "qkv")[1]
        self.shift = TokenShift(max(reads, key_reads), "attn_shift")
        self.q, self.v = (LinearNorm(reads * e, e, cfg.norm, cfg.bias) for _ in range(2))
        self.k = LinearNorm(key_reads * e, e, cfg.norm, cfg.bias)
        self.q.energy_place = self.k.energy_place = self.v.energy_place = "qkv"
        if cfg.attn_key_init == "previous":
            self._key_reads_previous_query()
        self.q_lif, self.k_lif, self.v_lif = (make_lif(cfg, e, "qkv") for _ in range(3))
        self.binary_scores = cfg.residual == 2
        windows = cfg.head_windows
        self.windows = tuple(windows)
        self.long = [h for h, w in enumerate(windows) if w is None]
        self.local = [h for h, w in enumerate(windows) if w is not None]
        local = tuple(windows[h] for h in self.local)
        self.local_window = local[0] if len(set(local)) == 1 else local
        self.keep = max(local, default=1) - 1  # keys a local head still needs from the past
        self.narrowest = min(local, default=1)  # keys every local head sees
        self.register_buffer("inverse", torch.tensor(self.long + self.local).argsort(), persistent=False)
        self.coincidence_norm = cfg.attn_norm == "coincidence"
        # the event engine (events.py) sets it: decoding touches only active state rows and builds no all-ones mask
        self.sparse_state = False
        self.binary_qkv = cfg.qkv_levels == 1  # the sparse step reads and writes rows of binary features only
        self.power = cfg.attn_power
        self.offset = nn.Parameter(torch.zeros(cfg.n_head, 1, 1)) if cfg.attn_offset else None
        self.score_lif = make_lif(cfg, None, "scores") if self.binary_scores else None
        self.score_gain = cfg.tau if cfg.decay_input else 1.0
        self.av_norm = make_norm(cfg.norm, e) if cfg.av_norm else None
        self.attn_lif = make_lif(cfg, e, "attn_out")
        self.proj = LinearNorm(e, e, cfg.norm, cfg.bias)
        self.proj.energy_place = "proj"
        self.out_lif = make_lif(cfg, e, "first_attn_out") if output_lif else None

    @torch.no_grad()
    def _key_reads_previous_query(self) -> None:
        """attn_key_init='previous': the key of token j starts as the query code of token j-1 (the key
        convolution's previous-token half copies the query weights, its current-token half starts at zero), so
        q_i . k_j is largest where token j-1 equals token i: an induction lookup present at initialisation, which
        training may keep or change."""
        e = self.q.linear.in_features
        self.k.linear.weight[:, :e] = 0.0
        self.k.linear.weight[:, e:] = self.q.linear.weight
        if self.k.linear.bias is not None:
            self.k.linear.bias.copy_(self.q.linear.bias)

    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        if self.in_lif is not None:
            x = self.in_lif(x)
        xs = self.shift(x, state)  # [x_i, x_{i-1}, ...]: each projection reads its first token_conv (key: more)
        q, k, v = (
            split_heads(lif(_conv(conv, layer(_first(xs, layer)), state)), self.n_head)  # (T, B, H, S, d_h) spikes
            for layer, conv, lif in ((self.q, self.q_conv, self.q_lif), (self.k, self.k_conv, self.k_lif),
                                     (self.v, self.v_conv, self.v_lif))
        )  # fmt: skip
        if self.binary_scores:
            y = self._binary_scores(q, k, v, state)
        elif not self.local:
            y = self._running_sum(q, k, v, state)
        elif not self.long:
            y = self._window(q, k, v, state)
        else:  # dual path: long-range heads and window heads side by side
            pick = [torch.tensor(h, device=q.device) for h in (self.long, self.local)]
            long = self._running_sum(*(t.index_select(2, pick[0]) for t in (q, k, v)), state)
            local = self._window(*(t.index_select(2, pick[1]) for t in (q, k, v)), state)
            y = torch.cat([long, local], dim=2).index_select(2, self.inverse)
        with energy_scope("values"):
            y = merge_heads(y) * self.scale
        if self.av_norm is not None:
            y = self.av_norm(y)
        y = self.attn_lif(y)
        y = self.proj(y)
        return self.out_lif(y) if self.out_lif is not None else y

    def _scores(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        """Coincidence counts q.k, future (and out-of-window) pairs zeroed (no mask: every pair kept); with
        attn_power = 2 their squares (q.k)^2 = pairs(q).pairs(k), where pairs(x) is the AND of every two channels:
        still binary features."""
        with energy_scope("scores"):
            scores = q @ k.transpose(-1, -2)
            scores = scores if mask is None else scores * mask
            return scores * scores if self.power == 2 else scores

    def _features(self, x: Tensor) -> Tensor:
        """The binary feature map whose dot products are the scores: x itself, or the AND of every pair of its
        channels for attn_power = 2 (d_h^2 features, so the decoding state is d_h^2 x d_h)."""
        return (x[..., :, None] * x[..., None, :]).flatten(-2) if self.power == 2 else x

    def _running_sum(self, q: Tensor, k: Tensor, v: Tensor, state: dict | None) -> Tensor:
        """Whole-context heads: y_i = phi(q_i) S_i, S_i = sum_{j<=i} phi(k_j)^T v_j; decoding keeps S (and z,
        sum v). phi is the identity unless attn_power = 2."""
        scores = self._scores(q, k, causal_mask(q.shape[-2], 0, q.device))
        if state is not None and self.sparse_state and self.binary_qkv and "kv" in state and q.shape[-2] == 1:
            return self._sparse_step(scores, q, k, v, state)
        if state is not None:
            with energy_scope("scores"):
                q, k = self._features(q), self._features(k)
        with energy_scope("values"):
            y = scores @ v
            if state is not None:
                if "kv" in state:
                    y = y + q @ state["kv"]
                state["kv"] = k.transpose(-1, -2) @ v + (state["kv"] if "kv" in state else 0)
        with energy_scope("state"):
            den = scores.sum(-1, keepdim=True) if self.coincidence_norm else None
            vsum = v.cumsum(-2) if self.offset is not None else None
            if state is not None:
                if "z" in state:
                    den = den + q @ state["z"] if den is not None else None
                    vsum = vsum + state["vsum"] if vsum is not None else None
                state["z"] = k.sum(-2)[..., None] + (state["z"] if "z" in state else 0)
                state["vsum"] = v.sum(-2, keepdim=True) + (state["vsum"] if "vsum" in state else 0)
            return self._finish(y, den, vsum, self.long)

    def _sparse_step(self, scores: Tensor, q: Tensor, k: Tensor, v: Tensor, state: dict) -> Tensor:
        """One decoded token through the whole-context state, event-driven (sparse_state): read the state rows of
        the active query features and add the value into the rows of the active key features, in place, instead of
        the dense q @ kv and k^T v + kv over all d_h (or d_h^2) rows. Every sum is of small integers (binary
        features, spike values), so the result is the dense step's exactly."""
        qf, kf = self._features(q), self._features(k)  # (T, B, H, 1, F) binary
        if not state.get("sparse"):  # the dense prefill made these tensors: own them before updating in place
            state["kv"], state["z"], state["sparse"] = state["kv"].clone(), state["z"].clone(), True
        kv, z = state["kv"], state["z"]
        groups, features, d = qf.shape[:-2].numel(), qf.shape[-1], v.shape[-1]
        rows, counts = kv.view(groups * features, d), z.view(groups * features)
        group, feature = qf.reshape(groups, features).nonzero(as_tuple=True)
        read = group * features + feature
        y = (scores @ v).reshape(groups, d).index_add_(0, group, rows.index_select(0, read))
        den = None
        if self.coincidence_norm:
            den = scores.sum(-1).reshape(groups).index_add_(0, group, counts.index_select(0, read))
            den = den.view(*qf.shape[:-1], 1)
        state["vsum"] = v + state["vsum"]  # the one new token's value: its cumulative sum is itself
        group, feature = kf.reshape(groups, features).nonzero(as_tuple=True)
        write = group * features + feature
        rows.index_add_(0, write, v.reshape(groups, d).index_select(0, group))
        counts.index_add_(0, write, torch.ones_like(write, dtype=counts.dtype))
        return self._finish(y.view_as(v), den, state["vsum"] if self.offset is not None else None, self.long)

    def _window(self, q: Tensor, k: Tensor, v: Tensor, state: dict | None) -> Tensor:
        """Window heads: an explicit score map over the last W keys; decoding keeps the last W-1 keys and values
        (O(W) per token, still exact)."""
        k, v = extend_kv(state, k, v, self.keep)
        if self.sparse_state and q.shape[-2] == 1 and k.shape[-2] <= self.narrowest and self.offset is None:
            return self._window_step(q, k, v)
        mask = causal_mask(q.shape[-2], k.shape[-2] - q.shape[-2], q.device, self.local_window)
        scores = self._scores(q, k, mask)
        with energy_scope("values"):
            y = scores @ v
        with energy_scope("state"):
            den = scores.sum(-1, keepdim=True) if self.coincidence_norm else None
            vsum = mask.to(v.dtype) @ v if self.offset is not None else None
            return self._finish(y, den, vsum, self.local)

    def _window_step(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One decoded token whose every kept key lies in its window (the event engine's step): the mask would be
        all ones, and multiplying by it changes nothing, so no mask is built."""
        scores = self._scores(q, k, None)
        y = scores @ v
        return self._finish(y, scores.sum(-1, keepdim=True) if self.coincidence_norm else None, None, self.local)

    def _finish(self, y: Tensor, den: Tensor | None, vsum: Tensor | None, heads: list[int]) -> Tensor:
        if vsum is not None:
            offset = self.offset if len(heads) == self.n_head else self.offset[heads]
            y = y - offset * vsum
        if den is not None:
            y = y / den.clamp(min=1)
        return y

    def _binary_scores(self, q: Tensor, k: Tensor, v: Tensor, state: dict | None) -> Tensor:
        """Degree 2: a LIF on every coincidence count, so the explicit score map is needed; decoding keeps K and V
        (all of them if a head sees the whole context, else the last W-1). Offset and normaliser apply to the binary
        scores as to the counts. The gain (tau with decay_input, else 1) brings a count of v_threshold to the
        threshold at the first step: a score spikes where q and k share at least v_threshold active channels (one,
        at the default)."""
        k, v = extend_kv(state, k, v, None if self.long else self.keep)
        past = k.shape[-2] - q.shape[-2]
        window = None if not self.local else self.local_window if not self.long else self.windows
        mask = causal_mask(q.shape[-2], past, q.device, window)
        with energy_scope("scores"):
            scores = self.score_lif((q @ k.transpose(-1, -2)) * mask * self.score_gain)
        with energy_scope("values"):
            y = scores @ v
        with energy_scope("state"):
            den = scores.sum(-1, keepdim=True) if self.coincidence_norm else None
            vsum = mask.to(v.dtype) @ v if self.offset is not None else None
            return self._finish(y, den, vsum, list(range(self.n_head)))


class SoftmaxAttention(nn.Module):
    """The ANN's pre-LayerNorm causal softmax attention with 1/sqrt(d_h) scaling; decoding keeps a KV cache (the
    last W-1 keys and values where every head has a window W). `attn_window` and `token_conv` give it the same
    inputs as a spiking variant, so the cost of spiking and the cost of context are measured apart.
    The fused kernel's two products are charged to `scores` and `values` by the energy counter."""

    energy_group = "attention"

    def __init__(self, cfg: SpikeDecoderConfig):
        super().__init__()
        e = cfg.n_embd
        self.n_head = cfg.n_head
        self.ln = LayerNorm(e)
        reads, self.qkv_conv = token_convs(cfg, cfg.token_conv, 3 * e, "qkv_conv", "qkv")
        self.shift = TokenShift(reads, "attn_shift")
        self.qkv = Linear(reads * e, 3 * e, bias=cfg.bias)
        windows = cfg.head_windows
        self.window = None if set(windows) == {None} else windows[0] if len(set(windows)) == 1 else tuple(windows)
        self.keep = None if None in windows else max(windows) - 1  # keys decoding still needs
        self.proj = Linear(e, e, bias=cfg.bias)
        self.qkv.energy_place, self.proj.energy_place = "qkv", "proj"
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        qkv = _conv(self.qkv_conv, self.qkv(self.shift(self.ln(x), state)), state)
        q, k, v = (split_heads(t, self.n_head) for t in qkv.chunk(3, dim=-1))
        k, v = extend_kv(state, k, v, self.keep)
        s, past = q.shape[-2], k.shape[-2] - q.shape[-2]
        mask = causal_mask(s, past, x.device, self.window)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=1 / math.sqrt(q.shape[-1]))
        return F.dropout(self.proj(merge_heads(y)), drop, self.training)
